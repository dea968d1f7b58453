"""The node's cluster DNS, as the daemon runs it: the name index, the server on the DNS
VIP, the upstreams. The daemon calls start() once, feed() with every batch of store
events it watches (before it reconciles, so names never wait for the dataplane),
resync() when it had to list the store again, and stop()."""
from __future__ import annotations

import structlog

from ..node import dnsdevice
from ..state.cluster import dns_vip_of, load_cluster_config
from ..state.model import VIPS_PREFIX
from ..state.names import DNS_VIP_OWNER
from ..state.store import Store
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

    def start(self, store: Store) -> None:
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
        log.info("dns_serving", address=f"{vip}:{self.server.port}", domain=self.index.domain.to_text(),
                 upstreams=[f"{h}:{p}" for h, p in servers], records=len(self.index.rows()))

    def resync(self, store: Store) -> None:
        items = []
        for prefix in PREFIXES:
            kvs, _ = store.list(prefix)
            items += [(kv.key, kv.value) for kv in kvs]
        self.index.load(items)

    def feed(self, events) -> None:
        if self.index.apply_events(events) and self.server and self.index.dns_vip != self.server.address:
            log.warning("dns_vip_changed", serving=self.server.address, configured=self.index.dns_vip,
                        note="restart the daemon to move the server")

    def stop(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None
