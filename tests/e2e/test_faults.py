"""Faults, end to end (issue 16): a conntrack flood, the daemon SIGKILLed in a tight loop
under long-lived connections, the store's disk full, etcd down for a minute. Real daemon,
real traffic through services; every figure printed is what the run measured."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.rig import in_pod, spawn_in_pod
from tests.e2e.servers import http_load, nginx, tcp_echo

HERE = Path(__file__).parent
ECHO_PORT = 9000
FLOOD_FLOWS = 300_000            # issue 16: 300 000 new flows from one pod
FLOOD_PORTS = list(range(7001, 7006))   # 5 destination ports x 60 000 source ports


def wait_service(node, name: str, backends: int, timeout: float = 15) -> dict:
    from tests.e2e.test_operations import wait_service as wait
    return wait(node, name, backends, timeout)


class Holder:
    """tests/e2e/held_conns.py in a pod: long-lived connections carrying data."""

    def __init__(self, rig, pod: str, vip: str, count: int):
        self.stop = rig.tmp / f"hold-{pod}.stop"
        self.proc = rig.spawn(spawn_in_pod(pod, "/usr/bin/python3", HERE / "held_conns.py", vip, ECHO_PORT, count,
                                           self.stop))

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()   # "ready" once every connection has echoed once
        assert line.strip() == "ready", f"holder not ready: {line!r} {self.proc.stderr.read()}"

    def finish(self) -> dict:
        """Stops after one more full round of traffic on every connection; its result."""
        self.stop.touch()
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])


def start_echo_service(rig, node, clients: int = 2) -> tuple[list[dict], list[dict], dict]:
    """Two echo backends (app=echo) behind one service, both programmed, and client pods:
    (backends, clients, service)."""
    backends = [node.add_pod(f"e{i}", "--label", "app=echo") for i in range(2)]
    pods = [node.add_pod(f"h{i}" if clients > 1 else "h") for i in range(clients)]
    for p in backends + pods:
        node.wait_endpoint(p["ip"])
    for p in backends:
        tcp_echo(rig, p["name"], ECHO_PORT)
    svc = node.atomnet_json("service", "add", f"echo{rig.uid}", "--port", str(ECHO_PORT), "--selector", "app=echo")
    wait_service(node, svc["name"], 2)
    return backends, pods, svc


@pytest.fixture
def echo_service(rig, node):
    """Two echo backends behind one service, and two client pods."""
    _, clients, svc = start_echo_service(rig, node)
    return svc, clients


def conntrack_entries(node) -> tuple[int, int]:
    m = next(m for m in node.atomnet_json("map", "list") if m["name"] == "conntrack")
    return m["entries"], m["max_entries"]


def test_conntrack_flood_leaves_established_connections_alone(rig, node, echo_service):
    svc, clients = echo_service
    sink = node.add_pod("sink")        # nothing listens there: the flood's datagrams just land
    flooder = node.add_pod("fl")
    node.wait_endpoint(flooder["ip"])
    # Each frontend port to its own backend port: five frontends on one backend:port would make
    # one source port's five flows one 4-tuple at the sink (the tuple clash, refused: README)
    ports = [arg for p in FLOOD_PORTS for arg in ("--port", f"{p}:{p}/udp")]
    flood = node.atomnet_json("service", "add", f"fl{rig.uid}", *ports, "--backend", sink["name"])
    holders = [Holder(rig, c["name"], svc["vip"], 10) for c in clients]
    for h in holders:
        h.wait_ready()
    res = in_pod(flooder["name"], "/usr/bin/python3", HERE / "udp_flood.py", flood["vip"], FLOOD_FLOWS,
                 ",".join(map(str, FLOOD_PORTS)), timeout=300)
    sent = json.loads(res.stdout)
    entries, capacity = conntrack_entries(node)
    new_flows = next(r["packets"] for r in node.atomnet_json("stats") if r["counter"] == "lb_new_flow")
    results = [h.finish() for h in holders]
    print(f"conntrack flood: {sent['sent']} flows in {sent['seconds']} s, {new_flows} new flows translated, "
          f"table {entries}/{capacity}, held connections broken: {[r['broken'] for r in results]}, "
          f"rounds {[r['rounds'] for r in results]}")
    assert sent["sent"] == FLOOD_FLOWS
    assert new_flows >= capacity // 2, "the flood overflowed the table (2 entries per flow)"
    assert all(r["broken"] == 0 for r in results), results


# Issue 16's reset: many more restarts than test_operations' 10, with connections that stay
# open across every one of them carrying data, and new connections at full speed besides.
RESTART_LOOP = int(os.environ.get("ATOMNET_RESTART_LOOP", "20"))


def test_sigkill_loop_resets_no_connection(rig, node, echo_service):
    svc, clients = echo_service
    for p in node.atomnet_json("pod", "list"):
        if p["name"].endswith(("-e0", "-e1")):
            nginx(rig, p["name"])
    web = node.atomnet_json("service", "add", f"web{rig.uid}", "--port", "80:8080", "--selector", "app=echo")
    wait_service(node, web["name"], 2)
    holder = Holder(rig, clients[0]["name"], svc["vip"], 20)
    holder.wait_ready()
    stop = rig.tmp / "load.stop"
    load = rig.spawn(http_load(clients[1]["name"], web["vip"], 80, seconds=900, max_requests=10**8,
                               stop_file=stop, min_requests=1, timeout=15))
    for i in range(RESTART_LOOP):
        assert load.poll() is None and holder.proc.poll() is None, f"a client ended before restart {i + 1}"
        node.stop_daemon(signal.SIGKILL)
        node.start_daemon()
    held = holder.finish()
    stop.touch()
    out, _ = load.communicate(timeout=600)
    crr = json.loads(out)
    print(f"sigkill loop: {RESTART_LOOP} SIGKILLs, held {held['rounds']} rounds on 20 connections "
          f"({held['broken']} broken), {crr['ok']} new connections ({crr['failed']} failed)")
    assert held["broken"] == 0, held["errors"]
    assert crr["failed"] == 0, crr["errors"]


def fill(directory: Path) -> Path:
    """Writes a file until the filesystem says ENOSPC; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == 28, exc   # ENOSPC
    return filler


