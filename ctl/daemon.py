"""The root controller daemon: owns the dataplane of one node.

Start-up order is what keeps traffic flowing across restarts and upgrades:
  1. reuse the pinned maps (or create them) and load fresh programs against them;
  2. fill the maps from the store (a new map is full before any program sees it);
  3. `tc filter replace` every attachment in place (same handle/prio: no gap);
  4. pin the new programs (and any new maps).
SIGTERM stops it and leaves the programs attached and the maps pinned: the dataplane keeps
forwarding with the last state.

Event-driven, in three stages:
  sources   threads that block on something and put events on one queue: the store watch
            (ctl/state/store, from a revision), netlink link events (ctl/node/linkwatch.py);
  dispatch  the main thread takes events off the queue, collects a burst for a short window
            (kube-proxy's min sync period) and hands each store event to the subscriber of its
            key prefix (`subscribe`), which decodes only that value and updates the model;
  sync      the incremental desired-state model (ctl/dataplane/desired.Model) recomputes only
            what the changes touched; its pending changes go to the kernel through the map
            caches (ctl/dataplane/reconcile.Reconciler), which write only what differs.
A drift check (DRIFT_SECONDS) compares the model with a from-scratch computation and the
caches with the kernel, and repairs (logged, counted) whatever differs.

A subsystem that needs store changes calls `subscribe(prefix, handler)` before `run()`;
handler(key, value_or_None) runs on the main thread. A new kind of desired-state source
is a `set_X` input and a `_contrib_X` method on the Model (see its header).
"""
from __future__ import annotations

import gc
import os
import queue
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable

import structlog

from .node import linkwatch, netplumb, pods as podlib, readiness, snatports
from .dataplane.bpf import syscalls as sc, tc
from .dataplane.bpf.loader import Loader, close_loaded, ensure_bpffs
from .state.cluster import LEASE_RENEW_MARGIN, LEASE_TTL, load_cluster_config, load_network
from .dataplane.desired import EGRESS, INGRESS, Model, Overlay, compute
from .dns.records import NameIndex
from .dns.service import DnsService
from .errors import AtomnetError
from .observe.metrics import FrontendSeries, Metrics
from .dataplane.reconcile import Reconciler
from .state.model import (ATOMNET_CONFIG_KEY, FORWARDS_PREFIX, NETWORK_CONFIG_KEY, PODS_PREFIX, SERVICES_PREFIX,
                          SUBNETS_PREFIX, ClusterConfig, Forward, Lease, Pod, Service, ValidationError,
                          parse_port_range)
from .state import validate
from .runtimes.cni import orphans
from .runtimes import nodeapi_server
from .state.store import Compacted, Event, Store, StoreError, open_store

log = structlog.get_logger("atomnet.daemon")

# Events already queued when a sync starts are one sync (a burst such as `apply -f`, one
# store transaction, arrives as one watch batch and becomes one write per map); a sync
# collects for at most BATCH_MAX. BATCH_WINDOW is how long to wait for one more event: 0,
# because on a loaded machine a 1 ms timed wait sleeps far longer than 1 ms, and each
# sync is incremental (a second small one costs less than waiting for it).
BATCH_WINDOW = 0.0
BATCH_MAX = 0.05
# The rare full comparison (model against from scratch, caches against the kernel).
DRIFT_SECONDS = 300.0
REPAIR_RETRY_FIRST = 1.0   # after a failed pass the repair comes this soon, then 2, 4 ... DRIFT_SECONDS
# Kept for the benchmark harness: the longest the daemon sleeps between two looks at the
# world when nothing happens (the store watch and netlink wake it otherwise).
RESYNC_SECONDS = DRIFT_SECONDS
# How long one store watch call may block before the source thread calls again. Nothing
# waits on it (the thread is a daemon thread; a stop does not join it): long, so an idle
# etcd watch does not reopen its stream every few seconds.
WATCH_TIMEOUT = 300.0


