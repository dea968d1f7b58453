/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The cluster DNS fast path at from_pod: a pod's A query for a cluster name is answered
 * here, from the dns_names map, without reaching the node's server (ctl/dns/server.py).
 *
 * Only the plain shape is answered, and the answer is byte for byte what the server says
 * for the same query (tests/prog/test_dns.py compares them): one question, QTYPE A,
 * QCLASS IN, opcode QUERY, QR and TC clear, no answer/authority records, no compression in
 * the question, a name of at most DNS_NAME_KEY_LEN bytes, and either no additional record
 * or exactly one EDNS OPT RR (version 0) that carries nothing or only a client cookie
 * (dig's default). The reply is the query rewritten in place:
 *   header   QR AA RA set, RD copied, every other flag and the rcode 0, ANCOUNT 1;
 *   question unchanged (the client's case is kept);
 *   answer   a pointer to the question's name (0xc00c), A IN, the map's TTL and address;
 *   OPT      (if the query had one) UDP size DNS_OUR_PAYLOAD, no flags, no options, as the
 *            server's dnspython answers (it does not echo cookies or the DO bit);
 * IP and UDP addresses, ports and lengths swapped/fixed, checksums computed anew, and the
 * frame sent straight back into the pod (bpf_redirect_peer), as reject.h does.
 * Anything else (AAAA, ANY, several questions, pointers, long names, names the map lacks:
 * NXDOMAIN/NODATA and search-path misses are the server's to say) goes on untouched to
 * the stack and the server; both outcomes are counted.
 */
#ifndef ATOMNET_DNS_H
#define ATOMNET_DNS_H

#include <linux/in.h>
#include <linux/udp.h>
#include "counters.h"
#include "reject.h"

#define DNS_PORT 53
#define DNS_OUR_PAYLOAD 1232		/* ctl/dns/server.py OUR_PAYLOAD: the EDNS size the server offers */
#define DNS_HDR_LEN 12
#define DNS_QFIXED_LEN 4		/* QTYPE + QCLASS */
#define DNS_ANSWER_LEN 16		/* pointer, type, class, TTL, rdlength, IPv4 */
#define DNS_OPT_LEN 11			/* an OPT RR without options */
#define DNS_COOKIE_OPT_LEN 12		/* option code, length, 8-byte client cookie */
#define DNS_MAX_LABELS (DNS_NAME_KEY_LEN / 2)
#define DNS_MSG_OFF (ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr))

#define DNS_F_QR 0x8000
#define DNS_F_OPCODE 0x7800
#define DNS_F_AA 0x0400
#define DNS_F_TC 0x0200
#define DNS_F_RD 0x0100
#define DNS_F_RA 0x0080
#define DNS_TYPE_A 1
#define DNS_CLASS_IN 1
#define DNS_TYPE_OPT 41
#define DNS_OPT_COOKIE 10
#define DNS_CLIENT_COOKIE 8

/* libbpf's barrier_var: the bound checked next is the one the verifier sees at the use. */
#define dns_bound(var) asm volatile("" : "+r"(var))


struct dnshdr {
	__be16 id;
	__be16 flags;
	__be16 qdcount;
	__be16 ancount;
	__be16 nscount;
	__be16 arcount;
};

/* An OPT RR as a query carries it, with room for one option header. */
struct dns_opt {
	__u8  name;			/* the root: 0 */
	__be16 type;
	__be16 udp_size;
	__u8  ext_rcode;
	__u8  version;
	__be16 flags;
	__be16 rdlen;
	__be16 opt_code;
	__be16 opt_len;
} __attribute__((packed));

struct dns_tail {			/* answer RR + our OPT RR, as they follow the question */
	__be16 ptr;
	__be16 type;
	__be16 class;
	__be32 ttl;
	__be16 rdlen;
	__be32 ip;
	struct {
		__u8  name;
		__be16 type;
		__be16 udp_size;
		__be32 ttl;		/* extended rcode 0, version 0, no flags */
		__be16 rdlen;
	} __attribute__((packed)) opt;
} __attribute__((packed));

struct dns_udp_csum {			/* what the UDP checksum covers before the message */
	struct pseudo_hdr ph;
	struct udphdr udp;
};

/*
 * Returns the length of the reply message built in s->msg, or 0:
 * not the plain shape or not a name of ours. Reads only; the packet is untouched.
 */
static __always_inline __u64 dns_build(struct __sk_buff *skb, struct dns_scratch *s, __u64 msg_len)
{
	struct dnshdr q;
	struct dns_opt opt = {};
	struct dns_name_value *v;
	struct dns_tail t = {};
	__be16 qfixed[2];
	__u64 n, off = 0, namelen = 0, tail, edns, qlen, out_len;
	int i;

	if (msg_len < DNS_HDR_LEN + 1 + DNS_QFIXED_LEN || msg_len > DNS_MSG_MAX + DNS_COOKIE_OPT_LEN)
		return 0;
	if (bpf_skb_load_bytes(skb, DNS_MSG_OFF, &q, sizeof(q)) < 0)
		return 0;
	if (q.flags & bpf_htons(DNS_F_QR | DNS_F_OPCODE | DNS_F_TC) || q.qdcount != bpf_htons(1) ||
	    q.ancount || q.nscount || bpf_ntohs(q.arcount) > 1)
		return 0;

	/* The name: copy what may be it into the reply (the question is echoed as sent), walk
	 * its labels there, then make the key from it. */
	__builtin_memset(s->msg, 0, sizeof(s->msg));
	n = msg_len - DNS_HDR_LEN;
	if (n > DNS_NAME_KEY_LEN)
		n = DNS_NAME_KEY_LEN;
	dns_bound(n);
	if (n < 1 || n > DNS_NAME_KEY_LEN)
		return 0;
	if (bpf_skb_load_bytes(skb, DNS_MSG_OFF + DNS_HDR_LEN, s->msg + DNS_HDR_LEN, n) < 0)
		return 0;
	for (i = 0; i < DNS_MAX_LABELS; i++) {
		__u8 len;

		if (off >= n)
			return 0;	/* runs past the message or the key: the server's */
		len = s->msg[DNS_HDR_LEN + (off & (DNS_NAME_KEY_LEN - 1))];
		if (len == 0) {
			namelen = off + 1;
			break;
		}
		if (len & 0xc0)
			return 0;	/* a compression pointer (or an extended label type) */
		off += len + 1;
	}
	if (namelen == 0 || namelen > DNS_NAME_KEY_LEN)
		return 0;
	/* Each way out of the walk gives namelen its own range, and the verifier would check
	 * all that follows once per way: a trip through memory makes it one unknown value. */
	s->namelen = namelen;
	namelen = *(volatile __u32 *)&s->namelen;
	if (namelen == 0 || namelen > DNS_NAME_KEY_LEN)
		return 0;
	/* The key: the name, zero-padded, letters lower-cased eight at a time without a
	 * branch (label lengths are at most 63, below 'A', so they are left alone). */
	__builtin_memset(s->key.name, 0, sizeof(s->key.name));
	if (bpf_skb_load_bytes(skb, DNS_MSG_OFF + DNS_HDR_LEN, s->key.name, namelen) < 0)
		return 0;
#pragma unroll
	for (i = 0; i < DNS_NAME_KEY_LEN / 8; i++) {
		__u64 w = ((__u64 *)s->key.name)[i];
		__u64 low7 = w & 0x7f7f7f7f7f7f7f7fULL;
		__u64 ge_a = low7 + 0x3f3f3f3f3f3f3f3fULL;	/* high bit set where byte >= 'A' */
		__u64 gt_z = low7 + 0x2525252525252525ULL;	/* high bit set where byte > 'Z' */
		__u64 upper = (ge_a & ~gt_z & ~w) & 0x8080808080808080ULL;

		((__u64 *)s->key.name)[i] = w | (upper >> 2);	/* + 0x20 */
	}

	qlen = namelen + DNS_QFIXED_LEN;
	if (msg_len < DNS_HDR_LEN + qlen)
		return 0;
	if (bpf_skb_load_bytes(skb, DNS_MSG_OFF + DNS_HDR_LEN + namelen, qfixed, sizeof(qfixed)) < 0)
		return 0;
	if (qfixed[0] != bpf_htons(DNS_TYPE_A) || qfixed[1] != bpf_htons(DNS_CLASS_IN))
		return 0;

	/* What follows the question: nothing, or one OPT RR with no option or a client cookie. */
	tail = msg_len - DNS_HDR_LEN - qlen;
	edns = q.arcount != 0;
	if (!edns) {
		if (tail)
			return 0;
	} else {
		if (tail != DNS_OPT_LEN && tail != DNS_OPT_LEN + DNS_COOKIE_OPT_LEN)
			return 0;
		if (bpf_skb_load_bytes(skb, DNS_MSG_OFF + DNS_HDR_LEN + qlen, &opt,
				       tail == DNS_OPT_LEN ? DNS_OPT_LEN : sizeof(opt)) < 0)
			return 0;
		if (opt.name || opt.type != bpf_htons(DNS_TYPE_OPT) || opt.version ||
		    bpf_ntohs(opt.rdlen) != tail - DNS_OPT_LEN)
			return 0;
		if (opt.rdlen && (opt.opt_code != bpf_htons(DNS_OPT_COOKIE) ||
				  opt.opt_len != bpf_htons(DNS_CLIENT_COOKIE)))
			return 0;
	}

	v = bpf_map_lookup_elem(&dns_names, &s->key);
	if (!v)
		return 0;

	/* The reply: header, the question already in place, then answer and OPT RRs. The
	 * bytes after them stay zero: the checksum sums the message padded to 4 bytes. */
	q.flags = bpf_htons(DNS_F_QR | DNS_F_AA | DNS_F_RA) | (q.flags & bpf_htons(DNS_F_RD));
	q.ancount = bpf_htons(1);
	__builtin_memcpy(s->msg, &q, sizeof(q));
	t.ptr = bpf_htons(0xc000 | DNS_HDR_LEN);
	t.type = bpf_htons(DNS_TYPE_A);
	t.class = bpf_htons(DNS_CLASS_IN);
	t.ttl = bpf_htonl(v->ttl);
	t.rdlen = bpf_htons(4);
	t.ip = v->ip;
	if (edns) {
		t.opt.type = bpf_htons(DNS_TYPE_OPT);
		t.opt.udp_size = bpf_htons(DNS_OUR_PAYLOAD);
	}
	off = DNS_HDR_LEN + qlen;
	dns_bound(off);
	if (off > DNS_MSG_MAX - sizeof(t))
		return 0;
	__builtin_memcpy(s->msg + off, &t, sizeof(t));
	out_len = off + DNS_ANSWER_LEN + (edns ? DNS_OPT_LEN : 0);
	return out_len;
}

/* The UDP checksum of the reply, from scratch: pseudo header, UDP header, message. */
static __always_inline __u16 dns_udp_csum(struct dns_scratch *s, __be32 saddr, __be32 daddr, __be16 sport,
					  __be16 dport, __u64 msg_len)
{
	struct dns_udp_csum c = {};
	__u64 padded = (msg_len + 3) & ~3ULL;	/* 64-bit: the bound check and the use stay one register */
	__s64 sum;
	__u16 folded;

	c.ph.saddr = saddr;
	c.ph.daddr = daddr;
	c.ph.proto = IPPROTO_UDP;
	c.ph.len = bpf_htons(sizeof(struct udphdr) + msg_len);
	c.udp.source = sport;
	c.udp.dest = dport;
	c.udp.len = c.ph.len;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&c, sizeof(c), 0);
	dns_bound(padded);
	if (padded > DNS_MSG_MAX)
		return 0;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)s->msg, padded, sum);
	folded = csum_fold(sum);
	return folded ? folded : 0xffff;	/* 0 would mean "no checksum" */
}

