/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Masquerade: a local pod's packet leaving the cluster through the uplink gets this
 * node's address and a port of this node as its source (to_netdev, tc egress), and the
 * replies get the pod's tuple back before the stack sees them (from_netdev, tc ingress).
 *
 * Each masqueraded flow is two conntrack entries, created together:
 *   CT_SNAT_OUT  (pod, remote, pod port, remote port)   -> nat = node IP, node port
 *   CT_SNAT_IN   (remote, node IP, remote port, node port) -> nat = pod IP, pod port
 * The CT_SNAT_IN key is also the claim on the node port: a port is free towards one
 * destination (remote IP, remote port, protocol) when no live CT_SNAT_IN entry holds it.
 * ICMP echo uses its identifier as the port (the request's source port, the reply's
 * destination port). Both entries age together (every packet refreshes both), with the
 * TCP/UDP timeouts of conntrack.h.
 *
 * Taking a port over (snat_claim): an absent claim is inserted with BPF_NOEXIST; an
 * expired one, or (for a new TCP connection, after SNAT_FREE_TRIES candidates) one whose
 * connection is over (RST, or FIN both ways: never a half-closed one, whose other side
 * still sends) and quiet for SNAT_REUSE_QUIET_NS, is taken by the one CPU whose
 * compare-and-swap of its stamp succeeds. The quiet time lets the old connection's last
 * packets (its RST, which a SYN sent from the other CPU could overtake on the way) reach
 * the server first; it also makes a just-taken claim look fresh to any other CPU.
 *
 * Ports come from config.snat_port_min..max, which the daemon chooses outside the node's
 * ephemeral range and the NodePort range; a candidate that is a published host port
 * (a services frontend on the node's address) is skipped. The node's own flows that use
 * a port inside that range (an explicit bind) claim it with a CT_F_HOST entry, so no pod
 * flow is given it and their replies pass untouched.
 */
#ifndef ATOMNET_SNAT_H
#define ATOMNET_SNAT_H

#include "route.h"

/* Hash-derived candidates tried before a counted drop. Drops go as p^n, p the share of ports
 * whose connection is open or ended less than SNAT_REUSE_QUIET_NS ago: with 16 candidates, at
 * 10 000 connections/s to one destination on a loaded machine (p ~ 0.4), about 1 SYN in
 * 30 000 was dropped (and retransmitted by the pod 1 s later); with 64, p^60 is ~1e-22 there
 * and a range 90 % busy still drops only ~1 in 550. (The kernel's NAT tries at most 128,
 * nf_nat_l4proto_unique_tuple; each candidate here costs the verifier ~2 500 instructions.) */
#define SNAT_CANDIDATES 64
#define SNAT_FREE_TRIES 4	/* candidates that must be free (or expired) before ended connections' ports are retaken */
/* An ended connection's port is retaken only after this long without a packet: a range of
 * R ports then sustains about R / 0.1 s new connections/s to one destination (4536 -> 45 000). */
#define SNAT_REUSE_QUIET_NS (100 * 1000 * 1000ULL)
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define ICMP_ID_OFF 4		/* the echo identifier, within struct icmphdr */

enum snat_result {
	SNAT_PASS,		/* not masqueraded: leave the packet alone */
	SNAT_TRANSLATED,
	SNAT_EXHAUSTED,		/* no free port towards this destination */
	SNAT_FRAGMENT,		/* a later fragment of a flow never seen */
	SNAT_FAILED,		/* a rewrite failed */
};

/* The config when masquerading is on and fully programmed, else NULL. */
static __always_inline struct config *snat_config(void)
{
	struct config *cfg = load_config();

	if (!cfg || !(cfg->flags & CFG_F_MASQUERADE) || !cfg->masq_ip || !cfg->snat_port_min ||
	    cfg->snat_port_max < cfg->snat_port_min)
		return NULL;
	return cfg;
}

/* Cluster network, services, nodes and the no-masquerade CIDRs keep the pod's address. */
static __always_inline int snat_excluded(__be32 daddr)
{
	struct snat_exclude_key k = { .prefixlen = 32, .ip = daddr };

	return bpf_map_lookup_elem(&snat_exclude, &k) != NULL;
}

static __always_inline int snat_port_in_range(const struct config *cfg, __be16 port)
{
	__u16 p = bpf_ntohs(port);

	return p >= cfg->snat_port_min && p <= cfg->snat_port_max;
}

/* A fast "not ours" for the bulk of the node's own traffic (VXLAN, its own connections)
 * before the full parse: an unfragmented TCP/UDP packet whose node-side port (source
 * outbound, destination inbound) is outside the masquerade range. */
static __always_inline int snat_port_outside_range(struct __sk_buff *skb, const struct headers *h,
						   const struct config *cfg, int outbound)
{
	__be16 port;

	if ((h->ip->protocol != IPPROTO_TCP && h->ip->protocol != IPPROTO_UDP) ||
	    (bpf_ntohs(h->ip->frag_off) & (IP_MF | IP_OFFSET)))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + h->ip->ihl * 4 + (outbound ? 0 : 2), &port, sizeof(port)) < 0)
		return 0;
	return !snat_port_in_range(cfg, port);
}

