/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Refusing a client at once when a service has no ready backend, as kube-proxy does:
 * TCP gets a RST, UDP an ICMP port unreachable, both from the service address. The
 * client's own packet is rewritten into the answer and sent straight back into the
 * client's pod (we run at ingress of its host-side veth).
 */
#ifndef ATOMNET_REJECT_H
#define ATOMNET_REJECT_H

#include <linux/if_ether.h>
#include "csum.h"
#include "flow.h"

#define IP_DF 0x4000
#define REPLY_TTL 64
#define ICMP_ERR_INNER_LEN 28	/* the offending IP header (no options) + 8 bytes of L4 */

struct pseudo_hdr {
	__be32 saddr;
	__be32 daddr;
	__u8  zero;
	__u8  proto;
	__be16 len;
};

static __always_inline void reply_ip(struct iphdr *ip, __be32 saddr, __be32 daddr, __u8 proto, __u16 len)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 4;
	ip->ihl = 5;
	ip->tot_len = bpf_htons(len);
	ip->frag_off = bpf_htons(IP_DF);
	ip->ttl = REPLY_TTL;
	ip->protocol = proto;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));
}

static __always_inline int store_reply_eth(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	struct ethhdr eth;

	__builtin_memcpy(eth.h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth.h_source, src, ETH_ALEN);
	eth.h_proto = bpf_htons(ETH_P_IP);
	return bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0);
}

/* Returns the tc verdict; the caller counted the rejection. */
static __always_inline int reject_tcp(struct __sk_buff *skb)
{
	struct headers h;
	struct tcphdr *t, rst = {};
	struct iphdr ip;
	struct pseudo_hdr ph = {};
	__u8 mac_dst[ETH_ALEN], mac_src[ETH_ALEN];
	__u32 payload;
	__s64 sum;

	if (parse(skb, &h) != PARSE_IPV4 || h.ip->ihl != 5)
		return TC_ACT_SHOT;
	t = (void *)(h.ip + 1);
	if ((void *)(t + 1) > (void *)(long)skb->data_end || t->rst)
		return TC_ACT_SHOT;	/* never answer a RST */
	payload = bpf_ntohs(h.ip->tot_len) - sizeof(struct iphdr) - t->doff * 4;
	rst.source = t->dest;
	rst.dest = t->source;
	rst.doff = sizeof(rst) / 4;
	rst.rst = 1;
	if (t->ack) {
		rst.seq = t->ack_seq;
	} else {
		rst.ack = 1;
		rst.ack_seq = bpf_htonl(bpf_ntohl(t->seq) + payload + t->syn + t->fin);
	}
	__builtin_memcpy(mac_dst, h.eth->h_source, ETH_ALEN);
	__builtin_memcpy(mac_src, h.eth->h_dest, ETH_ALEN);
	reply_ip(&ip, h.ip->daddr, h.ip->saddr, IPPROTO_TCP, sizeof(ip) + sizeof(rst));
	ph.saddr = ip.saddr;
	ph.daddr = ip.daddr;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(rst));
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&rst, sizeof(rst), sum);
	rst.check = csum_fold(sum);

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip) + sizeof(rst), 0) < 0 ||
	    store_reply_eth(skb, mac_dst, mac_src) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &rst, sizeof(rst), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

struct icmp_reply {
	struct icmphdr icmp;
	__u8 inner[ICMP_ERR_INNER_LEN];
};

static __always_inline int reject_udp(struct __sk_buff *skb)
{
	struct headers h;
	struct icmp_reply r = {};
	struct iphdr ip;
	__u8 mac_dst[ETH_ALEN], mac_src[ETH_ALEN];
	__be32 saddr, daddr;

	if (parse(skb, &h) != PARSE_IPV4 || h.ip->ihl != 5)
		return TC_ACT_SHOT;
	__builtin_memcpy(mac_dst, h.eth->h_source, ETH_ALEN);
	__builtin_memcpy(mac_src, h.eth->h_dest, ETH_ALEN);
	saddr = h.ip->daddr;
	daddr = h.ip->saddr;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, r.inner, sizeof(r.inner)) < 0)
		return TC_ACT_SHOT;
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_PORT_UNREACH;
	r.icmp.checksum = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&r, sizeof(r), 0));
	reply_ip(&ip, saddr, daddr, IPPROTO_ICMP, sizeof(ip) + sizeof(r));

	/* Room for the new IP + ICMP headers in front of the offending header, then cut the rest. */
	if (bpf_skb_adjust_room(skb, sizeof(ip) + sizeof(struct icmphdr), BPF_ADJ_ROOM_MAC, 0) < 0 ||
	    bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip) + sizeof(r), 0) < 0 ||
	    store_reply_eth(skb, mac_dst, mac_src) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &r, sizeof(r), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

#endif
