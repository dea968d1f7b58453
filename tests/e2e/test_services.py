"""Services end to end on one node: real nginx backends, a real client, the daemon
programming the dataplane from the store."""
from __future__ import annotations

import json
import socket
import time

import pytest

from tests.e2e.rig import in_pod
from tests.e2e.servers import http_load, nginx, udp_echo


@pytest.fixture
def web(rig, node):
    """Three nginx backends labelled app=web and a client pod."""
    backends = [node.add_pod(f"w{i}", "--label", "app=web") for i in range(3)]
    client = node.add_pod("client")
    for p in backends + [client]:
        node.wait_endpoint(p["ip"])
        if p is not client:
            nginx(rig, p["name"])
    return backends, client


def wait_backends(node, service: str, count: int, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in node.atomnet_json("lb", "list") if r["service"] == service]
        if rows and all(len(r["backends"]) == count for r in rows):
            return rows[0]
        time.sleep(0.1)
    raise AssertionError(f"{service} never had {count} backends: {node.atomnet_json('lb', 'list')}")


def run_load(pod, host, port, seconds, max_requests=100000) -> dict:
    proc = http_load(pod, host, port, seconds, max_requests)
    out, err = proc.communicate(timeout=seconds + 30)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_vip_balances_over_all_backends_and_replies_from_the_vip(rig, node, web):
    backends, client = web
    svc = node.atomnet_json("service", "add", f"web{rig.uid}", "--port", "80:8080/tcp", "--selector", "app=web")
    assert svc["vip"].startswith("10.9") and len(svc["backends"]) == 3
    assert svc["ports"] == [{"port": 80, "target_port": 8080, "proto": "tcp", "node_port": None}]
    wait_backends(node, svc["name"], 3)
    result = run_load(client["name"], svc["vip"], 80, seconds=20, max_requests=600)
    assert result["failed"] == 0, result["errors"]
    counts = result["by_body"]
    assert set(counts) == {b["name"] for b in backends}
    fair = result["ok"] / 3
    for name, n in counts.items():
        assert abs(n - fair) / fair < 0.25, f"{name} got {n} of {result['ok']}"
    lb = wait_backends(node, svc["name"], 3)
    assert sum(b["packets"] for b in lb["backends"]) > 0
    stats = {r["counter"]: r["packets"] for r in node.atomnet_json("stats")}
    assert stats["lb_new_flow"] >= result["ok"] and stats["rev_nat"] > 0
    # http_load closes with RST, whose flows are forgotten at once (bpf/include/lb.h ct_forget);
    # a FIN-closed connection stays listed while it closes
    in_pod(client["name"], "curl", "-s", "--max-time", "3", f"http://{svc['vip']}:80/")
    flows = node.atomnet_json("ct", "list")
    assert any(f["dst"] == f"{svc['vip']}:80" and f["dir"] == "forward" for f in flows)
    print(f"balance over 3 backends, {result['ok']} requests: {dict(counts)}")


def test_backend_removed_under_load_fails_no_request(rig, node, web):
    backends, client = web
    name = f"api{rig.uid}"
    doc = lambda pods: json.dumps([{"kind": "service", "name": name, "ports": [{"port": 80, "target_port": 8080}],
                                    "backends": [{"pod": p["name"]} for p in pods]}])
    (rig.tmp / "svc.json").write_text(doc(backends))
    node.atomnet("apply", "-f", f"{rig.tmp}/svc.json")
    vip = node.atomnet_json("service", "show", name)["vip"]
    wait_backends(node, name, 3)
    # Each request may take 5 s: this test is about no request failing while the backend
    # goes, not about latency (one request over 2 s was seen once in a full run: see the note).
    load = http_load(client["name"], vip, 80, seconds=6, timeout=5.0)
    carried = lambda: [b for r in node.atomnet_json("lb", "list") if r["service"] == name for b in r["backends"]
                       if b["ip"] == backends[2]["ip"] and b["packets"] > 0]
    deadline = time.monotonic() + 10   # remove the backend once it carries some of the load
    while not carried():
        assert time.monotonic() < deadline and load.poll() is None, "the load never reached the third backend"
        time.sleep(0.05)
    (rig.tmp / "svc.json").write_text(doc(backends[:2]))
    node.atomnet("apply", "-f", f"{rig.tmp}/svc.json")
    wait_backends(node, name, 2)
    removed_at = time.monotonic()
    out, err = load.communicate(timeout=40)
    result = json.loads(out)
    assert result["failed"] == 0, result["errors"]
    assert result["ok"] > 100
    # After the removal no new connection lands on the removed backend.
    after = run_load(client["name"], vip, 80, seconds=3, max_requests=200)
    assert after["failed"] == 0 and backends[2]["name"] not in after["by_body"]
    assert time.monotonic() - removed_at < 30
    print(f"churn: {result['ok']} requests, {result['failed']} failed")


