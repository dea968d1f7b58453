"""The reconciler against real (unpinned) maps: random batches of service changes, small
ones (tables built inline) and big ones (>= PARALLEL_FROM missing tables: built by the native
threads while the other maps are written), applied incrementally; after every batch the
kernel holds what a from-scratch computation of the same inputs says, and every service's
Maglev table is the pure-Python reference table of its backends."""
import random

import pytest

from ctl.dataplane import maglev, maglev_tables
from ctl.dataplane.bpf.loader import Loader, close_loaded
from ctl.dataplane.desired import Model, Overlay, compute, freeze
from ctl.dataplane.reconcile import Reconciler, without_table
from ctl.node.netplumb import LinkInfo
from ctl.state.model import BackendRef, ClusterConfig, Pod, Service, ServicePort, host_ifname
from tests.conftest import require_root
from tests.prog.test_maglev_tables import content as table_content

SIZE = 251   # small tables: the reconciler's bookkeeping is under test, not table size
OVERLAY = Overlay(ifindex=3, vni=1, vtep_mac="02:00:00:00:01:01", subnet="10.244.1.0/24")
PODS = [Pod(f"p{j}", "n1", f"10.244.1.{10 + j}", f"/run/netns/p{j}", host_ifname(f"p{j}"), f"02:00:00:00:00:{j:02x}")
        for j in range(12)]
LINKS = {p.host_ifname: LinkInfo(100 + j, "02:aa:00:00:00:01") for j, p in enumerate(PODS)}


def node_model() -> Model:
    """Node n1's model with PODS and their LINKS, no services yet."""
    model = Model("n1", table_size_for=lambda n: SIZE)
    model.set_node(cluster=ClusterConfig(), overlay=OVERLAY, node_ip="192.168.0.1", netdevs=[1])
    for p in PODS:
        model.set_pod(p.name, p)
    model.set_links(LINKS)
    return model


@pytest.fixture
def maps(tmp_path):
    require_root()
    loaded = Loader(str(tmp_path / "no-pins")).load()
    try:
        yield loaded.maps
    finally:
        close_loaded(loaded)


def service(i: int, pods: list[str]) -> Service:
    return Service(name=f"s{i}", vip=f"10.96.1.{i + 1}", ports=(ServicePort(80, 8080, id=i + 1),),
                   backends=tuple(BackendRef(p) for p in pods))


@pytest.mark.parametrize("chunk", [maglev_tables.BUILD_CHUNK, 7])   # 7: a big batch is built in chunks
def test_random_batches_leave_the_kernel_as_a_from_scratch_computation(maps, monkeypatch, chunk):
    monkeypatch.setattr(maglev_tables, "COOL_SECONDS", 0.0)   # spares get reused between batches
    monkeypatch.setattr(maglev_tables, "BUILD_CHUNK", chunk)
    rng = random.Random(21)
    model = node_model()
    model.update()
    model.drain()
    rec = Reconciler(maps)
    rec.apply(rec.initial_changes(model.snapshot()))
    services: dict[int, Service] = {}
    big = 0
    for step in range(14):
        count = rng.choice([1, 3, 40, 60]) if step % 3 else 50   # a big batch every third step at least
        big += count >= maglev_tables.PARALLEL_FROM
        for _ in range(count):
            i = rng.randrange(80)
            if i in services and rng.random() < 0.25:
                del services[i]
                model.set_service(f"s{i}", None)
            else:
                pods = sorted(rng.sample([p.name for p in PODS], rng.randint(0, 6)))
                services[i] = service(i, pods)
                model.set_service(f"s{i}", services[i])
        model.update()
        rec.apply(model.drain())
        want = compute("n1", PODS, LINKS, list(services.values()), ClusterConfig(), table_size_for=lambda n: SIZE,
                       overlay=OVERLAY, node_ip="192.168.0.1", netdevs=[1])
        live = {freeze(k.to_dict()): freeze(v.to_dict()) for k, v in maps["services"].items()}
        assert {k: without_table(v) for k, v in live.items()} == want.maps["services"], step
        assert {freeze(k.to_dict()) for k in maps["backends"].keys()} == set(want.maps["backends"]), step
        for value in live.values():
            v = dict(value)
            spec = want.maglev[v["id"]]
            ips = [ip for ip, _ in spec.backends]
            ref = [ips[s] for s in maglev.table([f"{ip}:{port}" for ip, port in spec.backends], SIZE)] \
                if ips else ["0.0.0.0"] * SIZE
            assert table_content(maps["maglev"], v["table"]) == ref, (step, v["id"])
    assert big >= 4
