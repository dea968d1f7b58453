/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU packet/byte counters; drops always go through drop() so none is silent. */
#ifndef ATOMNET_COUNTERS_H
#define ATOMNET_COUNTERS_H

#include <linux/pkt_cls.h>
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

static __always_inline int drop(struct __sk_buff *skb, enum counter_id reason)
{
	count(skb, reason);
	return TC_ACT_SHOT;
}

#endif
