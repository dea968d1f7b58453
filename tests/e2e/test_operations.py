"""Operations: restart and upgrade without disruption, Prometheus metrics."""
from __future__ import annotations

import json
import threading
import signal
import subprocess
import time

import pytest

from ctl.dataplane.bpf.loader import OBJECT_NAMES
from tests.e2e.rig import REPO, in_pod, spawn_in_pod
from tests.e2e.servers import http_load, nginx, wait_established, wait_listening


def wait_service(node, name: str, backends: int, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in node.atomnet_json("lb", "list") if r["service"] == name]
        if rows and len(rows[0]["backends"]) == backends:
            return rows[0]
        time.sleep(0.1)
    raise AssertionError(f"{name} not programmed with {backends} backends")


@pytest.fixture
def served(rig, node):
    backends = [node.add_pod(f"b{i}", "--label", "app=op") for i in range(2)]
    client = node.add_pod("cl")
    for p in backends:
        node.wait_endpoint(p["ip"])
        nginx(rig, p["name"])
    node.wait_endpoint(client["ip"])
    svc = node.atomnet_json("service", "add", f"op{rig.uid}", "--port", "80:8080", "--selector", "app=op")
    wait_service(node, svc["name"], 2)
    return svc, client, backends


RESTARTS, MIN_CONNECTIONS = 10, 50_000   # issue 16: 10 SIGKILLs in a row under 50 000 new connections


def test_sigkill_and_restart_under_load_fails_no_request(rig, node, served):
    svc, client, _ = served
    stop = rig.tmp / "load.stop"
    load = rig.spawn(http_load(client["name"], svc["vip"], 80, seconds=600, max_requests=10**8,
                               stop_file=stop, min_requests=MIN_CONNECTIONS,
                               # A reset or a refusal fails the test; a request slowed past 2 s by a
                               # machine shared with other test runs (a SYN retransmitted) does not.
                               timeout=15))
    for i in range(RESTARTS):   # back to back, no sleeps: start_daemon waits for dataplane_ready
        assert load.poll() is None, f"the load ended before restart {i + 1}"
        node.stop_daemon(signal.SIGKILL)
        node.start_daemon()
    stop.touch()
    out, err = load.communicate(timeout=600)
    result = json.loads(out)
    assert result["ok"] >= MIN_CONNECTIONS
    assert result["failed"] == 0, result["errors"]
    print(f"restart under load: {RESTARTS} SIGKILLs, {result['ok']} connections, {result['failed']} failed")


def build_objects(tmp_path, cflags: str):
    """The BPF objects built with extra compiler flags (another version), in their own directory."""
    objdir = tmp_path / "objects-v2"
    subprocess.run(["make", "-s", "-C", str(REPO), f"OBJDIR={objdir}", f"EXTRA_BPF_CFLAGS={cflags}",
                    *[f"{objdir}/{n}.o" for n in OBJECT_NAMES]],
                   check=True, capture_output=True)
    return objdir


