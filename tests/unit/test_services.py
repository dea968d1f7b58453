"""Services against the real sqlite store: VIP allocation and validation, ids, apply
(all or nothing, idempotent, prune, 10 000 services in one transaction), and the
desired-state function for services."""
import json
import time

import pytest

from ctl.state import cluster, services as svclib
from ctl.dataplane.desired import compute, freeze
from ctl.errors import AtomnetError
from ctl.state.model import (BackendRef, ClusterConfig, Pod, Service, ServicePort, ValidationError, host_ifname,
                       parse_affinity)
from ctl.state.store import open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite://{tmp_path}/state.db")
    cluster.init_network(s, "10.244.0.0/16", 24, "10.96.0.0/28")   # 12 usable VIPs (.10 is DNS)
    yield s
    s.close()


def add_pod(store, name, ip, labels=None, node="n1"):
    pod = Pod(name=name, node=node, ip=ip, netns=f"/run/netns/{name}", host_ifname=host_ifname(name),
              mac="02:00:00:00:00:01", labels=labels or {})
    store.put(f"/atomnet/pods/{name}", pod.to_json())
    return pod


def svc(name, *ports, vip="", **kw):
    return Service(name=name, vip=vip, ports=tuple(ServicePort.parse(p) for p in ports or ("80",)), **kw)


def test_port_parsing_and_validation():
    assert ServicePort.parse("80") == ServicePort(80, 80, "tcp")
    assert ServicePort.parse("443:8443") == ServicePort(443, 8443, "tcp")
    assert ServicePort.parse("53/UDP") == ServicePort(53, 53, "udp")
    for bad in ("0", "65536", "80:0", "x", "80/sctp", "80:abc"):
        with pytest.raises(ValidationError):
            ServicePort.parse(bad)
    assert parse_affinity("client-ip") == 10800 and parse_affinity("client-ip:600") == 600
    for bad in ("cookie", "client-ip:0", "client-ip:x", "client-ip:999999"):
        with pytest.raises(ValidationError):
            parse_affinity(bad)
    with pytest.raises(ValidationError, match="given twice"):
        svc("a", "80", "80")
    with pytest.raises(ValidationError, match="not both"):
        svc("a", backends=(BackendRef("x"),), selector={"app": "x"})


def test_vips_are_allocated_unique_and_validated(store):
    first = svclib.add_service(store, svc("a"))
    second = svclib.add_service(store, svc("b"))
    assert first.vip == "10.96.0.2" and second.vip == "10.96.0.3"   # .0 network, .1 kept for the API service
    assert svclib.add_service(store, svc("c", vip="10.96.0.1")).vip == "10.96.0.1"
    with pytest.raises(AtomnetError, match="already used by service a"):
        svclib.add_service(store, svc("d", vip="10.96.0.2"))
    with pytest.raises(ValidationError, match="outside the service CIDR"):
        svclib.add_service(store, svc("d", vip="10.97.0.1"))
    with pytest.raises(AtomnetError, match="already exists"):
        svclib.add_service(store, svc("a"))
    ids = [p.id for s in svclib.list_services(store) for p in s.ports]
    assert len(set(ids)) == len(ids) and min(ids) >= 1


def test_service_cidr_exhaustion_is_one_clear_error_and_frees_nothing(store):
    # 14 hosts in the /28, less .1 (kept) and .10 (the cluster DNS VIP, claimed at network init)
    vips = [svclib.add_service(store, svc(f"s{i}")).vip for i in range(12)]
    assert "10.96.0.10" not in vips
    with pytest.raises(AtomnetError, match="exhausted"):
        svclib.add_service(store, svc("one-too-many"))
    assert len(svclib.list_services(store)) == 12
    svclib.delete_service(store, "s3")
    assert svclib.add_service(store, svc("again")).vip == "10.96.0.5"


def test_named_backend_must_exist(store):
    with pytest.raises(AtomnetError, match="backend pod ghost does not exist"):
        svclib.add_service(store, svc("a", backends=(BackendRef("ghost"),)))
    assert svclib.list_services(store) == []
    assert [kv.key for kv in store.list("/atomnet/vips/")[0]] == ["/atomnet/vips/10.96.0.10"]   # the DNS VIP only


def test_show_resolves_selected_and_named_backends(store):
    add_pod(store, "w1", "10.244.1.2", {"app": "web"})
    add_pod(store, "w2", "10.244.2.2", {"app": "web"}, node="n2")
    add_pod(store, "db", "10.244.1.3", {"app": "db"})
    s = svclib.add_service(store, svc("web", "80:8080", selector={"app": "web"}))
    shown = svclib.show(s, svclib.pods_by_name(store))
    assert shown["backends"] == [{"pod": "w1", "ip": "10.244.1.2", "port": 8080, "node": "n1"},
                                 {"pod": "w2", "ip": "10.244.2.2", "port": 8080, "node": "n2"}]
    n = svclib.add_service(store, svc("dbs", "5432", backends=(BackendRef("db", 6432),)))
    assert svclib.show(n, svclib.pods_by_name(store))["backends"][0]["port"] == 6432


def doc(name, **extra):
    return {"kind": "service", "name": name, "ports": [{"port": 80, "target_port": 8080}], **extra}


