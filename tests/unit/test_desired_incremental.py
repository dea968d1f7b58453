"""The incremental desired-state model (ctl/dataplane/desired.py Model) against the
from-scratch computation (compute): random sequences of store and link changes, and after
each batch the model equals compute() of the same inputs. Plus index maintenance and the
change tracker (pending changes coalesce; a key changed and changed back is not written)."""
from hypothesis import given, settings, strategies as st, HealthCheck

from ctl.dataplane.desired import MAGLEV, Model, Overlay, compute, freeze
from ctl.node.netplumb import LinkInfo
from ctl.state.model import BackendRef, ClusterConfig, Forward, Lease, Pod, Service, ServicePort, host_ifname

NODES = ["n1", "n2", "n3"]
SUBNET = {"n1": "10.244.1.0/24", "n2": "10.244.2.0/24", "n3": "10.244.3.0/24"}
POD_NAMES = [f"p{i}" for i in range(6)]
SVC_NAMES = [f"s{i}" for i in range(4)]
LABELS = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["a", "b"]), max_size=2)
OVERLAY = Overlay(ifindex=3, vni=1, vtep_mac="02:00:00:00:01:01", subnet=SUBNET["n1"])
SIZE = lambda n: 251   # noqa: E731  small tables: the model's logic, not Maglev, is under test


def make_pod(name, node, labels):
    idx = POD_NAMES.index(name)
    return Pod(name=name, node=node, ip=f"{SUBNET[node][:-4]}{10 + idx}", netns=f"/run/netns/{name}",
               host_ifname=host_ifname(name), mac=f"02:00:00:00:00:{idx:02x}", labels=labels)


def make_service(name, ports, selector, backends, affinity, node_port):
    idx = SVC_NAMES.index(name)
    sp = tuple(ServicePort(port=80 + i, target_port=8080 + i, proto=proto, id=idx * 10 + i + 1,
                           node_port=(30000 + idx * 10 + i) if node_port else None)
               for i, proto in enumerate(ports))
    return Service(name=name, vip=f"10.96.0.{idx + 1}", ports=sp, selector=selector if selector else {},
                   backends=() if selector else tuple(BackendRef(p, port) for p, port in backends),
                   affinity_timeout=affinity)


pods_st = st.builds(lambda n, node, labels: ("pod", n, make_pod(n, node, labels)),
                    st.sampled_from(POD_NAMES), st.sampled_from(NODES), LABELS)
pod_del = st.builds(lambda n: ("pod", n, None), st.sampled_from(POD_NAMES))
svc_st = st.builds(lambda n, ports, sel, backends, aff, np_: ("svc", n, make_service(n, ports, sel, backends, aff, np_)),
                   st.sampled_from(SVC_NAMES), st.lists(st.sampled_from(["tcp", "udp"]), min_size=1, max_size=2, unique=True),
                   LABELS, st.lists(st.tuples(st.sampled_from(POD_NAMES), st.sampled_from([None, 9000])),
                                    max_size=3, unique_by=lambda b: b[0]),
                   st.sampled_from([0, 30]), st.booleans())
svc_del = st.builds(lambda n: ("svc", n, None), st.sampled_from(SVC_NAMES))
lease_st = st.builds(lambda node, mac: ("lease", SUBNET[node], Lease(SUBNET[node], f"192.168.0.{NODES.index(node) + 1}",
                                                                     1, mac)),
                     st.sampled_from(NODES), st.sampled_from(["", "02:00:00:00:02:02", "02:00:00:00:03:03"]))
lease_del = st.builds(lambda node: ("lease", SUBNET[node], None), st.sampled_from(NODES))
fwd_st = st.builds(lambda i, pod, node: ("fwd", f"f{i}", Forward(f"f{i}", node, "192.168.0.1", 8000 + i, "tcp", pod,
                                                                 80, 100 + i)),
                   st.integers(0, 2), st.sampled_from(POD_NAMES), st.sampled_from(["n1", "n2"]))
fwd_del = st.builds(lambda i: ("fwd", f"f{i}", None), st.integers(0, 2))
link_st = st.builds(lambda n, up, ifindex: ("link", host_ifname(n), LinkInfo(ifindex, "02:aa:00:00:00:01") if up else None),
                    st.sampled_from(POD_NAMES), st.booleans(), st.integers(10, 12))
changes = st.lists(st.one_of(pods_st, pod_del, svc_st, svc_del, lease_st, lease_del, fwd_st, fwd_del, link_st),
                   min_size=1, max_size=30)


