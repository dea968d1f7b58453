/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ICMP errors about translated flows (port unreachable, fragmentation needed, time
 * exceeded): a backend's error about the packet client -> backend is rewritten to be
 * about client -> VIP, from the VIP, so the client's socket (and PMTU discovery) sees it.
 *
 * Inner address changes keep the inner header's one's-complement sum constant (address
 * and inner checksum change together), so only the inner port change touches the ICMP
 * checksum. The inner L4 checksum is left as is: no receiver checks it in an error.
 */
#ifndef ATOMNET_ICMP_H
#define ATOMNET_ICMP_H

#include "lb.h"

static __always_inline int icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* The error's sender is the destination of the packet it quotes: the backend. */
static __always_inline int icmp_from_backend(const struct flow *f, const struct iphdr *inner)
{
	return f->saddr == inner->daddr;
}

static __always_inline int rewrite_inner_addr(struct __sk_buff *skb, __u32 inner_off, __u32 field_off,
					      __be32 from, __be32 to)
{
	if (from == to)
		return 0;
	if (bpf_l3_csum_replace(skb, inner_off + offsetof(struct iphdr, check), from, to, 4) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, inner_off + field_off, &to, 4, 0);
}

/*
 * The one rewrite every ICMP error translation makes to the packet it quotes (services here,
 * masquerade in snat.h): an address (at field_off in the inner IP header, whose checksum
 * follows) and the port or echo identifier at port_off (the ICMP checksum follows; the
 * inner L4 checksum is left as is, see above).
 */
static __always_inline int icmp_rewrite_quoted(struct __sk_buff *skb, const struct flow *f, __u32 field_off,
					       __be32 from, __be32 to, __u32 port_off, __be16 old_port, __be16 new_port)
{
	__u32 inner_off = f->l4_off + sizeof(struct icmphdr);

	if (rewrite_inner_addr(skb, inner_off, field_off, from, to) < 0)
		return -1;
	if (old_port != new_port &&
	    (bpf_l4_csum_replace(skb, f->l4_off + offsetof(struct icmphdr, checksum), old_port, new_port, 2) < 0 ||
	     bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0))
		return -1;
	return 0;
}

static __always_inline enum lb_result lb_icmp_error(struct __sk_buff *skb, struct flow *f)
{
	__u32 inner_off = f->l4_off + sizeof(struct icmphdr);
	struct iphdr inner;
	__be16 ports[2];
	struct ct_key rk = {};
	struct ct_entry *ct;
	__be32 vip, client;
	__be16 vport;

	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)) < 0 || inner.ihl != 5 ||
	    bpf_skb_load_bytes(skb, inner_off + sizeof(inner), ports, sizeof(ports)) < 0)
		return LB_PASS;
	/* The offending packet went client -> backend; its flow's reply entry is backend -> client. */
	ct_key_of_quoted(&rk, &inner, ports, CT_REPLY);
	ct = bpf_map_lookup_elem(&conntrack, &rk);
	if (!ct)
		return LB_PASS;
	/* Only the flow's backend may speak for it: an error about client -> backend from
	 * anyone else (another pod injecting frag-needed into someone's service flow) is
	 * left untranslated, so it never reaches the client's socket for the VIP. */
	if (!icmp_from_backend(f, &inner))
		return LB_PASS;
	vip = ct->nat_ip;
	vport = ct->nat_port;
	client = ct->snat_ip;

	if (icmp_rewrite_quoted(skb, f, offsetof(struct iphdr, daddr), inner.daddr, vip, inner_off + sizeof(inner) + 2,
				ports[1], vport) < 0)
		return LB_NAT_FAILED;
	if (client && rewrite_inner_addr(skb, inner_off, offsetof(struct iphdr, saddr), inner.saddr, client) < 0)
		return LB_NAT_FAILED;
	if (nat_rewrite(skb, f, NAT_SRC, vip, f->sport) < 0)
		return LB_NAT_FAILED;
	if (client && nat_rewrite(skb, f, NAT_DST, client, f->dport) < 0)
		return LB_NAT_FAILED;
	count(skb, CTR_ICMP_ERROR_NAT);
	return LB_TRANSLATED;
}

#endif