RETRY_MAX_SECONDS = 30.0


def _trim_heap() -> None:
    """glibc keeps freed memory in its arenas; malloc_trim returns it to the kernel."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass



@contextmanager
def gc_paused():
    """The cyclic collector off for one pass (dispatch + sync). A 10 000-service batch allocates
    millions of long-lived objects, and each full collection the allocations trigger walks all
    of them (measured: 0.6 s of the pass, 0.34 s of it in dispatch); the objects a pass makes
    are freed by refcounting, and the collection after a big sync (gc.collect + freeze, in
    _reconcile) or the next allocation after this block finds any cycle it left."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Refreshed:
    """Keys the node API's refresh applied ahead of the watch, with the revision applied: the
    watch's later copy of that state (or of an older one) is skipped, not applied a second time
    over a newer state (a pod added then deleted through the API would otherwise be re-added by
    the watch's late put, then deleted again)."""

    def __init__(self):
        self.applied: dict[str, tuple[int, str]] = {}

    def record(self, events) -> None:
        self.applied.update((ev.key, (ev.revision, ev.type)) for ev in events)

    def stale(self, ev) -> bool:
        seen = self.applied.get(ev.key)
        if seen is None:
            return False
        revision, kind = seen
        # Forgotten once the watch is past it or delivers its own copy: a put was recorded at
        # its exact revision, a delete at the store revision read before the get.
        if (ev.revision >= revision) if kind == "put" else (ev.revision > revision or ev.type == "delete"):
            del self.applied[ev.key]
        return ev.revision <= revision

    def clear(self) -> None:
        self.applied.clear()