def apply_change(model, state, change):
    kind, key, value = change
    table = state[kind]
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value
    {"pod": model.set_pod, "svc": model.set_service, "lease": model.set_lease, "fwd": model.set_forward,
     "link": model.set_link}[kind](key, value)


def oracle(state):
    return compute("n1", list(state["pod"].values()), state["link"], list(state["svc"].values()), ClusterConfig(),
                   table_size_for=SIZE, leases=list(state["lease"].values()), overlay=OVERLAY,
                   forwards=list(state["fwd"].values()), node_ip="192.168.0.1", netdevs=[1, 2])


def new_model():
    m = Model("n1", table_size_for=SIZE)
    m.set_node(ClusterConfig(), OVERLAY, "192.168.0.1", [1, 2])
    return m


def assert_same(model, state):
    want, got = oracle(state), model.snapshot()
    for name in want.maps:
        assert got.maps[name] == want.maps[name], name
    assert got.maglev == want.maglev
    assert got.ingress == want.ingress and got.egress == want.egress
    assert got.missing_links == sorted(want.missing_links)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(changes, min_size=1, max_size=4))
def test_incremental_equals_from_scratch(batches):
    model, state = new_model(), {"pod": {}, "svc": {}, "lease": {}, "fwd": {}, "link": {}}
    mirror = {}   # what a kernel map would hold if only the drained changes were written
    for batch in batches:
        for change in batch:
            apply_change(model, state, change)
        model.update()
        for name, entries in model.drain().items():
            for key, value in entries.items():
                if value is None:
                    mirror.get(name, {}).pop(key, None)
                else:
                    mirror.setdefault(name, {})[key] = value
        assert_same(model, state)
        snap = model.snapshot()
        for name in snap.maps:   # the drained changes alone rebuild the state
            assert mirror.get(name, {}) == snap.maps[name], name
        assert mirror.get(MAGLEV, {}) == snap.maglev


def test_indexes_follow_changes():
    model = new_model()
    a = make_pod("p0", "n1", {"app": "a"})
    model.set_pod("p0", a)
    model.set_link(a.host_ifname, LinkInfo(10, "02:aa:00:00:00:01"))
    model.set_service("s0", make_service("s0", ["tcp"], {"app": "a"}, [], 0, False))
    model.set_service("s1", make_service("s1", ["tcp"], {}, [("p1", None)], 0, False))
    model.update()
    assert model.svc_by_label == {("app", "a"): {"s0"}}
    assert model.svc_by_pod == {"p0": {"s0"}, "p1": {"s1"}}   # p1 named before it exists
    assert model.pods_by_label == {("app", "a"): {"p0"}}
    assert model.pod_by_ifname == {a.host_ifname: "p0"}
    model.set_pod("p0", make_pod("p0", "n1", {"app": "b"}))   # relabelled: s0 loses it
    model.update()
    assert model.svc_by_pod == {"p1": {"s1"}}
    assert model.pods_by_label == {("app", "b"): {"p0"}}
    model.set_service("s0", None)
    model.set_service("s1", None)
    model.set_pod("p0", None)
    model.update()
    assert (model.svc_by_label, model.svc_by_pod, model.pods_by_label, model.pod_by_ifname, model.pods_by_ip) == \
        ({}, {}, {}, {}, {})


def test_change_touches_only_its_sources():
    model = new_model()
    for i in range(4):
        model.set_service(f"s{i}", make_service(f"s{i}", ["tcp"], {}, [], 0, False))
    model.update()
    model.drain()
    model.set_service("s2", make_service("s2", ["tcp"], {}, [], 30, False))
    assert model.dirty == {("svc", "s2")}
    model.update()
    assert set(model.drain()) == {"services"}


def test_changes_coalesce_and_cancel():
    model = new_model()
    model.update()
    model.drain()
    svc = make_service("s0", ["tcp"], {}, [], 0, False)
    model.set_service("s0", svc)
    model.update()
    model.set_service("s0", None)
    model.update()   # added then removed within one window: the pending key drains as a delete
    pending = model.drain()
    assert all(v is None for entries in pending.values() for v in entries.values())
    model.set_service("s0", svc)
    model.update()
    model.drain()
    model.set_service("s0", make_service("s0", ["tcp"], {}, [], 30, False))
    model.set_service("s0", svc)    # back as it was before the sync: nothing to write
    model.update()
    assert model.drain() == {}
    key = freeze({"vip": "10.96.0.1", "port": 80, "proto": 6})
    assert key in model.values["services"]
