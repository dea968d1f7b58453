/* SPDX-License-Identifier: GPL-2.0 */
/* Conntrack for translated flows. The programs own this LRU map; the daemon only
 * flushes entries (UDP flows of removed backends), as kube-proxy does. */
#ifndef ATOMNET_CONNTRACK_H
#define ATOMNET_CONNTRACK_H

#include "flow.h"

#define NSEC 1000000000ULL
#define CT_TIMEOUT_TCP (6 * 3600 * NSEC)	/* established: a quiet TCP flow keeps its backend */
#define CT_TIMEOUT_CLOSING (10 * NSEC)		/* after FIN/RST */
#define CT_TIMEOUT_OTHER (120 * NSEC)		/* UDP: like the kernel's udp stream timeout */

static __always_inline void ct_key_of(struct ct_key *k, const struct flow *f, enum ct_dir dir)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = f->saddr;
	k->daddr = f->daddr;
	k->sport = f->sport;
	k->dport = f->dport;
	k->proto = f->proto;
	k->dir = dir;
}

/* The reply entry's key of a service flow f translated to backend be_ip:be_port (and, for
 * hairpin/SNAT, from source snat): replies come from the backend to the client (or snat). */
static __always_inline void ct_reply_key(struct ct_key *k, const struct flow *f, __be32 be_ip, __be16 be_port,
					 __be32 snat)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = be_ip;
	k->daddr = snat ? snat : f->saddr;
	k->sport = be_port;
	k->dport = f->sport;
	k->proto = f->proto;
	k->dir = CT_REPLY;
}

/* The forward entry's key of the flow the reply entry rk belongs to, from that entry's
 * VIP:port and client (hairpin/SNAT: the real client; else rk's destination). */
static __always_inline void ct_forward_key_of_reply(struct ct_key *k, const struct ct_key *rk, __be32 vip,
						    __be16 port, __be32 client)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = client ? client : rk->daddr;
	k->daddr = vip;
	k->sport = rk->dport;
	k->dport = port;
	k->proto = rk->proto;
	k->dir = CT_FORWARD;
}

/* The key of the reply direction of a packet quoted in an ICMP error: the quoted packet went
 * a -> b, so the flow's entry that the error travels along is keyed b -> a. */
static __always_inline void ct_key_of_quoted(struct ct_key *k, const struct iphdr *inner, const __be16 ports[2],
					     enum ct_dir dir)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = inner->daddr;
	k->daddr = inner->saddr;
	k->sport = ports[1];
	k->dport = ports[0];
	k->proto = inner->protocol;
	k->dir = dir;
}

/* How long an entry stamped at last_seen has been quiet. Signed: another CPU's packet of
 * the same flow may have stamped it after this CPU read `now` (both directions stamp both
 * entries of a masqueraded flow), and an unsigned difference would wrap to ~2^64 there: a
 * live flow "expired" (issue 14's iperf3 resets). Such an entry is fresh: quiet for 0. */
static __always_inline __u64 ct_quiet_for(__u64 last_seen, __u64 now)
{
	__s64 quiet = (__s64)(now - last_seen);

	return quiet > 0 ? (__u64)quiet : 0;
}

static __always_inline __u64 ct_timeout(const struct ct_entry *ct, __u8 proto)
{
	if (proto == IPPROTO_TCP)
		return ct->flags & CT_F_CLOSING ? CT_TIMEOUT_CLOSING : CT_TIMEOUT_TCP;
	return CT_TIMEOUT_OTHER;
}

static __always_inline int ct_expired(const struct ct_entry *ct, __u64 now, __u8 proto)
{
	return ct_quiet_for(ct->last_seen_ns, now) > ct_timeout(ct, proto);
}

/* A new SYN on a tuple whose previous connection closed starts a new flow (port reuse). */
static __always_inline int ct_reopened(const struct ct_entry *ct, const struct flow *f)
{
	return f->proto == IPPROTO_TCP && (ct->flags & CT_F_CLOSING) &&
	       (f->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
}

static __always_inline void ct_touch(struct ct_entry *ct, const struct flow *f, __u64 now, __u32 len)
{
	ct->last_seen_ns = now;
	__sync_fetch_and_add(&ct->packets, 1);
	__sync_fetch_and_add(&ct->bytes, len);
	if (f->tcp_flags & (TCPF_FIN | TCPF_RST))
		ct->flags |= CT_F_CLOSING;
}

#endif
