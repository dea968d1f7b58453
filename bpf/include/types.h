/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The binary contract between the eBPF programs and the control plane.
 *
 * Every map key and value is defined here, once. ctl/dataplane/bpf/types.py mirrors each
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
	CTR_LB_NEW_FLOW = 5,		/* a new flow to a service got a backend */
	CTR_LB_REJECT = 6,		/* a service without ready backends answered with RST / ICMP unreachable */
	CTR_REV_NAT = 7,		/* a reply translated back to its service address */
	CTR_ICMP_ERROR_NAT = 8,		/* an ICMP error about a translated flow, translated back */
	CTR_DROP_FRAGMENT = 9,		/* a fragment to a service whose first fragment was never seen */
	CTR_DROP_NAT_FAILED = 10,	/* rewriting a header failed (or IP options where atomnet builds a reply) */
	CTR_FWD_OVERLAY = 11,		/* encapsulated to the node that owns the destination */
	CTR_FROM_OVERLAY = 12,		/* decapsulated traffic for this node */
	CTR_DROP_NO_TUNNEL = 13,	/* to the cluster network, but no node owns that subnet */
	CTR_SNAT_NEW = 14,		/* a pod's new flow to the outside got a port of this node (masquerade) */
	CTR_SNAT_REV = 15,		/* a reply of a masqueraded flow translated back to its pod */
	CTR_SNAT_ICMP_ERROR = 16,	/* an ICMP error about a masqueraded flow translated back (inner header too) */
	CTR_SNAT_PORT_EXHAUSTED = 17,	/* dropped: no free masquerade port towards that destination */
	CTR_DNS_FAST_ANSWER = 18,	/* a pod's A query to the DNS VIP answered by from_pod itself (dns.h) */
	CTR_DNS_FAST_PASS = 19,		/* a pod's query to the DNS VIP left to the node's DNS server */
	CTR_DROP_TUPLE_CLASH = 20,	/* dropped: a new service flow would be one 4-tuple at the backend with a live one (lb.h) */
	CTR_MAX = 21,
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

/* config: one entry (index 0) of run-time settings the daemon writes. */
struct config {
	__be32 service_net;		/* service CIDR, network order */
	__be32 service_mask;		/* its netmask, network order */
	__u32 flags;			/* reserved, 0 */
	__u32 overlay_ifindex;		/* the VXLAN device (external mode); 0 = no overlay yet */
	__u32 vni;			/* VXLAN network identifier, host order (flannel: 1) */
	__u8  vtep_mac[ETH_ALEN_];	/* this node's overlay device MAC: inner source MAC */
	__u16 pad;
	__be32 snat_ip;			/* this node's overlay address (subnet .0): the source of
					 * NodePort traffic sent to a backend on another node */
	__be32 masq_ip;			/* this node's uplink address: the source of masqueraded pod traffic */
	__u16 snat_port_min;		/* masquerade ports, host order, inclusive: outside the node's */
	__u16 snat_port_max;		/* ephemeral range and the NodePort range */
};

/* config.flags */
#define CFG_F_MASQUERADE 2		/* SNAT pod traffic leaving the cluster to masq_ip */

/* tunnels (LPM trie): remote pod subnet -> the node that owns it (from its subnet lease). */
struct tunnel_key {
	__u32 prefixlen;		/* LPM: bits of ip that count, host order */
	__be32 ip;
};

struct tunnel_info {
	__be32 node_ip;			/* the owner's PublicIP: outer destination */
	__u8  vtep_mac[ETH_ALEN_];	/* the owner's VtepMAC: inner destination MAC */
	__u16 pad;
};

/* services: (VIP, port, protocol) -> the service port's load-balancing state. */
struct service_key {
	__be32 vip;
	__be16 port;
	__u8  proto;			/* IPPROTO_TCP / IPPROTO_UDP */
	__u8  pad;
};

struct service_info {
	__u32 id;			/* service-port id: key of backends and affinity; host order */
	__u32 backend_count;		/* 0: refuse new flows at once */
	__u32 table_size;		/* entries of this service's Maglev table (prime) */
	__u32 affinity_timeout;		/* client-IP affinity in seconds; 0 = none */
	__u32 digest;			/* of the backend set the Maglev table was built from (control plane's) */
	__u32 table;			/* key of its Maglev table in maglev (shared by backend set, chosen by
					 * ctl/dataplane/maglev_tables.py; pointing a service at another table is
					 * an update of this entry, not of the map-in-map, which waits for RCU) */
};

/* A backend address: the value of every Maglev slot. */
struct backend_addr {
	__be32 ip;
	__be16 port;
	__u16 pad;
};

/* backends (per-CPU hash): its keys are the live backends of each service port; the
 * values are packet/byte counters the programs add to. */
struct backend_key {
	__u32 service_id;		/* host order */
	__be32 ip;
	__be16 port;
	__u16 pad;
};

/* conntrack: every translated flow has a forward entry (client -> VIP) and a reply
 * entry (backend -> client), created together by the first packet. */
