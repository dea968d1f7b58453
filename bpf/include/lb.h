/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Service load balancing: frontend (VIP, port, proto) -> backend, chosen by client-IP
 * affinity if configured, else by the service's Maglev table indexed with a hash of
 * the 5-tuple; pinned by conntrack; DNAT on the way in, reverse NAT on the way out.
 */
#ifndef ATOMNET_LB_H
#define ATOMNET_LB_H

#include "conntrack.h"
#include "counters.h"
#include "nat.h"

/* Hairpin: a pod reaching itself through a service gets this source address, or its
 * kernel would drop a packet "from" its own address as a martian (Cilium does the same). */
#define HAIRPIN_IP_BE bpf_htonl(0xA9FE2A01)	/* 169.254.42.1 */

enum lb_result {
	LB_PASS,		/* not a service flow: deliver as is */
	LB_TRANSLATED,		/* rewritten: deliver by the new destination */
	LB_REJECT,		/* no ready backend: refuse the client */
	LB_DROP_FRAGMENT,
	LB_NAT_FAILED,
	LB_TUPLE_CLASH,		/* a new flow would take over another live flow's reply entry */
};

static __always_inline __u32 mix32(__u32 h)
{
	/* murmur3's finaliser: every input bit affects every output bit */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 flow_hash(const struct flow *f)
{
	__u32 h = mix32(f->saddr ^ 0x9e3779b9);

	h = mix32(h ^ f->daddr);
	h = mix32(h ^ (((__u32)f->sport << 16) | f->dport));
	return mix32(h ^ f->proto);
}

static __always_inline void trace_translation(struct __sk_buff *skb, const struct flow *f, __u32 service_id,
						const struct backend_addr *be)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct event ev = {};

	if (!cfg || !(cfg->flags & CFG_F_DEBUG_EVENTS))
		return;
	ev.ts_ns = bpf_ktime_get_ns();
	ev.ifindex = skb->ifindex;
	ev.len = skb->len;
	ev.type = EV_TRANSLATE;
	ev.proto = f->proto;
	ev.saddr = f->saddr;
	ev.daddr = f->daddr;
	ev.sport = f->sport;
	ev.dport = f->dport;
	ev.nat_ip = be->ip;
	ev.nat_port = be->port;
	ev.service_id = service_id;
	bpf_perf_event_output(skb, &events, BPF_F_CURRENT_CPU, &ev, sizeof(ev));
}

static __always_inline int backend_alive(__u32 service_id, __be32 ip, __be16 port)
{
	struct backend_key k = { .service_id = service_id, .ip = ip, .port = port };

	return bpf_map_lookup_elem(&backends, &k) != NULL;
}

