/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The binary contract between the eBPF programs and the control plane.
 *
 * Every map key and value is defined here, once. ctl/bpf/types.py mirrors each
 * struct with ctypes; tests/unit/test_types_contract.py reads the DWARF of the
 * built objects and fails on any size, offset or byte-order difference.
 *
 * Byte order is part of each field's type: __be* fields hold network byte order,
 * __u* fields host byte order. Padding is explicit so that no compiler-inserted
 * hole can carry garbage into a hash key.
 */
#ifndef ATOMNET_TYPES_H
#define ATOMNET_TYPES_H

#include <linux/types.h>

#define ETH_ALEN_ 6

/* endpoints: one entry per pod on this node, keyed by the pod's IPv4 address. */
struct endpoint_key {
	__be32 ip;			/* pod address, network order */
};

struct endpoint_info {
	__u32 ifindex;			/* host-side veth of the pod, host order */
	__u8  mac[ETH_ALEN_];		/* the pod's eth0 MAC */
	__u8  node_mac[ETH_ALEN_];	/* the host-side veth's MAC: source MAC of frames we deliver */
};

/*
 * counters: a per-CPU array indexed by enum counter_id; user space sums the CPUs.
 * Reasons are appended, never renumbered: dashboards and `atomnet stats` key on them.
 */
enum counter_id {
	CTR_FWD_LOCAL = 0,		/* delivered to a pod on this node */
	CTR_PASS_STACK = 1,		/* handed to the node's kernel stack */
	CTR_DROP_SPOOFED = 2,		/* source IP is not the sending pod's */
	CTR_DROP_MALFORMED = 3,		/* truncated or invalid L2/L3 header */
	CTR_DROP_UNSUPPORTED_L3 = 4,	/* neither IPv4 nor ARP (atomnet is IPv4-only) */
	CTR_MAX = 5,
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

#endif
