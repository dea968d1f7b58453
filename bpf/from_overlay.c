/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tc ingress on the overlay (VXLAN, external mode) device: packets other nodes
 * encapsulated to this one, already decapsulated by the kernel. Replies of flows that
 * were translated on this node are translated back; then delivery to the local pod
 * (bpf_redirect_peer) or, for the node itself, the kernel stack.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "include/types.h"
#include "include/maps.h"
#include "include/parse.h"
#include "include/counters.h"
#include "include/route.h"

SEC("tc")
int from_overlay(struct __sk_buff *skb)
{
	struct headers h;

	switch (parse(skb, &h)) {
	case PARSE_IPV4:
		break;
	case PARSE_ARP:
	case PARSE_OTHER_L3:
		return TC_ACT_OK;	/* the kernel's business (flannel peers never ARP: NOARP device) */
	default:
		return drop(skb, CTR_DROP_MALFORMED);
	}
	count(skb, CTR_FROM_OVERLAY);
	return route_from_overlay(skb, &h);
}

char _license[] SEC("license") = "GPL";
