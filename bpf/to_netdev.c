/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tc egress on the node's uplink: a local pod's packet leaving the cluster (destination
 * outside the cluster network, the service CIDR, the nodes and the no-masquerade CIDRs)
 * is masqueraded: its source becomes this node's address and a port of this node
 * (snat.h). The node's own packets pass untouched.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "include/types.h"
#include "include/maps.h"
#include "include/parse.h"
#include "include/counters.h"
#include "include/snat.h"

SEC("tc")
int to_netdev(struct __sk_buff *skb)
{
	struct headers h;

	if (parse(skb, &h) != PARSE_IPV4)
		return TC_ACT_OK;
	return snat_to_netdev(skb, &h);
}

char _license[] SEC("license") = "GPL";