class Daemon:
    def __init__(self, store_url: str, node_name: str, bpffs: str, uplink: str | None = None,
                 public_ip: str | None = None, lease_ttl: float = LEASE_TTL,
                 renew_margin: float = LEASE_RENEW_MARGIN, metrics: str | None = None, debug_events: bool = False,
                 dns: DnsService | None = None, map_sizes: dict[str, int] | None = None):
        self.store_url = store_url
        self.store: Store | None = None
        self.node_name = node_name
        self.loader = Loader(bpffs, map_sizes)   # --bpf-lb-*-map-max (ctl/dataplane/mapsizes.py)
        self.uplink = uplink
        self.public_ip = public_ip
        self.lease_ttl = lease_ttl
        self.renew_margin = min(renew_margin, lease_ttl / 2)
        self.loaded = None
        self.overlay: Overlay | None = None
        self.lease_id = 0
        self.lease_deadline = 0.0
        self.stopping = False
        self.reload_requested = False
        self.metrics_address = metrics
        self.debug_events = debug_events
        self.metrics = Metrics()
        self.frontend_series = FrontendSeries()   # the scrape's per-frontend label lines, kept
        self.model = Model(node_name, debug_events=debug_events)
        self.reconciler: Reconciler | None = None
        self._overflows: dict | None = None   # map -> Overflow last reported; None: none yet (report_overflow)
        self.dns = dns or DnsService()   # cluster DNS on the DNS VIP (ctl/dns/): its own server threads
        # (kind, payload) from the source threads, and ("wake", None) from the signal handlers:
        # SimpleQueue.put is reentrant (safe from a signal handler), so a signal ends the
        # main thread's wait at once and the wait needs no short timeout to notice it.
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.vanished: set[str] = set()   # pods whose host veth went: forgotten by their runtime? (orphans)
        self.subscribers: list[tuple[str, Callable[[str, str | None], None]]] = []
        self.revision = 0
        self.last_drift = time.monotonic()
        self.repair_retry = REPAIR_RETRY_FIRST
        self.refreshed = Refreshed()
        self.subscribe(PODS_PREFIX, self._on_pod)
        self.subscribe(SERVICES_PREFIX, self._on_service)
        self.subscribe(FORWARDS_PREFIX, self._on_forward)
        self.subscribe(SUBNETS_PREFIX, self._on_lease)
        self.subscribe(ATOMNET_CONFIG_KEY, self._on_cluster_config)
        self.subscribe(NETWORK_CONFIG_KEY, lambda key, value: None)   # VNI/port: re-read on SIGHUP
        # The cluster's names follow this one watch too (ctl/dns/): fed per batch by _take.

    # ---------------------------------------------------------------- store subscriptions
    def subscribe(self, prefix: str, handler: Callable[[str, str | None], object]) -> None:
        """handler(key, value or None) for every change under prefix (main thread). The
        initial content is delivered the same way, at start. A handler may return the object
        it decoded the value to (the name index then takes it instead of decoding it again)."""
        self.subscribers.append((prefix, handler))

    def _dispatch(self, key: str, value: str | None):
        """Returns what a handler decoded (None if none did)."""
        decoded = None
        for prefix, handler in self.subscribers:
            if key.startswith(prefix):
                try:
                    decoded = handler(key, value) or decoded
                except (ValidationError, ValueError, TypeError, KeyError) as exc:
                    log.warning("store_value_malformed", key=key, error=str(exc))
        return decoded

    # Store records are untrusted (any node can write any key): each is checked before it can
    # reach the model (ctl/state/validate.py); an invalid one counts as absent, logged once.
    def _on_pod(self, key: str, value: str | None) -> None:
        name = key[len(PODS_PREFIX):]
        pod = validate.screen("pod", key, value, validate.pod, self.network) if value is not None else None
        self.model.set_pod(name, pod)

    def _on_service(self, key: str, value: str | None) -> Service | None:
        name = key[len(SERVICES_PREFIX):]
        svc = validate.screen("service", key, value, validate.service, self.model.cluster) if value is not None else None
        self.model.set_service(name, svc)
        return svc   # the name index's too (it would decode the same value again)

    def _on_forward(self, key: str, value: str | None) -> None:
        fid = key[len(FORWARDS_PREFIX):]
        self.model.set_forward(fid, validate.screen("forward", key, value, validate.forward)
                               if value is not None else None)

    def _on_lease(self, key: str, value: str | None) -> None:
        from .state.model import subnet_from_key
        try:
            subnet = str(subnet_from_key(key))
        except (ValueError, ValidationError) as exc:
            validate.INVALID.reject("lease", key, value or "", ValidationError(f"{key}: {exc}"))
            return
        lease = validate.screen("lease", key, value, validate.lease, self.network) if value is not None else None
        self.model.set_lease(subnet, lease)

    def _on_cluster_config(self, key: str, value: str | None) -> None:
        cluster = (validate.config("config", key, value, validate.cluster_config, default=self.model.cluster)
                   if value is not None else ClusterConfig())
        self.model.set_node(cluster=cluster, snat_ports=self.snat_ports(cluster))

    def load_all(self) -> None:
        """The subscribed prefixes' content at one revision; watching continues from there."""
        revision = 0
        for prefix, _ in self.subscribers:
            kvs, rev = self.store.list(prefix)
            revision = max(revision, rev)
            for kv in kvs:
                self._dispatch(kv.key, kv.value)
        self.revision = revision + 1

    def start(self) -> None:
        if os.geteuid() != 0:
            raise AtomnetError("atomnet daemon must run as root (it loads BPF programs and changes links)")
        if self.metrics_address:   # first: a taken address is a start-up error, not a late surprise
            self.metrics.serve(self.metrics_address, self.snapshot)
            log.info("metrics_serving", address=self.metrics_address)
        ensure_bpffs(str(self.loader.root))
        # etcd may come up after us (retry); a bad URL or an unreadable sqlite file will not heal.
        self.store = (self.retry("store_open", lambda: open_store(self.store_url))
                      if self.store_url.startswith("etcd://") else open_store(self.store_url))
        self.node, self.lease_id = self.retry("node_register", lambda: podlib.ensure_node(
            self.store, self.node_name, self.public_ip, self.uplink, ttl=self.lease_ttl))
        self.lease_deadline = time.monotonic() + self.lease_ttl
        self.retry("overlay_setup", self.setup_overlay)
        for key in netplumb.node_sysctls():
            log.info("sysctl_set", key=key, value="1")
        log.info("node_ready", node=self.node.name, subnet=self.node.subnet, public_ip=self.node.public_ip,
                 uplink=self.node.uplink, pod_mtu=self.node.pod_mtu, overlay=netplumb.overlay_ifname(self.network.vni))
        self.loaded = self.loader.load()
        cluster = load_cluster_config(self.store)
        self.model.set_node(cluster=cluster, overlay=self.overlay, node_ip=self.node.public_ip,
                            snat_ports=self.snat_ports(cluster), **self._netdevs())
        # Subscribed to link events before the dump: a link that changes in between is reported.
        self.linkwatch = linkwatch.LinkWatch(lambda ifname, link: self.events.put(("link", (ifname, link))))
        self.model.set_links(netplumb.link_table())   # then netlink events keep it current
        with gc_paused():
            self.load_all()
            self.reconcile(force_attach=True)   # fills maps, then replaces every attachment
        self.vanished |= self._pods_without_link()   # containers deleted while the daemon was down
        self.loader.commit(self.loaded)    # pins last: the previous generation stays usable until now
        try:   # before dataplane_ready: a node that says it is ready answers names too
            self.dns.start(self.store, maps=self.loaded.maps)   # fed by _dispatch; fills the fast path's map
        except (AtomnetError, OSError) as exc:   # names are lost, the dataplane is not: keep forwarding
            log.error("dns_failed", error=str(exc))
        # pod add/del and CNI ADD/DEL done here (ctl/runtimes/nodeapi_server.py); the keys they wrote, at once
        self.api = nodeapi_server.serve(self.store, self.store_url, self.node_name, str(self.loader.root),
                                        self._programmed)
        readiness.mark_ready(str(self.loader.root), self.node_name)   # what CNI STATUS reads
        log.info("dataplane_ready", bpffs=str(self.loader.root),
                 programs={n: sc.prog_info(fd).id for n, fd in self.loaded.programs.items()})

    def retry(self, what: str, fn):
        """Store trouble at start-up (etcd not up yet, no network config yet) is waited out with
        exponential backoff, one log line per attempt, instead of a crash-loop."""
        delay, attempt = 0.5, 1
        while True:
            try:
                return fn()
            except (StoreError, ValidationError) as exc:
                log.warning("retrying", step=what, attempt=attempt, error=str(exc), retry_in=delay)
            except AtomnetError as exc:
                if "no network configured" not in str(exc):
                    raise
                log.warning("retrying", step=what, attempt=attempt, error=str(exc), retry_in=delay)
            if self.stopping:
                raise AtomnetError(f"stopped while waiting for: {what}")
            time.sleep(delay)
            delay, attempt = min(delay * 2, RETRY_MAX_SECONDS), attempt + 1

    def setup_overlay(self) -> None:
        self.network = load_network(self.store)
        ifindex = netplumb.ensure_overlay(self.network.vni, self.network.port, self.node.vtep_mac,
                                          self.node.pod_mtu, self.node.subnet, self.network.network)
        self.overlay = Overlay(ifindex, self.network.vni, self.node.vtep_mac, self.node.subnet)

    def snapshot(self) -> dict:
        """What the metrics endpoint reports: map sizes from the caches, counters read from
        the kernel at scrape time (batch lookups), names from the model."""
        from .observe.metrics import backend_totals, dataplane_counters
        out: dict = {}
        try:
            rec = self.reconciler
            if self.loaded is not None:   # our open map, not the pins: no ELF/DWARF parse per scrape
                out["counters"] = dataplane_counters(self.loaded.maps["counters"])
            if rec is not None:
                out["maps"] = [{"name": n, "entries": len(c), "max_entries": c.map.info.max_entries}
                               for n, c in rec.caches.items()]
                services = rec.caches["services"]
                self.frontend_series.rows(services.version, services.cache, self._frontend_names)
                out["services_text"] = self.frontend_series.render(*backend_totals(rec.maps["backends"]))
                out["drift_repairs"] = rec.drift_repairs
            out["lease"] = {"subnet": self.node.subnet, "remaining": self.store.lease_ttl(self.lease_id)}
        except AtomnetError as exc:   # before the first pin, or the store away: report what there is
            log.debug("metrics_partial", error=str(exc))
        return out

    def _frontend_names(self) -> dict[int, str]:
        names = {p.id: s.name for s in list(self.model.services.values()) for p in s.ports}
        names.update({f.service_id: f"forward:{f.id}" for f in list(self.model.forwards.values())})
        return names

    def reconcile(self, force_attach: bool = False) -> None:
        """One sync: the model's pending changes (all of them, the first time) to the kernel."""
        with self.metrics.time_reconcile():
            self._reconcile(force_attach)

    def _reconcile(self, force_attach: bool = False) -> None:
        started = time.monotonic()
        self.model.update()
        full = self.reconciler is None or force_attach
        if full:
            self.reconciler = self.reconciler or Reconciler(self.loaded.maps)
            self.model.drain()
            desired = self.model.snapshot()
            changes = self.reconciler.initial_changes(desired)
            wanted_in, wanted_eg = desired.ingress, desired.egress
            for name in desired.missing_links:
                log.warning("pod_link_missing", pod=name)
        else:
            changes = self.model.drain()
            wanted_in = {k: v for k, v in changes.pop(INGRESS, {}).items() if v is not None}
            wanted_eg = {k: v for k, v in changes.pop(EGRESS, {}).items() if v is not None}
        if not any(changes.values()) and not wanted_in and not wanted_eg:
            return
        conflicts = self.model.conflicts()
        if conflicts != getattr(self, "_conflicts", []):
            for frontend, kept, refused in conflicts:
                log.warning("frontend_conflict", frontend=frontend, kept=kept, refused=refused)
            self._conflicts = conflicts
        # the whole state was admitted by initial_changes; drained changes are filtered alike
        res = self.reconciler.apply(changes) if full else self.reconciler.apply_drained(changes)
        self.report_overflow()
        attached = self.sync_attachments(wanted_in, tc.INGRESS, force_attach)
        attached += self.sync_attachments(wanted_eg, tc.EGRESS, force_attach)
        total = res.total + attached
        if total:
            log.info("reconciled", changes=total, tables_built=res.tables_built,
                     seconds=round(time.monotonic() - started, 4))
        if total > 1000:
            # The model now holds millions of long-lived tuples and dicts: every full pass of
            # the cyclic garbage collector would walk them all (hundreds of ms at 10 000
            # services, landing on whichever change is being applied). Collect once, then
            # move them out of the collector's generations (gc.freeze; refcounting still
            # frees what a later change drops).
            gc.collect()
            gc.freeze()
            _trim_heap()   # a big sync's temporaries: give the freed heap back (RSS, not just free lists)

    def report_overflow(self) -> None:
        """A desired state larger than a service-side map (ctl/dataplane/capacity.py): one
        `map_overflow` event per map when it starts or its numbers change, one
        `map_overflow_resolved` when it fits again; the metrics and the file `atomnet map
        list` reads (ctl/node/readiness.py) follow."""
        from .dataplane.mapsizes import flag_for
        now = {o.map: o for o in self.reconciler.capacity.overflows}
        before = self._overflows   # None: the first pass also clears an old file
        if now == before:
            return
        before = before or {}
        for name, o in now.items():
            if before.get(name) != o:
                log.error("map_overflow", map=name, needed=o.needed, capacity=o.capacity,
                          refused_service_ports=o.refused, raise_flag=flag_for(name),
                          note="the oldest service ports that fit are programmed, the rest are not")
        for name in before.keys() - now.keys():
            log.info("map_overflow_resolved", map=name)
        self._overflows = now
        self.metrics.set_overflow([o.to_dict() for o in now.values()],
                                  len(self.reconciler.capacity.refused))
        readiness.write_overflow(str(self.loader.root), [{**o.to_dict(), "flag": flag_for(o.map)}
                                                         for o in now.values()])

    def drift_check(self) -> None:
        """The rare full comparison. The model is checked against a from-scratch computation
        of the same inputs (a difference is a bug: logged, and the model rebuilt), then the
        kernel against the caches and the caches against that computation."""
        m = self.model
        scratch = compute(self.node_name, list(m.pods.values()), m.links, list(m.services.values()), m.cluster,
                          leases=list(m.leases.values()), overlay=m.overlay, forwards=list(m.forwards.values()),
                          node_ip=m.node_ip, netdevs=list(m.netdevs), debug_events=m.debug_events,
                          uplink=m.uplink or None, cluster_cidr=m.cluster_cidr, snat_ports=m.snat_ports)
        mine = m.snapshot()
        if mine.maps != scratch.maps or mine.maglev != scratch.maglev:
            log.error("desired_model_drift", note="incremental model differs from the from-scratch computation")
            self.metrics.drift_repairs.labels(kind="model").inc()
        repairs = self.reconciler.drift_check(scratch)
        self.report_overflow()
        if repairs:
            self.metrics.drift_repairs.labels(kind="kernel").inc(repairs)
        log.info("drift_checked", repairs=repairs)

    def snat_ports(self, cluster) -> tuple[int, int] | None:
        """Re-read every pass: ip_local_port_range may change under us (it is cheap)."""
        chosen = snatports.masquerade_port_range(snatports.ephemeral_range(), parse_port_range(cluster.node_port_range))
        if chosen != getattr(self, "_snat_ports", False):
            if chosen is None and cluster.masquerade:
                log.warning("masquerade_disabled", reason="no free port range outside ip_local_port_range "
                            "and the NodePort range", node_port_range=cluster.node_port_range)
            else:
                log.info("masquerade_ports", range=f"{chosen[0]}-{chosen[1]}" if chosen else None,
                         masquerade=cluster.masquerade)
            self._snat_ports = chosen
        return chosen

    def sync_attachments(self, wanted: dict[int, str], direction: str, force: bool) -> int:
        """Attach where the live filter is missing or runs another program generation."""
        count = 0
        if not wanted:
            return 0
        with netplumb.ipr() as conn:
            for ifindex, prog_name in wanted.items():
                fd = self.loaded.programs[prog_name]
                want = sc.prog_info(fd).id
                current = [f for f in tc.filters(conn, ifindex, direction) if f.ours]
                if force or not current or current[0].prog_id != want:
                    tc.attach(conn, ifindex, direction, fd, prog_name)
                    log.info("program_attached", ifindex=ifindex, direction=direction, program=prog_name, id=want)
                    count += 1
        return count

    def renew_lease_if_due(self) -> None:
        if time.monotonic() < self.lease_deadline - self.renew_margin:
            return
        try:
            self.store.refresh(self.lease_id)
        except AtomnetError:
            # Expired or revoked (e.g. the store was unreachable too long): take it again.
            self.node, self.lease_id = podlib.ensure_node(self.store, self.node_name, self.node.public_ip,
                                                          self.node.uplink, ttl=self.lease_ttl)
        self.lease_deadline = time.monotonic() + self.lease_ttl
        log.info("lease_renewed", subnet=self.node.subnet, ttl=self.lease_ttl)

    # ---------------------------------------------------------------- sources
    def _watch_store(self) -> None:
        """Source thread: store events from self.revision on, onto the queue."""
        revision = self.revision
        while not self.stopping:
            try:
                events = self.store.watch("/", revision, timeout=WATCH_TIMEOUT)
            except Compacted:   # fell too far behind the history: the main thread lists again
                self.events.put(("relist", None))
                return
            except StoreError as exc:
                log.warning("store_watch_failed", error=str(exc))
                time.sleep(1)
                continue
            if events:
                revision = events[-1].revision + 1
                self.events.put(("store", events))

    def _start_sources(self) -> None:
        threading.Thread(target=self._watch_store, name="store-watch", daemon=True).start()
        self.linkwatch.start()

    def _take(self, item) -> None:
        kind, payload = item
        if kind == "store":
            names = []
            for ev in payload:
                if self.refreshed.stale(ev):
                    continue
                value = ev.value if ev.type == "put" else None
                decoded = self._dispatch(ev.key, value)
                if NameIndex.wants(ev.key):
                    names.append((ev.key, value, decoded))
            # Names now, not after the batch window and the reconcile: the index takes the
            # batch in one pass, the fast path's map gets it here.
            self.dns.apply_many(names)
            self.dns.flush()
        elif kind == "link":
            self.model.set_link(*payload)
            ifname, link = payload
            if link is None and ifname in self.model.pod_by_ifname:
                self.vanished.add(self.model.pod_by_ifname[ifname])
        elif kind == "relist":
            self._relist()
        elif kind == "refresh":   # keys the node API wrote: their current values, as if watched, synced now
            keys, done = payload
            try:
                # Read before the keys: whatever the watch will deliver for them at or below it
                # is already in what these gets return (without this, a pod added then deleted
                # would be re-added by the watch's late copy of the put, then deleted again).
                before = self.store.revision()
                kvs = [(key, self.store.get(key)) for key in keys]
                events = [Event("put", k, kv.value, kv.mod_revision) if kv else Event("delete", k, None, before)
                          for k, kv in kvs]
                self._take(("store", events))
                self.refreshed.record(events)
                self.reconcile()
            finally:
                done.set()   # the request is answered once its pod is programmed

    def _programmed(self, keys: list[str]) -> threading.Event:
        done = threading.Event()
        self.events.put(("refresh", (keys, done)))
        return done

    def _relist(self) -> None:
        """After a compaction: the current content replaces the model's inputs."""
        self.refreshed.clear()   # everything is listed again
        self.model = Model(self.node_name, debug_events=self.debug_events)
        self.model.set_node(overlay=self.overlay, node_ip=self.node.public_ip, **self._netdevs())
        self.model.set_links(netplumb.link_table())
        self.load_all()
        self.dns.resync(self.store)   # deletions missed while behind: the names are listed again too
        self._full_sync()
        threading.Thread(target=self._watch_store, name="store-watch", daemon=True).start()

    def _full_sync(self) -> None:
        self.model.update()
        self.model.drain()
        desired = self.model.snapshot()
        self.reconciler.apply(self.reconciler.initial_changes(desired))
        self.report_overflow()

    def _netdevs(self) -> dict:
        """The node's own devices, as Model.set_node takes them: from_netdev on the uplink and
        lo, to_netdev (masquerade) on the uplink, and the cluster network it must not SNAT."""
        links = netplumb.link_table()
        return {"netdevs": [links[n].ifindex for n in (self.node.uplink, "lo") if n in links],
                "uplink": links[self.node.uplink].ifindex if self.node.uplink in links else 0,
                "cluster_cidr": self.network.network}

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        self.start()
        self._start_sources()
        while not self.stopping:
            try:
                try:   # idle means asleep: only an event, a signal or a deadline ends this wait
                    first = self.events.get(timeout=self.idle_timeout(time.monotonic()))
                except queue.Empty:
                    first = None
                if first is not None:
                    with gc_paused():
                        self._take(first)
                        # The batching window: take what follows closely, up to BATCH_MAX.
                        window_end = time.monotonic() + BATCH_MAX
                        while time.monotonic() < window_end:
                            try:
                                self._take(self.events.get(timeout=BATCH_WINDOW))
                            except queue.Empty:
                                break
                        self.reconcile()
                if time.monotonic() - self.last_drift >= DRIFT_SECONDS:
                    self.last_drift = time.monotonic()
                    self.drift_check()
                    self.repair_retry = REPAIR_RETRY_FIRST   # repaired: the next failure retries soon again
                    self.vanished |= self._pods_without_link()   # a netns that died after its veth did
                if self.vanished:
                    self.release_forgotten()
                self.renew_lease_if_due()
                if self.reload_requested:
                    self.reload_requested = False
                    self.setup_overlay()   # network config (VNI, port) re-read from the store
                    self.model.set_node(overlay=self.overlay, snat_ports=self.snat_ports(self.model.cluster),
                                        **self._netdevs())
                    self.model.set_links(netplumb.link_table())
                    self.reconcile(force_attach=True)
                    log.info("reloaded")
            except AtomnetError as exc:
                # A pass that failed half way (the kernel refused a write) has drained the
                # model's pending changes: the drift check, due in a second, re-reads the
                # kernel and writes whatever differs from a from-scratch computation.
                # A kernel that keeps refusing (a map too small for the store) must not turn
                # this into a busy loop of full repairs: each failure in a row doubles the wait.
                log.error("reconcile_failed", error=str(exc), retry_in=self.repair_soon(time.monotonic()))
                time.sleep(1)
            except Exception as exc:  # a bug or a surprise from the kernel: log it, keep serving
                log.exception("reconcile_crashed", error=f"{type(exc).__name__}: {exc}")
                time.sleep(1)
        self.close()
        log.info("daemon_stopped", note="programs stay attached, maps stay pinned")

    def repair_soon(self, now: float) -> float:
        """After a failed pass: the drift check (the repair) comes in repair_retry seconds, a
        wait that doubles with each failure in a row up to DRIFT_SECONDS. Returns the wait."""
        wait = self.repair_retry
        self.last_drift = min(self.last_drift, now - DRIFT_SECONDS + wait)
        self.repair_retry = min(wait * 2, DRIFT_SECONDS)
        return wait

    def idle_timeout(self, now: float) -> float:
        """How long the main thread may sleep with nothing queued: until the next deadline
        (the drift check, the lease renewal), never a polling period."""
        return max(0.0, min(self.last_drift + DRIFT_SECONDS, self.lease_deadline - self.renew_margin) - now)

    def _pods_without_link(self) -> set[str]:
        return {p.name for p in orphans.forgotten(self.model.pods.values(), self.model.links, lambda _: False,
                                                  self.node_name)}

    def release_forgotten(self) -> None:
        """CNI pods whose veth and netns are gone without a DEL (`ctr task delete`) are released
        as DEL would release them (ctl/runtimes/cni/orphans.py); kept for the next round when
        the store is away."""
        names, self.vanished = self.vanished, set()
        try:
            orphans.release_forgotten(self.store, self.node_name, names)
        except (AtomnetError, StoreError) as exc:
            log.warning("forgotten_pods_release_failed", pods=sorted(names), error=str(exc))
            self.vanished |= names

    def _reload(self, signum, _frame):
        log.info("signal", signal="SIGHUP")
        self.reload_requested = True
        self.events.put(("wake", None))

    def _stop(self, signum, _frame):
        log.info("signal", signal=signal.Signals(signum).name)
        self.stopping = True
        self.events.put(("wake", None))

    def close(self) -> None:
        if getattr(self, "api", None):
            self.api.stop()
        self.dns.stop()
        readiness.clear(str(self.loader.root))   # the overflow file stays: it describes the maps left behind
        if getattr(self, "linkwatch", None):
            self.linkwatch.stop()
        if self.store:
            self.store.close()
        if self.loaded:
            close_loaded(self.loaded)
            self.loaded = None