def test_udp_service_answers_from_the_vip(rig, node):
    dns = [node.add_pod(f"dns{i}") for i in range(2)]
    client = node.add_pod("uclient")
    for p in dns:
        node.wait_endpoint(p["ip"])
        udp_echo(rig, p["name"], 5353)
    node.wait_endpoint(client["ip"])
    svc = node.atomnet_json("service", "add", f"dns{rig.uid}", "--port", "53:5353/udp",
                            *[a for p in dns for a in ("--backend", p["name"])])
    wait_backends(node, svc["name"], 2)
    # A connected UDP socket only accepts datagrams from the address it sent to: an answer
    # that arrives proves the reply was translated back to VIP:53. Like any UDP client (DNS),
    # it asks again when no answer comes in time: one datagram once went unanswered for 2 s
    # in a fresh-clone run at load 7 (socat forks a shell per datagram).
    script = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
              f"s.connect(('{svc['vip']}', 53))\n"
              "for _ in range(5):\n"
              "    s.send(b'q')\n"
              "    try:\n        print(s.recv(100).decode().strip()); break\n"
              "    except TimeoutError:\n        pass\n")
    answer = in_pod(client["name"], "/usr/bin/python3", "-c", script).stdout.strip()
    assert answer in {p["name"] for p in dns}


def test_hairpin_backend_calls_its_own_service(rig, node):
    solo = node.add_pod("solo", "--label", "app=solo")
    node.wait_endpoint(solo["ip"])
    nginx(rig, solo["name"])
    svc = node.atomnet_json("service", "add", f"solo{rig.uid}", "--port", "80:8080", "--selector", "app=solo")
    wait_backends(node, svc["name"], 1)
    result = run_load(solo["name"], svc["vip"], 80, seconds=5, max_requests=20)
    assert result == {"ok": 20, "failed": 0, "by_body": {solo["name"]: 20}, "errors": {}}
    in_pod(solo["name"], "curl", "-s", "--max-time", "3", f"http://{svc['vip']}:80/")   # FIN-closed: stays listed
    assert any("hairpin" in f["flags"] for f in node.atomnet_json("ct", "list"))


def test_service_without_backends_is_refused_at_once(rig, node):
    client = node.add_pod("lonely")
    node.wait_endpoint(client["ip"])
    svc = node.atomnet_json("service", "add", f"none{rig.uid}", "--port", "80", "--port", "53/udp",
                            "--selector", "app=nothing")
    deadline = time.monotonic() + 10
    while not any(r["service"] == svc["name"] for r in node.atomnet_json("lb", "list")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    script = f"""
import socket, time
t = time.monotonic()
try:
    socket.create_connection(("{svc['vip']}", 80), timeout=3)
    print("connected")
except ConnectionRefusedError:
    print("refused", time.monotonic() - t)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3); u.connect(("{svc['vip']}", 53))
u.send(b"q")
t = time.monotonic()
try:
    u.recv(10); print("answered")
except ConnectionRefusedError:
    print("refused", time.monotonic() - t)
"""
    lines = in_pod(client["name"], "/usr/bin/python3", "-c", script).stdout.split("\n")
    tcp, udp = lines[0].split(), lines[1].split()
    assert tcp[0] == "refused" and float(tcp[1]) < 0.1, lines
    assert udp[0] == "refused" and float(udp[1]) < 0.1, lines
    stats = {r["counter"]: r["packets"] for r in node.atomnet_json("stats")}
    assert stats["lb_reject"] >= 2
    print(f"refused in {float(tcp[1]) * 1000:.2f} ms (TCP), {float(udp[1]) * 1000:.2f} ms (UDP)")


def test_bad_service_input_changes_nothing(rig, node):
    web = node.add_pod("bw", "--label", "app=bw")
    node.atomnet("service", "add", f"ok{rig.uid}", "--port", "80", "--vip", "10.96.0.50", "--backend", web["name"])
    before = node.atomnet_json("service", "list")
    for args, message in [
        (("--port", "0"), "must be 1-65535"),
        (("--port", "70000"), "must be 1-65535"),
        (("--port", "80/sctp"), "unknown protocol"),
        (("--port", "80", "--vip", "10.200.0.1"), "outside the service CIDR"),
        (("--port", "80", "--vip", "10.96.0.50"), "already used by service"),
        (("--port", "80", "--backend", "ghost"), "does not exist"),
        (("--port", "80", "--affinity", "cookie"), "invalid affinity"),
    ]:
        res = node.atomnet("service", "add", f"bad{rig.uid}", *args, check=False)
        assert res.returncode == 1 and message in res.stderr and len(res.stderr.splitlines()) == 1, (args, res.stderr)
    res = node.atomnet("service", "add", f"ok{rig.uid}", "--port", "81", check=False)
    assert res.returncode == 1 and "already exists" in res.stderr
    assert node.atomnet_json("service", "list") == before
