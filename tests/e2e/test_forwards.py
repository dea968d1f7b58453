"""Port forwarding and NodePort end to end: an external host on the underlay reaches pods
through published node ports; the node itself and pods (hairpin) too; NodePort reaches a
backend on another node; deleted forwards are refused at once; bad input changes nothing."""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.e2e.rig import in_pod, spawn_in_pod
from tests.e2e.servers import nginx, udp_echo, wait_listening


def http_get(node_or_host, url: str, timeout: int = 3) -> subprocess.CompletedProcess:
    return node_or_host.exec("curl", "-s", "--max-time", str(timeout), url, check=False)


def wait_frontend(node, ip: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["vip"] == ip and r["port"] == port and r["backends"] for r in node.atomnet_json("lb", "list")):
            return
        time.sleep(0.1)
    raise AssertionError(f"{ip}:{port} never programmed: {node.atomnet_json('lb', 'list')}")


@pytest.fixture
def setup(rig):
    n1 = rig.add_node("n1")
    n1.start_daemon()
    ext = rig.add_host("ext")   # a machine outside the cluster, on the same LAN
    web = n1.add_pod("web")
    n1.wait_endpoint(web["ip"])
    nginx(rig, web["name"])
    return n1, ext, web


def test_host_port_from_outside_from_the_node_and_from_pods(rig, setup):
    n1, ext, web = setup
    assert n1.atomnet("forward", "add", f"{web['name']}:8080", "--host-port", "8080").stdout.strip() == "8080"
    wait_frontend(n1, n1.ip, 8080)
    assert http_get(ext, f"http://{n1.ip}:8080/").stdout.strip() == web["name"]
    assert http_get(n1, f"http://{n1.ip}:8080/").stdout.strip() == web["name"], "the node itself (lo)"
    other = n1.add_pod("other")
    n1.wait_endpoint(other["ip"])
    assert in_pod(other["name"], "curl", "-s", "--max-time", "3", f"http://{n1.ip}:8080/").stdout.strip() == web["name"]
    assert in_pod(web["name"], "curl", "-s", "--max-time", "3", f"http://{n1.ip}:8080/").stdout.strip() == web["name"], \
        "hairpin: the pod reaches itself through its node's port"
    rows = n1.atomnet_json("forward", "list")
    assert rows[0]["host_port"] == 8080 and rows[0]["packets"] > 0
    assert any(r["service"] == f"forward:{rows[0]['id']}" for r in n1.atomnet_json("lb", "list"))


def test_client_address_is_kept_and_auto_port_works(rig, setup):
    n1, ext, web = setup
    rig.spawn(spawn_in_pod(web["name"], "socat", "TCP-LISTEN:9000,reuseaddr,fork", "SYSTEM:echo $SOCAT_PEERADDR"))
    wait_listening(web["name"], 9000)
    port = int(n1.atomnet("forward", "add", f"{web['name']}:9000", "--host-port", "auto").stdout)
    lo, hi = map(int, n1.exec("cat", "/proc/sys/net/ipv4/ip_local_port_range").stdout.split())
    assert lo <= port <= hi
    wait_frontend(n1, n1.ip, port)
    seen = ext.exec("socat", "-t2", "-T2", "-", f"TCP:{n1.ip}:{port}").stdout.strip()
    assert seen == ext.ip, "the pod sees the real client address"


def test_udp_forward(rig, setup):
    n1, ext, web = setup
    udp_echo(rig, web["name"], 5353)
    n1.atomnet("forward", "add", f"{web['name']}:5353", "--host-port", "5353", "--proto", "udp")
    wait_frontend(n1, n1.ip, 5353)
    # Like any UDP client (DNS), ask again when no answer comes in time.
    script = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
              f"s.connect(('{n1.ip}', 5353))\n"
              "for _ in range(3):\n"
              "    s.send(b'q')\n"
              "    try:\n        print(s.recv(100).decode().strip()); break\n"
              "    except TimeoutError:\n        pass\n")
    got = ext.exec("/usr/bin/python3", "-c", script, check=False)
    assert got.stdout.strip() == web["name"], got.stderr