/* Gives an ICMP echo its identifier as port; 0 when f is a flow masquerade handles
 * (TCP, UDP, ICMP echo request outbound / echo reply inbound). A fragmented echo's first
 * fragment records the identifier in the fragments map, so its later fragments (which
 * flow_parse gives that "port") are translated like it. */
static __always_inline int snat_ports(struct __sk_buff *skb, struct flow *f, int outbound)
{
	struct frag_key k = {};
	struct frag_ports p;
	__be16 id;

	if (f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP)
		return 0;
	if (f->proto != IPPROTO_ICMP)
		return -1;
	if (!f->has_l4)
		return (outbound ? f->sport : f->dport) ? 0 : -1;
	if (f->icmp_type != (outbound ? ICMP_ECHO : ICMP_ECHOREPLY) ||
	    bpf_skb_load_bytes(skb, f->l4_off + ICMP_ID_OFF, &id, sizeof(id)) < 0)
		return -1;
	if (outbound)
		f->sport = id;
	else
		f->dport = id;
	if (f->fragment && bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, id), &k.id, sizeof(k.id)) == 0) {
		k.saddr = f->saddr;
		k.daddr = f->daddr;
		k.proto = IPPROTO_ICMP;
		p.sport = f->sport;
		p.dport = f->dport;
		bpf_map_update_elem(&fragments, &k, &p, BPF_ANY);
	}
	return 0;
}

static __always_inline void snat_in_key(struct ct_key *k, __be32 remote, __be16 remote_port, __be32 node,
					__be16 node_port, __u8 proto)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = remote;
	k->daddr = node;
	k->sport = remote_port;
	k->dport = node_port;
	k->proto = proto;
	k->dir = CT_SNAT_IN;
}

/* Address and port (or echo identifier) of one side, checksums included; f follows. */
static __always_inline int snat_rewrite(struct __sk_buff *skb, struct flow *f, enum nat_side side, __be32 ip,
					__be16 port)
{
	if (f->proto == IPPROTO_ICMP) {
		__be16 old = side == NAT_SRC ? f->sport : f->dport;

		/* The ICMP checksum has no pseudo-header: only the identifier's change counts. */
		if (old != port &&
		    (bpf_l4_csum_replace(skb, f->l4_off + offsetof(struct icmphdr, checksum), old, port, 2) < 0 ||
		     bpf_skb_store_bytes(skb, f->l4_off + ICMP_ID_OFF, &port, 2, 0) < 0))
			return -1;
	}
	return nat_rewrite(skb, f, side, ip, port);	/* for ICMP: the address only */
}

/* A packet of one direction keeps the other direction's entry alive and closing with it. */
static __always_inline void snat_touch_peer(struct ct_entry *peer, const struct flow *f, __u64 now)
{
	peer->last_seen_ns = now;
	if (f->tcp_flags & (TCPF_FIN | TCPF_RST))
		peer->flags |= CT_F_CLOSING;
}

/* The claim (CT_SNAT_IN) records how its connection ends: fin is CT_F_FIN_OUT for the pod's
 * packets, CT_F_FIN_IN for the remote's. */
