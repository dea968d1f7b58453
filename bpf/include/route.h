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

static __always_inline int deliver(struct __sk_buff *skb)
{
	struct headers h;
	struct endpoint_key key = {};
	struct endpoint_info *dst;
	int rc;

	/* Rewrites invalidate packet pointers: parse again. */
	if (parse(skb, &h) != PARSE_IPV4)
		return drop(skb, CTR_DROP_MALFORMED);
	key.ip = h.ip->daddr;
	dst = bpf_map_lookup_elem(&endpoints, &key);
	if (dst)
		return deliver_local(skb, &h, dst);
	rc = encap_redirect(skb, key.ip);
	if (rc >= 0)
		return rc;
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
		return deliver(skb);
	default:
		return drop(skb, CTR_DROP_MALFORMED);
	}
	if (f.proto == IPPROTO_ICMP && f.has_l4 && icmp_is_error(f.icmp_type))
		r = lb_icmp_error(skb, &f);
	else
		r = lb_reverse(skb, &f);
	if (r == LB_NAT_FAILED)
		return drop(skb, CTR_DROP_NAT_FAILED);
	return deliver(skb);
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
		return deliver(skb);
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
				r = lb_forward(skb, &f, svc);
		}
	}

	switch (r) {
	case LB_REJECT:
		count(skb, CTR_LB_REJECT);
		return f.proto == IPPROTO_TCP ? reject_tcp(skb) : reject_udp(skb);
	case LB_DROP_FRAGMENT:
		return drop(skb, CTR_DROP_FRAGMENT);
	case LB_NAT_FAILED:
		return drop(skb, CTR_DROP_NAT_FAILED);
	default:
		return deliver(skb);
	}
}

#endif
