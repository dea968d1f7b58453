"""Three nodes on an underlay sharing a real etcd: the VXLAN overlay in tc, services
across nodes, lease expiry and recovery, and a flannel-configured node interoperating."""
from __future__ import annotations

import itertools
import json
import signal
import sys
import time

import pytest

from tests.e2e.rig import in_pod, sh, spawn_in_pod
from tests.e2e.servers import http_load, nginx, wait_listening

LEASE_TTL = "6"
RENEW_MARGIN = "3"


def wait_tunnels(node, count: int, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = node.atomnet_json("tunnel", "list")
        if len(rows) == count:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{node.name}: expected {count} tunnels, have {node.atomnet_json('tunnel', 'list')}")


@pytest.fixture
def cluster(rig):
    rig.use_etcd()
    nodes = [rig.add_node(f"n{i}") for i in (1, 2, 3)]
    for n in nodes:
        n.start_daemon("--lease-ttl", LEASE_TTL, "--lease-renew-margin", RENEW_MARGIN)
    pods = {n.name: [n.add_pod(f"{n.name}a"), n.add_pod(f"{n.name}b")] for n in nodes}
    for n in nodes:
        wait_tunnels(n, 2)
        for p in pods[n.name]:
            n.wait_endpoint(p["ip"])
    return nodes, pods


def test_full_mesh_ping_and_tcp_across_nodes(rig, cluster):
    nodes, pods = cluster
    everyone = [p for ps in pods.values() for p in ps]
    for p in everyone:
        rig.spawn(spawn_in_pod(p["name"], "socat", "TCP-LISTEN:7000,reuseaddr,fork", f"SYSTEM:echo {p['name']}"))
    for p in everyone:
        wait_listening(p["name"], 7000)
    for src, dst in itertools.permutations(everyone, 2):
        in_pod(src["name"], "ping", "-c1", "-W2", dst["ip"])
        if src["node"] != dst["node"]:
            got = in_pod(src["name"], "socat", "-t2", "-T2", "-", f"TCP:{dst['ip']}:7000", input="").stdout.strip()
            assert got == dst["name"]
    # The node itself reaches remote pods too (to_overlay sets the tunnel key).
    nodes[0].exec("ping", "-c1", "-W2", pods["n2"][0]["ip"])
    stats = {r["counter"]: r["packets"] for r in nodes[0].atomnet_json("stats")}
    assert stats["fwd_overlay"] > 0 and stats["from_overlay"] > 0
    mtu = in_pod(pods["n1"][0]["name"], "cat", "/sys/class/net/eth0/mtu").stdout.strip()
    assert mtu == "1450", "pod MTU = uplink MTU - 50"


def test_iperf3_across_nodes(rig, cluster):
    _, pods = cluster
    server, client = pods["n2"][0], pods["n1"][0]
    rig.spawn(spawn_in_pod(server["name"], "iperf3", "-s", "-1", "-p", "5202"))
    wait_listening(server["name"], 5202)
    out = in_pod(client["name"], "iperf3", "-c", server["ip"], "-p", "5202", "-t", "3", "-J", timeout=30).stdout
    result = json.loads(out)
    gbps = result["end"]["sum_received"]["bits_per_second"] / 1e9
    retrans = result["end"]["sum_sent"].get("retransmits", 0)
    assert gbps > 0.1
    print(f"cross-node iperf3: {gbps:.2f} Gbit/s, {retrans} retransmits")


def test_service_with_backends_on_two_other_nodes(rig, cluster):
    nodes, pods = cluster
    backends = [pods["n2"][0], pods["n3"][0]]
    for b in backends:
        nginx(rig, b["name"])
    svc = nodes[0].atomnet_json("service", "add", f"x{rig.uid}", "--port", "80:8080",
                                *[a for b in backends for a in ("--backend", b["name"])])
    deadline = time.monotonic() + 15
    while True:
        rows = [r for r in nodes[0].atomnet_json("lb", "list") if r["service"] == svc["name"]]
        if rows and len(rows[0]["backends"]) == 2:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    proc = http_load(pods["n1"][0]["name"], svc["vip"], 80, seconds=4, max_requests=400)
    out, err = proc.communicate(timeout=40)
    result = json.loads(out)
    assert result["failed"] == 0, result["errors"]
    assert set(result["by_body"]) == {b["name"] for b in backends}, "both remote backends answer"


def test_dead_node_loses_its_subnet_and_gets_it_back(rig, cluster):
    nodes, pods = cluster
    n1, n3 = nodes[0], nodes[2]
    subnet = next(r["subnet"] for r in n1.atomnet_json("tunnel", "list") if r["node_ip"] == n3.ip)
    n3.stop_daemon(signal.SIGKILL)   # stops renewing
    started = time.monotonic()
    wait_tunnels(n1, 1, timeout=float(LEASE_TTL) + 10)
    gone_after = time.monotonic() - started
    assert gone_after <= float(LEASE_TTL) + 5
    n3.start_daemon("--lease-ttl", LEASE_TTL, "--lease-renew-margin", RENEW_MARGIN)
    rows = wait_tunnels(n1, 2)
    assert subnet in {r["subnet"] for r in rows}, "the restarted node got its old subnet back"
    in_pod(pods["n1"][0]["name"], "ping", "-c1", "-W2", pods["n3"][0]["ip"])
    print(f"subnet of a dead node left the tunnel map after {gone_after:.1f} s (TTL {LEASE_TTL} s)")


def flannel_node(rig, store_url: str, subnet: str, vtep_mac: str):
    """A node set up the way flannel's vxlan backend sets up the kernel: flannel.1 (VNI 1,
    port 8472, no learning), subnet.0/32 on it, cni0-style gateway for one pod, and per
    remote lease a route via subnet.0 onlink, a permanent neighbour and an FDB entry."""
    import ipaddress
    host = rig.add_host("flannel")
    net = ipaddress.IPv4Network(subnet)
    ns = ["ip", "-n", host.netns]
    sh(*ns, "link", "add", "flannel.1", "address", vtep_mac, "type", "vxlan", "id", "1", "local", host.ip,
       "dev", "uplink0", "dstport", "8472", "nolearning")
    sh(*ns, "link", "set", "flannel.1", "mtu", "1450", "up")
    sh(*ns, "addr", "add", f"{net.network_address}/32", "dev", "flannel.1")
    sh("ip", "netns", "exec", host.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    pod = f"p{rig.uid}-fpod"
    sh("ip", "netns", "add", pod)
    rig.extra_netns.append(pod)
    sh(*ns, "link", "add", "cni0", "type", "veth", "peer", "name", "eth0", "netns", pod)
    gw, pod_ip = str(net.network_address + 1), str(net.network_address + 2)
    sh(*ns, "addr", "add", f"{gw}/24", "dev", "cni0")
    sh(*ns, "link", "set", "cni0", "up")
    sh("ip", "-n", pod, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
    sh("ip", "-n", pod, "link", "set", "eth0", "mtu", "1450", "up")
    sh("ip", "-n", pod, "link", "set", "lo", "up")
    sh("ip", "-n", pod, "route", "add", "default", "via", gw)
    return host, pod, pod_ip


def program_flannel_peers(host, leases: list[dict]) -> None:
    for lease in leases:
        net, mac, ip = lease["subnet"], lease["vtep_mac"], lease["node_ip"]
        gw = net.split("/")[0]
        ns = ["ip", "-n", host.netns]
        sh(*ns, "neigh", "replace", gw, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
        sh(*ns, "route", "replace", net, "via", gw, "dev", "flannel.1", "onlink")
        sh("bridge", "-n", host.netns, "fdb", "replace", mac, "dev", "flannel.1", "dst", ip, "self", "permanent")


def test_flannel_node_interoperates(rig):
    store_url = rig.use_etcd()
    n1 = rig.add_node("n1")
    fl_subnet, fl_mac = "10.244.250.0/24", "0e:11:22:33:44:55"
    host, fpod, fpod_ip = flannel_node(rig, store_url, fl_subnet, fl_mac)
    # flannel publishes its lease (its format, its key, a TTL'd store lease), from its own node.
    value = json.dumps({"PublicIP": host.ip, "PublicIPv6": None, "BackendType": "vxlan",
                        "BackendData": {"VNI": 1, "VtepMAC": fl_mac}})
    host.exec(sys.executable, "-c", "import sys; from ctl.state.store import open_store; s = open_store(sys.argv[1]); "
              "s.put(sys.argv[2], sys.argv[3], lease=s.grant(120))",
              store_url, "/coreos.com/network/subnets/10.244.250.0-24", value)
    n1.start_daemon()
    a = n1.add_pod("a")
    n1.wait_endpoint(a["ip"])
    rows = wait_tunnels(n1, 1)
    assert rows[0]["subnet"] == fl_subnet and rows[0]["vtep_mac"] == fl_mac
    node = n1.atomnet_json("network", "show")
    atomnet_lease = {"subnet": node["subnet"], "node_ip": n1.ip,
                     "vtep_mac": sh("ip", "-n", n1.netns, "-j", "link", "show", "atomnet.1").stdout}
    atomnet_lease["vtep_mac"] = json.loads(atomnet_lease["vtep_mac"])[0]["address"]
    program_flannel_peers(host, [atomnet_lease])
    in_pod(a["name"], "ping", "-c2", "-W2", fpod_ip)            # atomnet pod -> flannel pod
    sh("ip", "netns", "exec", fpod, "ping", "-c2", "-W2", a["ip"])  # flannel pod -> atomnet pod
    rig.spawn(spawn_in_pod(fpod, "socat", "TCP-LISTEN:7001,reuseaddr,fork", "SYSTEM:echo flannel-pod"))
    wait_listening(fpod, 7001)
    got = in_pod(a["name"], "socat", "-t2", "-T2", "-", f"TCP:{fpod_ip}:7001", input="").stdout.strip()
    assert got == "flannel-pod"




def test_daemon_waits_for_etcd_and_survives_losing_it(rig):
    import random
    port = random.randint(20000, 30000)
    rig.use_etcd(start=False, client_port=port)
    n1 = rig.add_node("n1", init=False)
    n1.start_daemon(wait=False)
    n1.wait_log("retrying", occurrences=2, timeout=20)   # one line per attempt, backing off, no crash
    assert n1.daemon.poll() is None
    rig.etcd.start()
    n1.atomnet("network", "init", "--cidr", "10.244.0.0/16")
    n1.wait_log("dataplane_ready", timeout=60)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    n1.wait_endpoint(b["ip"])
    rig.etcd.proc.send_signal(signal.SIGSTOP)            # etcd lost
    try:
        for _ in range(3):
            in_pod(a["name"], "ping", "-c1", "-W2", b["ip"])  # the dataplane keeps forwarding
            time.sleep(1)   # the outage's length (3 s), not synchronisation
        assert n1.daemon.poll() is None
    finally:
        rig.etcd.proc.send_signal(signal.SIGCONT)
    svc = n1.atomnet_json("service", "add", f"late{rig.uid}", "--port", "80", "--backend", b["name"])
    deadline = time.monotonic() + 45
    while not any(r["service"] == svc["name"] for r in n1.atomnet_json("lb", "list")):
        assert time.monotonic() < deadline, "the daemon caught up after etcd came back"
        time.sleep(0.3)