static __always_inline void snat_note_end(struct ct_entry *in, const struct flow *f, __u8 fin)
{
	if (f->tcp_flags & TCPF_RST)
		in->flags |= CT_F_RST | CT_F_CLOSING;
	if (f->tcp_flags & TCPF_FIN)
		in->flags |= fin | CT_F_CLOSING;
}

/* A pod's TCP connection that is over: reset, or finished both ways. */
static __always_inline int snat_ended(const struct ct_entry *in)
{
	return !(in->flags & CT_F_HOST) &&
	       ((in->flags & CT_F_RST) || (in->flags & (CT_F_FIN_OUT | CT_F_FIN_IN)) == (CT_F_FIN_OUT | CT_F_FIN_IN));
}

/* A host port forward or NodePort on the node's address owns that port. */
static __always_inline int snat_port_published(__be32 node, __be16 port, __u8 proto)
{
	struct service_key sk = { .vip = node, .port = port, .proto = proto };

	return proto != IPPROTO_ICMP && bpf_map_lookup_elem(&services, &sk) != NULL;
}

/* May the new flow f take over the claim `in`, last stamped `seen`? (See snat_claim.) */
static __always_inline int snat_claimable(const struct ct_entry *in, __u64 seen, __u64 now, const struct flow *f,
					  int ended_too)
{
	__u64 quiet = ct_quiet_for(seen, now);

	return quiet > ct_timeout(in, f->proto) ||
	       (ended_too && f->proto == IPPROTO_TCP && (f->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN &&
		snat_ended(in) && quiet >= SNAT_REUSE_QUIET_NS);
}

/*
 * Claims the node port of key ik for the new flow f (entry `fresh`): 0 when it is ours.
 * Absent: inserted with BPF_NOEXIST (of two CPUs, one wins). Present: taken over when
 * expired, or, with `ended_too` and a new TCP connection (a SYN) asking, when its
 * connection ended and has been quiet for SNAT_REUSE_QUIET_NS (the kernel's NAT likewise
 * evicts a closed tuple only when no free port is found first). The take-over is a
 * compare-and-swap of the stamp the decision was made on: of several CPUs only one
 * succeeds, and the claim then looks fresh to the others. (A delete then an insert
 * would let a second CPU that saw the same old claim delete the first one's new claim.)
 * A published port is never claimed; that lookup comes last, as most candidates of a busy
 * range fail on their claim first.
 */
static __always_inline int snat_claim(struct ct_key *ik, const struct ct_entry *fresh, __u64 now,
				      const struct flow *f, int ended_too)
{
	struct ct_entry *in = bpf_map_lookup_elem(&conntrack, ik);
	__u64 seen;

	if (!in)
		return snat_port_published(ik->daddr, ik->dport, ik->proto) ? -1 :
		       bpf_map_update_elem(&conntrack, ik, fresh, BPF_NOEXIST);
	seen = *(volatile __u64 *)&in->last_seen_ns;
	if (!snat_claimable(in, seen, now, f, ended_too))
		return -1;
	if (snat_port_published(ik->daddr, ik->dport, ik->proto) ||
	    __sync_val_compare_and_swap(&in->last_seen_ns, seen, now) != seen)
		return -1;	/* another CPU took it, or the old connection sent a packet */
	in->created_ns = now;
	in->nat_ip = fresh->nat_ip;
	in->nat_port = fresh->nat_port;
	in->flags = fresh->flags;
	in->packets = 0;
	in->bytes = 0;
	return 0;
}

/* Candidate i of the node ports for a flow of hash h. */
static __always_inline __be16 snat_candidate(const struct config *cfg, __u32 span, __u32 h, __u32 i)
{
	return bpf_htons((__u16)(cfg->snat_port_min + mix32(h + i) % span));
}

/*
 * The first candidate from index *from on that snat_claim would take (ended connections'
 * ports too), other than `skip`, or 0; *from is left just past it. Lookups only, in a real
 * loop: claiming inside it made the verifier walk the rest of the program once per
 * candidate (660 000 instructions for 128 candidates).
 */
static __always_inline __be16 snat_search(struct ct_key *ik, const struct config *cfg, __u32 span, __u32 h,
					  const struct flow *f, __u64 now, __u32 *from, __be16 skip)
{
	__u32 i;

#pragma clang loop unroll(disable)
	for (i = *from; i < SNAT_CANDIDATES; i++) {
		__be16 cand = snat_candidate(cfg, span, h, i);
		struct ct_entry *in;

		if (cand == skip)
			continue;
		snat_in_key(ik, f->daddr, f->dport, cfg->masq_ip, cand, f->proto);
		in = bpf_map_lookup_elem(&conntrack, ik);
		if (in ? snat_claimable(in, *(volatile __u64 *)&in->last_seen_ns, now, f, 1) :
			 !snat_port_published(ik->daddr, ik->dport, ik->proto)) {
			*from = i + 1;
			return cand;
		}
	}
	*from = SNAT_CANDIDATES;
	return 0;
}

/*
 * A new flow: claim a free node port (hash-derived candidates, as Cilium), then both entries.
 * The first SNAT_FREE_TRIES candidates are claimed in turn (a range with room ends there);
 * a crowded range is searched, and the port found claimed; losing it (to another CPU, or
 * to a host port published since) searches on once, past it. Only then is it a counted
 * drop, as a full range is.
 */
static __always_inline enum snat_result snat_new_flow(struct __sk_buff *skb, struct flow *f, const struct config *cfg,
						      __u64 now)
{
	struct ct_key ok, ik;
	struct ct_entry in = {}, out = {};
	__u32 span = (__u32)cfg->snat_port_max - cfg->snat_port_min + 1;
	__u32 h = flow_hash(f);
	__be16 port = 0;
	int i;

	in.created_ns = in.last_seen_ns = now;
	in.nat_ip = f->saddr;
	in.nat_port = f->sport;
	snat_note_end(&in, f, CT_F_FIN_OUT);	/* a flow may start with its end (a stray RST) */
#pragma unroll
	for (i = 0; i < SNAT_FREE_TRIES; i++) {
		__be16 cand = snat_candidate(cfg, span, h, i);

		snat_in_key(&ik, f->daddr, f->dport, cfg->masq_ip, cand, f->proto);
		if (snat_claim(&ik, &in, now, f, 0) == 0) {
			port = cand;
			break;
		}
	}
	if (!port) {
		__u32 from = SNAT_FREE_TRIES;
		__be16 cand = snat_search(&ik, cfg, span, h, f, now, &from, 0);

		/* Between the search and the claim, the other CPU's SYN may take the same port
		 * (its search found it too), or the port turns out published: search on once,
		 * past it. A drop here, with most of the range free, was 1 SYN in ~1.2 million
		 * in the e2e egress test (2 CPUs, ~7 700 connections/s to one destination). */
		if (cand && snat_claim(&ik, &in, now, f, 1) == 0)
			port = cand;
		else if (cand && (cand = snat_search(&ik, cfg, span, h, f, now, &from, cand)) &&
			 snat_claim(&ik, &in, now, f, 1) == 0)
			port = cand;
	}
	if (!port)
		return SNAT_EXHAUSTED;
	out.created_ns = out.last_seen_ns = now;
	out.nat_ip = cfg->masq_ip;
	out.nat_port = port;
	out.packets = 1;
	out.bytes = skb->len;
	ct_key_of(&ok, f, CT_SNAT_OUT);
	if (bpf_map_update_elem(&conntrack, &ok, &out, BPF_ANY) < 0) {
		bpf_map_delete_elem(&conntrack, &ik);
		return SNAT_FAILED;
	}
	count(skb, CTR_SNAT_NEW);
	if (snat_rewrite(skb, f, NAT_SRC, cfg->masq_ip, port) < 0)
		return SNAT_FAILED;
	return SNAT_TRANSLATED;
}

/*
 * A live flow (CT_SNAT_OUT) whose claim the LRU evicted: every reply would pass to the
 * node's stack, which has no such socket and answers with an RST. Its own port is claimed
 * again (snat_claim: if still free, or expired), so the flow keeps its tuple at the remote;
 * only when another flow took the port does it start over with a new one. Costs nothing
 * on the fast path: this runs only where the claim's lookup already missed.
 */
static __always_inline struct ct_entry *snat_reclaim(struct ct_key *ik, const struct ct_entry *out,
						     const struct flow *f, __u64 now)
{
	struct ct_entry in = {};

	in.created_ns = in.last_seen_ns = now;
	in.nat_ip = f->saddr;
	in.nat_port = f->sport;
	in.flags = out->flags & CT_F_CLOSING;
	snat_note_end(&in, f, CT_F_FIN_OUT);
	if (snat_claim(ik, &in, now, f, 0) < 0)
		return NULL;
	return bpf_map_lookup_elem(&conntrack, ik);
}

/* to_netdev: a local pod's packet to a destination outside the cluster. */
static __always_inline enum snat_result snat_egress(struct __sk_buff *skb, struct flow *f, const struct config *cfg)
{
	struct ct_key ok, ik;
	struct ct_entry *out, *in;
	__u64 now = bpf_ktime_get_ns();

	if (snat_ports(skb, f, 1) < 0)
		return SNAT_PASS;
	ct_key_of(&ok, f, CT_SNAT_OUT);
	out = bpf_map_lookup_elem(&conntrack, &ok);
	if (out && !ct_expired(out, now, f->proto)) {
		snat_in_key(&ik, f->daddr, f->dport, out->nat_ip, out->nat_port, f->proto);
		in = bpf_map_lookup_elem(&conntrack, &ik);
		if (!in)
			in = snat_reclaim(&ik, out, f, now);
		/* The claim may have been retaken by another flow once expired: then start over. */
		if (in && in->nat_ip == f->saddr && in->nat_port == f->sport && !(in->flags & CT_F_HOST)) {
			if (ct_reopened(out, f)) {	/* a new connection on the same tuple keeps its port */
				out->flags &= ~CT_F_CLOSING;
				in->flags &= ~(CT_F_CLOSING | CT_F_FIN_OUT | CT_F_FIN_IN | CT_F_RST);
			}
			ct_touch(out, f, now, skb->len);
			snat_touch_peer(in, f, now);
			snat_note_end(in, f, CT_F_FIN_OUT);
			if (snat_rewrite(skb, f, NAT_SRC, out->nat_ip, out->nat_port) < 0)
				return SNAT_FAILED;
			return SNAT_TRANSLATED;
		}
	}
	if (!f->has_l4)
		return SNAT_FRAGMENT;	/* a flow cannot start in a later fragment */
	return snat_new_flow(skb, f, cfg, now);
}

/* to_netdev: the node's own packet from a port inside the masquerade range (an explicit
 * bind) claims that port towards its destination, so no pod flow is given it. */
static __always_inline void snat_host_claim(struct __sk_buff *skb, struct headers *h, const struct config *cfg)
{
	struct flow f;
	struct ct_key ik;
	struct ct_entry *in;
	struct ct_entry claim = {};
	__u64 now;

	if (flow_parse(skb, h, &f) != FLOW_OK || !f.has_l4 || snat_ports(skb, &f, 1) < 0 ||
	    !snat_port_in_range(cfg, f.sport))
		return;
	now = bpf_ktime_get_ns();
	snat_in_key(&ik, f.daddr, f.dport, f.saddr, f.sport, f.proto);
	in = bpf_map_lookup_elem(&conntrack, &ik);
	if (in && !ct_expired(in, now, f.proto)) {
		if (in->flags & CT_F_HOST)
			ct_touch(in, &f, now, 0);
		return;		/* held by a pod's flow: the node's own flow collides (not resolved) */
	}
	claim.created_ns = claim.last_seen_ns = now;
	claim.nat_ip = f.saddr;
	claim.nat_port = f.sport;
	claim.flags = CT_F_HOST;
	bpf_map_update_elem(&conntrack, &ik, &claim, BPF_ANY);
}

/* from_netdev: a reply to a masqueraded flow goes back to its pod. */
static __always_inline enum snat_result snat_ingress(struct __sk_buff *skb, struct flow *f, const struct config *cfg)
{
	struct ct_key ik, ok;
	struct ct_entry *in, *out;
	__u64 now;

	if (snat_ports(skb, f, 0) < 0 || !snat_port_in_range(cfg, f->dport))
		return SNAT_PASS;	/* the node's own ports: not ours */
	ct_key_of(&ik, f, CT_SNAT_IN);
	in = bpf_map_lookup_elem(&conntrack, &ik);
	now = bpf_ktime_get_ns();
	if (!in || ct_expired(in, now, f->proto))
		return SNAT_PASS;
	ct_touch(in, f, now, skb->len);
	if (in->flags & CT_F_HOST)
		return SNAT_PASS;
	in->flags |= CT_F_SEEN_REPLY;
	snat_note_end(in, f, CT_F_FIN_IN);
	ct_key_of(&ok, f, CT_SNAT_OUT);
	ok.saddr = in->nat_ip;
	ok.daddr = f->saddr;
	ok.sport = in->nat_port;
	ok.dport = f->sport;
	out = bpf_map_lookup_elem(&conntrack, &ok);
	if (out) {
		snat_touch_peer(out, f, now);
		out->flags |= CT_F_SEEN_REPLY;
	}
	if (snat_rewrite(skb, f, NAT_DST, in->nat_ip, in->nat_port) < 0)
		return SNAT_FAILED;
	count(skb, CTR_SNAT_REV);
	return SNAT_TRANSLATED;
}

/*
 * from_netdev: an ICMP error (frag-needed from a router on the way, port unreachable from
 * the destination) about a masqueraded packet node IP:port -> remote: the quoted header
 * is rewritten to the pod's tuple and the error sent to the pod, so its socket and its
 * path MTU see it. The quoted address and its header checksum change together (their sum
 * stays constant, icmp.h); only the quoted port/identifier changes the ICMP checksum.
 */
static __always_inline enum snat_result snat_icmp_error(struct __sk_buff *skb, struct flow *f, const struct config *cfg)
{
	__u32 inner_off = f->l4_off + sizeof(struct icmphdr);
	__u32 l4_inner = inner_off + sizeof(struct iphdr);
	__u32 port_off = l4_inner;
	struct iphdr inner;
	__be16 ports[4];	/* TCP/UDP: source, destination; ICMP: type/code, checksum, identifier, sequence */
	__be16 node_port, remote_port = 0;
	struct ct_key ik;
	struct ct_entry *in;

	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)) < 0 || inner.ihl != 5 ||
	    inner.saddr != cfg->masq_ip || bpf_skb_load_bytes(skb, l4_inner, ports, sizeof(ports)) < 0)
		return SNAT_PASS;
	if (inner.protocol == IPPROTO_TCP || inner.protocol == IPPROTO_UDP) {
		node_port = ports[0];
		remote_port = ports[1];
	} else if (inner.protocol == IPPROTO_ICMP && (bpf_ntohs(ports[0]) >> 8) == ICMP_ECHO) {
		node_port = ports[2];
		port_off = l4_inner + ICMP_ID_OFF;
	} else {
		return SNAT_PASS;
	}
	snat_in_key(&ik, inner.daddr, remote_port, inner.saddr, node_port, inner.protocol);
	in = bpf_map_lookup_elem(&conntrack, &ik);
	if (!in || (in->flags & CT_F_HOST))
		return SNAT_PASS;
	if (icmp_rewrite_quoted(skb, f, offsetof(struct iphdr, saddr), inner.saddr, in->nat_ip, port_off, node_port,
				in->nat_port) < 0)
		return SNAT_FAILED;
	if (nat_rewrite(skb, f, NAT_DST, in->nat_ip, f->dport) < 0)
		return SNAT_FAILED;
	count(skb, CTR_SNAT_ICMP_ERROR);
	return SNAT_TRANSLATED;
}

