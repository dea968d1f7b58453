"""The benchmark's machines, each built the way its system builds it, on the e2e rig
(tests/e2e/rig.py): every namespace is named after the rig's unique tag and registered
with the rig (nodes in rig.nodes, everything else in rig.extra_netns), every process is
started through rig.spawn, so Rig.teardown removes all of it, even after a failure.

  atomnet           rig nodes with the daemon; pods from `atomnet pod add`
  routed            a node that forwards with the kernel only: pods on veths, a /32
                    route per pod, no BPF, no netfilter (Calico-style "routed veth")
  kube-proxy        the same routed node plus kube-proxy's iptables-mode rules
                    (tests/bench/rules.py), loaded with iptables-restore
  flannel           flannel's vxlan backend + the bridge CNI plugin: flannel.1 (VNI 1,
                    port 8472, nolearning), cni0 bridge, per remote lease an onlink
                    route, a permanent neighbour and an FDB entry
  docker            docker0 bridge, a container on it, Docker's nat/filter rules
  ext               a plain host on the underlay (the "outside" client)

Pods of the baselines get the same MTU as atomnet's (uplink - 50) unless the system
itself uses another (Docker: 1500).
"""
from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass

from tests.e2e.rig import Node, Rig, sh

POD_MTU = 1450
GATEWAY = "169.254.1.1"


@dataclass
class Pod:
    name: str      # its network namespace
    ip: str


