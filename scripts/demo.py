"""`make demo`: a two-node sandbox on this machine that shows atomnet working for real.

Two node namespaces joined by a LAN (a bridge in its own namespace), sharing one
embedded sqlite store, each with its own daemon and bpffs directory; pods on both; a
service spanning them. Everything is named atomnet-demo*: nothing outside the sandbox is
touched. On exit it removes all of it, unless KEEP=1, in which case it prints how to
explore and how to remove it (`make demo-clean`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LAN_NS = "atomnet-demo-lan"
NODES = {"demo-node1": "192.168.100.1", "demo-node2": "192.168.100.2"}
BPFFS = "/sys/fs/bpf/atomnet-demo"
STATE = Path("/tmp/atomnet-demo")
STORE = f"sqlite://{STATE}/state.db"
PODS = {"demo-web1": ("demo-node1", "app=web"), "demo-web2": ("demo-node2", "app=web"),
        "demo-client": ("demo-node1", "app=client")}
ATOMNET = [sys.executable, "-m", "ctl.cli"]


def netns(node: str) -> str:
    return f"atomnet-{node}"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(cmd: list[str], check: bool = True, show: bool = True) -> subprocess.CompletedProcess:
    if show:
        print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, text=True, capture_output=True)
    if show and (res.stdout or res.stderr):
        print((res.stdout + res.stderr).rstrip(), flush=True)
    if check and res.returncode != 0:
        raise SystemExit(f"demo step failed: {' '.join(cmd)}\n{res.stderr}")
    return res


def env(node: str) -> dict:
    return {**os.environ, "ATOMNET_STORE": STORE, "ATOMNET_NODE": node, "ATOMNET_BPFFS": f"{BPFFS}/{node}"}


def atomnet(node: str, *args: str, show: bool = True) -> subprocess.CompletedProcess:
    if show:
        print(f"[{node}]$ atomnet {' '.join(args)}", flush=True)
    res = subprocess.run(["nsenter", f"--net=/run/netns/{netns(node)}", *ATOMNET, *args], env=env(node), text=True,
                         capture_output=True)
    if show:
        print((res.stdout + res.stderr).rstrip(), flush=True)
    if res.returncode != 0:
        raise SystemExit(f"demo step failed: atomnet {' '.join(args)}\n{res.stderr}")
    return res


def in_pod(pod: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", pod, *cmd], check=check)


def pod_ip(pod: str) -> str:
    pods = json.loads(atomnet("demo-node1", "-j", "pod", "list", show=False).stdout)
    return next(p["ip"] for p in pods if p["name"] == pod)


def cleanup() -> None:
    for pid_file in STATE.glob("*.pid") if STATE.exists() else ():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError, PermissionError):
            pass
    time.sleep(0.3)
    for ns in [*PODS, *(netns(n) for n in NODES), LAN_NS]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for pod in PODS:   # `ip netns del` leaves /etc/netns/NAME (pod add wrote resolv.conf there)
        shutil.rmtree(Path("/etc/netns") / pod, ignore_errors=True)
    shutil.rmtree(BPFFS, ignore_errors=True)
    shutil.rmtree(STATE, ignore_errors=True)


def spawn(name: str, cmd: list[str], node: str | None = None, log: Path | None = None) -> None:
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env(node) if node else None, stdout=out, stderr=out, start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(proc.pid))


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates namespaces and loads BPF programs): sudo make demo", file=sys.stderr)
        return 1
    if "--remove" in sys.argv:
        cleanup()
        print("demo sandbox removed")
        return 0
    keep = os.environ.get("KEEP") == "1"
    cleanup()  # a previous KEEP=1 run
    STATE.mkdir(parents=True)
    try:
        demo()
    finally:
        if keep:
            explore()
        else:
            say("Cleaning up: removing every namespace, pin and file the demo made")
            cleanup()
    return 0


def demo() -> None:
    say("Two nodes: network namespaces on a LAN (a bridge in its own namespace)")
    run(["ip", "netns", "add", LAN_NS], show=False)
    run(["ip", "-n", LAN_NS, "link", "add", "br0", "type", "bridge"], show=False)
    run(["ip", "-n", LAN_NS, "link", "set", "br0", "up"], show=False)
    for i, (node, ip) in enumerate(NODES.items(), 1):
        ns = netns(node)
        run(["ip", "netns", "add", ns], show=False)
        run(["ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", f"lan{i}", "netns", LAN_NS],
            show=False)
        run(["ip", "-n", LAN_NS, "link", "set", f"lan{i}", "master", "br0", "up"], show=False)
        for cmd in (["addr", "add", f"{ip}/24", "dev", "uplink0"], ["link", "set", "uplink0", "up"],
                    ["link", "set", "lo", "up"]):
            run(["ip", "-n", ns, *cmd], show=False)
        print(f"{node} ({ns}): uplink0 {ip}/24")

    say("The cluster network, in flannel's format (the same key flannel reads from etcd)")
    atomnet("demo-node1", "network", "init", "--cidr", "10.244.0.0/16")

    say("A daemon per node: loads the compiled BPF programs, takes a /24 lease, builds the VXLAN overlay")
    for node in NODES:
        spawn(f"daemon-{node}", ["nsenter", f"--net=/run/netns/{netns(node)}", *ATOMNET, "daemon"], node,
              STATE / f"daemon-{node}.log")
    for node in NODES:
        log = STATE / f"daemon-{node}.log"
        for _ in range(150):
            if "dataplane_ready" in log.read_text():
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"the daemon on {node} did not start:\n{log.read_text()}")
    time.sleep(1)
    atomnet("demo-node1", "tunnel", "list")
    print("-> node1 learnt node2's subnet from its lease: remote subnet -> node IP + VtepMAC")

    say("Pods: a namespace, a veth pair and an address from their node's subnet each")
    for name, (node, label) in PODS.items():
        atomnet(node, "pod", "add", name, "--label", label)
    time.sleep(1.5)
    atomnet("demo-node1", "endpoint", "list")

    web1, web2 = pod_ip("demo-web1"), pod_ip("demo-web2")
    say("Pod to pod on one node: from_pod delivers with bpf_redirect_peer (no bridge, no iptables)")
    in_pod("demo-client", "ping", "-c", "2", "-i", "0.2", web1)
    say("Pod to pod across nodes: from_pod sets a VXLAN tunnel key, from_overlay delivers on the other side")
    in_pod("demo-client", "ping", "-c", "2", "-i", "0.2", web2)

    say("A service spanning both nodes: a VIP load-balanced in tc (Maglev + conntrack)")
    for pod in ("demo-web1", "demo-web2"):
        spawn(f"server-{pod}", ["ip", "netns", "exec", pod, "socat", "TCP-LISTEN:8080,reuseaddr,fork",
                                f"SYSTEM:echo hello from {pod}"])
    vip = json.loads(atomnet("demo-node1", "-j", "service", "add", "web", "--port", "80:8080",
                             "--selector", "app=web").stdout)["vip"]
    time.sleep(1.5)
    for _ in range(6):
        in_pod("demo-client", "socat", "-t2", "-T2", "-", f"TCP:{vip}:80")
    print("-> new connections spread over both backends; replies come back from the VIP")
    atomnet("demo-node1", "lb", "list")
    atomnet("demo-node1", "ct", "list")

    say("Names: each node's daemon answers cluster DNS on 10.96.0.10, pods are told so in resolv.conf")
    in_pod("demo-client", "cat", "/etc/resolv.conf")
    in_pod("demo-client", "getent", "hosts", "web")
    in_pod("demo-client", "dig", "+short", "SRV", "_80._tcp.web.svc.cluster.local")
    in_pod("demo-client", "dig", "+short", "demo-web2.pod.cluster.local")
    in_pod("demo-client", "dig", "+short", "-x", vip)
    print("-> `web` is found through the search path; a pod on the other node by name; the VIP's PTR")
    atomnet("demo-node1", "dns", "list")

    say("Anti-spoofing: a pod that lies about its source address is dropped and counted")
    in_pod("demo-client", "ip", "addr", "add", "10.244.250.250/32", "dev", "eth0")
    in_pod("demo-client", "ping", "-c", "2", "-W", "1", "-I", "10.244.250.250", web1, check=False)
    atomnet("demo-node1", "stats")
    print("-> drop_spoofed counts the forged packets")

    say("Inspection: what is attached where, the programs and maps (ids agree with bpftool)")
    atomnet("demo-node1", "net", "show")
    atomnet("demo-node1", "prog", "show")
    atomnet("demo-node1", "map", "list")


def explore() -> None:
    say("KEEP=1: the sandbox stays up")
    print(f"""Explore it (as root):
  nsenter --net=/run/netns/{netns('demo-node1')} env ATOMNET_STORE={STORE} ATOMNET_NODE=demo-node1 \\
      ATOMNET_BPFFS={BPFFS}/demo-node1 {Path(sys.executable).parent}/atomnet lb list
  ip netns exec demo-client ping 10.244.X.Y        # any pod address from `atomnet pod list`
  daemon logs: {STATE}/daemon-demo-node1.log, {STATE}/daemon-demo-node2.log
Remove it:
  make demo-clean""")


if __name__ == "__main__":
    sys.exit(main())