/* to_netdev: an ICMP error a pod sends about a masqueraded flow (say port unreachable for
 * a reply that came too late): it quotes remote -> pod IP:port, which becomes remote ->
 * node IP:port, and it leaves from the node's address. */
static __always_inline enum snat_result snat_icmp_error_out(struct __sk_buff *skb, struct flow *f,
							    const struct config *cfg)
{
	__u32 inner_off = f->l4_off + sizeof(struct icmphdr);
	struct iphdr inner;
	__be16 ports[2];
	struct ct_key ok = {};
	struct ct_entry *out;

	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)) < 0 || inner.ihl != 5 ||
	    inner.daddr != f->saddr || (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP) ||
	    bpf_skb_load_bytes(skb, inner_off + sizeof(inner), ports, sizeof(ports)) < 0)
		return SNAT_PASS;
	ct_key_of_quoted(&ok, &inner, ports, CT_SNAT_OUT);
	out = bpf_map_lookup_elem(&conntrack, &ok);
	if (!out)
		return SNAT_PASS;	/* about no masqueraded flow: as any other packet of no flow */
	if (icmp_rewrite_quoted(skb, f, offsetof(struct iphdr, daddr), inner.daddr, out->nat_ip,
				inner_off + sizeof(inner) + 2, ports[1], out->nat_port) < 0)
		return SNAT_FAILED;
	if (nat_rewrite(skb, f, NAT_SRC, out->nat_ip, f->sport) < 0)
		return SNAT_FAILED;
	count(skb, CTR_SNAT_ICMP_ERROR);
	return SNAT_TRANSLATED;
}

