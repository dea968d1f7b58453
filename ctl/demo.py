"""`make demo`: a one-node sandbox on this machine that shows atomnet working for real.

Everything lives in namespaces and a bpffs directory named atomnet-demo*, with its own
sqlite store in /tmp: nothing outside the sandbox is touched. On exit it removes all of
it, unless KEEP=1, in which case it prints how to explore and how to remove it
(`make demo-clean`).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NODE_NS = "atomnet-demo-node"
LAN_NS = "atomnet-demo-lan"
BPFFS = "/sys/fs/bpf/atomnet-demo"
STATE = Path("/tmp/atomnet-demo")
STORE = f"sqlite://{STATE}/state.db"
NODE_IP = "192.168.100.1"
PODS = {"demo-web": "app=web", "demo-client": "app=client", "demo-db": "app=db"}
ATOMNET = [sys.executable, "-m", "ctl.cli"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(cmd: list[str], check: bool = True, show: bool = True, **kw) -> subprocess.CompletedProcess:
    if show:
        print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if show and (res.stdout or res.stderr):
        print((res.stdout + res.stderr).rstrip(), flush=True)
    if check and res.returncode != 0:
        raise SystemExit(f"demo step failed: {' '.join(cmd)}")
    return res


def env() -> dict:
    return {**os.environ, "ATOMNET_STORE": STORE, "ATOMNET_NODE": "demo-node", "ATOMNET_BPFFS": BPFFS}


def atomnet(*args: str, **kw) -> subprocess.CompletedProcess:
    print(f"$ atomnet {' '.join(args)}", flush=True)
    res = subprocess.run(["nsenter", f"--net=/run/netns/{NODE_NS}", *ATOMNET, *args], env=env(), text=True,
                         capture_output=True)
    print((res.stdout + res.stderr).rstrip(), flush=True)
    if kw.get("check", True) and res.returncode != 0:
        raise SystemExit(f"demo step failed: atomnet {' '.join(args)}")
    return res


def in_pod(pod: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", pod, *cmd], check=check)


def pod_ip(pod: str) -> str:
    import json
    res = subprocess.run(["nsenter", f"--net=/run/netns/{NODE_NS}", *ATOMNET, "-j", "pod", "list"], env=env(),
                         text=True, capture_output=True, check=True)
    return next(p["ip"] for p in json.loads(res.stdout) if p["name"] == pod)


def cleanup() -> None:
    pid_file = STATE / "daemon.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            time.sleep(0.5)
        except (ProcessLookupError, ValueError):
            pass
    server = STATE / "server.pid"
    if server.exists():
        try:
            os.killpg(int(server.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
    for pod in PODS:
        subprocess.run(["ip", "netns", "del", pod], capture_output=True)
    for ns in (NODE_NS, LAN_NS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(BPFFS, ignore_errors=True)
    shutil.rmtree(STATE, ignore_errors=True)


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
    say("A node: a network namespace whose uplink is a veth to a LAN namespace")
    run(["ip", "netns", "add", NODE_NS])
    run(["ip", "netns", "add", LAN_NS])
    run(["ip", "-n", NODE_NS, "link", "add", "uplink0", "type", "veth", "peer", "name", "lan0", "netns", LAN_NS],
        show=False)
    for cmd in (["addr", "add", f"{NODE_IP}/24", "dev", "uplink0"], ["link", "set", "uplink0", "up"],
                ["link", "set", "lo", "up"]):
        run(["ip", "-n", NODE_NS, *cmd], show=False)
    run(["ip", "-n", LAN_NS, "link", "set", "lan0", "up"], show=False)
    print(f"node {NODE_NS}: uplink0 {NODE_IP}/24")

    say("The cluster network, in flannel's format (the same key flannel reads from etcd)")
    atomnet("network", "init", "--cidr", "10.244.0.0/16")

    say("The daemon: loads the compiled BPF programs, pins the maps, takes a /24 subnet lease")
    log = open(STATE / "daemon.log", "w")
    daemon = subprocess.Popen(["nsenter", f"--net=/run/netns/{NODE_NS}", *ATOMNET, "daemon",
                               "--log-format", "json"], env=env(), stdout=log, stderr=log)
    (STATE / "daemon.pid").write_text(str(daemon.pid))
    for _ in range(100):
        if "dataplane_ready" in (STATE / "daemon.log").read_text():
            break
        if daemon.poll() is not None:
            raise SystemExit("the daemon exited:\n" + (STATE / "daemon.log").read_text())
        time.sleep(0.1)
    print((STATE / "daemon.log").read_text().strip().splitlines()[-1])

    say("Three pods: each gets a namespace, a veth pair, an address from the node's subnet")
    for name, label in PODS.items():
        atomnet("pod", "add", name, "--label", label)
    time.sleep(1)
    atomnet("endpoint", "list")
    print("-> the daemon saw the pods in the store and programmed one endpoint each")

    web, db = pod_ip("demo-web"), pod_ip("demo-db")
    say("Pod to pod: delivered by from_pod with bpf_redirect_peer (no bridge, no iptables)")
    in_pod("demo-client", "ping", "-c", "3", "-i", "0.2", web)
    server = subprocess.Popen(["ip", "netns", "exec", "demo-web", "socat", "TCP-LISTEN:80,reuseaddr,fork",
                               "SYSTEM:echo hello from demo-web"], start_new_session=True)
    (STATE / "server.pid").write_text(str(server.pid))
    time.sleep(0.5)
    in_pod("demo-client", "socat", "-t2", "-T2", "-", f"TCP:{web}:80")
    print("-> ICMP and a real TCP connection between pods on this node")

    say("Node to pod and pod to node: the kernel stack, as usual")
    run(["nsenter", f"--net=/run/netns/{NODE_NS}", "ping", "-c", "1", db])
    in_pod("demo-db", "ping", "-c", "1", NODE_IP)

    say("Anti-spoofing: a pod that lies about its source address is dropped and counted")
    in_pod("demo-client", "ip", "addr", "add", "10.244.250.250/32", "dev", "eth0")
    in_pod("demo-client", "ping", "-c", "2", "-W", "1", "-I", "10.244.250.250", web, check=False)
    atomnet("stats")
    print("-> drop_spoofed counts the forged packets; fwd_local counts pod-to-pod deliveries")

    say("Inspection: what is attached where, the programs, the maps (ids agree with bpftool)")
    atomnet("net", "show")
    atomnet("prog", "show")
    atomnet("map", "list")
    atomnet("map", "dump", "endpoints")


def explore() -> None:
    say("KEEP=1: the sandbox stays up")
    print(f"""Explore it (as root):
  nsenter --net=/run/netns/{NODE_NS} env ATOMNET_STORE={STORE} ATOMNET_NODE=demo-node \\
      ATOMNET_BPFFS={BPFFS} {Path(sys.executable).parent}/atomnet endpoint list
  ip netns exec demo-client ping {pod_ip('demo-web')}
  bpftool net show dev $(ip -n {NODE_NS} -o link | awk -F': ' '/an[0-9a-f]+@/{{print $2}}' | head -1 | cut -d@ -f1)
  daemon log: {STATE}/daemon.log
Remove it:
  make demo-clean""")


if __name__ == "__main__":
    sys.exit(main())
