"""Maglev tables in the kernel (ctl/dataplane/maglev_tables.py): one inner map per distinct
backend set, shared by every service port with that set and across passes, refcounted; a
table nobody uses cools, then is reused as a spare (no outer-map write on the change path);
content as the reference."""
import ctypes as ct

import pytest

from ctl.dataplane import maglev
from ctl.dataplane.bpf import syscalls as sc
from ctl.dataplane.bpf.maps import Map
from ctl.dataplane.bpf.types import BackendAddr, U32
from ctl.dataplane.desired import maglev_spec
from ctl.dataplane import maglev_tables
from ctl.dataplane.maglev_tables import MaglevTables
from tests.conftest import require_root

SIZE = 251


@pytest.fixture
def outer():
    require_root()
    tmpl = sc.create_map(sc.BPF_MAP_TYPE_ARRAY, "tmpl", 4, ct.sizeof(BackendAddr), 1,
                         sc.BPF_F_INNER_MAP | sc.BPF_F_MMAPABLE)
    fd = sc.create_map(13, "maglev_test", 4, 4, 64, sc.BPF_F_NO_PREALLOC, inner_map_fd=tmpl)
    sc.close(tmpl)
    m = Map(fd, U32, U32)
    yield m
    m.close()


def spec(*backends):
    return maglev_spec([(ip, 80) for ip in backends], lambda n: SIZE)


def inner_id(m: Map, key: int) -> int | None:
    v = ct.c_uint32()
    return v.value if sc.lookup(m.fd, U32(value=key), v) else None


def content(m: Map, key: int) -> list[str]:
    fd = sc.map_fd_by_id(inner_id(m, key))
    try:
        out = []
        for k in range(SIZE):
            v = BackendAddr()
            sc.lookup(fd, U32(value=k), v)
            out.append(v.to_dict()["ip"])
        return out
    finally:
        sc.close(fd)


def test_tables_are_shared_by_backend_set_and_recycled_when_unused(outer, monkeypatch):
    monkeypatch.setattr(maglev_tables, "COOL_SECONDS", 0.0)
    t = MaglevTables(outer)
    a, b = spec("10.0.0.1", "10.0.0.2"), spec("10.0.0.3")
    assert t.set_many({1: a, 2: a, 3: b}) == 2          # two distinct sets: two tables built
    assert t.key_of(1) == t.key_of(2) != t.key_of(3) and t.key_of(1)
    assert {s: x.refs for s, x in t.tables.items()} == {t.shape(a): 2, t.shape(b): 1}
    assert t.set_many({4: a}) == 0                      # a later pass reuses the live table
    assert t.key_of(4) == t.key_of(1)
    assert t.set_many({1: a, 2: a}) == 0                # unchanged: nothing written
    shared = t.key_of(1)
    keys_before = set(outer_keys(outer))
    assert t.set_many({1: b, 2: b, 4: b}) == 0          # every user of `a` moves to `b`
    assert t.shape(a) not in t.tables and t.tables[t.shape(b)].refs == 4
    c = spec("10.0.0.4")
    assert t.set_many({5: c}) == 1                      # filled into `a`'s table, now a spare
    assert t.key_of(5) == shared and set(outer_keys(outer)) == keys_before   # no outer-map write
    assert content(outer, shared) == ["10.0.0.4"] * SIZE
    t.remove_many([1, 2, 3, 4, 5])
    assert t.tables == {} and t.slots == {}


def outer_keys(m: Map) -> list[int]:
    return [k.value for k in m.keys()]


def test_unused_tables_are_not_reused_before_they_cool(outer):
    t = MaglevTables(outer)
    t.set_many({1: spec("10.0.0.1")})
    first = t.key_of(1)
    t.set_many({1: spec("10.0.0.2")})                   # the old table is cooling: a new one
    assert t.key_of(1) != first and len(t.cooling) == 1


