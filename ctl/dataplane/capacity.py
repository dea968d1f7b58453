"""Pure: which service ports fit the service-side maps. A desired state larger than the maps
(more frontends than the services map holds, more (service port, backend) entries than the
backends map, more distinct backend sets than the Maglev map) is programmed in part instead
of failing every sync: whole service ports, oldest first (lowest id: ids only grow), each
with its frontends, backends and table or not at all, so a new service never pushes out one
that runs, and the same stored state always programs the same ports. The rest waits, logged
and counted (`map_overflow`, atomnet_map_overflow_*), until the operator raises the size
(ctl/dataplane/mapsizes.py) or removes services.

Capacity sits between the model's drained changes and the reconciler: `filter(changes)`
returns the changes to write. While everything fits it returns them as they are, after
O(changes) bookkeeping; once something does not fit, each sync decides again over every
service port (O(service ports), one row lookup each: 22-140 ms a change at 50 000 in-process
on this loaded 2-CPU machine, 111-297 ms with three lookups a port; only while overflowing). `admit(desired)`
filters a whole desired state the same way (start-up, drift check).
"""
from __future__ import annotations

from dataclasses import dataclass

from .desired import MAGLEV, Desired, Frozen, MaglevSpec, backend_key

LIMITED = ("services", "backends", MAGLEV)   # the maps whose capacity is checked here


@dataclass(frozen=True)
class Overflow:
    map: str         # services | backends | maglev
    needed: int      # entries the whole desired state needs
    capacity: int    # entries usable in the map
    refused: int     # service ports left out (whole: frontends, backends and table)

    def to_dict(self) -> dict:
        return {"map": self.map, "needed": self.needed, "capacity": self.capacity, "refused": self.refused}


def _sid(value: Frozen) -> int:
    return dict(value)["id"]


def _shape(spec: MaglevSpec) -> tuple:
    """What makes a table distinct: its backends (the model derives the size from their count;
    the spec's own tuple, so counting tables allocates nothing per port)."""
    return spec.backends


