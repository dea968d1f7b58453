/* SPDX-License-Identifier: GPL-2.0 */
/* Delivery to a pod on this node, the way a router would: new MACs, TTL - 1. */
#ifndef ATOMNET_FORWARD_H
#define ATOMNET_FORWARD_H

#include <linux/pkt_cls.h>
#include <stddef.h>
#include "counters.h"
#include "parse.h"

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_TTL_OFF (ETH_HLEN + offsetof(struct iphdr, ttl))

/*
 * Rewrites MACs and TTL, then bpf_redirect_peer: the frame enters the pod's
 * eth0 ingress directly, skipping the node's stack, netfilter and a second
 * softirq pass. A packet whose TTL would expire goes to the kernel stack instead,
 * which sends ICMP time-exceeded as a router must.
 */
static __always_inline int deliver_local(struct __sk_buff *skb, struct headers *h,
					 const struct endpoint_info *ep)
{
	__u8 ttl = h->ip->ttl;
	__u16 old_word, new_word;

	if (ttl <= 1) {
		count(skb, CTR_PASS_STACK);
		return TC_ACT_OK;
	}
	/* TTL shares a 16-bit checksum word with the protocol byte. */
	old_word = bpf_htons((__u16)ttl << 8);
	new_word = bpf_htons((__u16)(ttl - 1) << 8);
	__builtin_memcpy(h->eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(h->eth->h_source, ep->node_mac, ETH_ALEN);
	h->ip->ttl = ttl - 1;
	/* Direct writes above stay valid; the helper below invalidates packet pointers. */
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_word, new_word, sizeof(__u16)) < 0)
		return drop(skb, CTR_DROP_MALFORMED);
	count(skb, CTR_FWD_LOCAL);
	return bpf_redirect_peer(ep->ifindex, 0);
}

#endif