def test_refill_keeps_spares_and_deletes_the_surplus(outer, monkeypatch):
    monkeypatch.setattr(maglev_tables, "COOL_SECONDS", 0.0)
    monkeypatch.setattr(maglev_tables, "SPARES_LOW", 2)
    monkeypatch.setattr(maglev_tables, "SPARES_BATCH", 3)
    monkeypatch.setattr(maglev_tables, "SPARES_MAX", 4)
    monkeypatch.setattr(maglev, "TABLE_SIZE", SIZE)
    t = MaglevTables(outer)
    t.refill()
    assert len(t.spares[SIZE]) == 3 and len(outer_keys(outer)) == 3
    t.set_many({i: spec(f"10.0.1.{i}") for i in range(1, 8)})   # 3 spares used, 4 new
    assert len(outer_keys(outer)) == 7 and t.spares[SIZE] == []
    t.remove_many(range(1, 8))
    t.refill()                                          # 7 spares: 3 over the maximum deleted
    assert len(t.spares[SIZE]) == 4 and len(outer_keys(outer)) == 4


def test_table_content_is_the_reference_table(outer, monkeypatch):
    monkeypatch.setattr(maglev_tables, "COOL_SECONDS", 0.0)
    t = MaglevTables(outer)
    backends = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    t.set_many({7: spec(*backends)})
    names = [f"{ip}:80" for ip in backends]
    assert content(outer, t.key_of(7)) == [backends[i] for i in maglev.table(names, SIZE)]
    t.remove_many([7])
    t.set_many({8: spec()})                             # no backends: all zero, even in a recycled table
    assert set(content(outer, t.key_of(8))) == {"0.0.0.0"}


def test_adopt_keeps_a_live_table_after_restart(outer):
    first = MaglevTables(outer)
    a = spec("10.0.0.1")
    first.set_many({1: a})
    key = first.key_of(1)
    second = MaglevTables(outer)                        # a restarted daemon: same pinned outer map
    assert second.adopt(1, a, key) and not second.adopt(9, a, key + 100)
    assert second.set_many({1: a, 2: a}) == 0 and second.key_of(2) == key
    assert key in second.keys_used                      # a new table never takes a live key
    second.set_many({3: spec("10.0.0.9")})
    assert second.key_of(3) != key


def test_a_big_batch_is_built_on_native_threads_as_the_reference(outer, monkeypatch):
    """maglev_build_many: 40 tables in one call (>= PARALLEL_FROM: on BUILD_THREADS threads,
    in the background while the caller goes on), some into cooled spares, one of them empty;
    every table's slots equal the pure-Python reference's."""
    import random
    monkeypatch.setattr(maglev_tables, "COOL_SECONDS", 0.0)
    assert maglev_tables.BUILD_THREADS > 1 and 40 >= maglev_tables.PARALLEL_FROM
    rng = random.Random(5)
    pool = [f"10.0.{i // 200}.{i % 200 + 1}" for i in range(300)]
    t = MaglevTables(outer)
    t.set_many({100 + i: spec(*rng.sample(pool, 3)) for i in range(5)})
    t.remove_many(range(100, 105))                      # five spares to fill next
    sets = {i: sorted(rng.sample(pool, rng.randint(1, 12))) for i in range(1, 40)}
    sets[40] = []
    wait = t.begin({sid: spec(*ips) for sid, ips in sets.items()})
    assert wait() == 40
    assert len({t.key_of(sid) for sid in sets}) == 40
    for sid, ips in sets.items():
        want = [ips[i] for i in maglev.table([f"{ip}:80" for ip in ips], SIZE)] if ips else ["0.0.0.0"] * SIZE
        assert content(outer, t.key_of(sid)) == want, sid


def test_a_failed_batch_raises_and_leaves_no_table_behind(outer, monkeypatch):
    """A build the native side refuses (here: more backends than slots) raises from the
    waiter, and is not taken for an old outer map (no batch-fill fallback); no service port
    points at a table of that batch."""
    monkeypatch.setattr(maglev_tables, "COOL_SECONDS", 0.0)
    t = MaglevTables(outer)
    t.set_many({99: spec("10.0.0.9")})
    t.remove_many([99])                                 # a spare, taken by the failing batch
    bad = maglev_spec([(f"10.0.0.{i}", 80) for i in range(1, 6)], lambda n: 3)   # 5 backends, 3 slots
    with pytest.raises(sc.BpfError, match="building maglev tables"):
        t.begin({i: bad for i in range(1, 20)} | {20: spec("10.0.0.2")})()
    assert t.slots == {} and t.tables == {} and t.mmapable
    t._cool()
    assert len(t.spares[SIZE]) == 1                     # handed back to the pool