class Capacity:
    def __init__(self, limits: dict[str, int]):
        """limits: usable entries per map of LIMITED (a map left out is not limited)."""
        self.limits = dict(limits)
        # Mirrors of the desired frontends and specs (references to the model's values, no
        # copies); a port's frontend keys are found by a scan, only when it changes side.
        self.fronts: dict[Frozen, Frozen] = {}       # services key -> value (the desired frontends)
        self.specs: dict[int, MaglevSpec] = {}       # service-port id -> its Maglev spec (its backends)
        self.shapes: dict[tuple, list] = {}          # distinct tables -> [table number, ports using it]
        self._next_table = 0
        # What the overflow pass reads of each port, in one place (one lookup a port, ints
        # only): service-port id -> [frontends, backends, table number or -1]; and the ids in
        # order, kept until a port comes or goes.
        self.rows: dict[int, list] = {}
        self._order: list[int] | None = None
        self.backends = 0                            # sum of len(spec.backends)
        self.refused: set[int] = set()               # service ports not programmed now
        self.overflows: list[Overflow] = []          # what does not fit, per map (empty: all fits)

    # ---------------------------------------------------------------- bookkeeping
    def _track(self, changes: dict) -> None:
        rows, touched = self.rows, []

        def row(sid: int) -> list:
            r = rows.get(sid)
            if r is None:
                r = rows[sid] = [0, 0, -1]
                self._order = None
            touched.append(sid)
            return r

        fronts = self.fronts
        for key, value in changes.get("services", {}).items():
            old = fronts.pop(key, None)
            if old is not None:
                row(_sid(old))[0] -= 1
            if value is not None:
                fronts[key] = value
                row(_sid(value))[0] += 1
        for sid, spec in changes.get(MAGLEV, {}).items():
            old = self.specs.pop(sid, None)
            r = row(sid)
            if old is not None:
                self.backends -= len(old.backends)
                shape = _shape(old)
                self.shapes[shape][1] -= 1
                if not self.shapes[shape][1]:
                    del self.shapes[shape]
                r[1], r[2] = 0, -1
            if spec is not None:
                self.specs[sid] = spec
                self.backends += len(spec.backends)
                entry = self.shapes.get(_shape(spec))
                if entry is None:
                    entry = self.shapes[_shape(spec)] = [self._next_table, 0]
                    self._next_table += 1
                entry[1] += 1
                r[1], r[2] = len(spec.backends), entry[0]
        for sid in touched:   # a port with neither frontends nor a table is gone
            r = rows.get(sid)
            if r is not None and r[0] == 0 and r[2] < 0:
                del rows[sid]
                self._order = None

    def needed(self) -> dict[str, int]:
        return {"services": len(self.fronts), "backends": self.backends, MAGLEV: len(self.shapes)}

    def _fits(self, needed: dict[str, int]) -> bool:
        return all(needed[m] <= self.limits[m] for m in self.limits)

    def _sid_fronts(self, sids: set[int]) -> dict[int, list]:
        """service-port id -> its frontend keys, for the ports in `sids`: one scan."""
        out: dict[int, list] = {}
        for key, value in self.fronts.items():
            sid = _sid(value)
            if sid in sids:
                out.setdefault(sid, []).append(key)
        return out

    def _choose(self) -> set[int]:
        """The refused service ports: every port in id order takes its frontends, backends and
        (if no admitted port has the same backend set) a table, while all three fit."""
        used_s = used_b = 0
        tables: set[int] = set()
        lim_s, lim_b, lim_t = (self.limits.get(m, float("inf")) for m in LIMITED)
        refused = set()
        if self._order is None:
            self._order = sorted(self.rows)
        rows = self.rows
        for sid in self._order:
            nf, nb, table = rows[sid]
            s, b = used_s + nf, used_b + nb
            new_table = table >= 0 and table not in tables
            if s <= lim_s and b <= lim_b and len(tables) + new_table <= lim_t:
                used_s, used_b = s, b
                if new_table:
                    tables.add(table)
            else:
                refused.add(sid)
        return refused

    def _port_entries(self, sid: int, present: bool, fronts: dict[int, list]) -> dict:
        """A service port's whole contribution (present) or its removal (not present)."""
        out: dict = {"services": {}, "backends": {}, MAGLEV: {}}
        for key in fronts.get(sid, ()):
            out["services"][key] = self.fronts[key] if present else None
        spec = self.specs.get(sid)
        if spec is not None:
            for ip, port in spec.backends:
                out["backends"][backend_key(sid, ip, port)] = () if present else None
            out[MAGLEV][sid] = spec if present else None
        return out

    # ---------------------------------------------------------------- the two entry points
    def filter(self, changes: dict) -> dict:
        """The drained changes -> the changes to write: a refused port's keys become deletions
        (no-ops where the kernel never had them); ports refused or admitted since the last
        call gain their removal or their whole contribution."""
        self._track(changes)
        needed = self.needed()
        fits = self._fits(needed)
        if fits and not self.refused:
            self.overflows = []
            return changes
        refused = set() if fits else self._choose()
        newly_refused, newly_admitted = refused - self.refused, self.refused - refused
        self.refused = refused
        self.overflows = [Overflow(m, needed[m], self.limits[m], len(refused))
                          for m in LIMITED if m in self.limits and needed[m] > self.limits[m]]
        out = {name: dict(entries) for name, entries in changes.items()}
        if refused:
            for key, value in out.get("services", {}).items():
                if value is not None and _sid(value) in refused:
                    out["services"][key] = None
            for key, value in out.get("backends", {}).items():
                if value is not None and dict(key)["service_id"] in refused:
                    out["backends"][key] = None
            for sid, spec in out.get(MAGLEV, {}).items():
                if spec is not None and sid in refused:
                    out[MAGLEV][sid] = None
        fronts = self._sid_fronts(newly_refused | newly_admitted) if newly_refused or newly_admitted else {}
        for sid, present in [*((s, False) for s in newly_refused), *((s, True) for s in newly_admitted)]:
            for name, entries in self._port_entries(sid, present, fronts).items():
                out.setdefault(name, {}).update(entries)
        return out

    def admit(self, desired: Desired) -> Desired:
        """A whole desired state (start-up, drift check) -> the part that fits, as filter()
        decides it; this object's state is replaced by it."""
        self.__init__(self.limits)
        self._track({"services": desired.maps["services"], MAGLEV: desired.maglev})
        needed = self.needed()
        self.refused = set() if self._fits(needed) else self._choose()
        self.overflows = [Overflow(m, needed[m], self.limits[m], len(self.refused))
                          for m in LIMITED if m in self.limits and needed[m] > self.limits[m]]
        if not self.refused:
            return desired
        maps = dict(desired.maps)
        maps["services"] = {k: v for k, v in desired.maps["services"].items() if _sid(v) not in self.refused}
        maps["backends"] = {k: v for k, v in desired.maps["backends"].items()
                            if dict(k)["service_id"] not in self.refused}
        maglev = {sid: spec for sid, spec in desired.maglev.items() if sid not in self.refused}
        return Desired(maps=maps, maglev=maglev, ingress=desired.ingress, egress=desired.egress,
                       missing_links=desired.missing_links, conflicts=desired.conflicts)
