"""`atomnet pod add/del` and the CNI plugin's ADD/DEL through the node's daemon (the node API,
ctl/runtimes/nodeapi.py) and without one: the same pod, the same dataplane, the same errors,
and nothing half-made either way; a stopped or killed daemon means in-process, not failure."""
from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

from ctl.runtimes import nodeapi
from ctl.state.model import host_ifname
from tests.e2e.cni_rig import CniNode
from tests.e2e.rig import ATOMNET, INSTALLED_ATOMNET, in_pod, sh
from tests.e2e.test_cni import make_netns
from tests.e2e.test_pods import serve_tcp, tcp_get

OFF = {"ATOMNET_API_SOCKET": "off"}   # the CLI does the work itself, as with no daemon


def cli(node, *args, env: dict | None = None, cmd: list[str] = ATOMNET) -> subprocess.CompletedProcess:
    return subprocess.run(node.nsenter + cmd + [str(a) for a in args], env={**node.env(), **(env or {})},
                          capture_output=True, text=True, timeout=60)


def served(node, op: str) -> int:
    """How many requests of `op` the daemon answered (its nodeapi_request events)."""
    if not node.log_path.exists():
        return 0
    return sum(1 for line in node.log_path.read_text().splitlines()
               if '"event": "nodeapi_request"' in line and f'"op": "{op}"' in line)


def pod_add(node, short: str, *extra, env=None, cmd: list[str] = ATOMNET) -> dict:
    name = f"p{node.rig.uid}-{short}"
    node.pods.append(name)   # the rig's teardown removes it whatever happens
    res = cli(node, "-j", "pod", "add", name, *extra, env=env, cmd=cmd)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def pod_shape(pod: dict) -> list[str]:
    """What a pod's namespace holds, with its own address and MAC written as placeholders."""
    out = []
    for cmd in (["ip", "-o", "-4", "addr", "show"], ["ip", "-4", "route", "show"], ["ip", "neigh", "show"],
                ["ip", "-o", "link", "show"]):
        text = in_pod(pod["name"], *cmd).stdout.replace(pod["ip"], "IP").replace(pod["mac"], "MAC")
        text = re.sub(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", "LLADDR", text)
        text = re.sub(r"@if\d+|^\d+:", "", text, flags=re.M)
        out.append(text)
    return out


def gone(node, pod: dict) -> None:
    assert pod["name"] not in {p["name"] for p in node.atomnet_json("pod", "list")}
    assert not Path(pod["netns"]).exists()
    assert f" {pod['host_ifname']}@" not in node.exec("ip", "-o", "link", "show").stdout
    node.wait_endpoint(pod["ip"], present=False)


def test_through_the_daemon_and_in_process_the_same_pod_the_same_dataplane(rig, node):
    a = pod_add(node, "a", "--label", "app=x")
    assert served(node, "pod.add") == 1
    assert a["ip"] in {e["ip"] for e in node.atomnet_json("endpoint", "list")}, "programmed when pod add returns"
    b = pod_add(node, "b", "--label", "app=x", env=OFF)
    assert served(node, "pod.add") == 1, "the in-process add did not go to the daemon"
    assert list(a) == list(b), "the same -j keys in the same order"
    assert {k: v for k, v in a.items() if k not in ("name", "ip", "netns", "host_ifname", "mac")} == \
           {k: v for k, v in b.items() if k not in ("name", "ip", "netns", "host_ifname", "mac")}
    for p in (a, b):
        node.wait_endpoint(p["ip"])
    assert pod_shape(a) == pod_shape(b)
    eps = {e["ip"]: e for e in node.atomnet_json("endpoint", "list")}
    assert set(eps[a["ip"]]) == set(eps[b["ip"]])
    serve_tcp(rig, a)
    serve_tcp(rig, b)
    assert tcp_get(b["name"], a["ip"]) == f"hello-from-{a['name']}"
    assert tcp_get(a["name"], b["ip"]) == f"hello-from-{b['name']}"
    # deleted the other way round: each path removes what the other made
    res = cli(node, "-j", "pod", "del", a["name"], env=OFF)
    assert res.returncode == 0 and json.loads(res.stdout)[0]["name"] == a["name"], res.stderr
    res = cli(node, "-j", "pod", "del", b["name"])
    assert res.returncode == 0 and json.loads(res.stdout)[0]["name"] == b["name"], res.stderr
    assert served(node, "pod.del") == 1
    gone(node, a)
    gone(node, b)
    assert cli(node, "pod", "del", a["name"]).stdout.strip() == f"pod {a['name']} not found (nothing to do)"


def test_the_installed_command_adds_and_deletes_the_same_pods(rig, node):
    """The `atomnet` users run (make build's launcher, ctl/launch.py: Python without site until a
    verb needs it), through the daemon and in its own process, against `python -m ctl.cli`: the
    same pods, the same -j output, the same errors."""
    installed = [str(INSTALLED_ATOMNET)]
    assert "from ctl.launch import run" in INSTALLED_ATOMNET.read_text(), "make build installs the launcher"
    a = pod_add(node, "la", "--label", "app=x", cmd=installed)
    assert served(node, "pod.add") == 1
    assert a["ip"] in {e["ip"] for e in node.atomnet_json("endpoint", "list")}, "programmed when pod add returns"
    b = pod_add(node, "lb", "--label", "app=x", env=OFF, cmd=installed)
    c = pod_add(node, "lc", "--label", "app=x")
    assert served(node, "pod.add") == 2
    unique = ("name", "ip", "netns", "host_ifname", "mac")
    assert list(a) == list(b) == list(c)
    assert {k: v for k, v in a.items() if k not in unique} == {k: v for k, v in b.items() if k not in unique} \
        == {k: v for k, v in c.items() if k not in unique}
    for p in (b, c):
        node.wait_endpoint(p["ip"])
    assert pod_shape(a) == pod_shape(b) == pod_shape(c)
    for args in (["pod", "add", a["name"]], ["pod", "add", f"p{rig.uid}-lx", "--label", "novalue"],
                 ["pod", "add", f"p{rig.uid}-lx", "--netns", f"/run/netns/absent{rig.uid}"], ["pod", "add"],
                 ["-j", "pod", "del", f"p{rig.uid}-absent"], ["pod", "list"],
                 ["-j", "endpoint", "list"], ["tunnel", "list"]):   # these two read the pins with bcc (site)
        for env in (None, OFF):
            want = cli(node, *args, env=env)
            got = cli(node, *args, env=env, cmd=installed)
            assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr), (args, env)
    res = cli(node, "pod", "del", a["name"], cmd=installed)
    assert res.returncode == 0 and res.stdout == f"pod {a['name']} deleted\n", res.stderr
    res = cli(node, "-j", "pod", "del", b["name"], env=OFF, cmd=installed)
    assert res.returncode == 0 and json.loads(res.stdout)[0]["name"] == b["name"], res.stderr
    for p in (a, b):
        gone(node, p)


