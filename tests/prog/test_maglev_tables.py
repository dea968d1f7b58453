"""Maglev tables in the kernel (ctl/dataplane/maglev_tables.py): one inner map per distinct
backend set, shared by every service port with that set and across passes, refcounted,
forgotten (so freed by the kernel) when the last port moves away; content as the reference."""
import ctypes as ct

import pytest

from ctl.dataplane import maglev
from ctl.dataplane.bpf import syscalls as sc
from ctl.dataplane.bpf.maps import Map
from ctl.dataplane.bpf.types import BackendAddr, U32
from ctl.dataplane.desired import maglev_spec
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


def inner_id(m: Map, sid: int) -> int | None:
    v = ct.c_uint32()
    return v.value if sc.lookup(m.fd, U32(value=sid), v) else None


def content(m: Map, sid: int) -> list[str]:
    fd = sc.map_fd_by_id(inner_id(m, sid))
    try:
        out = []
        for k in range(SIZE):
            v = BackendAddr()
            sc.lookup(fd, U32(value=k), v)
            out.append(v.to_dict()["ip"])
        return out
    finally:
        sc.close(fd)


def test_tables_are_shared_by_backend_set_and_freed_when_unused(outer):
    t = MaglevTables(outer)
    a, b = spec("10.0.0.1", "10.0.0.2"), spec("10.0.0.3")
    assert t.set_many({1: a, 2: a, 3: b}) == 2          # two distinct sets: two tables built
    assert inner_id(outer, 1) == inner_id(outer, 2) != inner_id(outer, 3)
    assert {s: x.refs for s, x in t.tables.items()} == {t.shape(a): 2, t.shape(b): 1}
    assert t.set_many({4: a}) == 0                      # a later pass reuses the live table
    assert inner_id(outer, 4) == inner_id(outer, 1)
    assert t.set_many({1: a, 2: a}) == 0                # unchanged: nothing written
    shared = inner_id(outer, 1)
    assert t.set_many({1: b, 2: b, 4: b}) == 0          # every user of `a` moves to `b`
    assert t.shape(a) not in t.tables and t.tables[t.shape(b)].refs == 4
    assert shared not in sc.map_ids() or all(inner_id(outer, s) != shared for s in (1, 2, 3, 4))
    t.remove_many([1, 2, 3, 4])
    assert t.tables == {} and t.slots == {} and list(outer.keys()) == []


def test_table_content_is_the_reference_table(outer):
    t = MaglevTables(outer)
    backends = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    t.set_many({7: spec(*backends)})
    names = [f"{ip}:80" for ip in backends]
    assert content(outer, 7) == [backends[i] for i in maglev.table(names, SIZE)]
    t.set_many({8: spec()})                             # no backends: an all-zero table
    assert set(content(outer, 8)) == {"0.0.0.0"}


def test_adopt_keeps_a_live_table_after_restart(outer):
    first = MaglevTables(outer)
    a = spec("10.0.0.1")
    first.set_many({1: a})
    live = inner_id(outer, 1)
    second = MaglevTables(outer)                        # a restarted daemon: same pinned outer map
    assert second.adopt(1, a) and not second.adopt(9, a)
    assert second.set_many({1: a, 2: a}) == 0 and inner_id(outer, 2) == live
    second.remove_many([1, 2])