def test_deleted_forward_is_refused_at_once(rig, setup):
    n1, ext, web = setup
    fwd = n1.atomnet_json("forward", "add", f"{web['name']}:8080", "--host-port", "8081")
    wait_frontend(n1, n1.ip, 8081)
    assert http_get(ext, f"http://{n1.ip}:8081/").stdout.strip() == web["name"]
    n1.atomnet("forward", "del", fwd["id"])
    n1.atomnet("forward", "del", fwd["id"])   # idempotent
    deadline = time.monotonic() + 10
    while any(r["port"] == 8081 for r in n1.atomnet_json("lb", "list")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = time.monotonic()
    res = http_get(ext, f"http://{n1.ip}:8081/")
    assert res.returncode == 7, "connection refused (curl exit 7), not a timeout"
    assert time.monotonic() - started < 1


def test_bad_forward_input_changes_nothing(rig, setup):
    n1, ext, web = setup
    n1.atomnet("forward", "add", f"{web['name']}:8080", "--host-port", "8082")
    rig.spawn(subprocess.Popen(n1.nsenter + ["socat", "TCP-LISTEN:9999,reuseaddr,fork", "SYSTEM:echo busy"]))
    wait_listening(n1, 9999)
    before = n1.atomnet_json("forward", "list")
    for args, message in [
        (("--host-port", "9999"), "9999/tcp is already bound on this node by socat"),
        (("--host-port", "70000"), "must be 1-65535"),
        (("--host-port", "8082"), "already forwarded"),
        (("--host-port", "8083", "--host-ip", "192.0.2.1"), "not an address of node"),
        (("--host-port", "8083", "--proto", "sctp"), "unknown protocol"),
    ]:
        res = n1.atomnet("forward", "add", f"{web['name']}:8080", *args, check=False)
        assert res.returncode == 1 and message in res.stderr and len(res.stderr.splitlines()) == 1, (args, res.stderr)
    res = n1.atomnet("forward", "add", "ghost:80", "--host-port", "8084", check=False)
    assert res.returncode == 1 and "pod ghost does not exist" in res.stderr
    assert n1.atomnet_json("forward", "list") == before


def test_nodeport_reaches_a_backend_on_another_node(rig):
    n1, n2 = rig.add_node("n1"), rig.add_node("n2")
    for n in (n1, n2):
        n.start_daemon()
    ext = rig.add_host("ext")
    backend = n2.add_pod("np")
    n2.wait_endpoint(backend["ip"])
    nginx(rig, backend["name"])
    svc = n1.atomnet_json("service", "add", f"np{rig.uid}", "--port", "80:8080", "--backend", backend["name"],
                          "--node-port", "auto")
    node_port = svc["ports"][0]["node_port"]
    assert 30000 <= node_port <= 32767
    wait_frontend(n1, n1.ip, node_port, timeout=20)
    for _ in range(3):
        assert http_get(ext, f"http://{n1.ip}:{node_port}/").stdout.strip() == backend["name"], "via n1, backend on n2"
    wait_frontend(n2, n2.ip, node_port)
    assert http_get(ext, f"http://{n2.ip}:{node_port}/").stdout.strip() == backend["name"], "via n2, backend local"
    flows = n1.atomnet_json("ct", "list")
    assert any("snat" in f["flags"] for f in flows), "to another node the source becomes n1's, so replies return via n1"


def test_apply_takes_forwards_too(rig, setup):
    n1, ext, web = setup
    doc = [{"kind": "forward", "pod": web["name"], "port": 8080, "host_port": 8090},
           {"kind": "service", "name": f"ap{rig.uid}", "ports": [{"port": 80, "target_port": 8080}],
            "backends": [{"pod": web["name"]}]}]
    (rig.tmp / "all.json").write_text(__import__("json").dumps(doc))
    first = n1.atomnet_json("apply", "-f", rig.tmp / "all.json")
    assert first["created"] == 1 and first["forwards"]["created"] == 1
    again = n1.atomnet_json("apply", "-f", rig.tmp / "all.json")
    assert again["unchanged"] == 1 and again["forwards"] == {"created": 0, "unchanged": 1, "pruned": 0}
    wait_frontend(n1, n1.ip, 8090)
    assert http_get(ext, f"http://{n1.ip}:8090/").stdout.strip() == web["name"]
    bad = doc + [{"kind": "forward", "pod": "ghost", "port": 1, "host_port": 8091}]
    (rig.tmp / "bad.json").write_text(__import__("json").dumps(bad))
    before = (n1.atomnet_json("forward", "list"), n1.atomnet_json("service", "list"))
    assert n1.atomnet("apply", "-f", rig.tmp / "bad.json", check=False).returncode == 1
    assert (n1.atomnet_json("forward", "list"), n1.atomnet_json("service", "list")) == before
    (rig.tmp / "only-service.json").write_text(__import__("json").dumps(doc[1:]))
    result = n1.atomnet_json("apply", "-f", rig.tmp / "only-service.json", "--prune")
    assert "forwards" not in result and len(n1.atomnet_json("forward", "list")) == 1, \
        "--prune only touches the kinds the file lists"