enum ct_dir {
	CT_FORWARD = 0,
	CT_REPLY = 1,
	CT_SNAT_OUT = 2,		/* masquerade: pod -> outside, the pod's tuple; nat = node IP:port */
	CT_SNAT_IN = 3,			/* masquerade: outside -> node IP:port (the reply's tuple); nat = pod IP:port */
};

struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8  proto;
	__u8  dir;			/* enum ct_dir */
	__u16 pad;
};

#define CT_F_CLOSING 1			/* FIN or RST seen: the flow may be replaced by a new SYN */
#define CT_F_HAIRPIN 2			/* client and backend are the same pod: source rewritten too */
#define CT_F_SEEN_REPLY 4		/* the backend answered */
#define CT_F_SNAT 8			/* from outside to a remote backend: source is this node */
#define CT_F_HOST 16			/* CT_SNAT_IN: the node's own flow holds this port (never translated) */
#define CT_F_FIN_OUT 32			/* CT_SNAT_IN: the pod sent FIN */
#define CT_F_FIN_IN 64			/* CT_SNAT_IN: the remote sent FIN */
#define CT_F_RST 128			/* CT_SNAT_IN: either side sent RST */

struct ct_entry {
	__u64 created_ns;		/* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 last_seen_ns;
	__be32 nat_ip;			/* forward: backend address; reply: VIP */
	__be16 nat_port;		/* forward: backend port; reply: service port */
	__u8  flags;			/* CT_F_* */
	__u8  pad;
	__be32 snat_ip;			/* hairpin: forward: new source; reply: the client to restore; else 0 */
	__u32 service_id;		/* host order */
	__u64 packets;
	__u64 bytes;
};

/* affinity: client IP + service port -> the backend it was given. */
struct affinity_key {
	__be32 client;
	__u32 service_id;		/* host order */
};

struct affinity_value {
	__u64 last_used_ns;
	struct backend_addr backend;
};

/* fragments: the ports of a fragmented datagram, learnt from its first fragment, so the
 * later fragments (which carry no L4 header) are translated the same way. */
struct frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8  proto;
	__u8  pad;
};

struct frag_ports {
	__be16 sport;
	__be16 dport;
};

/* snat_exclude (LPM trie): destinations pods reach with their own address (never masqueraded):
 * the cluster network, the service CIDR, every node's address, the no-masquerade CIDRs. */
struct snat_exclude_key {
	__u32 prefixlen;		/* LPM: bits of ip that count, host order */
	__be32 ip;
};

enum snat_exclude_kind {
	EXCL_CLUSTER = 1,
	EXCL_SERVICES = 2,
	EXCL_NODE = 3,
	EXCL_USER = 4,			/* --no-masquerade-cidr */
};

struct snat_exclude_value {
	__u32 kind;			/* enum snat_exclude_kind */
};

/* events (perf event array): what `atomnet monitor` prints. Drops always; translation
 * decisions only while config.flags has CFG_F_DEBUG_EVENTS. */
#define CFG_F_DEBUG_EVENTS 1

enum event_type {
	EV_DROP = 1,
	EV_TRANSLATE = 2,
};

struct event {
	__u64 ts_ns;			/* bpf_ktime_get_ns */
	__u32 ifindex;			/* where the packet was seen */
	__u8  type;			/* enum event_type */
	__u8  reason;			/* enum counter_id: the drop reason */
	__u8  proto;
	__u8  pad;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__be32 nat_ip;			/* translate: the chosen backend */
	__be16 nat_port;
	__u16 pad2;
	__u32 len;
	__u32 service_id;		/* translate: the service port; host order */
};

/*
 * The DNS fast path (bpf/include/dns.h): the cluster's A records, answered at from_pod.
 * Filled by the daemon's DNS service from its name index (ctl/dns/fastpath.py), the one
 * source of the names; a name the map lacks goes to the node's server.
 */
#define DNS_NAME_KEY_LEN 128		/* wire-format names up to this long are fast-pathed; longer: server */
#define DNS_MSG_MAX 176			/* header + longest question + answer RR + OPT RR (171), rounded to 8 */

/* dns_names key: the query name in wire format (length-prefixed labels, the root's 0 byte
 * included), ASCII letters lower-cased, zero-padded to the full size. */
struct dns_name_key {
	__u8  name[DNS_NAME_KEY_LEN];
};

struct dns_name_value {
	__be32 ip;			/* the A record's address, network order */
	__u32 ttl;			/* seconds, host order: what the server's answer carries */
};

/* dns_config: one entry (index 0). */
struct dns_config {
	__be32 vip;			/* the cluster's DNS VIP; 0 = fast path off */
	__u32 flags;			/* reserved, 0 */
};

/* dns_scratch (per-CPU, one entry): the lookup key and the reply being built, off the
 * 512-byte BPF stack. User space never needs it (it is pinned only as every map is). */
struct dns_scratch {
	struct dns_name_key key;
	__u8  msg[DNS_MSG_MAX];
	__u32 namelen;			/* the question name's length, through memory (see dns.h) */
	__u32 pad;
};

#endif
