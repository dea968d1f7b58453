"""Writes desired-state changes into the kernel maps, through one cache per map (so the
kernel is read once, at start, and at the rare drift check), in a safe order: additions and
updates first, frontends last (backends and Maglev tables before the services that point at
them); then deletions in the reverse order. Each change is one structlog event.

Start-up is the same path as any change: every key the model has, and every key the kernel
has, is "pending"; the caches drop what already matches.

Conntrack belongs to the programs; the only thing done to it here is what kube-proxy
does: when a UDP backend goes away, its flows are flushed so the next datagram picks a
live backend.
"""
from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field

import structlog

from .bpf.maps import Map
from .bpf.types import CtDir
from .capacity import Capacity
from .desired import KEY_ONLY_MAPS, MAGLEV, OWNED_MAPS, Desired, Frozen, MaglevSpec
from .mapcache import Flushed, MapCache, log_changes
from .maglev_tables import SPARES_LOW, MaglevTables
from ..state.model import PROTOCOLS

log = structlog.get_logger("atomnet.reconcile")

Changes = dict[str, dict]   # map name -> key -> desired value, or None where the key must go


@dataclass
class Result:
    upserts: dict[str, int] = field(default_factory=dict)
    deletes: dict[str, int] = field(default_factory=dict)
    tables_built: int = 0

    @property
    def total(self) -> int:
        return sum(self.upserts.values()) + sum(self.deletes.values())


