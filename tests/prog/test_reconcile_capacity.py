"""The reconciler against real maps created smaller than the desired state (the daemon's
--bpf-lb-*-map-max, through the loader): every sync succeeds, the kernel holds exactly what
fits (Capacity's whole-state admission of the same inputs), never an E2BIG, also where
one batch swaps a programmed port for a waiting one in a full map (its deletions go first)."""
import random

import pytest

from ctl.dataplane import maglev_tables
from ctl.dataplane.bpf.loader import Loader, close_loaded
from ctl.dataplane.capacity import Capacity
from ctl.dataplane.desired import MAGLEV, freeze
from ctl.dataplane.reconcile import Reconciler, capacity_limits, without_table
from tests.conftest import require_root
from tests.prog.test_reconcile_batches import PODS, node_model, service

SIZES = {"services": 6, "backends": 14, "maglev": 8}   # 6 usable tables (2 kept for spares)


@pytest.fixture
def maps(tmp_path):
    require_root()
    loaded = Loader(str(tmp_path / "no-pins"), sizes=SIZES).load()
    try:
        yield loaded.maps
    finally:
        close_loaded(loaded)


def test_a_state_larger_than_the_maps_programs_what_fits_every_sync(maps, monkeypatch):
    monkeypatch.setattr(maglev_tables, "COOL_SECONDS", 0.0)
    assert {n: maps[n].info.max_entries for n in SIZES} == SIZES, "the loader made the maps this size"
    limits = capacity_limits(maps)
    assert limits == {"services": 6, "backends": 14, MAGLEV: 6}
    rng = random.Random(23)
    model = node_model()
    for i in range(12):   # twice what the services map holds, in the first sync
        model.set_service(f"s{i}", service(i, sorted(rng.sample([p.name for p in PODS], rng.randint(1, 4)))))
    model.update()
    model.drain()
    rec = Reconciler(maps)
    rec.apply(rec.initial_changes(model.snapshot()))
    overflowed = early = 0
    for step in range(60):
        for _ in range(rng.choice([1, 1, 2])):   # a change or two per sync
            i = rng.randrange(14)
            if rng.random() < 0.3:
                model.set_service(f"s{i}", None)
            else:
                model.set_service(f"s{i}", service(i, sorted(rng.sample([p.name for p in PODS], rng.randint(0, 4)))))
        model.update()
        rec.apply_drained(model.drain())
        overflowed += bool(rec.capacity.overflows)
        early += bool(rec._early)   # a full map's deletions written before its upserts
        want = Capacity(limits).admit(model.snapshot())
        live = {freeze(k.to_dict()): freeze(v.to_dict()) for k, v in maps["services"].items()}
        assert {k: without_table(v) for k, v in live.items()} == want.maps["services"], step
        assert {freeze(k.to_dict()) for k in maps["backends"].keys()} == set(want.maps["backends"]), step
        assert {dict(v)["id"] for v in live.values()} <= set(want.maglev), step
    assert overflowed > 10, "the run spent time beyond the maps' capacity"
    assert early, "some sync swapped entries in a full map"