def test_full_disk_under_the_sqlite_store(rig):
    disk = rig.tmp / "small-disk"
    disk.mkdir()
    # A tmpfs of its own: the store's disk can fill without touching anyone else's.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", f"an{rig.uid}-disk", str(disk)], check=True)
    try:
        rig.store = f"sqlite://{disk}/state.db"
        node = rig.add_node("n1")
        node.start_daemon()
        web, client = node.add_pod("w", "--label", "app=w"), node.add_pod("c")
        for p in (web, client):
            node.wait_endpoint(p["ip"])
        nginx(rig, web["name"])
        s1 = node.atomnet_json("service", "add", f"s1{rig.uid}", "--port", "80:8080", "--selector", "app=w")
        wait_service(node, s1["name"], 1)
        stored_before = node.atomnet_json("service", "list")
        filler = fill(disk)

        res = node.atomnet("service", "add", f"s2{rig.uid}", "--port", "80:8080", "--selector", "app=w", check=False)
        assert res.returncode == 1, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "disk is full" in lines[0], res.stderr
        # Several objects in one apply: all or nothing.
        doc = node.atomnet_json("service", "show", s1["name"])
        docs = [{"kind": "service", "name": f"a{i}{rig.uid}", "selector": doc["selector"],
                 "ports": [{"port": 80, "target_port": 8080}]} for i in range(3)]
        (rig.tmp / "many.json").write_text(json.dumps(docs))
        res = node.atomnet("apply", "-f", rig.tmp / "many.json", check=False)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert node.atomnet_json("service", "list") == stored_before, "nothing half-written"
        # The daemon keeps running and forwarding what is stored.
        assert node.daemon.poll() is None
        body = in_pod(client["name"], "curl", "-s", "--max-time", "5", f"http://{s1['vip']}/").stdout.strip()
        assert body == web["name"]

        filler.unlink()   # space again: the next write works and is programmed
        s2 = node.atomnet_json("service", "add", f"s2{rig.uid}", "--port", "80:8080", "--selector", "app=w")
        wait_service(node, s2["name"], 1)
        body = in_pod(client["name"], "curl", "-s", "--max-time", "5", f"http://{s2['vip']}/").stdout.strip()
        assert body == web["name"] and node.daemon.poll() is None
        print(f"full disk: refused with {lines[0]!r}; daemon kept serving")
    finally:
        rig.teardown()   # the daemon holds the database open: stop it before unmounting
        rig.nodes, rig.procs = [], []
        subprocess.run(["umount", "-l", str(disk)], check=False)