def test_apply_is_all_or_nothing(store):
    svclib.apply(store, [doc("keep")])
    rev = store.revision()
    for bad in ([doc("a"), doc("a")], [doc("a"), {"kind": "deployment", "name": "x"}],
                [doc("a"), doc("b", vip="10.200.0.1")], [doc("a"), doc("b", ports=[{"port": 0}])],
                [doc("a"), doc("b", backends=[{"pod": "ghost"}])]):
        with pytest.raises(AtomnetError):
            svclib.apply(store, bad)
        assert store.revision() == rev, f"nothing written for {bad}"


def test_apply_is_idempotent_keeps_vips_and_ids_and_prunes(store):
    r1 = svclib.apply(store, [doc("a"), doc("b")])
    assert r1 == {"created": 2, "updated": 0, "unchanged": 0, "pruned": 0}
    before = {s.name: s for s in svclib.list_services(store)}
    rev = store.revision()
    assert svclib.apply(store, [doc("a"), doc("b")])["unchanged"] == 2
    assert store.revision() == rev, "the same file twice writes nothing"
    # The shape `service show -j` prints applies unchanged.
    shown = [svclib.show(s, {}) for s in svclib.list_services(store)]
    assert svclib.apply(store, json.loads(json.dumps(shown)))["unchanged"] == 2
    r3 = svclib.apply(store, [doc("a", ports=[{"port": 80, "target_port": 9090}])], prune=True)
    assert r3 == {"created": 0, "updated": 1, "unchanged": 0, "pruned": 1}
    after = svclib.get_service(store, "a")
    assert after.vip == before["a"].vip and after.ports[0].id == before["a"].ports[0].id
    assert svclib.get_service(store, "b") is None
    assert store.get(f"/atomnet/vips/{before['b'].vip}") is None


def test_apply_parses_yaml_and_json():
    assert svclib.parse_documents("- kind: service\n  name: a\n  ports: [{port: 80}]\n")[0]["name"] == "a"
    assert svclib.parse_documents('{"kind": "service", "name": "a", "ports": []}')[0]["name"] == "a"
    with pytest.raises(ValidationError):
        svclib.parse_documents("42")


def test_ten_thousand_services_apply_in_one_transaction(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/big.db")
    cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12")
    docs = [doc(f"svc-{i}") for i in range(10000)]
    start = time.monotonic()
    rev = store.revision()
    result = svclib.apply(store, docs)
    took = time.monotonic() - start
    assert result["created"] == 10000
    assert store.revision() - rev <= 2, "one transaction (plus the id reservation)"
    vips = {s.vip for s in svclib.list_services(store)}
    assert len(vips) == 10000
    print(f"apply of 10 000 services: {took:.2f} s")
    store.close()


def test_desired_services_maps():
    pods = [Pod("w1", "n1", "10.244.1.2", "/run/netns/w1", host_ifname("w1"), "02:00:00:00:00:01", {"app": "w"}),
            Pod("w2", "n2", "10.244.2.2", "/run/netns/w2", host_ifname("w2"), "02:00:00:00:00:02", {"app": "w"}),
            Pod("w3", "n1", "10.244.1.3", "/run/netns/w3", host_ifname("w3"), "02:00:00:00:00:03", {"app": "w"})]
    from ctl.node.netplumb import LinkInfo
    links = {host_ifname("w1"): LinkInfo(5, "02:aa:00:00:00:05")}   # w3's veth is not there (yet)
    s = Service("web", "10.96.0.10", (ServicePort(80, 8080, "tcp", id=7),), selector={"app": "w"},
                affinity_timeout=600)
    from ctl.dataplane.desired import Overlay
    from ctl.state.model import Lease
    leases = [Lease("10.244.1.0/24", "192.168.100.1", 1, "02:00:00:00:01:01"),
              Lease("10.244.2.0/24", "192.168.100.2", 1, "02:00:00:00:02:02")]
    d = compute("n1", pods, links, [s], ClusterConfig(), table_size_for=lambda n: 251, leases=leases,
                overlay=Overlay(9, 1, "02:00:00:00:01:01", "10.244.1.0/24"))
    assert d.maps["tunnels"] == {freeze({"prefixlen": 24, "ip": "10.244.2.0"}): freeze(
        {"node_ip": "192.168.100.2", "vtep_mac": "02:00:00:00:02:02"})}, "remote subnets only"
    assert d.ingress[9] == "from_overlay" and d.egress[9] == "to_overlay"
    # Without the lease of w2's node, w2 is not reachable, so not a backend.
    alone = compute("n1", pods, links, [s], ClusterConfig(), table_size_for=lambda n: 251)
    assert alone.maglev[7].backends == (("10.244.1.2", 8080),)
    key = freeze({"vip": "10.96.0.10", "port": 80, "proto": 6})
    value = dict(d.maps["services"][key])
    assert value["id"] == 7 and value["backend_count"] == 2 and value["affinity_timeout"] == 600
    assert d.maglev[7].backends == (("10.244.1.2", 8080), ("10.244.2.2", 8080))
    assert set(d.maps["backends"]) == {freeze({"service_id": 7, "ip": ip, "port": 8080})
                                       for ip in ("10.244.1.2", "10.244.2.2")}
    assert value["digest"] == d.maglev[7].digest
    assert dict(d.maps["config"][freeze({"value": 0})])["service_mask"] == "255.240.0.0"
