/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tc ingress on the node's uplink (and on lo, for the node's own connections): packets
 * to a published host port or a NodePort are translated to their pod (DNAT; the
 * client's address is kept when the pod is on this node, replaced by this node's
 * overlay address when it is on another, so the reply comes back through here).
 * Replies (and ICMP errors) of pod flows this node masqueraded go back to their pod
 * first (snat.h). Everything else passes untouched.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "include/types.h"
#include "include/maps.h"
#include "include/parse.h"
#include "include/counters.h"
#include "include/route.h"
#include "include/snat.h"

SEC("tc")
int from_netdev(struct __sk_buff *skb)
{
	struct headers h;
	int verdict = TC_ACT_OK;

	if (parse(skb, &h) != PARSE_IPV4)
		return TC_ACT_OK;
	if (snat_from_netdev(skb, &h, &verdict))
		return verdict;
	return route_from_netdev(skb, &h);
}

char _license[] SEC("license") = "GPL";