static __always_inline void backend_count(__u32 service_id, const struct backend_addr *be, __u32 len)
{
	struct backend_key k = { .service_id = service_id, .ip = be->ip, .port = be->port };
	struct counter *c = bpf_map_lookup_elem(&backends, &k);

	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

static __always_inline int select_backend(const struct flow *f, const struct service_info *svc, __u64 now,
					  struct backend_addr *out)
{
	struct affinity_key ak = { .client = f->saddr, .service_id = svc->id };
	struct affinity_value *av;
	struct backend_addr *slot;
	void *table;
	__u32 index;

	if (svc->affinity_timeout) {
		av = bpf_map_lookup_elem(&affinity, &ak);
		/* signed age: another CPU may have stamped the entry after our clock read */
		if (av && ct_quiet_for(av->last_used_ns, now) <= (__u64)svc->affinity_timeout * NSEC &&
		    backend_alive(svc->id, av->backend.ip, av->backend.port)) {
			av->last_used_ns = now;
			*out = av->backend;
			return 0;
		}
	}
	table = bpf_map_lookup_elem(&maglev, &svc->table);
	if (!table || svc->table_size == 0)
		return -1;
	index = flow_hash(f) % svc->table_size;
	slot = bpf_map_lookup_elem(table, &index);
	if (!slot || slot->ip == 0)
		return -1;
	*out = *slot;
	if (svc->affinity_timeout) {
		struct affinity_value v = { .last_used_ns = now, .backend = *slot };

		bpf_map_update_elem(&affinity, &ak, &v, BPF_ANY);
	}
	return 0;
}

static __always_inline int is_local_pod(__be32 ip)
{
	struct endpoint_key k = { .ip = ip };

	return bpf_map_lookup_elem(&endpoints, &k) != NULL;
}

/* 127.0.0.0/8: the node's own connection to a port published on loopback (Docker's
 * -p 127.0.0.1:N:M, and every published port of a node with no uplink). */
static __always_inline int is_loopback(__be32 addr)
{
	return (bpf_ntohl(addr) >> 24) == 127;
}

/*
 * An RST ends a TCP connection at once (no TIME_WAIT follows it), so both entries of its
 * flow go now rather than linger CT_TIMEOUT_CLOSING in the LRU table: at high rates of
 * RST-closed connections (clients that close with SO_LINGER 0, the benchmark's) the
 * lingering entries fill the table and every new flow's two inserts then pay for LRU
 * evictions (BPF_PROG_TEST_RUN, each flow a SYN then an RST, 160 000 flows: a SYN's
 * median 2.7 us with the entries lingering, 1.7 us without). A late packet of the flow finds no entry: a forward one is translated again
 * (Maglev picks the same backend) without re-creating the flow if it is an RST; a reply
 * goes untranslated and the client's stack answers it with an RST, as for any closed socket.
 */
static __always_inline void ct_forget(const struct ct_key *fk, const struct ct_key *rk)
{
	bpf_map_delete_elem(&conntrack, rk);
	bpf_map_delete_elem(&conntrack, fk);
}

/* The reply entry of service flow f (translated to a backend, source snat or 0): replies
 * come from VIP:port, and go back to the real client when the source was replaced. */
static __always_inline void ct_reply_entry(struct ct_entry *rev, const struct flow *f, __be32 snat, __u8 flags,
					   __u32 service_id, __u64 now)
{
	__builtin_memset(rev, 0, sizeof(*rev));
	rev->created_ns = rev->last_seen_ns = now;
	rev->nat_ip = f->daddr;			/* replies come from VIP:port */
	rev->nat_port = f->dport;
	rev->snat_ip = snat ? f->saddr : 0;	/* hairpin/SNAT: back to the real client */
	rev->flags = flags & (CT_F_HAIRPIN | CT_F_SNAT | CT_F_CLOSING);
	rev->service_id = service_id;
}

/* The reply entry key rk names f's own flow (not another forward flow's that DNAT made
 * the same 4-tuple at the backend: the tuple clash, see lb_forward). */
static __always_inline int ct_reply_is_of(const struct ct_entry *rev, const struct flow *f, __be32 snat)
{
	return rev->nat_ip == f->daddr && rev->nat_port == f->dport && rev->snat_ip == (snat ? f->saddr : 0);
}

/* The forward entry of the flow the reply entry rk (value ct) belongs to is gone, closing or expired. */
static __always_inline int reply_is_stale(const struct ct_key *rk, const struct ct_entry *ct, __u64 now)
{
	struct ct_key fk;
	struct ct_entry *fwd;

	ct_forward_key_of_reply(&fk, rk, ct->nat_ip, ct->nat_port, ct->snat_ip);
	fwd = bpf_map_lookup_elem(&conntrack, &fk);
	return !fwd || (fwd->flags & CT_F_CLOSING) || ct_expired(fwd, now, rk->proto);
}

/*
 * The DNAT tuple clash that conntrack can see: the reply entry rk that the new flow f needs
 * is held by another live service flow (one client port to two frontends that DNAT to the
 * same backend:port; or two outside clients with the same port whose sources snat_remote
 * replaced with one address). At the backend both are one 4-tuple. Writing our entry over
 * the other would send that flow's replies to f's client (another socket; for SNAT, another
 * host). netfilter remaps the new flow's source port; that needs a source port in
 * ct_entry (a new layout that an upgrade would have to migrate), so for now the new flow is
 * refused instead (lb_forward: dropped and counted; a TCP client retransmits its SYN and
 * gets through once the other flow is closing or gone). Calico's BPF dataplane first did the
 * same (felix #2983); Cilium documents the multi-VIP case as a known limitation.
 * Costs one lookup per new flow; the established path never runs it.
 */
/* A TCP flow whose backend never answered, quiet this long, is not protected from a clash:
 * such a flow is what a forward packet sent after its flow's RST re-creates (the client's
 * last ACK, from the other CPU, overtaken by the RST that deleted the flow), and nothing
 * will ever answer it; it held the tuple for the 6 h of an established flow (one connection
 * in a few thousand refused through another VIP, issue 16). A live handshake's SYN-ACK
 * comes well within it, and a client still waiting retransmits its SYN after 1 s, which
 * refreshes its reply entry (ct_restore_reply). */
#define CT_UNANSWERED_NS NSEC

static __always_inline int reply_key_clashes(const struct ct_key *rk, const struct flow *f, __be32 snat, __u64 now)
{
	struct ct_entry *rev = bpf_map_lookup_elem(&conntrack, rk);

	if (!rev || ct_reply_is_of(rev, f, snat) || ct_expired(rev, now, f->proto))
		return 0;
	if (f->proto == IPPROTO_TCP && !(rev->flags & CT_F_SEEN_REPLY) &&
	    ct_quiet_for(rev->last_seen_ns, now) >= CT_UNANSWERED_NS)
		return 0;
	return !reply_is_stale(rk, rev, now);
}

/*
 * A live forward entry whose reply entry the LRU evicted (or that outlived it: a UDP flow
 * whose backend is quiet for CT_TIMEOUT_OTHER) would let every reply pass untranslated,
 * from the backend's address: the client's stack answers those with an RST or drops them.
 * So a forward packet re-creates the reply entry from the forward entry, and keeps an
 * existing one of its own flow alive. Not on every packet (a second lookup on the
 * established fast path): only when the flow was quiet for CT_REPLY_CHECK_QUIET_NS (an
 * idle flow is what the LRU evicts from, and the first packet after a pause is when the
 * replies resume) or on every CT_REPLY_CHECK_EVERY-th packet (a busy one-way flow).
 * A live entry of another flow is left alone (the tuple clash: refused in lb_forward).
 */
#define CT_REPLY_CHECK_QUIET_NS NSEC
#define CT_REPLY_CHECK_EVERY 64		/* a power of two: a mask test per packet */

static __always_inline void ct_restore_reply(const struct flow *f, const struct ct_entry *fwd, __be32 be_ip,
					     __be16 be_port, __be32 snat, __u64 now)
{
	struct ct_key rk;
	struct ct_entry *rev, fresh;

	ct_reply_key(&rk, f, be_ip, be_port, snat);
	rev = bpf_map_lookup_elem(&conntrack, &rk);
	if (rev && !ct_expired(rev, now, f->proto)) {
		if (ct_reply_is_of(rev, f, snat))
			rev->last_seen_ns = now;
		return;
	}
	ct_reply_entry(&fresh, f, snat, fwd->flags, fwd->service_id, now);
	bpf_map_update_elem(&conntrack, &rk, &fresh, BPF_ANY);
}

/* A packet to a service frontend: find or create its flow, then DNAT, and SNAT where the
 * reply would otherwise not come back through here: hairpin (a pod calling itself), and
 * (snat_remote != 0) traffic from outside the cluster to a backend on another node. */
static __always_inline enum lb_result lb_forward(struct __sk_buff *skb, struct flow *f,
						 const struct service_info *svc, __be32 snat_remote)
{
	struct ct_key fk, rk;
	struct ct_entry *ct;
	struct backend_addr be;
	__be32 snat = 0;
	__u64 now = bpf_ktime_get_ns();

	ct_key_of(&fk, f, CT_FORWARD);
	ct = bpf_map_lookup_elem(&conntrack, &fk);
	/* An established flow keeps its backend even after the backend left the service
	 * (a terminating pod finishes its connections, as with kube-proxy); UDP flows of
	 * removed backends are flushed by the daemon. */
	if (ct && !ct_expired(ct, now, f->proto) && !ct_reopened(ct, f)) {
		be.ip = ct->nat_ip;
		be.port = ct->nat_port;
		snat = ct->snat_ip;
		if (f->tcp_flags & TCPF_RST) {	/* read above: a deleted LRU entry may be reused at once */
			ct_reply_key(&rk, f, be.ip, be.port, snat);
			ct_forget(&fk, &rk);
		} else {
			if (ct_quiet_for(ct->last_seen_ns, now) > CT_REPLY_CHECK_QUIET_NS ||
			    !(ct->packets & (CT_REPLY_CHECK_EVERY - 1)))
				ct_restore_reply(f, ct, be.ip, be.port, snat, now);
			ct_touch(ct, f, now, skb->len);
		}
	} else {
		struct ct_entry fwd = {}, rev;

		if (!f->has_l4)
			return LB_DROP_FRAGMENT;	/* a flow cannot start in a later fragment */
		if (svc->backend_count == 0 || select_backend(f, svc, now, &be) < 0)
			return LB_REJECT;
		if (be.ip == f->saddr)
			snat = HAIRPIN_IP_BE;
		else if (snat_remote && (!is_local_pod(be.ip) || is_loopback(f->saddr)))
			snat = snat_remote;	/* a pod cannot answer 127.x: the node's own, via lo */
		fwd.created_ns = fwd.last_seen_ns = now;
		fwd.nat_ip = be.ip;
		fwd.nat_port = be.port;
		fwd.snat_ip = snat;
		fwd.flags = !snat ? 0 : snat == HAIRPIN_IP_BE ? CT_F_HAIRPIN : CT_F_SNAT;
		fwd.service_id = svc->id;
		fwd.packets = 1;
		fwd.bytes = skb->len;
		ct_reply_entry(&rev, f, snat, fwd.flags, svc->id, now);
		ct_reply_key(&rk, f, be.ip, be.port, snat);
		if (f->tcp_flags & TCPF_RST)
			goto translate;		/* an RST ends a flow, never starts one (ct_forget) */
		if (reply_key_clashes(&rk, f, snat, now))
			return LB_TUPLE_CLASH;
		/* Reply entry first: once the forward entry exists, replies may follow at once. */
		if (bpf_map_update_elem(&conntrack, &rk, &rev, BPF_ANY) < 0 ||
		    bpf_map_update_elem(&conntrack, &fk, &fwd, BPF_ANY) < 0)
			return LB_NAT_FAILED;
		count(skb, CTR_LB_NEW_FLOW);
		trace_translation(skb, f, svc->id, &be);
	}
translate:
	backend_count(svc->id, &be, skb->len);
	if (snat && nat_rewrite(skb, f, NAT_SRC, snat, f->sport) < 0)
		return LB_NAT_FAILED;
	if (nat_rewrite(skb, f, NAT_DST, be.ip, be.port) < 0)
		return LB_NAT_FAILED;
	return LB_TRANSLATED;
}


/* A reply of a translated flow: source back to VIP:port (and, for hairpin, destination
 * back to the real client). */
static __always_inline enum lb_result lb_reverse(struct __sk_buff *skb, struct flow *f)
{
	struct ct_key rk;
	struct ct_entry *ct;
	__be32 client, vip;
	__be16 port;
	__u64 now;

	ct_key_of(&rk, f, CT_REPLY);
	ct = bpf_map_lookup_elem(&conntrack, &rk);
	if (!ct)
		return LB_PASS;		/* most packets (all but replies): no clock read */
	now = bpf_ktime_get_ns();
	if (ct_expired(ct, now, f->proto))
		return LB_PASS;
	if (f->proto == IPPROTO_TCP && (f->tcp_flags & TCPF_SYN) && reply_is_stale(&rk, ct, now)) {
		/* A SYN-ACK on the tuple of a translated connection that is over: it answers a
		 * new, direct connection (same client port, straight to the backend), which must
		 * not be rewritten to come from the VIP. */
		bpf_map_delete_elem(&conntrack, &rk);
		return LB_PASS;
	}
	client = ct->snat_ip;
	vip = ct->nat_ip;
	port = ct->nat_port;
	if (f->tcp_flags & TCPF_RST) {	/* values read above: a deleted LRU entry may be reused at once */
		struct ct_key fk;

		ct_forward_key_of_reply(&fk, &rk, vip, port, client);
		ct_forget(&fk, &rk);
	} else {
		ct_touch(ct, f, now, skb->len);
		ct->flags |= CT_F_SEEN_REPLY;
	}
	if (nat_rewrite(skb, f, NAT_SRC, vip, port) < 0)
		return LB_NAT_FAILED;
	if (client && nat_rewrite(skb, f, NAT_DST, client, f->dport) < 0)
		return LB_NAT_FAILED;
	count(skb, CTR_REV_NAT);
	return LB_TRANSLATED;
}

static __always_inline int in_service_cidr(__be32 addr)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);

	return cfg && cfg->service_mask && (addr & cfg->service_mask) == cfg->service_net;
}

#endif
