"""Daemon lifecycle and inspection on one node: SIGTERM leaves the dataplane forwarding,
a restart reuses the pinned maps, ids agree with bpftool, concurrent `pod add`s never
share an address, and failed commands change nothing."""
from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess

from tests.e2e.rig import in_pod, sh


def test_sigterm_leaves_forwarding_and_restart_reuses_maps(rig, node):
    a, b = node.add_pod("a"), node.add_pod("b")
    node.wait_endpoint(b["ip"])
    maps_before = {m["name"]: m["id"] for m in node.atomnet_json("map", "list")}
    node.stop_daemon()  # SIGTERM
    assert "daemon_stopped" in node.log_path.read_text()
    in_pod(a["name"], "ping", "-c1", "-W2", b["ip"])  # programs stay attached, maps stay pinned
    node.start_daemon()
    assert {m["name"]: m["id"] for m in node.atomnet_json("map", "list")} == maps_before
    in_pod(a["name"], "ping", "-c1", "-W2", b["ip"])


def test_ids_agree_with_bpftool(rig, node):
    node.add_pod("a")
    progs = node.atomnet_json("prog", "show")
    for p in progs:
        tool = json.loads(sh("bpftool", "-j", "prog", "show", "id", p["id"]).stdout)
        assert (tool["name"], tool["tag"], sorted(tool["map_ids"])) == (p["name"], p["tag"], sorted(p["map_ids"]))
        assert tool["type"] == p["type"]
    for m in node.atomnet_json("map", "list"):
        tool = json.loads(sh("bpftool", "-j", "map", "show", "pinned", m["pinned"]).stdout)
        assert (tool["id"], tool["type"], tool["bytes_key"], tool["bytes_value"], tool["max_entries"]) == (
            m["id"], m["type"], m["key_size"], m["value_size"], m["max_entries"])
    ids = {p["name"]: p["id"] for p in progs}
    assert set(ids) == {"from_pod", "from_overlay", "to_overlay", "from_netdev", "to_netdev"}
    attached = [f for f in node.atomnet_json("net", "show") if f["atomnet"]]
    assert {f["name"] for f in attached} == {f"atomnet:{n}" for n in ids}
    assert {f["ifname"] for f in attached if f["name"] == "atomnet:from_netdev"} == {"uplink0", "lo"}
    assert [(f["ifname"], f["direction"]) for f in attached if f["name"] == "atomnet:to_netdev"] == [("uplink0", "egress")]
    assert all(f["prog_id"] == ids[f["name"].removeprefix("atomnet:")] and f["direct_action"] for f in attached)
    dumped = node.atomnet_json("map", "dump", "endpoints")
    assert dumped and all("." in e["key"]["ip"] and ":" in e["value"]["mac"] for e in dumped)


def test_concurrent_pod_adds_get_distinct_addresses(rig, node):
    names = [f"p{rig.uid}-c{i}" for i in range(4)]
    node.pods.extend(names)
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: node.atomnet("-j", "pod", "add", n), names))
    ips = [json.loads(r.stdout)["ip"] for r in results]
    assert len(set(ips)) == 4
    for ip in ips:
        node.wait_endpoint(ip)


def test_failed_commands_change_nothing(rig, node):
    a = node.add_pod("a")
    node.wait_endpoint(a["ip"])
    pods_before = node.atomnet_json("pod", "list")
    eps_before = node.atomnet_json("endpoint", "list")
    links_before = node.exec("ip", "-o", "link").stdout
    for args, message in [
        (("pod", "add", a["name"]), "already exists"),
        (("pod", "add", "Bad_Name"), "invalid pod name"),
        (("pod", "add", f"p{rig.uid}-x", "--netns", "/run/netns/does-not-exist"), "does not exist"),
        (("network", "init", "--cidr", "10.245.0.0/16"), "already initialised"),
        (("map", "dump", "no-such-map"), "unknown map"),
    ]:
        res = node.atomnet(*args, check=False)
        assert res.returncode == 1, args
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert node.atomnet_json("pod", "list") == pods_before
    assert node.atomnet_json("endpoint", "list") == eps_before
    assert node.exec("ip", "-o", "link").stdout == links_before
    assert subprocess.run(["ip", "netns", "pids", f"p{rig.uid}-x"], capture_output=True).returncode != 0


def test_pod_in_an_existing_namespace_keeps_the_namespace(rig, node):
    ns = f"p{rig.uid}-own"
    sh("ip", "netns", "add", ns)
    try:
        pod = node.atomnet_json("pod", "add", f"p{rig.uid}-e", "--netns", f"/run/netns/{ns}")
        node.pods.append(pod["name"])
        node.wait_endpoint(pod["ip"])
        node.exec("ping", "-c1", "-W2", pod["ip"])
        node.atomnet("pod", "del", pod["name"])
        node.pods.remove(pod["name"])
        assert ns in sh("ip", "netns", "list").stdout, "a namespace atomnet did not create is not deleted"
        assert "eth0" not in sh("ip", "-n", ns, "-o", "link").stdout
    finally:
        sh("ip", "netns", "del", ns, check=False)
