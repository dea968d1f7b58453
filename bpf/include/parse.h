/* SPDX-License-Identifier: GPL-2.0 */
/* Bounds-checked header access: every pointer is checked against data_end before use. */
#ifndef ATOMNET_PARSE_H
#define ATOMNET_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>

struct headers {
	struct ethhdr *eth;
	struct iphdr *ip;	/* NULL unless the frame is IPv4 */
};

enum parse_result {
	PARSE_IPV4,
	PARSE_ARP,
	PARSE_OTHER_L3,
	PARSE_MALFORMED,
};

static __always_inline enum parse_result parse(struct __sk_buff *skb, struct headers *h)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;

	h->eth = NULL;
	h->ip = NULL;
	if ((void *)(eth + 1) > data_end)
		return PARSE_MALFORMED;
	h->eth = eth;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return PARSE_ARP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_OTHER_L3;

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return PARSE_MALFORMED;
	/* Options are allowed, but the whole header must be in the linear part, and the
	 * claimed length must fit the frame. (Only headers need be linear: a socket's
	 * payload usually sits in page fragments beyond data_end, so compare with skb->len.) */
	if (ip->version != 4 || ip->ihl < 5 || (void *)ip + ip->ihl * 4 > data_end)
		return PARSE_MALFORMED;
	if (bpf_ntohs(ip->tot_len) < ip->ihl * 4 ||
	    bpf_ntohs(ip->tot_len) > skb->len - sizeof(*eth))
		return PARSE_MALFORMED;
	h->ip = ip;
	return PARSE_IPV4;
}

#endif
