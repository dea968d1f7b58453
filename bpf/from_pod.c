/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tc ingress on the host side of every pod veth: everything a pod sends.
 *
 *  - ARP is left to the kernel (pods normally never ARP: their gateway has a
 *    permanent neighbour entry pointing at the host-side veth MAC);
 *  - other non-IPv4 frames and malformed IPv4 are dropped and counted;
 *  - an IPv4 source that is not the sending pod's own address is dropped (anti-spoofing);
 *  - an A query for a cluster name to the DNS VIP is answered here (dns.h);
 *  - then the IPv4 path of route.h: services (DNAT, reverse NAT, ICMP errors,
 *    refusal without backends), delivery to pods on this node with
 *    bpf_redirect_peer, everything else (the node itself, the outside world) to the
 *    kernel stack.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "include/types.h"
#include "include/maps.h"
#include "include/parse.h"
#include "include/counters.h"
#include "include/route.h"
#include "include/dns.h"

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	struct headers h;
	struct endpoint_key key = {};
	struct endpoint_info *src;
	int rc = TC_ACT_SHOT;

	switch (parse(skb, &h)) {
	case PARSE_IPV4:
		break;
	case PARSE_ARP:
		count(skb, CTR_PASS_STACK);
		return TC_ACT_OK;
	case PARSE_OTHER_L3:
		return drop(skb, CTR_DROP_UNSUPPORTED_L3);
	default:
		return drop(skb, CTR_DROP_MALFORMED);
	}

	key.ip = h.ip->saddr;
	src = bpf_map_lookup_elem(&endpoints, &key);
	if (!src || src->ifindex != skb->ingress_ifindex)
		return drop(skb, CTR_DROP_SPOOFED);

	if (dns_fast_path(skb, &h, &rc))
		return rc;
	return route_ipv4(skb, &h);
}

char _license[] SEC("license") = "GPL";
