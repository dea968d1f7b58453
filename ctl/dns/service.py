"""The node's cluster DNS, as the daemon runs it: the name index, the server on the DNS
VIP, the upstreams, what feeds the index, and the BPF fast path's name map it keeps
equal to the index (ctl/dns/fastpath.py; given the daemon's maps).

Two ways to feed it, one at a time:
  - start(store) and then apply_many(changes) (or apply(key, value)) from a watch-driven
    daemon's dispatch, one call per batch it took off its watch, flush()
    after each batch it took off its watch (and resync(store) after it had to list again):
    what the daemon does. The change reaches the index as the daemon's main thread takes it,
    before the batching window and the reconcile (so a name never waits for those), and
    the node watches the store once;
  - start(store, store_url): its own watch of the store on its own connection and thread,
    fed with feed(events) (for a user without a watch of its own)."""
from __future__ import annotations

import threading

import structlog

from ..node import dnsdevice
from ..state.cluster import dns_vip_of, load_cluster_config
from ..state.model import VIPS_PREFIX
from ..state.names import DNS_VIP_OWNER
from ..state.store import Compacted, Store, open_store
from .fastpath import FastPath
from .records import DEFAULT_POD_TTL, DEFAULT_SERVICE_TTL, PREFIXES, NameIndex
from .server import DnsServer
from .upstream import Upstream, parse_upstream, system_upstreams

log = structlog.get_logger("atomnet.dns")


class DnsService:
    def __init__(self, upstreams: list[str] | None = None, service_ttl: int = DEFAULT_SERVICE_TTL,
                 pod_ttl: int = DEFAULT_POD_TTL, port: int = 53):
        # parsed here, before anything starts: a bad --upstream is a start-up error
        self.upstream_args = [parse_upstream(u) for u in upstreams or []]
        self.index = NameIndex(service_ttl, pod_ttl)
        self.port = port
        self.server: DnsServer | None = None
        self.fastpath: FastPath | None = None
        self._pending = False   # apply() changed the index since the last flush()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, store: Store, store_url: str | None = None, maps: dict | None = None) -> None:
        if maps and "dns_names" in maps and "dns_config" in maps:
            self.fastpath = FastPath(maps["dns_names"], maps["dns_config"])
        self.resync(store)
        vip = dns_vip_of(load_cluster_config(store))
        # Clusters initialised before the DNS VIP existed: claim it now (a no-op otherwise).
        if not store.create(VIPS_PREFIX + vip, DNS_VIP_OWNER):
            owner = store.get(VIPS_PREFIX + vip)
            if owner is not None and owner.value != DNS_VIP_OWNER:
                log.error("dns_vip_taken", vip=vip, service=owner.value,
                          note="that service's VIP:53 would be load-balanced instead of answered here")
        dnsdevice.ensure(vip)
        servers = self.upstream_args or system_upstreams(exclude={vip})
        self.server = DnsServer(self.index, Upstream(servers), vip, self.port)
        self.server.start()
        if self.fastpath:   # after the server: a query the map cannot answer finds it listening
            self.fastpath.enable(vip)
        log.info("dns_serving", address=f"{vip}:{self.server.port}", domain=self.index.domain,
                 upstreams=[f"{h}:{p}" for h, p in servers], records=len(self.index.rows()))
        if store_url:
            self._watcher = threading.Thread(target=self._watch, args=(open_store(store_url),), name="dns-watch",
                                             daemon=True)
            self._watcher.start()

    def _watch(self, store: Store) -> None:
        revision = None
        try:
            while not self._stopping.is_set():
                try:
                    if revision is None:
                        revision = self.resync(store) + 1
                    events = store.watch("/", revision, timeout=0.5)
                    if events:
                        revision = events[-1].revision + 1
                        self.feed(events)
                except Compacted:
                    revision = None   # fell behind the history: list again
                except Exception as exc:   # the store away (etcd down): names keep answering from the index
                    log.warning("dns_watch_failed", error=f"{type(exc).__name__}: {exc}", retry_in=1)
                    revision = None
                    self._stopping.wait(1)
        finally:
            store.close()

    def resync(self, store: Store) -> int:
        """Loads the index from a full list; returns the lowest revision listed (watch from after it:
        replaying a change already listed is harmless, missing one is not)."""
        items, revisions = [], []
        for prefix in PREFIXES:
            kvs, rev = store.list(prefix)
            items += [(kv.key, kv.value) for kv in kvs]
            revisions.append(rev)
        self.index.load(items)
        self._sync_fastpath()
        return min(revisions)

    def _sync_fastpath(self) -> None:
        if self.fastpath:
            try:
                self.fastpath.sync(self.index)
            except Exception as exc:   # the map away or full: the server still answers every name
                log.error("dns_fastpath_sync_failed", error=f"{type(exc).__name__}: {exc}")
                self.index.a_changes_lost()   # the next sync is a full one

    def apply(self, key: str, value: str | None) -> None:
        """One store change (a daemon's dispatch handler); the fast path learns it at flush()."""
        if self.index.apply(key, value):
            self._pending = True

    def apply_many(self, items) -> None:
        """A batch of store changes, (key, value or None, decoded object or None) each: one
        pass of the index (ctl/dns/records.NameIndex.apply_many); the fast path learns them at flush()."""
        if self.index.apply_many(items):
            self._pending = True

    def flush(self) -> None:
        if self._pending:
            self._pending = False
            self._sync_fastpath()
            self._check_vip()

    def _check_vip(self) -> None:
        if self.server and self.index.dns_vip != self.server.address:
            log.warning("dns_vip_changed", serving=self.server.address, configured=self.index.dns_vip,
                        note="restart the daemon to move the server")

    def feed(self, events) -> None:
        if self.index.apply_events(events):
            self._sync_fastpath()
            self._check_vip()

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher:
            self._watcher.join(timeout=5)
            self._watcher = None
        if self.server:
            self.server.stop()
            self.server = None