def test_upgrade_with_a_resized_conntrack_keeps_an_established_stream(rig, node, served, tmp_path):
    svc, client, backends = served
    # The "new version": the same programs built with a conntrack table twice as large.
    objdir = build_objects(tmp_path, "-DMAX_CONNTRACK=524288")
    iperf_srv = backends[0]
    rig.spawn(spawn_in_pod(iperf_srv["name"], "iperf3", "-s", "-1", "-p", "5301"))
    wait_listening(iperf_srv["name"], 5301)
    node.atomnet("service", "add", f"ip{rig.uid}", "--port", "5301", "--backend", iperf_srv["name"])
    wait_service(node, f"ip{rig.uid}", 1)
    vip = node.atomnet_json("service", "show", f"ip{rig.uid}")["vip"]
    # 20 s: the stream must outlast the restart and the reads around it (~4 s under the full
    # suite's load; with 8 s the data connection had sometimes ended, and its closed entries were
    # gone, by the time the new table was read: a test failure, not a lost flow)
    stream = rig.spawn(spawn_in_pod(client["name"], "iperf3", "-c", vip, "-p", "5301", "-t", "20", "-J"))
    wait_established(client["name"], vip, 5301)   # the stream runs through the VIP: upgrade under it
    before = {m["name"]: m for m in node.atomnet_json("map", "list")}
    assert before["conntrack"]["max_entries"] == 262144
    flows_before = {(f["src"], f["dst"], f["dir"]) for f in node.atomnet_json("ct", "list")}
    node.stop_daemon()
    node.start_daemon(env={"ATOMNET_BPF_OBJECTS": str(objdir)})
    after = {m["name"]: m for m in node.atomnet_json("map", "list")}
    assert after["conntrack"]["max_entries"] == 524288 and after["conntrack"]["id"] != before["conntrack"]["id"]
    assert after["endpoints"]["id"] == before["endpoints"]["id"], "unchanged maps are reused"
    flows_after = {(f["src"], f["dst"], f["dir"]) for f in node.atomnet_json("ct", "list")}
    still_running = stream.poll() is None
    out, err = stream.communicate(timeout=60)
    # the stream's own verdict first: a flow missing below is either not migrated or was ended
    assert stream.returncode == 0, err
    assert still_running, "the stream ended before the new table was read: this test's window is too short"
    assert flows_before <= flows_after, f"established flows carried into the new table (stream ok: {out[-300:]})"
    result = json.loads(out)
    assert all(i["sum"]["bytes"] > 0 for i in result["intervals"]), "no stall across the upgrade"
    assert "map_migrated" in node.log_path.read_text()
    moved = sum(i["sum"]["bytes"] for i in result["intervals"])
    print(f"upgrade: stream survived, {moved / 1e9:.2f} GB moved")


