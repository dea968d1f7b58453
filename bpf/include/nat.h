/* SPDX-License-Identifier: GPL-2.0 */
/* Address/port rewriting with incremental checksum updates (IP, and the L4 checksum's
 * pseudo-header). UDP's "no checksum" (0) stays 0 thanks to BPF_F_MARK_MANGLED_0. */
#ifndef ATOMNET_NAT_H
#define ATOMNET_NAT_H

#include <stddef.h>
#include "flow.h"

#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#ifndef IP_CSUM_OFF
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#endif

enum nat_side { NAT_SRC = 0, NAT_DST = 1 };

static __always_inline int l4_csum_info(const struct flow *f, __u32 *csum_off, __u64 *flags)
{
	*flags = 0;
	if (f->proto == IPPROTO_TCP) {
		*csum_off = f->l4_off + offsetof(struct tcphdr, check);
		return 1;
	}
	if (f->proto == IPPROTO_UDP) {
		*csum_off = f->l4_off + offsetof(struct udphdr, check);
		*flags = BPF_F_MARK_MANGLED_0;
		return 1;
	}
	return 0;
}

/* Rewrites the source or destination address and port of f's packet; f is updated. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, struct flow *f, enum nat_side side,
				       __be32 new_ip, __be16 new_port)
{
	__be32 old_ip = side == NAT_DST ? f->daddr : f->saddr;
	__be16 old_port = side == NAT_DST ? f->dport : f->sport;
	__u32 csum_off = 0;
	__u64 l4flags = 0;
	/* A later fragment has no L4 header: its checksum was fixed in the first fragment. */
	int l4 = f->has_l4 && l4_csum_info(f, &csum_off, &l4flags);

	if (old_ip != new_ip) {
		if (l4 && bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip, l4flags | BPF_F_PSEUDO_HDR | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, 4) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, side == NAT_DST ? IP_DADDR_OFF : IP_SADDR_OFF, &new_ip, 4, 0) < 0)
			return -1;
	}
	if (l4 && old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4flags | 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, f->l4_off + (side == NAT_DST ? 2 : 0), &new_port, 2, 0) < 0)
			return -1;
	}
	if (side == NAT_DST) {
		f->daddr = new_ip;
		f->dport = new_port;
	} else {
		f->saddr = new_ip;
		f->sport = new_port;
	}
	return 0;
}

#endif
