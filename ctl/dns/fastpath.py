"""The loader side of the DNS fast path (bpf/include/dns.h): keeps the pinned dns_names map
equal to the name index's A records, and tells from_pod which address is the DNS VIP.

One source of truth for the names: the NameIndex (ctl/dns/records.py). After every batch
of changes the index is fed, `sync` takes the names whose A records changed
(NameIndex.take_a_changes) and writes only those, so the map follows the store exactly
as fast as the server's own answers do. The map is pinned and outlives the daemon: while
the daemon is down (or restarting) its pods' A queries for cluster names are still
answered, from the last state it wrote; a fresh start lists everything again (full sync)
and drops what went stale meanwhile.
"""
from __future__ import annotations

import structlog

from ..dataplane.bpf.maps import Map
from ..dataplane.bpf.types import DnsConfig, DnsNameKey, DnsNameValue, U32, dns_name_wire
from .records import NameIndex

log = structlog.get_logger("atomnet.dns")


def name_key(name: str) -> DnsNameKey | None:
    """The map key of a name, or None when it is too long for the key (the server answers it)."""
    try:
        dns_name_wire(name)
    except ValueError:
        return None
    return DnsNameKey.from_dict({"name": name})


class FastPath:
    def __init__(self, names: Map, config: Map):
        self.names, self.config = names, config

    def enable(self, vip: str) -> None:
        self.config.put(U32(value=0), DnsConfig.from_dict({"vip": vip}))

    def disable(self) -> None:
        self.config.put(U32(value=0), DnsConfig())

    def sync(self, index: NameIndex) -> int:
        """Writes what changed in the index since the last sync; returns how many entries."""
        full, changes = index.take_a_changes()
        puts, deletes = [], []
        for name, rec in changes.items():
            key = name_key(name)
            if key is None:
                continue
            if rec is None:
                deletes.append(key)
            else:
                ip, ttl = rec
                puts.append((key, DnsNameValue.from_dict({"ip": ip, "ttl": ttl})))
        if full:   # whatever the map holds beyond the index is stale (an earlier daemon's)
            wanted = {bytes(k) for k, _ in puts}
            deletes = [k for k in list(self.names.keys()) if bytes(k) not in wanted]
        self.names.put_many(puts)
        for key in deletes:
            self.names.delete(key)
        if full or puts or deletes:
            log.debug("dns_fastpath_synced", full=full, written=len(puts), removed=len(deletes))
        return len(puts) + len(deletes)
