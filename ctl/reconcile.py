"""Diff desired map content against the live maps and apply the difference in a safe
order: every owned map's additions and updates first (in OWNED_MAPS order), then the
deletions in reverse order. Each change is one structlog event."""
from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from .bpf.maps import Map
from .desired import OWNED_MAPS, Desired, Frozen, freeze

log = structlog.get_logger("atomnet.reconcile")


@dataclass
class MapDiff:
    upserts: dict[Frozen, Frozen] = field(default_factory=dict)
    deletes: list[Frozen] = field(default_factory=list)

    def __bool__(self):
        return bool(self.upserts or self.deletes)


def read_live(m: Map) -> dict[Frozen, Frozen]:
    return {freeze(k.to_dict()): freeze(v.to_dict()) for k, v in m.items()}


def diff(desired: dict[Frozen, Frozen], live: dict[Frozen, Frozen]) -> MapDiff:
    out = MapDiff()
    for key, value in desired.items():
        if live.get(key) != value:
            out.upserts[key] = value
    out.deletes = [key for key in live if key not in desired]
    return out


def apply(maps: dict[str, Map], desired: Desired) -> dict[str, MapDiff]:
    diffs = {name: diff(desired.maps[name], read_live(maps[name])) for name in OWNED_MAPS}
    for name in OWNED_MAPS:
        m, d = maps[name], diffs[name]
        pairs = [(m.key_cls.from_dict(dict(k)), m.value_cls.from_dict(dict(v))) for k, v in d.upserts.items()]
        m.put_many(pairs)
        for k, v in d.upserts.items():
            log.info("map_upsert", map=name, key=dict(k), value=dict(v))
    for name in reversed(OWNED_MAPS):
        m, d = maps[name], diffs[name]
        for k in d.deletes:
            m.delete(m.key_cls.from_dict(dict(k)))
            log.info("map_delete", map=name, key=dict(k))
    return diffs