def test_failures_are_the_same_one_line_either_way_and_leave_nothing(rig, node):
    taken = pod_add(node, "t")
    name = f"p{rig.uid}-f"
    host_if = host_ifname(name)
    # veth creation fails half way (after the namespace and the address): all of it is undone
    node.exec("ip", "link", "add", host_if, "type", "veth", "peer", "name", f"x{rig.uid}")
    cases = {
        "name taken": ["pod", "add", taken["name"]],
        "bad label": ["pod", "add", name, "--label", "novalue"],
        "missing netns": ["pod", "add", name, "--netns", f"/run/netns/absent{rig.uid}"],
        "link in the way": ["pod", "add", name],
    }
    before = node.atomnet_json("pod", "list")
    for what, args in cases.items():
        errors = []
        for env in (None, OFF):
            res = cli(node, *args, env=env)
            assert res.returncode == 1 and res.stdout == "", (what, env, res)
            assert res.stderr.count("\n") == 1 and res.stderr.startswith("atomnet: "), (what, res.stderr)
            errors.append(res.stderr)
            assert node.atomnet_json("pod", "list") == before, what
            assert not Path(f"/run/netns/{name}").exists(), what
        assert errors[0] == errors[1], (what, errors)
    node.exec("ip", "link", "del", host_if)
    assert served(node, "pod.add") == 1 + len(cases)
    # the address the failed adds claimed and released is the next pod's
    again = pod_add(node, "f2")
    assert again["ip"] != taken["ip"]
    node.wait_endpoint(again["ip"])


def test_a_stopped_or_killed_daemon_means_in_process(rig, node):
    path = nodeapi.socket_path(node.name, node.bpffs, env={})
    assert Path(path).is_socket()
    node.stop_daemon()
    assert not Path(path).exists(), "a stopped daemon removes its socket"
    a = pod_add(node, "a")
    node.start_daemon()
    node.wait_endpoint(a["ip"])   # programmed from the store when it is back
    node.stop_daemon(signal.SIGKILL)
    assert Path(path).is_socket(), "a killed daemon leaves its socket: nobody listens on it"
    b = pod_add(node, "b")
    res = cli(node, "pod", "del", a["name"])
    assert res.returncode == 0, res.stderr
    node.start_daemon()   # takes over the stale socket
    before = served(node, "pod.add")
    c = pod_add(node, "c")
    assert served(node, "pod.add") == before + 1
    for p in (b, c):
        node.wait_endpoint(p["ip"])
    if c["ip"] != a["ip"]:   # a's address is free again, and the lowest free one is c's
        node.wait_endpoint(a["ip"], present=False)


def test_cni_add_and_del_go_through_the_daemon(rig, node, tmp_path):
    cni = CniNode(node, tmp_path)
    ns1, ns2 = make_netns(rig, "1"), make_netns(rig, "2")
    rc1, r1 = cni.call("ADD", "ctr1", ns1)
    rc2, r2 = cni.call("ADD", "ctr2", ns2)
    assert (rc1, rc2) == (0, 0), (r1, r2)
    assert served(node, "cni") == 2
    ip1, ip2 = (r["ips"][0]["address"].split("/")[0] for r in (r1, r2))
    assert {ip1, ip2} <= {e["ip"] for e in node.atomnet_json("endpoint", "list")}, "programmed when ADD returns"
    assert in_pod(ns1.rsplit("/", 1)[1], "ping", "-c", "1", "-W", "2", ip2, check=False).returncode == 0
    # an error object through the daemon, as the plugin gives it in-process
    rc, err = cni.call("ADD", "ctr1", ns2)
    assert rc == 1 and err["code"] == 100 and "already" in err["msg"], err
    assert cni.call("DEL", "ctr1", ns1) == (0, None)
    assert cni.call("DEL", "ctr2", ns2) == (0, None)
    assert served(node, "cni") == 5
    assert not [p for p in node.atomnet_json("pod", "list") if p["runtime"] == "cni"]
    node.wait_endpoint(ip1, present=False)
    assert sh("ip", "-n", ns1.rsplit("/", 1)[1], "-o", "link", "show").stdout.count("eth0") == 0
