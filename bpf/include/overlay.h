/* SPDX-License-Identifier: GPL-2.0 */
/*
 * VXLAN encapsulation through one external-mode (collect_md) device: the program picks
 * the remote node from the tunnels LPM map, writes the inner MACs (flannel's rule: the
 * inner destination is the remote VtepMAC) and sets the tunnel key; the kernel's VXLAN
 * device builds the outer headers. Wire-compatible with flannel's vxlan backend.
 */
#ifndef ATOMNET_OVERLAY_H
#define ATOMNET_OVERLAY_H

#include "counters.h"
#include "parse.h"

#define TUNNEL_TTL 64

static __always_inline struct config *load_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}

static __always_inline struct tunnel_info *tunnel_for(__be32 daddr)
{
	struct tunnel_key k = { .prefixlen = 32, .ip = daddr };

	return bpf_map_lookup_elem(&tunnels, &k);
}

/* Sets inner MACs and the tunnel key. Returns 0, or -1 if the packet cannot be encapsulated. */
static __always_inline int encap_set(struct __sk_buff *skb, const struct config *cfg, const struct tunnel_info *t)
{
	struct bpf_tunnel_key key = {};
	struct ethhdr eth;

	__builtin_memcpy(eth.h_dest, t->vtep_mac, ETH_ALEN);
	__builtin_memcpy(eth.h_source, cfg->vtep_mac, ETH_ALEN);
	eth.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0)
		return -1;
	key.remote_ipv4 = bpf_ntohl(t->node_ip);	/* the helper takes host order */
	key.tunnel_id = cfg->vni;
	key.tunnel_ttl = TUNNEL_TTL;
	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0 ? -1 : 0;
}

/* From a pod (or after translation): off to the owning node through the overlay device. */
static __always_inline int encap_redirect(struct __sk_buff *skb, __be32 daddr)
{
	struct config *cfg = load_config();
	struct tunnel_info *t;

	if (!cfg || !cfg->overlay_ifindex)
		return -1;
	t = tunnel_for(daddr);
	if (!t)
		return -1;
	if (encap_set(skb, cfg, t) < 0)
		return drop(skb, CTR_DROP_NAT_FAILED);
	count(skb, CTR_FWD_OVERLAY);
	return bpf_redirect(cfg->overlay_ifindex, 0);
}

#endif
