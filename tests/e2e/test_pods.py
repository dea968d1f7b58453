"""One node, three pods: every pair talks (ICMP and TCP), node <-> pod works, deleted
addresses are refused and then reused, spoofed traffic is dropped, and a TCP stream
survives a SIGKILLed and restarted daemon."""
from __future__ import annotations

import itertools
import json
import signal
import time

import pytest

from tests.e2e.rig import in_pod, spawn_in_pod
from tests.e2e.servers import wait_established, wait_listening


@pytest.fixture
def pods(rig, node):
    out = [node.add_pod(s, "--label", f"app={s}") for s in ("a", "b", "c")]
    for p in out:
        node.wait_endpoint(p["ip"])
    return out


def serve_tcp(rig, pod: dict, port: int = 8080):
    """A real TCP server in the pod that answers with the pod's name."""
    proc = rig.spawn(spawn_in_pod(pod["name"], "socat", f"TCP-LISTEN:{port},reuseaddr,fork",
                                  f"SYSTEM:echo hello-from-{pod['name']}"))
    for _ in range(50):
        if f":{port}" in in_pod(pod["name"], "ss", "-ltn").stdout:
            return proc
        time.sleep(0.05)
    raise AssertionError("socat did not listen")


def tcp_get(pod_name: str, ip: str, port: int = 8080) -> str:
    return in_pod(pod_name, "socat", "-t3", "-T3", "-", f"TCP:{ip}:{port},connect-timeout=2", input="", timeout=10).stdout.strip()


def test_every_pair_pings_and_talks_tcp(rig, node, pods):
    for p in pods:
        serve_tcp(rig, p)
    for src, dst in itertools.permutations(pods, 2):
        in_pod(src["name"], "ping", "-c1", "-W2", dst["ip"])
        assert tcp_get(src["name"], dst["ip"]) == f"hello-from-{dst['name']}"
    stats = {c["counter"]: c["packets"] for c in node.atomnet_json("stats")}
    assert stats["fwd_local"] > 0, "pod-to-pod traffic must go through redirect_peer"


def test_node_and_pods_reach_each_other(rig, node, pods):
    a = pods[0]
    serve_tcp(rig, a)
    node.exec("ping", "-c1", "-W2", a["ip"])
    in_pod(a["name"], "ping", "-c1", "-W2", node.ip)
    assert node.exec("socat", "-t3", "-T3", "-", f"TCP:{a['ip']}:8080,connect-timeout=2").stdout.strip() == f"hello-from-{a['name']}"
    rig.spawn(node_server := __import__("subprocess").Popen(
        node.nsenter + ["socat", "TCP-LISTEN:9090,reuseaddr,fork", "SYSTEM:echo hello-from-node"]))
    wait_listening(node, 9090)
    assert tcp_get(a["name"], node.ip, 9090) == "hello-from-node"
    assert node_server.poll() is None


def test_pod_del_refuses_then_reuses_the_address(rig, node, pods):
    a, _, c = pods
    node.atomnet("pod", "del", c["name"])
    node.atomnet("pod", "del", c["name"])  # idempotent
    node.pods.remove(c["name"])
    node.wait_endpoint(c["ip"], present=False)
    started = time.monotonic()
    assert in_pod(a["name"], "ping", "-c1", "-W2", c["ip"], check=False).returncode != 0
    assert time.monotonic() - started < 2.5
    d = node.add_pod("d")
    assert d["ip"] == c["ip"], "the freed address is handed out again"
    node.wait_endpoint(d["ip"])
    in_pod(a["name"], "ping", "-c1", "-W2", d["ip"])
    names = {p["name"] for p in node.atomnet_json("pod", "list")}
    assert c["name"] not in names and d["name"] in names


def test_spoofed_source_is_dropped_and_counted(rig, node, pods):
    a, b, _ = pods
    before = {c["counter"]: c["packets"] for c in node.atomnet_json("stats")}["drop_spoofed"]
    in_pod(a["name"], "ip", "addr", "add", "10.244.250.250/32", "dev", "eth0")
    res = in_pod(a["name"], "ping", "-c2", "-W1", "-I", "10.244.250.250", b["ip"], check=False)
    assert res.returncode != 0
    after = {c["counter"]: c["packets"] for c in node.atomnet_json("stats")}["drop_spoofed"]
    assert after >= before + 2


def test_tcp_stream_survives_daemon_sigkill_and_restart(rig, node, pods):
    a, b, _ = pods
    rig.spawn(spawn_in_pod(b["name"], "iperf3", "-s", "-1", "-p", "5201"))
    wait_listening(b["name"], 5201)
    old_prog = {p["name"]: p["id"] for p in node.atomnet_json("prog", "show")}
    client = rig.spawn(spawn_in_pod(a["name"], "iperf3", "-c", b["ip"], "-p", "5201", "-t", "6", "-J"))
    wait_established(a["name"], b["ip"], 5201)   # the stream runs: now kill the daemon under it
    node.stop_daemon(signal.SIGKILL)
    node.start_daemon()
    out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    result = json.loads(out)
    assert result["end"]["sum_received"]["bytes"] > 0
    # Every one-second interval moved data: no stall while programs were replaced.
    assert all(i["sum"]["bytes"] > 0 for i in result["intervals"])
    new = {p["name"]: p["id"] for p in node.atomnet_json("prog", "show")}
    assert set(new.values()).isdisjoint(old_prog.values()), "the restarted daemon attached a new generation"
    attached = {(f["name"].removeprefix("atomnet:"), f["prog_id"]) for f in node.atomnet_json("net", "show") if f["atomnet"]}
    assert attached == set(new.items()), "every attachment runs the new generation"
