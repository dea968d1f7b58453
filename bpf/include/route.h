/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The IPv4 path every pod packet takes once it passed anti-spoofing:
 *   1. ICMP error about a translated flow -> translate it back;
 *   2. reply of a translated flow -> reverse NAT;
 *   3. to a service frontend -> pick a backend, DNAT (or refuse at once);
 *   4. deliver: a pod on this node via bpf_redirect_peer, a pod on another node through
 *      the overlay, anything else to the stack.
 */
#ifndef ATOMNET_ROUTE_H
#define ATOMNET_ROUTE_H

#include "forward.h"
#include "icmp.h"
#include "overlay.h"
#include "reject.h"

#define LOOPBACK_IFINDEX 1	/* in every network namespace */
#define AF_INET 2

/*
 * A translated packet for neither a local pod nor a remote one (a reply to a client
 * outside the cluster, or to the node itself) cannot go through the node's stack: its
 * source is now one of the node's own addresses, which the stack drops as a martian.
 * So it is routed here: out of the interface the FIB picks (the kernel resolves the
 * neighbour), or, for the node's own address, into lo.
 */
static __always_inline int deliver_routed(struct __sk_buff *skb, __be32 saddr, __be32 daddr, __u16 tot_len)
{
	struct bpf_fib_lookup p = {};
	int rc;

	p.family = AF_INET;
	p.ipv4_src = saddr;
	p.ipv4_dst = daddr;
	p.tot_len = tot_len;
	p.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &p, sizeof(p), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		count(skb, CTR_PASS_STACK);
		return bpf_redirect_neigh(p.ifindex, NULL, 0, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED) {	/* a local address */
		/* lo's address is all zeros; any other destination MAC would make the stack
		 * see PACKET_OTHERHOST and drop the packet */
		__u8 zero[ETH_ALEN] = {};

		if (bpf_skb_store_bytes(skb, 0, zero, ETH_ALEN, 0) < 0)
			return drop(skb, CTR_DROP_NAT_FAILED);
		count(skb, CTR_PASS_STACK);
		return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
	}
	count(skb, CTR_PASS_STACK);
	return TC_ACT_OK;
}

static __always_inline int deliver(struct __sk_buff *skb, int translated)
{
	struct headers h;
	struct endpoint_key key = {};
	struct endpoint_info *dst;
	__be32 saddr;
	__u16 tot_len;
	int rc;

	/* Rewrites invalidate packet pointers: parse again. */
	if (parse(skb, &h) != PARSE_IPV4)
		return drop(skb, CTR_DROP_MALFORMED);
	key.ip = h.ip->daddr;
	dst = bpf_map_lookup_elem(&endpoints, &key);
	if (dst)
		return deliver_local(skb, &h, dst);
	saddr = h.ip->saddr;	/* read now: encap_redirect invalidates packet pointers */
	tot_len = bpf_ntohs(h.ip->tot_len);
	rc = encap_redirect(skb, key.ip);
	if (rc >= 0)
		return rc;
	if (translated)
		return deliver_routed(skb, saddr, key.ip, tot_len);
	count(skb, CTR_PASS_STACK);
	return TC_ACT_OK;
}

/* from_overlay's path: decapsulated packets are for this node; only replies and ICMP
 * errors of flows translated here need work before delivery. */
static __always_inline int route_from_overlay(struct __sk_buff *skb, struct headers *h)
{
	struct flow f;
	enum lb_result r;

	switch (flow_parse(skb, h, &f)) {
	case FLOW_OK:
		break;
	case FLOW_FRAG_UNKNOWN:
		return deliver(skb, 0);
	default:
		return drop(skb, CTR_DROP_MALFORMED);
	}
	if (f.proto == IPPROTO_ICMP && f.has_l4 && icmp_is_error(f.icmp_type))
		r = lb_icmp_error(skb, &f);
	else
		r = lb_reverse(skb, &f);
	if (r == LB_NAT_FAILED)
		return drop(skb, CTR_DROP_NAT_FAILED);
	return deliver(skb, r == LB_TRANSLATED);
}

/* What becomes of a packet after the load balancer; can_reply: the sender is a pod
 * behind this very hook, so a refusal can be answered straight back into it. */
static __always_inline int lb_verdict(struct __sk_buff *skb, const struct flow *f, enum lb_result r, int can_reply)
{
	switch (r) {
	case LB_REJECT:
		count(skb, CTR_LB_REJECT);
		if (!can_reply)
			return TC_ACT_OK;	/* the node's stack refuses the port itself */
		return f->proto == IPPROTO_TCP ? reject_tcp(skb) : reject_udp(skb);
	case LB_DROP_FRAGMENT:
		return drop(skb, CTR_DROP_FRAGMENT);
	case LB_NAT_FAILED:
		return drop(skb, CTR_DROP_NAT_FAILED);
	case LB_TUPLE_CLASH:
		return drop(skb, CTR_DROP_TUPLE_CLASH);
	default:
		return deliver(skb, r == LB_TRANSLATED);
	}
}

/* A TCP/UDP packet from_netdev may translate: one with its ports, or a later fragment
 * that borrowed its first fragment's ports (flow_parse), so it follows the first one to
 * the same pod, as in from_pod. A later fragment whose first one was not seen goes to
 * the stack: the address is the node's own, the port unknown. */
static __always_inline int netdev_flow(struct __sk_buff *skb, struct headers *h, struct flow *f)
{
	if (flow_parse(skb, h, f) != FLOW_OK)
		return 0;
	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	return f->has_l4 || f->fragment;
}

/* from_netdev's path: traffic from outside (or, on lo, from the node itself) to a
 * published port or NodePort; everything else is the node's own business. */
static __always_inline int route_from_netdev(struct __sk_buff *skb, struct headers *h)
{
	struct flow f;
	struct service_key sk = {};
	struct service_info *svc;
	struct config *cfg;
	enum lb_result r;

	if (!netdev_flow(skb, h, &f))
		return TC_ACT_OK;
	sk.vip = f.daddr;
	sk.port = f.dport;
	sk.proto = f.proto;
	svc = bpf_map_lookup_elem(&services, &sk);
	if (!svc)
		return TC_ACT_OK;
	cfg = load_config();
	r = lb_forward(skb, &f, svc, cfg ? cfg->snat_ip : 0);
	return lb_verdict(skb, &f, r, 0);
}

static __always_inline int route_ipv4(struct __sk_buff *skb, struct headers *h)
{
	struct flow f;
	struct service_key sk = {};
	struct service_info *svc;
	enum lb_result r = LB_PASS;

	switch (flow_parse(skb, h, &f)) {
	case FLOW_OK:
		break;
	case FLOW_FRAG_UNKNOWN:
		if (in_service_cidr(f.daddr))
			return drop(skb, CTR_DROP_FRAGMENT);
		return deliver(skb, 0);
	default:
		return drop(skb, CTR_DROP_MALFORMED);
	}

	if (f.proto == IPPROTO_ICMP && f.has_l4 && icmp_is_error(f.icmp_type)) {
		r = lb_icmp_error(skb, &f);
	} else {
		r = lb_reverse(skb, &f);
		if (r == LB_PASS) {
			sk.vip = f.daddr;
			sk.port = f.dport;
			sk.proto = f.proto;
			svc = bpf_map_lookup_elem(&services, &sk);
			if (svc)
				r = lb_forward(skb, &f, svc, 0);	/* pod sources route back by themselves */
		}
	}

	return lb_verdict(skb, &f, r, 1);
}

#endif