/*
 * to_netdev's path. Packets that are not a local pod's, or go to an excluded destination,
 * leave untouched; a pod's packet that cannot be masqueraded (no free port, a fragment
 * of an unknown flow) is dropped and counted rather than sent with the pod's address.
 */
static __always_inline int snat_to_netdev(struct __sk_buff *skb, struct headers *h)
{
	struct config *cfg = snat_config();
	struct flow f;
	enum snat_result r;

	if (!cfg)
		return TC_ACT_OK;
	if (h->ip->saddr == cfg->masq_ip) {
		if (!snat_port_outside_range(skb, h, cfg, 1))
			snat_host_claim(skb, h, cfg);
		return TC_ACT_OK;
	}
	if (!is_local_pod(h->ip->saddr) || snat_excluded(h->ip->daddr))
		return TC_ACT_OK;
	switch (flow_parse(skb, h, &f)) {
	case FLOW_OK:
		break;
	case FLOW_FRAG_UNKNOWN:
		return drop(skb, CTR_DROP_FRAGMENT);
	default:
		return drop(skb, CTR_DROP_MALFORMED);
	}
	if (f.proto == IPPROTO_ICMP && f.has_l4 && icmp_is_error(f.icmp_type))
		r = snat_icmp_error_out(skb, &f, cfg);
	else
		r = snat_egress(skb, &f, cfg);
	switch (r) {
	case SNAT_EXHAUSTED:
		return drop(skb, CTR_SNAT_PORT_EXHAUSTED);
	case SNAT_FRAGMENT:
		return drop(skb, CTR_DROP_FRAGMENT);
	case SNAT_FAILED:
		return drop(skb, CTR_DROP_NAT_FAILED);
	default:
		return TC_ACT_OK;
	}
}

/* from_netdev, before anything else: replies and ICMP errors of masqueraded flows go
 * straight to their pod (returns 1, the verdict in *verdict); 0 for everything else,
 * with the packet untouched. (A flag, not a sentinel verdict: the verifier cannot tell
 * a helper's return value from any sentinel.) */
static __always_inline int snat_from_netdev(struct __sk_buff *skb, struct headers *h, int *verdict)
{
	struct config *cfg = snat_config();
	struct flow f;
	enum snat_result r;

	if (!cfg || h->ip->daddr != cfg->masq_ip || snat_port_outside_range(skb, h, cfg, 0) ||
	    flow_parse(skb, h, &f) != FLOW_OK)
		return 0;
	if (f.proto == IPPROTO_ICMP && f.has_l4 && icmp_is_error(f.icmp_type))
		r = snat_icmp_error(skb, &f, cfg);
	else
		r = snat_ingress(skb, &f, cfg);
	if (r == SNAT_PASS)
		return 0;
	*verdict = r == SNAT_TRANSLATED ? deliver(skb, 1) : drop(skb, CTR_DROP_NAT_FAILED);
	return 1;
}

#endif