def spawn_quiet(rig: Rig, netns: str, *cmd) -> subprocess.Popen:
    """A long-running server in a namespace, output discarded (a PIPE nobody reads would
    eventually block it), registered with the rig so teardown kills it by PID."""
    return rig.spawn(subprocess.Popen(["ip", "netns", "exec", netns, *map(str, cmd)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def new_netns(rig: Rig, name: str) -> str:
    rig.extra_netns.append(name)   # registered first: removed at teardown even if setup fails below
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def sysctl(netns: str, *assignments: str) -> None:
    sh("ip", "netns", "exec", netns, "sysctl", "-qw", *assignments)


def link_mac(netns: str, ifname: str) -> str:
    return json.loads(sh("ip", "-n", netns, "-j", "link", "show", ifname).stdout)[0]["address"]


# ------------------------------------------------------------------ routed veth (kernel forwarding)

def routed_node(rig: Rig, name: str) -> Node:
    host = rig.add_host(name)
    sysctl(host.netns, "net.ipv4.ip_forward=1")
    return host


def routed_pod(rig: Rig, host: Node, short: str, ip: str, mtu: int = POD_MTU) -> Pod:
    """What atomnet's `pod add` makes (eth0 with a /32, default via a link-local gateway
    that is a permanent neighbour = the host-side MAC), forwarded by the kernel instead of
    tc: the node has a /32 route per pod on its veth."""
    ns = new_netns(rig, f"p{rig.uid}-{short}")
    hostif = f"rv{short}"[:15]
    sh("ip", "-n", host.netns, "link", "add", hostif, "mtu", mtu, "type", "veth", "peer", "name", "eth0",
       "netns", ns, "mtu", mtu)
    sh("ip", "-n", host.netns, "link", "set", hostif, "up")
    sh("ip", "-n", host.netns, "route", "add", f"{ip}/32", "dev", hostif, "scope", "link")
    sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "route", "add", f"{GATEWAY}/32", "dev", "eth0", "scope", "link")
    sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
    sh("ip", "-n", ns, "neigh", "add", GATEWAY, "lladdr", link_mac(host.netns, hostif), "dev", "eth0",
       "nud", "permanent")
    return Pod(ns, ip)


# ------------------------------------------------------------------ iptables in a namespace

def iptables_restore(netns: str, rules: str, binary: str = "iptables-nft", noflush: bool = True,
                     timeout: float = 600) -> float:
    """Loads rules the way kube-proxy does (iptables-restore --noflush --counters, rules on
    stdin); returns the wall time of the restore process in seconds."""
    import time
    cmd = ["ip", "netns", "exec", netns, f"{binary}-restore", "-w", "5"]
    if noflush:
        cmd += ["--noflush", "--counters"]
    started = time.perf_counter()
    res = subprocess.run(cmd, input=rules, text=True, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if res.returncode != 0:
        raise RuntimeError(f"{binary}-restore failed in {netns}: {res.stderr.strip()[:2000]}")
    return elapsed


def iptables_clear(netns: str, binary: str = "iptables-nft") -> None:
    """Removes every rule and user chain of nat and filter in the namespace (not timed)."""
    for table in ("nat", "filter"):
        sh("ip", "netns", "exec", netns, binary, "-w", "5", "-t", table, "-F", timeout=300)
        sh("ip", "netns", "exec", netns, binary, "-w", "5", "-t", table, "-X", timeout=300)


# ------------------------------------------------------------------ flannel (vxlan backend + bridge CNI)

@dataclass
class FlannelHost:
    node: Node
    subnet: str
    vtep_mac: str

    def lease(self) -> dict:
        return {"subnet": self.subnet, "vtep_mac": self.vtep_mac, "node_ip": self.node.ip}


def flannel_host(rig: Rig, name: str, subnet: str, vtep_mac: str) -> FlannelHost:
    """What flanneld (vxlan backend) and the bridge CNI plugin leave in a node's kernel:
    flannel.1 (VNI 1, UDP 8472, nolearning, MTU uplink - 50) with the subnet's .0/32,
    cni0 bridge with the subnet's .1/24, forwarding on. Peers: program_flannel_peers."""
    host = rig.add_host(name)
    net = ipaddress.IPv4Network(subnet)
    ns = ["ip", "-n", host.netns]
    sh(*ns, "link", "add", "flannel.1", "address", vtep_mac, "type", "vxlan", "id", "1", "local", host.ip,
       "dev", "uplink0", "dstport", "8472", "nolearning")
    sh(*ns, "link", "set", "flannel.1", "mtu", POD_MTU, "up")
    sh(*ns, "addr", "add", f"{net.network_address}/32", "dev", "flannel.1")
    sh(*ns, "link", "add", "cni0", "mtu", POD_MTU, "type", "bridge")
    sh(*ns, "addr", "add", f"{net.network_address + 1}/{net.prefixlen}", "dev", "cni0")
    sh(*ns, "link", "set", "cni0", "up")
    sysctl(host.netns, "net.ipv4.ip_forward=1")
    return FlannelHost(host, subnet, vtep_mac)


def flannel_pod(rig: Rig, fh: FlannelHost, short: str) -> Pod:
    """The bridge CNI plugin's pod: veth into cni0, eth0 = subnet .2/24, default via .1."""
    net = ipaddress.IPv4Network(fh.subnet)
    ns = new_netns(rig, f"p{rig.uid}-{short}")
    hostif = f"veth{short}"[:15]
    ip = str(net.network_address + 2)
    sh("ip", "-n", fh.node.netns, "link", "add", hostif, "mtu", POD_MTU, "type", "veth", "peer", "name", "eth0",
       "netns", ns, "mtu", POD_MTU)
    sh("ip", "-n", fh.node.netns, "link", "set", hostif, "master", "cni0", "up")
    sh("ip", "-n", ns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", str(net.network_address + 1))
    return Pod(ns, ip)


def program_flannel_peers(fh: FlannelHost, peers: list[FlannelHost]) -> None:
    """flanneld's per-lease programming, as the test suite does it."""
    from tests.e2e.test_overlay import program_flannel_peers as program
    program(fh.node, [p.lease() for p in peers])


# ------------------------------------------------------------------ Docker (bridge network, -p)

DOCKER_NET = "172.17.0.0/16"


def docker_host(rig: Rig, name: str) -> Node:
    """dockerd's bridge network: docker0 172.17.0.1/16, forwarding on, FORWARD policy DROP."""
    host = rig.add_host(name)
    ns = ["ip", "-n", host.netns]
    sh(*ns, "link", "add", "docker0", "type", "bridge")
    sh(*ns, "addr", "add", "172.17.0.1/16", "dev", "docker0")
    sh(*ns, "link", "set", "docker0", "up")
    sysctl(host.netns, "net.ipv4.ip_forward=1")
    return host


def docker_container(rig: Rig, host: Node, short: str, ip: str = "172.17.0.2") -> Pod:
    ns = new_netns(rig, f"p{rig.uid}-{short}")
    hostif = f"veth{short}"[:15]
    sh("ip", "-n", host.netns, "link", "add", hostif, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", host.netns, "link", "set", hostif, "master", "docker0", "up")
    sh("ip", "-n", ns, "addr", "add", f"{ip}/16", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", "172.17.0.1")
    return Pod(ns, ip)