# Issue 16: etcd stopped for 60 s under load. Overridable to try other lengths; the default
# (what make test runs) is the 60 s. The sleep below IS the fault's duration.
ETCD_OUTAGE = float(os.environ.get("ATOMNET_ETCD_OUTAGE", "60"))


def test_etcd_down_for_a_minute_under_load(rig):
    """With the only etcd member down nothing can change in the store, so "what changed
    meanwhile" is what is written the moment it is back, racing the daemon's reconnect:
    the daemon's watch resumes from the revision it had seen, so no change is lost."""
    import time
    rig.use_etcd()
    node = rig.add_node("n1")
    node.start_daemon()
    backends = [node.add_pod(f"b{i}", "--label", "app=op") for i in range(2)]
    client = node.add_pod("cl")
    # The pod-to-pod load comes from a pod of its own: one pod connecting to a backend through
    # a VIP and directly at once can give both connections the same source port (Linux picks
    # ports per destination), and after DNAT they are one 4-tuple at the backend (a tuple
    # clash atomnet does not resolve yet; netfilter's NAT remaps the port: README, Operating it).
    direct = node.add_pod("cd")
    for p in [*backends, client, direct]:
        node.wait_endpoint(p["ip"])
    for p in backends:
        nginx(rig, p["name"])
    svc = node.atomnet_json("service", "add", f"op{rig.uid}", "--port", "80:8080", "--selector", "app=op")
    wait_service(node, svc["name"], 2)
    old = node.atomnet_json("service", "add", f"old{rig.uid}", "--port", "82:8080", "--selector", "app=op")
    wait_service(node, old["name"], 2)
    stop = rig.tmp / "load.stop"
    through_vip = rig.spawn(http_load(client["name"], svc["vip"], 80, seconds=ETCD_OUTAGE + 300, max_requests=10**8,
                                      stop_file=stop, min_requests=1, timeout=15))
    pod_to_pod = rig.spawn(http_load(direct["name"], backends[0]["ip"], 8080, seconds=ETCD_OUTAGE + 300,
                                     max_requests=10**8, stop_file=stop, min_requests=1, timeout=15))
    failures = node.log_count("store_watch_failed")
    rig.etcd.halt()
    node.wait_log("store_watch_failed", occurrences=failures + 1, timeout=30)   # the daemon noticed
    res = node.atomnet("service", "add", f"no{rig.uid}", "--port", "81", "--selector", "app=op", check=False,
                       timeout=120)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    time.sleep(ETCD_OUTAGE)
    assert node.daemon.poll() is None, "the daemon survived the outage"
    assert through_vip.poll() is None and pod_to_pod.poll() is None
    rig.etcd.resume()
    late = node.atomnet_json("service", "add", f"late{rig.uid}", "--port", "80:8080", "--selector", "app=op")
    node.atomnet("service", "del", old["name"])
    back = time.monotonic()
    wait_service(node, late["name"], 2, timeout=60)
    deadline = time.monotonic() + 60
    while any(r["vip"] == old["vip"] for r in node.atomnet_json("lb", "list")):   # the kernel's frontends
        assert time.monotonic() < deadline, "the deleted service is still programmed"
        time.sleep(0.1)
    applied = time.monotonic() - back
    stop.touch()
    results = {}
    for name, proc in (("vip", through_vip), ("pod", pod_to_pod)):
        out, _ = proc.communicate(timeout=120)
        results[name] = json.loads(out)
    print(f"etcd down {ETCD_OUTAGE:.0f} s: {results['vip']['ok']} requests through the VIP "
          f"({results['vip']['failed']} failed, by backend {dict(results['vip']['by_body'])}), "
          f"{results['pod']['ok']} pod to pod ({results['pod']['failed']} failed); changes after the return "
          f"programmed in {applied:.1f} s")
    assert results["pod"]["failed"] == 0, results["pod"]["errors"]
    assert results["vip"]["failed"] == 0, results["vip"]["errors"]
    assert set(results["vip"]["by_body"]) == {b["name"] for b in backends}, "both backends balanced"