/* 1 with *verdict set for a query answered here (or dropped mid-rewrite); 0: route it on,
 * untouched. (A flag, not a sentinel verdict: the verifier cannot know that no helper's
 * return value equals the sentinel, and would follow the old packet pointers after one.) */
static __always_inline int dns_fast_path(struct __sk_buff *skb, struct headers *h, int *verdict)
{
	struct iphdr *ip = h->ip;
	__u32 zero = 0;
	__u64 msg_len, out_len;
	struct dns_config *cfg;
	struct dns_scratch *s;
	struct udphdr udp;
	struct iphdr rip;
	__u8 mac_dst[ETH_ALEN], mac_src[ETH_ALEN];
	__be32 client, vip;

	if (ip->protocol != IPPROTO_UDP)
		return 0;
	cfg = bpf_map_lookup_elem(&dns_config, &zero);
	if (!cfg || !cfg->vip || ip->daddr != cfg->vip || (bpf_ntohs(ip->frag_off) & IP_OFFSET))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + ip->ihl * 4, &udp, sizeof(udp)) < 0 ||
	    udp.dest != bpf_htons(DNS_PORT))
		return 0;

	/* A query for the node's server: answered here, or counted as passed on. */
	s = bpf_map_lookup_elem(&dns_scratch, &zero);
	msg_len = bpf_ntohs(udp.len) - sizeof(udp);
	if (!s || ip->ihl != 5 || (bpf_ntohs(ip->frag_off) & IP_MF) ||
	    bpf_ntohs(udp.len) != bpf_ntohs(ip->tot_len) - sizeof(*ip) || bpf_ntohs(udp.len) < sizeof(udp))
		goto pass;
	out_len = dns_build(skb, s, msg_len);
	dns_bound(out_len);
	if (!out_len || out_len > DNS_MSG_MAX)
		goto pass;

	client = ip->saddr;
	vip = ip->daddr;
	__builtin_memcpy(mac_dst, h->eth->h_source, ETH_ALEN);
	__builtin_memcpy(mac_src, h->eth->h_dest, ETH_ALEN);
	reply_ip(&rip, vip, client, IPPROTO_UDP, sizeof(rip) + sizeof(udp) + out_len);
	udp.check = dns_udp_csum(s, vip, client, udp.dest, udp.source, out_len);
	udp.len = bpf_htons(sizeof(udp) + out_len);
	{
		__be16 port = udp.source;

		udp.source = udp.dest;
		udp.dest = port;
	}
	/* From here the packet is rewritten: a failure can only drop it. */
	if (bpf_skb_change_tail(skb, DNS_MSG_OFF + out_len, 0) < 0 ||
	    store_reply_eth(skb, mac_dst, mac_src) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &rip, sizeof(rip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(rip), &udp, sizeof(udp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, DNS_MSG_OFF, s->msg, out_len, 0) < 0)
	{
		*verdict = drop(skb, CTR_DROP_NAT_FAILED);
		return 1;
	}
	count(skb, CTR_DNS_FAST_ANSWER);
	*verdict = bpf_redirect_peer(skb->ifindex, 0);
	return 1;
pass:
	count(skb, CTR_DNS_FAST_PASS);
	return 0;
}

#endif
