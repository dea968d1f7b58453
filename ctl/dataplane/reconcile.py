"""Diff desired map content against the live maps and apply the difference in a safe
order: additions and updates first, frontends last (backends and Maglev tables before
the services that point at them); then deletions in the reverse order. Each change is
one structlog event.

Conntrack belongs to the programs; the only thing done to it here is what kube-proxy
does: when a UDP backend goes away, its flows are flushed so the next datagram picks a
live backend.
"""
from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass, field
from functools import cache

import structlog

from . import maglev
from .bpf import syscalls as sc
from .bpf.maps import Map
from .bpf.types import BackendAddr, CtDir, U32
from .desired import KEY_ONLY_MAPS, OWNED_MAPS, Desired, Frozen, MaglevSpec, freeze
from ..state.model import PROTOCOLS

log = structlog.get_logger("atomnet.reconcile")

# Changes listed one event each up to this many per map; beyond it one summary event
# (10 000 services would otherwise log 100 000 lines).
LOG_EACH_LIMIT = 50


@dataclass
class MapDiff:
    upserts: dict[Frozen, Frozen] = field(default_factory=dict)
    deletes: list[Frozen] = field(default_factory=list)

    def __bool__(self):
        return bool(self.upserts or self.deletes)

    def __len__(self):
        return len(self.upserts) + len(self.deletes)


def read_live(m: Map, keys_only: bool = False) -> dict[Frozen, Frozen]:
    if keys_only:
        return {freeze(k.to_dict()): () for k in m.keys()}
    return {freeze(k.to_dict()): freeze(v.to_dict()) for k, v in m.items()}


def diff(desired: dict[Frozen, Frozen], live: dict[Frozen, Frozen]) -> MapDiff:
    out = MapDiff()
    for key, value in desired.items():
        if live.get(key) != value:
            out.upserts[key] = value
    out.deletes = [key for key in live if key not in desired]
    return out


def _log_changes(name: str, event: str, items) -> None:
    items = list(items)
    for item in items[:LOG_EACH_LIMIT]:
        log.info(event, map=name, **item)
    if len(items) > LOG_EACH_LIMIT:
        log.info(event + "_more", map=name, count=len(items) - LOG_EACH_LIMIT)


def _upsert(m: Map, d: MapDiff, name: str) -> None:
    pairs = [(m.key_cls.from_dict(dict(k)), m.value_cls.from_dict(dict(v))) for k, v in d.upserts.items()]
    m.put_many(pairs)
    _log_changes(name, "map_upsert", ({"key": dict(k), "value": dict(v)} if v else {"key": dict(k)}
                                      for k, v in d.upserts.items()))


def _delete(m: Map, d: MapDiff, name: str) -> None:
    for k in d.deletes:
        m.delete(m.key_cls.from_dict(dict(k)))
    _log_changes(name, "map_delete", ({"key": dict(k)} for k in d.deletes))


def apply(maps: dict[str, Map], desired: Desired) -> dict[str, MapDiff]:
    diffs = {name: diff(desired.maps[name], read_live(maps[name], name in KEY_ONLY_MAPS)) for name in OWNED_MAPS}
    live_digests = {dict(v)["id"]: dict(v)["digest"] for v in read_live(maps["services"]).values()}
    live_tables = {k.value for k in maps["maglev"].keys()}
    for name in OWNED_MAPS:
        if name == "services":   # frontends last: their tables must be in place first
            diffs["maglev"] = sync_maglev(maps["maglev"], desired.maglev, live_digests, live_tables)
        _upsert(maps[name], diffs[name], name)
    for name in reversed(OWNED_MAPS):
        if name == "backends":   # tables no service points at any more, then their backends
            _delete_tables(maps["maglev"], live_tables - set(desired.maglev), diffs["maglev"])
        _delete(maps[name], diffs[name], name)
    removed = [dict(k) for k in diffs["backends"].deletes]
    if removed:
        flush_udp_flows(maps["conntrack"], removed)
    return diffs


# ------------------------------------------------------------------ Maglev

