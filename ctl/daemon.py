"""The root controller daemon: owns the dataplane of one node.

Start-up order is what keeps traffic flowing across restarts and upgrades:
  1. reuse the pinned maps (or create them) and load fresh programs against them;
  2. fill the maps from the store (a new map is full before any program sees it);
  3. `tc filter replace` every attachment in place (same handle/prio: no gap);
  4. pin the new programs (and any new maps).
Then it watches the store and reconciles on every change, and every RESYNC seconds
anyway (links can change under it). SIGTERM stops it and leaves the programs attached
and the maps pinned: the dataplane keeps forwarding with the last state.
"""
from __future__ import annotations

import os
import signal
import time

import structlog

from .node import netplumb, pods as podlib
from .state import forwards as fwdlib, pods as podstate, services as svclib
from .dataplane.bpf import syscalls as sc, tc
from .dataplane.bpf.loader import Loader, close_loaded, ensure_bpffs
from .state.cluster import LEASE_RENEW_MARGIN, LEASE_TTL, list_leases, load_cluster_config, load_network
from .dataplane.desired import Overlay, compute
from .errors import AtomnetError
from .observe.metrics import Metrics
from .dataplane.reconcile import apply
from .state.model import ValidationError
from .state.store import Compacted, Store, StoreError, open_store

log = structlog.get_logger("atomnet.daemon")

# A full resync (recompute everything, re-read every map) catches what no store event
# reports (a link that vanished); events drive everything else, so it can be rare: at
# 10 000 services a pass costs about a second of CPU.
RESYNC_SECONDS = 30.0


RETRY_MAX_SECONDS = 30.0


class Daemon:
    def __init__(self, store_url: str, node_name: str, bpffs: str, uplink: str | None = None,
                 public_ip: str | None = None, lease_ttl: float = LEASE_TTL,
                 renew_margin: float = LEASE_RENEW_MARGIN, metrics: str | None = None, debug_events: bool = False):
        self.store_url = store_url
        self.store: Store | None = None
        self.node_name = node_name
        self.loader = Loader(bpffs)
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
        self.reconcile(force_attach=True)   # fills maps, then replaces every attachment
        self.loader.commit(self.loaded)    # pins last: the previous generation stays usable until now
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
        """What the metrics endpoint reports, read from the pinned maps at scrape time."""
        from .observe import inspect
        out: dict = {}
        try:
            out["counters"] = inspect.counters(self.loader)
            out["maps"] = inspect.map_list(self.loader)
            names = {p.id: s.name for s in svclib.list_services(self.store) for p in s.ports}
            names.update({f.service_id: f"forward:{f.id}" for f in fwdlib.list_forwards(self.store)})
            out["services"] = inspect.lb_list(self.loader, names)
            out["lease"] = {"subnet": self.node.subnet, "remaining": self.store.lease_ttl(self.lease_id)}
        except AtomnetError as exc:   # before the first pin, or the store away: report what there is
            log.debug("metrics_partial", error=str(exc))
        return out

    def reconcile(self, force_attach: bool = False) -> None:
        with self.metrics.time_reconcile():
            self._reconcile(force_attach)

    def _reconcile(self, force_attach: bool = False) -> None:
        started = time.monotonic()
        links = netplumb.link_table()
        netdevs = [links[n].ifindex for n in (self.node.uplink, "lo") if n in links]
        desired = compute(self.node_name, podstate.list_pods(self.store), links,
                          svclib.list_services(self.store), load_cluster_config(self.store),
                          leases=[lease for lease, _ in list_leases(self.store)], overlay=self.overlay,
                          forwards=fwdlib.list_forwards(self.store, self.node_name), node_ip=self.node.public_ip,
                          netdevs=netdevs, debug_events=self.debug_events)
        for name in desired.missing_links:
            log.warning("pod_link_missing", pod=name)
        for frontend, kept, refused in desired.conflicts:
            log.warning("frontend_conflict", frontend=frontend, kept=kept, refused=refused)
        diffs = apply(self.loaded.maps, desired)
        attached = self.sync_attachments(desired.ingress, tc.INGRESS, force_attach)
        attached += self.sync_attachments(desired.egress, tc.EGRESS, force_attach)
        changes = sum(len(d) for d in diffs.values()) + attached
        if changes:
            log.info("reconciled", changes=changes, seconds=round(time.monotonic() - started, 4))

    def sync_attachments(self, wanted: dict[int, str], direction: str, force: bool) -> int:
        """Attach where the live filter is missing or runs another program generation."""
        count = 0
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

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        self.start()
        revision = self.store.revision() + 1
        while not self.stopping:
            try:
                try:
                    events = self.store.watch("/", revision, timeout=min(RESYNC_SECONDS, 0.5))
                except Compacted:  # fell too far behind the history: a full resync covers it
                    revision = self.store.revision() + 1
                    self.reconcile()
                    continue
                if events:
                    revision = events[-1].revision + 1
                    self.reconcile()
                elif time.monotonic() - getattr(self, "_last_resync", 0) > RESYNC_SECONDS:
                    self._last_resync = time.monotonic()
                    self.reconcile()
                self.renew_lease_if_due()
                if self.reload_requested:
                    self.reload_requested = False
                    self.setup_overlay()   # network config (VNI, port) re-read from the store
                    self.reconcile(force_attach=True)
                    log.info("reloaded")
            except AtomnetError as exc:
                log.error("reconcile_failed", error=str(exc))
                time.sleep(1)
            except Exception as exc:  # a bug or a surprise from the kernel: log it, keep serving
                log.exception("reconcile_crashed", error=f"{type(exc).__name__}: {exc}")
                time.sleep(1)
        self.close()
        log.info("daemon_stopped", note="programs stay attached, maps stay pinned")

    def _reload(self, signum, _frame):
        log.info("signal", signal="SIGHUP")
        self.reload_requested = True

    def _stop(self, signum, _frame):
        log.info("signal", signal=signal.Signals(signum).name)
        self.stopping = True

    def close(self) -> None:
        if self.store:
            self.store.close()
        if self.loaded:
            close_loaded(self.loaded)
            self.loaded = None
