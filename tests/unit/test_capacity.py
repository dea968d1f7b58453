"""What fits the service-side maps (ctl/dataplane/capacity.py): the model's drained changes,
filtered, rebuild exactly the whole-state admission of the same inputs, never more than the
maps hold, and always whole service ports (frontends, backends and table together), the
oldest ports first."""
from dataclasses import replace

from hypothesis import HealthCheck, given, settings, strategies as st

from ctl.dataplane.capacity import Capacity, Overflow
from ctl.dataplane.desired import MAGLEV, backend_key
from tests.unit.test_desired_incremental import apply_change, changes, make_pod, make_service, new_model

from ctl.node.netplumb import LinkInfo

LIMITED = ("services", "backends", MAGLEV)


def write(kernel: dict, changes: dict) -> None:
    """What the reconciler does with the filtered changes (a deletion of an absent key: nothing)."""
    for name, entries in changes.items():
        for key, value in entries.items():
            if value is None:
                kernel.setdefault(name, {}).pop(key, None)
            else:
                kernel.setdefault(name, {})[key] = value


def whole_ports(kernel: dict) -> None:
    fronts = {dict(v)["id"] for v in kernel.get("services", {}).values()}
    tables = kernel.get(MAGLEV, {})
    for sid in fronts:
        assert sid in tables, f"port {sid} has frontends without its table"
        for ip, port in tables[sid].backends:
            assert backend_key(sid, ip, port) in kernel["backends"], f"port {sid} lacks a backend"
    assert {dict(k)["service_id"] for k in kernel.get("backends", {})} <= set(tables)


limits_st = st.fixed_dictionaries({"services": st.integers(0, 6), "backends": st.integers(0, 8),
                                   MAGLEV: st.integers(0, 5)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(limits_st, st.lists(changes, min_size=1, max_size=5))
def test_filtered_changes_equal_the_whole_state_admission(limits, batches):
    model, state = new_model(), {"pod": {}, "svc": {}, "lease": {}, "fwd": {}, "link": {}}
    cap, kernel = Capacity(limits), {}
    for batch in batches:
        for change in batch:
            apply_change(model, state, change)
        model.update()
        write(kernel, cap.filter(model.drain()))
        want = Capacity(limits).admit(model.snapshot())
        for name in ("services", "backends"):
            assert kernel.get(name, {}) == want.maps[name], name
        assert kernel.get(MAGLEV, {}) == want.maglev
        assert len(kernel.get("services", {})) <= limits["services"]
        assert len(kernel.get("backends", {})) <= limits["backends"]
        assert len({(s.table_size, s.backends) for s in kernel.get(MAGLEV, {}).values()}) <= limits[MAGLEV]
        whole_ports(kernel)
        needed = cap.needed()
        assert {o.map for o in cap.overflows} == {m for m in LIMITED if needed[m] > limits[m]}


def services_model(count: int, backends_each: int):
    """count services, each with its own pods (backends_each of them), all ready on n1."""
    model = new_model()
    for i in range(count * backends_each):
        pod = replace(make_pod("p0", "n1", {}), name=f"q{i}", ip=f"10.244.1.{20 + i}", host_ifname=f"vq{i}",
                      labels={"svc": f"s{i // backends_each}"})
        model.set_pod(pod.name, pod)
        model.set_link(pod.host_ifname, LinkInfo(100 + i, "02:aa:00:00:00:01"))
    return model


def add_service(model, idx: int, selector_of: int | None = None) -> None:
    svc = make_service(f"s{idx}", ["tcp"], {"svc": f"s{selector_of if selector_of is not None else idx}"}, [], 0,
                       False)
    model.set_service(svc.name, svc)


def test_oldest_ports_first_and_a_new_service_never_pushes_one_out():
    model = services_model(4, 2)
    cap, kernel = Capacity({"services": 10, "backends": 5, MAGLEV: 10}), {}
    for i in range(3):   # 3 services x 2 backends = 6 > 5: the third waits
        add_service(model, i)
    model.update()
    write(kernel, cap.filter(model.drain()))
    ids = sorted(dict(v)["id"] for v in kernel["services"].values())
    assert ids == [1, 11] and len(kernel["backends"]) == 4
    assert cap.overflows == [Overflow("backends", 6, 5, 1)]
    add_service(model, 3)   # a fourth, newer still: it waits too, nothing programmed moves
    model.update()
    out = cap.filter(model.drain())
    assert not any(v is not None for entries in out.values() for v in entries.values()), out
    assert cap.overflows == [Overflow("backends", 8, 5, 2)]
    model.set_service("s0", None)   # room again: the oldest waiting one (s2, id 21) comes in
    model.update()
    write(kernel, cap.filter(model.drain()))
    assert sorted(dict(v)["id"] for v in kernel["services"].values()) == [11, 21]
    assert cap.overflows == [Overflow("backends", 6, 5, 1)]
    whole_ports(kernel)


def test_ports_with_the_same_backends_share_one_table():
    model = services_model(1, 2)
    cap = Capacity({"services": 10, "backends": 100, MAGLEV: 1})
    for i in range(3):   # three services selecting the same two pods: one table between them
        add_service(model, i, selector_of=0)
    model.update()
    kernel = {}
    write(kernel, cap.filter(model.drain()))
    assert len(kernel["services"]) == 3 and cap.overflows == []


def test_everything_fits_is_the_changes_unchanged():
    model = services_model(2, 2)
    cap = Capacity({"services": 10, "backends": 10, MAGLEV: 10})
    add_service(model, 0)
    model.update()
    drained = model.drain()
    assert cap.filter(drained) is drained
