"""A host port and a NodePort on the same (node IP, port, protocol) would be one key of the
`services` map: the store refuses the second of them, and the desired state never holds both."""
import json

import pytest

from ctl.dataplane.desired import compute
from ctl.node.netplumb import LinkInfo
from ctl.state import cluster, services as svclib
from ctl.state.forwards import claim_key
from ctl.state.names import DNS_VIP_OWNER
from ctl.state.model import NODEPORTS_PREFIX, Forward, Pod, Service, ServicePort, ValidationError, host_ifname
from ctl.state.store import open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/state.db")
    cluster.init_network(s, "10.244.0.0/16", 24, "10.96.0.0/12")
    yield s
    s.close()


def svc(name="web", node_port=None):
    return Service(name=name, vip="", ports=(ServicePort(80, 8080, "tcp", node_port),), selector={"app": "web"})


def test_node_port_that_is_a_host_port_is_refused_and_auto_skips_it(store):
    store.put(claim_key("n2", "tcp", 30000), "n2-tcp-30000")   # a forward of node n2
    store.put(claim_key("n1", "tcp", 30001), "n1-tcp-30001")
    with pytest.raises(ValidationError, match="node port 30000/tcp is a host port already .forward n2-tcp-30000"):
        svclib.add_service(store, svc(), node_port="30000")
    assert svclib.list_services(store) == [] and store.get(NODEPORTS_PREFIX + "tcp/30000") is None, "nothing half-written"
    assert [kv for kv in store.list("/atomnet/vips/")[0] if kv.value != DNS_VIP_OWNER] == []
    added = svclib.add_service(store, svc(), node_port="auto")
    assert added.ports[0].node_port == 30002
    assert store.get(NODEPORTS_PREFIX + "tcp/30001") is None, "the skipped claim was released"
    udp = svclib.add_service(store, Service("dns", "", (ServicePort(53, 53, "udp"),), selector={"a": "b"}),
                             node_port="30000")
    assert udp.ports[0].node_port == 30000, "another protocol is another port"


def test_apply_refuses_a_node_port_that_is_a_host_port_or_another_services(store):
    store.put(claim_key("n1", "tcp", 30080), "n1-tcp-30080")
    doc = {"kind": "service", "name": "web", "selector": {"app": "web"},
           "ports": [{"port": 80, "target_port": 8080, "node_port": 30080}]}
    with pytest.raises(ValidationError, match="30080/tcp is a host port already"):
        svclib.apply(store, [doc])
    assert svclib.list_services(store) == []
    doc["ports"][0]["node_port"] = 30081
    svclib.apply(store, [doc])
    assert store.get(NODEPORTS_PREFIX + "tcp/30081").value == "web", "apply claims the NodePort too"
    other = {**doc, "name": "other"}
    with pytest.raises(ValidationError, match="already used by service web"):
        svclib.apply(store, [doc, other])
    doc["ports"][0]["node_port"] = None
    svclib.apply(store, [doc])
    assert store.get(NODEPORTS_PREFIX + "tcp/30081") is None, "a NodePort the file drops is released"


def test_desired_state_never_programs_both():
    pod = Pod("web1", "n1", "10.244.1.2", "/run/netns/web1", host_ifname("web1"), "02:00:00:00:00:01", {"app": "web"})
    links = {pod.host_ifname: LinkInfo(10, "02:00:00:00:00:02")}
    nodeport = Service("web", "10.96.0.10", (ServicePort(80, 8080, "tcp", 30080, id=7),), selector={"app": "web"})
    older = Forward("n1-tcp-30080", "n1", "192.168.100.1", 30080, "tcp", "web1", 80, service_id=3)
    newer = Forward("n1-tcp-30080", "n1", "192.168.100.1", 30080, "tcp", "web1", 80, service_id=9)
    key = (("port", 30080), ("proto", 6), ("vip", "192.168.100.1"))
    for fwd, winner in ((older, 3), (newer, 7)):
        d = compute("n1", [pod], links, [nodeport], forwards=[fwd], node_ip="192.168.100.1")
        assert dict(d.maps["services"][key])["id"] == winner, "the older frontend (lower id) keeps the port"
        kept, refused = ("forward:n1-tcp-30080", "service:web") if winner == 3 else ("service:web", "forward:n1-tcp-30080")
        assert d.conflicts == [("192.168.100.1:30080/6", kept, refused)]
    d = compute("n1", [pod], links, [nodeport], forwards=[], node_ip="192.168.100.1")
    assert d.conflicts == [] and dict(d.maps["services"][key])["id"] == 7


def test_incremental_model_resolves_a_contested_frontend_as_compute_does():
    """The daemon's incremental model keeps the same frontend as the from-scratch computation,
    whichever arrives first, and hands the port back when the winner goes."""
    from ctl.dataplane.desired import Model
    pod = Pod("web1", "n1", "10.244.1.2", "/run/netns/web1", host_ifname("web1"), "02:00:00:00:00:01", {"app": "web"})
    links = {pod.host_ifname: LinkInfo(10, "02:00:00:00:00:02")}
    nodeport = Service("web", "10.96.0.10", (ServicePort(80, 8080, "tcp", 30080, id=7),), selector={"app": "web"})
    key = (("port", 30080), ("proto", 6), ("vip", "192.168.100.1"))
    for sid in (3, 9):
        fwd = Forward("n1-tcp-30080", "n1", "192.168.100.1", 30080, "tcp", "web1", 80, service_id=sid)
        for forward_first in (True, False):
            m = Model("n1")
            m.set_node(node_ip="192.168.100.1")
            m.set_links(links)
            m.set_pod("web1", pod)
            for step in ((lambda: m.set_forward(fwd.id, fwd)), (lambda: m.set_service("web", nodeport)))[::1 if forward_first else -1]:
                step()
                m.update()
            scratch = compute("n1", [pod], links, [nodeport], forwards=[fwd], node_ip="192.168.100.1")
            assert m.snapshot().maps["services"] == scratch.maps["services"]
            assert m.conflicts() == scratch.conflicts
            m.set_forward(fwd.id, None)
            m.update()
            assert dict(m.snapshot().maps["services"][key])["id"] == 7 and m.conflicts() == []