def scrape(node, port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    text = node.exec("curl", "-s", "--max-time", "3", f"http://127.0.0.1:{port}/metrics").stdout
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_scrape_parse_and_move_with_traffic(rig):
    node = rig.add_node("n1")
    port = 19641
    node.start_daemon("--metrics", f"127.0.0.1:{port}")
    a, b = node.add_pod("a"), node.add_pod("b")
    node.wait_endpoint(b["ip"])
    first = scrape(node, port)
    names = {name for name, _ in first}
    for expected in ("atomnet_reconcile_duration_seconds_count", "atomnet_map_entries", "atomnet_map_capacity",
                     "atomnet_drops_total", "atomnet_dataplane_packets_total", "atomnet_subnet_lease_remaining_seconds"):
        assert expected in names, expected
    assert all(n.startswith("atomnet_") or n.startswith(("python_", "process_")) for n in names)
    key = ("atomnet_dataplane_packets_total", (("outcome", "fwd_local"),))
    in_pod(a["name"], "ping", "-c3", "-i", "0.2", b["ip"])
    second = scrape(node, port)
    assert second[key] >= first.get(key, 0) + 6, "pod-to-pod packets show up in the metric"
    assert second[("atomnet_map_entries", (("map", "endpoints"),))] == 2


def test_metrics_address_in_use_is_one_line(rig):
    node = rig.add_node("n1")
    holder = subprocess.Popen(node.nsenter + ["socat", "TCP-LISTEN:19642,bind=127.0.0.1,reuseaddr", "-"],
                              stdin=subprocess.PIPE)
    rig.spawn(holder)
    deadline = time.monotonic() + 10   # wait for the listening socket, not a guessed time
    while "127.0.0.1:19642 " not in node.exec("ss", "-lnt").stdout:
        assert time.monotonic() < deadline and holder.poll() is None, "socat never listened"
        time.sleep(0.05)
    res = node.atomnet("daemon", "--metrics", "127.0.0.1:19642", check=False, timeout=20)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == "atomnet: metrics address 127.0.0.1:19642 is already in use"




def test_monitor_shows_a_spoofing_drop_with_its_reason(rig, node):
    a, b = node.add_pod("a"), node.add_pod("b")
    node.wait_endpoint(b["ip"])
    from tests.e2e.rig import ATOMNET
    mon = rig.spawn(subprocess.Popen(node.nsenter + ATOMNET + ["-j", "monitor", "--duration", "30"],
                                     env=node.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # Other drops may come first (the node's own IPv6 chatter on the overlay device is counted
    # as unsupported_l3), so read events until the spoofed one. The monitor is ready when it
    # has opened the perf ring, which nothing shows from outside: send spoofed packets until
    # it has seen one, not after a sleep.
    seen, spoofed = [], threading.Event()

    def read():
        for line in mon.stdout:
            seen.append(json.loads(line))
            if seen[-1].get("reason") == "spoofed":
                spoofed.set()
                return
    threading.Thread(target=read, daemon=True).start()
    in_pod(a["name"], "ip", "addr", "add", "10.244.250.250/32", "dev", "eth0")
    deadline = time.monotonic() + 25
    while not spoofed.is_set() and time.monotonic() < deadline:
        in_pod(a["name"], "ping", "-c1", "-W1", "-I", "10.244.250.250", b["ip"], check=False)
    mon.terminate()
    mon.wait(timeout=10)
    assert spoofed.is_set(), f"no spoofed drop among {seen}"
    event = seen[-1]
    assert event["type"] == "drop" and event["reason"] == "spoofed"
    assert event["src"].startswith("10.244.250.250") and event["dst"].startswith(b["ip"])
    # Without the daemon the monitor still works: it needs only the pins.
    node.stop_daemon()
    res = node.atomnet("monitor", "--duration", "1")
    assert res.returncode == 0


def test_explain_agrees_with_real_packets_and_changes_nothing(rig, node, served):
    svc, client, backends = served
    # Not drop_unsupported_l3: the node's own IPv6 chatter on the overlay device (router
    # solicitations) is dropped and counted by to_overlay whenever the kernel sends it.
    def stats():
        return [r for r in node.atomnet_json("stats") if r["counter"] != "drop_unsupported_l3"]
    counters_before = stats()
    flows_before = node.atomnet_json("ct", "list")
    r = node.atomnet_json("explain", "--from", client["name"], "--to", f"{svc['vip']}:80/tcp", "--sport", "41000")
    assert r["verdict"] == "redirect" and r["backend"].endswith(":8080")
    assert stats() == counters_before, "explain changed no counter"
    assert node.atomnet_json("ct", "list") == flows_before, "explain left no conntrack entry"
    # The same 5-tuple for real lands on the backend explain named.
    body = in_pod(client["name"], "curl", "-s", "--max-time", "3", "--local-port", "41000",
                  f"http://{svc['vip']}/").stdout.strip()
    expected = next(b["name"] for b in backends if r["backend"] == f"{b['ip']}:8080")
    assert body == expected
    # Pod to pod: delivered straight to the pod.
    direct = node.atomnet_json("explain", "--from", client["name"], "--to", f"{backends[0]['ip']}:8080")
    assert direct["delivered_to"] == f"pod with {backends[0]['ip']}" and direct["backend"] is None
    # No backend: explain says RST, and a real connection is refused.
    empty = node.atomnet_json("service", "add", f"e{rig.uid}", "--port", "81", "--selector", "app=none")
    wait_service(node, empty["name"], 0)
    r = node.atomnet_json("explain", "--from", client["name"], "--to", f"{empty['vip']}:81")
    assert r["reply"] == "TCP RST"
    res = in_pod(client["name"], "curl", "-s", "--max-time", "3", f"http://{empty['vip']}:81/", check=False)
    assert res.returncode == 7, "connection refused"


def test_explain_and_monitor_bad_input(rig, node):
    node.add_pod("a")
    for args, message in [
        (("explain", "--from", "ghost", "--to", "10.0.0.1:80"), "pod ghost not found"),
        (("explain", "--from", f"p{rig.uid}-a", "--to", "10.0.0.1:99999"), "malformed destination"),
        (("explain", "--from", f"p{rig.uid}-a", "--to", "nowhere:80"), "malformed destination"),
    ]:
        res = node.atomnet(*args, check=False)
        assert res.returncode == 1 and message in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    res = node.atomnet("--bpffs", str(rig.tmp / "nothing"), "monitor", "--duration", "1", check=False)
    assert res.returncode == 1 and "nothing pinned" in res.stderr
