/* SPDX-License-Identifier: GPL-2.0 */
/* The 5-tuple of an IPv4 packet, fragment-aware: later fragments borrow the ports
 * their first fragment recorded in the fragments map. */
#ifndef ATOMNET_FLOW_H
#define ATOMNET_FLOW_H

#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include "maps.h"
#include "parse.h"

/* linux/icmp.h pulls in glibc headers that do not build for -target bpf: the few
 * ICMP definitions atomnet needs (RFC 792). */
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 rest;		/* echo id/sequence, or unused/MTU in errors */
};
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define TCP_FLAGS_OFF 13		/* byte of the TCP header holding FIN..CWR */
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

struct flow {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8  proto;
	__u8  tcp_flags;
	__u8  has_l4;		/* the L4 header is in this packet (not a later fragment) */
	__u8  fragment;		/* part of a fragmented datagram */
	__u8  icmp_type;
	__u8  pad[3];
	__u32 l4_off;		/* from the start of the frame */
};

enum flow_result {
	FLOW_OK,
	FLOW_MALFORMED,
	FLOW_FRAG_UNKNOWN,	/* a later fragment whose first fragment was not seen */
};

static __always_inline enum flow_result flow_parse(struct __sk_buff *skb, struct headers *h, struct flow *f)
{
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = h->ip;
	void *l4 = (void *)ip + ip->ihl * 4;
	__u16 frag = bpf_ntohs(ip->frag_off);

	__builtin_memset(f, 0, sizeof(*f));
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	f->l4_off = sizeof(struct ethhdr) + ip->ihl * 4;
	f->fragment = (frag & (IP_MF | IP_OFFSET)) != 0;

	if (frag & IP_OFFSET) {
		struct frag_key k = { .saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .proto = ip->protocol };
		struct frag_ports *p = bpf_map_lookup_elem(&fragments, &k);

		if (!p)
			return FLOW_FRAG_UNKNOWN;
		f->sport = p->sport;
		f->dport = p->dport;
		return FLOW_OK;
	}

	if (f->proto == IPPROTO_TCP) {
		struct tcphdr *t = l4;

		if ((void *)(t + 1) > data_end)
			return FLOW_MALFORMED;
		f->sport = t->source;
		f->dport = t->dest;
		f->tcp_flags = ((__u8 *)t)[TCP_FLAGS_OFF];
	} else if (f->proto == IPPROTO_UDP) {
		struct udphdr *u = l4;

		if ((void *)(u + 1) > data_end)
			return FLOW_MALFORMED;
		f->sport = u->source;
		f->dport = u->dest;
	} else if (f->proto == IPPROTO_ICMP) {
		struct icmphdr *i = l4;

		if ((void *)(i + 1) > data_end)
			return FLOW_MALFORMED;
		f->icmp_type = i->type;
	}
	f->has_l4 = 1;

	if (frag & IP_MF) {	/* first fragment: remember the ports for the rest */
		struct frag_key k = { .saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .proto = ip->protocol };
		struct frag_ports p = { .sport = f->sport, .dport = f->dport };

		bpf_map_update_elem(&fragments, &k, &p, BPF_ANY);
	}
	return FLOW_OK;
}

#endif
