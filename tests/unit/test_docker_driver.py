"""The Docker driver's store side against a real sqlite store (no root: nothing here
touches links), and the plugin's HTTP server over a real unix socket."""
from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

from ctl.errors import AtomnetError
from ctl.runtimes.docker import driver as drv
from ctl.runtimes.docker.server import PluginServer
from ctl.state import cluster
from ctl.state.model import IPAM_PREFIX, Node
from ctl.state.store import open_store

EP = "d94e40793a571eb2e5e10e643c4b91bdfb4efb4380848058ac8217c0be7eef33"


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite://{tmp_path}/state.db")
    cluster.init_network(s, "10.244.0.0/16", 24, "10.96.0.0/12")
    cluster.save_node(s, Node(name="n1", public_ip="192.168.100.1", uplink="uplink0", mtu=1500,
                              subnet="10.244.7.0/24", vtep_mac="02:00:00:00:00:01"))
    yield s
    s.close()


def test_pool_is_the_cluster_network(store):
    d = drv.Driver(store, "n1")
    assert d.request_pool("") == d.request_pool("10.244.0.0/16") == "10.244.0.0/16"
    with pytest.raises(AtomnetError, match="subnet 10.99.0.0/16 is not atomnet's cluster network 10.244.0.0/16"):
        d.request_pool("10.99.0.0/16")
    with pytest.raises(AtomnetError, match="is not atomnet's cluster network"):
        d.request_pool("10.244.7.0/24")   # a part of it is not the network either


def test_network_needs_atomnet_ipam(store):
    d = drv.Driver(store, "n1")
    d.create_network("n" * 64, ["0.0.0.0/0"], {})
    d.create_network("n" * 64, ["10.244.0.0/16"], {})
    with pytest.raises(AtomnetError, match="--ipam-driver atomnet"):
        d.create_network("n" * 64, ["172.18.0.0/16"], {})


def test_addresses_come_from_this_nodes_subnet_and_are_held_until_used(store):
    d = drv.Driver(store, "n1")
    a, b = d.request_address("10.244.0.0/16", None), d.request_address("10.244.0.0/16", None)
    assert (a, b) == ("10.244.7.2", "10.244.7.3")
    assert store.get(IPAM_PREFIX + a).value == drv.pending_owner("n1")
    assert d.request_address("10.244.0.0/16", "10.244.7.50") == "10.244.7.50"
    with pytest.raises(AtomnetError, match="already in use"):
        d.request_address("10.244.0.0/16", "10.244.7.50")
    with pytest.raises(AtomnetError, match="not a pod address of this node's subnet"):
        d.request_address("10.244.0.0/16", "10.244.8.5")   # --ip on another node's subnet
    d.release_address(a)
    assert store.get(IPAM_PREFIX + a) is None
    cluster.allocate_address(store, "10.244.7.0/24", "some-pod", requested=a)
    d.release_address(a)   # a pod's address is the pod's: ReleaseAddress after DeleteEndpoint leaves it
    assert store.get(IPAM_PREFIX + a).value == "some-pod"


def test_unknown_endpoints(store):
    d = drv.Driver(store, "n1")
    assert d.endpoint_info("n", EP) == {}
    with pytest.raises(AtomnetError, match="does not exist on this node"):
        d.join("n", EP, "/var/run/docker/netns/x", {})
    with pytest.raises(AtomnetError, match="does not exist on this node"):
        d.program_external("n", EP, [])
    d.delete_endpoint("n", EP)   # idempotent
    d.revoke_external("n", EP)
    with pytest.raises(AtomnetError, match="invalid endpoint id"):
        drv.pod_name("../etc")


def test_pod_and_link_names():
    assert drv.pod_name(EP) == "docker-d94e40793a57"
    assert drv.peer_ifname("an3f1df0b4fc7") == "ad3f1df0b4fc7"


def _post(path, sock_path, body: bytes):
    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(sock_path)
    conn = Conn("localhost")
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), json.loads(resp.read())
    finally:
        conn.close()


def test_server_over_a_unix_socket(store, tmp_path):
    path = str(tmp_path / "plugins" / "atomnet.sock")
    server = PluginServer(path, drv.Driver(store, "n1"))
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        assert _post("/Plugin.Activate", path, b"") == (
            200, "application/vnd.docker.plugins.v1.2+json", {"Implements": ["NetworkDriver", "IpamDriver"]})
        status, _, resp = _post("/IpamDriver.RequestPool", path, json.dumps({"Pool": "10.1.0.0/16"}).encode())
        assert status == 200 and "not atomnet's cluster network" in resp["Err"]
        assert _post("/IpamDriver.RequestPool", path, b"{")[0] == 400
        with pytest.raises(AtomnetError, match="another plugin is already serving"):
            PluginServer(path, drv.Driver(store, "n1"))
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "plugins" / "atomnet.sock").exists()
    # a socket left by a dead plugin is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    PluginServer(path, drv.Driver(store, "n1")).server_close()


def test_container_of_an_endpoint_and_its_labels():
    from ctl.runtimes.docker.dockerapi import find_container, pod_labels
    listed = [{"Id": "c1", "Names": ["/other"], "NetworkSettings": {"Networks": {"bridge": {"EndpointID": "aa" * 32}}}},
              {"Id": "c2", "Names": ["/web"], "Labels": {"app": "frontend", "bad key!": "x", "k": "bad value!"},
               "NetworkSettings": {"Networks": {"atomnet": {"EndpointID": EP}}}},
              {"Id": "c3", "NetworkSettings": {"Networks": None}}]
    assert find_container(listed, EP)["Id"] == "c2"
    assert find_container(listed, EP[:12])["Id"] == "c2"   # the id prefix a pod name carries
    assert find_container(listed, "bb" * 32) is None
    assert pod_labels(listed[1]) == {"app": "frontend", "docker-name": "web"}
    assert pod_labels({"Names": ["/Not_A_Valid-Label-Value-Because-It-Is-Way-Too-Long-For-Kubernetes-Labels-x"]}) == {}


def test_plugin_cli_bad_input_is_one_line(tmp_path, capsys):
    import os
    from ctl.cli import main
    if os.geteuid() != 0:
        pytest.skip("the plugin refuses to start without root before it looks at its flags")
    code = main(["--store", f"sqlite://{tmp_path}/s.db", "docker-plugin", "--socket", str(tmp_path / "p.sock"),
                 "--docker-host", "tcp://127.0.0.1:2375"])
    err = capsys.readouterr().err
    assert code == 1 and err.splitlines() == ["atomnet: docker host 'tcp://127.0.0.1:2375': only unix:// sockets are supported"]