def capacity_limits(maps: dict[str, Map]) -> dict[str, int]:
    """What the service-side maps can hold (ctl/dataplane/capacity.py). The Maglev map keeps
    room beyond the live tables for spares (a change fills a spare, then repoints its service:
    with no spare and no room it could not be written)."""
    outer = maps["maglev"].info.max_entries
    return {"services": maps["services"].info.max_entries, "backends": maps["backends"].info.max_entries,
            MAGLEV: outer - min(SPARES_LOW, outer // 4)}


class Reconciler:
    def __init__(self, maps: dict[str, Map]):
        self.maps = maps
        self.caches = {name: MapCache(maps[name], name, name in KEY_ONLY_MAPS) for name in OWNED_MAPS}
        self.tables = MaglevTables(maps["maglev"])
        self.capacity = Capacity(capacity_limits(maps))   # what fits: the rest waits (map_overflow)
        self.drift_repairs = 0
        self._checked_stale = False   # outer keys nobody adopted: looked for after the first pass

    def initial_changes(self, desired: Desired) -> Changes:
        """Everything the kernel or the model has: the caches keep only real differences.
        Maglev tables the kernel already holds for the same backends (a restarted daemon:
        the service entry carries the digest and the table's key) are adopted instead of
        rebuilt; outer keys nobody adopted are deleted once the new entries are in. Only
        what fits the maps is desired (Capacity.admit)."""
        desired = self.capacity.admit(desired)
        out: Changes = {}
        for name in OWNED_MAPS:
            entries = {k: None for k in self.caches[name].cache}
            entries.update(desired.maps[name])
            out[name] = entries
        live = {dict(v)["id"]: dict(v) for v in self.caches["services"].cache.values()}
        tables: dict = {sid: None for sid in self.tables.slots if sid not in desired.maglev}
        for sid, spec in desired.maglev.items():
            entry = live.get(sid)
            if not (entry and entry["digest"] == spec.digest and self.tables.adopt(sid, spec, entry.get("table", 0))):
                tables[sid] = spec
        out[MAGLEV] = tables
        return out

    def apply_drained(self, changes: Changes) -> Result:
        """The model's drained changes, as far as they fit the maps (Capacity.filter)."""
        return self.apply(self.capacity.filter(changes))

    def apply(self, changes: Changes) -> Result:
        res = Result()
        self._early: dict[str, Flushed] = {}   # deletions written before their map's upserts (a full map)
        removed_backends: list[Frozen] = []
        tables = changes.get(MAGLEV, {})
        wanted = {sid: spec for sid, spec in tables.items() if spec is not None}
        # Many tables are built on native threads while the maps before "services" are written.
        built = self.tables.begin(wanted)
        try:
            self._write_before_services(changes, res)
        except BaseException:
            with suppress(Exception):   # the first failure is the one to report
                built()   # joined: nothing touches the pool while its build runs
            raise
        # frontends last: their tables must be in place first
        res.tables_built = built()
        self._point_at_tables(changes.setdefault("services", {}), wanted)
        if wanted:
            res.upserts[MAGLEV] = len(wanted)
            log_changes("maglev", "maglev_table_set", list(wanted.items()),
                        lambda item: {"service_id": item[0], "table_size": item[1].table_size,
                                      "backends": len(item[1].backends)})
        self._upsert("services", changes, res)
        for name in reversed(OWNED_MAPS):
            if name == "backends":   # tables no service points at any more, then their backends
                gone = sorted(sid for sid, spec in tables.items() if spec is None)
                if gone:
                    res.deletes[MAGLEV] = self.tables.remove_many(gone)
                    log_changes("maglev", "maglev_table_deleted", gone, lambda sid: {"service_id": sid})
            dels = [k for k, v in changes.get(name, {}).items() if v is None]
            if dels or name in self._early:
                done = self.caches[name].delete(dels)
                done.deletes += self._early.get(name, Flushed()).deletes
                if done.deletes:
                    res.deletes[name] = len(done.deletes)
                    if name == "backends":
                        removed_backends = done.deletes
        if removed_backends:
            flush_udp_flows(self.maps["conntrack"], [dict(k) for k in removed_backends])
        self.tables.refill()   # after the writes: no change waits for the outer map's RCU
        self._drop_unadopted()   # after the first pass: deleted by the next refill, once the
        return res               # new programs (which read service_info.table) are attached

    def _write_before_services(self, changes: Changes, res: Result) -> None:
        assert OWNED_MAPS[-1] == "services"
        for name in OWNED_MAPS[:-1]:
            self._upsert(name, changes, res)

    def _upsert(self, name: str, changes: Changes, res: Result) -> None:
        ups = {k: v for k, v in changes.get(name, {}).items() if v is not None}
        cache = self.caches[name]
        if ups and len(cache) + sum(1 for k in ups if k not in cache.cache) > cache.map.info.max_entries:
            # What fits the map (Capacity) may not fit beside what it replaces: this map's
            # deletions go first (a backend key gone early only loses its counters' last
            # packets; a frontend gone early is one going anyway).
            self._early[name] = cache.delete([k for k, v in changes[name].items() if v is None])
        if ups:
            done = self.caches[name].upsert(ups)
            if done.upserts:
                res.upserts[name] = len(done.upserts)

    def _point_at_tables(self, services: dict, moved: dict) -> None:
        """The desired services values name no table (the model does not choose keys): each
        written entry gets its table's key here; an entry whose service port moved to another
        table but whose value did not change (a table rebuilt) is rewritten too."""
        for k, v in services.items():
            if v is not None:
                services[k] = with_table(v, self.tables.key_of(dict(v)["id"]))
        written = {dict(v)["id"] for v in services.values() if v is not None}
        rest = set(moved) - written
        if rest:
            for k, v in self.caches["services"].cache.items():
                sid = dict(v)["id"]
                if sid in rest and k not in services:
                    services[k] = with_table(v, self.tables.key_of(sid))

    def _drop_unadopted(self) -> None:
        """Outer keys in the kernel that none of our tables, spares or cooling tables uses
        (an older generation's, or lost track of): refill deletes them."""
        if self.tables.stale or self._checked_stale:
            return
        self._checked_stale = True
        ours = {t.key for t in self.tables.tables.values()}
        ours.update(t.key for spares in self.tables.spares.values() for t in spares)
        ours.update(t.key for _, t in self.tables.cooling)
        self.tables.mark_stale(self.tables.live_ids() - ours)

    def drift_check(self, desired: Desired) -> int:
        """The rare full comparison: kernel against cache (repaired to the cache), then the
        cache against the from-scratch desired state (repaired to it), as far as it fits the
        maps (Capacity.admit). Returns repairs."""
        desired = self.capacity.admit(desired)
        repairs = sum(c.drift_check() for c in self.caches.values())
        live = self.tables.live_ids()
        lost = {sid for sid in self.tables.slots if self.tables.key_of(sid) not in live}
        for shape in {self.tables.slots[sid] for sid in lost}:   # the kernel lost it: rebuild
            self.tables.tables.pop(shape, None)
        for sid in lost:
            del self.tables.slots[sid]
        changes: Changes = {}
        for name in OWNED_MAPS:
            cache = self.caches[name].cache
            want = desired.maps[name]
            bare = (lambda v: without_table(v)) if name == "services" else (lambda v: v)
            diff = {k: v for k, v in want.items() if k not in cache or bare(cache[k]) != v}
            diff.update({k: None for k in cache if k not in want})
            if diff:
                changes[name] = diff
                log_changes(name, "drift_repaired", list(diff), lambda k: {"key": dict(k), "source": "desired"},
                            level="warning")
        tables = {sid: spec for sid, spec in desired.maglev.items()
                  if self.tables.slots.get(sid) != MaglevTables.shape(spec)}
        tables.update({sid: None for sid in self.tables.slots if sid not in desired.maglev})
        if tables:
            changes[MAGLEV] = tables
            log.warning("drift_repaired", map="maglev", slots=len(tables))
        self.apply(changes)
        repairs += sum(len(v) for v in changes.values())
        self.drift_repairs += repairs
        return repairs


def with_table(value: Frozen, key: int) -> Frozen:
    """A services value (frozen, sorted fields) with its Maglev table's key."""
    return tuple(sorted((*without_table(value), ("table", key))))


def without_table(value: Frozen) -> Frozen:
    return tuple(p for p in value if p[0] != "table")


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


__all__ = ["Changes", "MaglevSpec", "Reconciler", "Result", "flush_udp_flows"]
