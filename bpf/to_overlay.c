/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tc egress on the overlay device: traffic the node itself sends to remote pods (routed
 * there by the cluster-network route). Sets the tunnel key for the owning node. Packets
 * that from_pod already encapsulated and redirected here carry a tunnel key: left alone.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "include/types.h"
#include "include/maps.h"
#include "include/parse.h"
#include "include/counters.h"
#include "include/overlay.h"

SEC("tc")
int to_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key existing = {};
	struct headers h;
	struct config *cfg;
	struct tunnel_info *t;

	if (bpf_skb_get_tunnel_key(skb, &existing, sizeof(existing), 0) == 0 && existing.remote_ipv4)
		return TC_ACT_OK;	/* from_pod set it */
	switch (parse(skb, &h)) {
	case PARSE_IPV4:
		break;
	case PARSE_MALFORMED:
		return drop(skb, CTR_DROP_MALFORMED);
	default:
		return drop(skb, CTR_DROP_UNSUPPORTED_L3);	/* nothing else belongs on the overlay */
	}
	cfg = load_config();
	t = tunnel_for(h.ip->daddr);
	if (!cfg || !t)
		return drop(skb, CTR_DROP_NO_TUNNEL);
	if (encap_set(skb, cfg, t) < 0)
		return drop(skb, CTR_DROP_NAT_FAILED);
	count(skb, CTR_FWD_OVERLAY);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