@cache
def _slot_keys(size: int):
    return (ct.c_uint32 * size)(*range(size))


def build_table(spec: MaglevSpec) -> bytes:
    """The inner map's content: one struct backend_addr per slot (all zero when empty)."""
    if not spec.backends:
        return bytes(ct.sizeof(BackendAddr) * spec.table_size)
    packed = [BackendAddr.from_dict({"ip": ip, "port": port}).to_bytes() for ip, port in spec.backends]
    slots = maglev.table([f"{ip}:{port}" for ip, port in spec.backends], spec.table_size)
    return b"".join(packed[i] for i in slots)


def sync_maglev(outer: Map, specs: dict[int, MaglevSpec], live_digests: dict[int, int], live_tables: set[int]) -> MapDiff:
    """A changed table is built in a new inner map and swapped in with one update of the
    outer map: the program sees the old table or the new one, never a half-written one.
    Service ports with the same backend set share one inner map (built once): the
    kernel holds one copy, and 10 000 services in front of the same pods cost one table."""
    d = MapDiff()
    built: dict[tuple, int] = {}   # (table size, backends) -> inner map fd, for this pass
    swaps: list[tuple[int, int]] = []
    try:
        for sid, spec in specs.items():
            if live_digests.get(sid) == spec.digest and sid in live_tables:
                continue
            shape = (spec.table_size, spec.backends)
            if shape not in built:
                built[shape] = _new_table(spec)
            swaps.append((sid, built[shape]))
            d.upserts[freeze({"value": sid})] = freeze({"table_size": spec.table_size, "backends": len(spec.backends)})
        # One batch: every map-in-map update makes the kernel wait for an RCU grace period
        # (so no program still sees the old table); a batch waits once, not once per service.
        if swaps:
            keys = (ct.c_uint32 * len(swaps))(*(sid for sid, _ in swaps))
            fds = (ct.c_uint32 * len(swaps))(*(fd for _, fd in swaps))
            sc.update_batch(outer.fd, keys, fds, len(swaps))
    finally:
        for fd in built.values():
            sc.close(fd)   # the outer map holds the references now
    _log_changes("maglev", "maglev_table_built", ({"service_id": dict(k)["value"], **dict(v)} for k, v in d.upserts.items()))
    return d


def _new_table(spec: MaglevSpec) -> int:
    inner = sc.create_map(sc.BPF_MAP_TYPE_ARRAY, "maglev_table", 4, ct.sizeof(BackendAddr), spec.table_size,
                          sc.BPF_F_INNER_MAP)
    try:
        values = (BackendAddr * spec.table_size).from_buffer_copy(build_table(spec))
        sc.update_batch(inner, _slot_keys(spec.table_size), values, spec.table_size)
    except BaseException:
        sc.close(inner)
        raise
    return inner


def _delete_tables(outer: Map, ids: set[int], d: MapDiff) -> None:
    for sid in sorted(ids):
        outer.delete(U32(value=sid))
        d.deletes.append(freeze({"value": sid}))
    _log_changes("maglev", "maglev_table_deleted", ({"service_id": sid} for sid in sorted(ids)))


def flush_udp_flows(conntrack: Map, removed_backends: list[dict]) -> int:
    """kube-proxy's `conntrack -D` for UDP: flows to a removed backend are forgotten, so
    the client's next datagram is balanced to a live one instead of a dead address."""
    gone = {(b["service_id"], b["ip"], b["port"]) for b in removed_backends}
    flushed = 0
    for key, entry in list(conntrack.items()):
        if key.proto != PROTOCOLS["udp"]:
            continue
        k, v = key.to_dict(), entry.to_dict()
        backend = (v["service_id"], v["nat_ip"], v["nat_port"]) if k["dir"] == CtDir.CT_FORWARD \
            else (v["service_id"], k["saddr"], k["sport"])
        if backend in gone and conntrack.delete(key):
            flushed += 1
    if flushed:
        log.info("conntrack_flushed", proto="udp", entries=flushed, backends=len(gone))
    return flushed
