"""The e2e rig: nodes are network namespaces joined by an underlay bridge that lives in
its own namespace; pods are namespaces made by `atomnet pod add`. Every name carries the
test's unique tag, and teardown removes every namespace, link, pin and process it made,
even when the test failed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ctl.node.readiness import overflow_path, ready_path

ATOMNET = [sys.executable, "-m", "ctl.cli"]
# The command users run: what `make build` installs next to the venv's interpreter (ctl/launch.py's
# launcher: Python without site until a verb needs it). The benchmark times this one.
INSTALLED_ATOMNET = Path(sys.executable).parent / "atomnet"
REPO = Path(__file__).resolve().parents[2]
# Nodes join the cluster with the same script the Vagrant rig provisions with.
BOOTSTRAP = REPO / "scripts" / "node-bootstrap.sh"
UNDERLAY_NET = "192.168.100"


def sh(*cmd, check=True, timeout=30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, timeout=timeout, capture_output=True, text=True, **kw)


class Node:
    def __init__(self, rig: "Rig", name: str, index: int):
        self.rig, self.name = rig, name
        self.netns = f"an{rig.uid}-{name}"
        self.ip = f"{UNDERLAY_NET}.{index}"
        self.bpffs = f"/sys/fs/bpf/atomnet-test-{rig.uid}-{name}"
        self.daemon: subprocess.Popen | None = None
        self.log_path = rig.tmp / f"daemon-{name}.log"
        self.pods: list[str] = []

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def env(self) -> dict:
        return {**os.environ, "ATOMNET_STORE": self.rig.store, "ATOMNET_NODE": self.name,
                "ATOMNET_BPFFS": self.bpffs, "PYTHONPATH": str(REPO)}

    def atomnet(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        res = subprocess.run(self.nsenter + ATOMNET + [str(a) for a in args], env=self.env(), capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"atomnet {' '.join(map(str, args))} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def atomnet_json(self, *args):
        return json.loads(self.atomnet("-j", *args).stdout)

    def exec(self, *cmd, check=True, timeout=30) -> subprocess.CompletedProcess:
        return sh(*self.nsenter, *cmd, check=check, timeout=timeout, env=self.env())

    def start_daemon(self, *extra, wait: bool = True, env: dict | None = None) -> None:
        log = open(self.log_path, "a")
        ready = self.log_count("dataplane_ready") + 1
        # --foreground: nsenter execs the script, the script execs the daemon, so the PID
        # held here is the daemon's own (signals reach it).
        cmd = self.nsenter + [str(BOOTSTRAP), "--foreground", "--store", self.rig.store, "--node", self.name,
                              "--bpffs", self.bpffs, "--", *map(str, extra)]
        self.daemon = subprocess.Popen(cmd, env={**self.env(), "ATOMNET_BIN": " ".join(ATOMNET), **(env or {})},
                                       stdout=log, stderr=log, cwd=REPO)
        if wait:
            self.wait_log("dataplane_ready", occurrences=ready)

    def log_count(self, event: str) -> int:
        if not self.log_path.exists():
            return 0
        return sum(1 for line in self.log_path.read_text().splitlines() if f'"event": "{event}"' in line)

    def wait_log(self, event: str, occurrences: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_count(event) >= occurrences:
                return
            if self.daemon and self.daemon.poll() is not None:
                raise AssertionError(f"daemon on {self.name} exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {event} from the daemon on {self.name} in {timeout}s:\n{self.log_path.read_text()[-2000:]}")

    def stop_daemon(self, sig=signal.SIGTERM) -> None:
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None

    def add_pod(self, short: str, *extra) -> dict:
        name = f"p{self.rig.uid}-{short}"
        pod = self.atomnet_json("pod", "add", name, *extra)
        self.pods.append(name)
        return pod

    def wait_endpoint(self, ip: str, present: bool = True, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ips = {e["ip"] for e in self.atomnet_json("endpoint", "list")}
            if (ip in ips) == present:
                return
            time.sleep(0.1)
        raise AssertionError(f"endpoint {ip} {'never appeared' if present else 'never went away'} on {self.name}")


def in_pod(pod: str, *cmd, check=True, timeout=30, **kw) -> subprocess.CompletedProcess:
    """Commands inside a pod need no pins, so plain `ip netns exec` is fine."""
    return sh("ip", "netns", "exec", pod, *cmd, check=check, timeout=timeout, **kw)


def spawn_in_pod(pod: str, *cmd, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", pod, *map(str, cmd)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


class Rig:
    def __init__(self, uid: str, tmp: Path):
        self.uid, self.tmp = uid, tmp
        self.store = f"sqlite://{tmp}/state.db"
        self.underlay = f"an{uid}-ul"
        self.nodes: list[Node] = []
        self.procs: list[subprocess.Popen] = []
        self.etcd = None
        self.extra_netns: list[str] = []   # namespaces a test made itself, removed at teardown
        sh("ip", "netns", "add", self.underlay)
        sh("ip", "-n", self.underlay, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.underlay, "link", "set", "br0", "up")
        sh("ip", "-n", self.underlay, "link", "set", "lo", "up")

    def use_etcd(self, start: bool = True, client_port: int | None = None) -> str:
        """A real etcd on the underlay (its own address on the bridge), shared by every node."""
        from tests.etcd_server import EtcdServer, etcd_available
        reason = etcd_available()
        if reason:
            import pytest
            pytest.skip(reason)
        sh("ip", "-n", self.underlay, "addr", "add", f"{UNDERLAY_NET}.254/24", "dev", "br0")
        self.etcd = EtcdServer(f"{UNDERLAY_NET}.254", prefix=["nsenter", f"--net=/run/netns/{self.underlay}"],
                               data_parent=str(self.tmp), client_port=client_port)
        if start:
            self.etcd.start()
        self.store = f"etcd://{UNDERLAY_NET}.254:{client_port}" if client_port else self.etcd.url
        return self.store

    def add_node(self, name: str, network: str = "10.244.0.0/16", init: bool = True) -> Node:
        node = self.add_host(name)
        if init and len(self.nodes) == 1:
            node.atomnet("network", "init", "--cidr", network)
        return node

    def add_host(self, name: str) -> Node:
        """A namespace on the underlay with an uplink address (an atomnet node, or a plain host)."""
        node = Node(self, name, len(self.nodes) + 1)
        self.nodes.append(node)
        sh("ip", "netns", "add", node.netns)
        peer = f"ul{len(self.nodes)}"
        sh("ip", "link", "add", f"an{self.uid}{len(self.nodes)}", "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", f"an{self.uid}{len(self.nodes)}", "netns", node.netns, "name", "uplink0")
        sh("ip", "link", "set", peer, "netns", self.underlay)
        sh("ip", "-n", self.underlay, "link", "set", peer, "master", "br0", "up")
        sh("ip", "-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "uplink0")
        sh("ip", "-n", node.netns, "link", "set", "uplink0", "up")
        sh("ip", "-n", node.netns, "link", "set", "lo", "up")
        return node

    def spawn(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for node in self.nodes:
            node.stop_daemon()
            for pod in node.pods:
                node.atomnet("pod", "del", pod, check=False)
                sh("ip", "netns", "del", pod, check=False)  # in case `pod del` itself failed
                shutil.rmtree(Path("/etc/netns") / pod, ignore_errors=True)   # its resolv.conf, likewise
            sh("ip", "netns", "del", node.netns, check=False)
            shutil.rmtree(node.bpffs, ignore_errors=True)
            ready_path(node.bpffs).unlink(missing_ok=True)   # a SIGKILLed daemon leaves its readiness file
            overflow_path(node.bpffs).unlink(missing_ok=True)   # and a daemon whose maps were too small, its overflow file
        for ns in self.extra_netns:
            sh("ip", "netns", "del", ns, check=False)
        if self.etcd:
            self.etcd.stop()
        sh("ip", "netns", "del", self.underlay, check=False)
