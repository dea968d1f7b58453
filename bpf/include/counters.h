/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU packet/byte counters; drops always go through drop() so none is silent. */
#ifndef ATOMNET_COUNTERS_H
#define ATOMNET_COUNTERS_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

static __always_inline void count(struct __sk_buff *skb, enum counter_id id)
{
	__u32 key = id;
	struct counter *c = bpf_map_lookup_elem(&counters, &key);

	if (c) {	/* per-CPU slot: no atomics needed */
		c->packets += 1;
		c->bytes += skb->len;
	}
}

/* The addresses and ports of an IPv4 packet, read with helpers (no packet-pointer state),
 * for an event about a packet in any shape. */
static __always_inline void event_fill(struct __sk_buff *skb, struct event *ev)
{
	struct iphdr ip;
	__be16 ports[2];

	ev->ts_ns = bpf_ktime_get_ns();
	ev->ifindex = skb->ifindex;
	ev->len = skb->len;
	if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return;
	ev->saddr = ip.saddr;
	ev->daddr = ip.daddr;
	ev->proto = ip.protocol;
	if ((ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) &&
	    bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, ports, sizeof(ports)) == 0) {
		ev->sport = ports[0];
		ev->dport = ports[1];
	}
}

static __always_inline int drop(struct __sk_buff *skb, enum counter_id reason)
{
	struct event ev = {};

	count(skb, reason);
	event_fill(skb, &ev);
	ev.type = EV_DROP;
	ev.reason = reason;
	/* Without a reader this fails at once (nothing to deliver to): no cost worth guarding. */
	bpf_perf_event_output(skb, &events, BPF_F_CURRENT_CPU, &ev, sizeof(ev));
	return TC_ACT_SHOT;
}

#endif
