"""The benchmark's cases (issue 8's table), each atomnet against the kernel mechanism it
replaces, built by the benchmark the way that system builds it, in the same run,
interleaved. `Bench(rig, config).run()` fills `rows` (the table) and `series` (charts).

While a dataplane is measured, every atomnet daemon is paused (SIGSTOP, SIGCONT after):
it does no per-packet work, and its periodic full resync (ctl.daemon.RESYNC_SECONDS; a
second or two of CPU at 10 000 services) would otherwise compete with the load for the
2 CPUs. That idle cost is measured separately and reported (control plane section), and
one row measures connections/s with the daemon running.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import resource
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from tests.e2e.rig import Node, Rig, in_pod, sh
from tests.e2e.servers import nginx, wait_listening

from . import measure, rules, topo
from .harness import SERVER_CPU, Row, Sample, Series, Target, cpu_seconds, interleave, memory_kib, paused


@dataclass(frozen=True)
class Config:
    reps: int = 5
    # Long enough that a few scheduler stalls of a shared machine average out (issue 18:
    # runs of 1-3 s gave overlapping ranges): throughput >= 10 s, connection rates >= 5 s.
    iperf_seconds: int = 10
    iperf_omit: int = 1
    iperf_bytes: str = ""           # if set (e.g. "200M"): each iperf3 run sends this much instead (smoke)
    latency_seconds: int = 3
    crr_seconds: float = 5.0
    crr_warmup: float = 0.5
    crr_procs: int = 4
    service_counts: tuple[int, ...] = (1, 1000, 10000)
    cp_services: int = 10000
    cp_backends: int = 10
    idle_window: float = 0.0        # daemon CPU at cp_services sampled over this many s (0: 30 s)
    cp_changes: int = 30            # adds, backend changes and deletes timed per control-plane repetition
    cp_pod_adds: int = 5
    cp_cluster: tuple[int, int, int] = (200, 10_000, 1000)   # simulated nodes, their pods, services (etcd)
    iptables: str = "iptables-legacy"


FULL = Config()
SMOKE = Config(reps=1, iperf_seconds=1, iperf_omit=0, iperf_bytes="100M", latency_seconds=2, crr_seconds=0.3, crr_warmup=0.1,
               crr_procs=2, service_counts=(1, 3), cp_services=3, cp_backends=2, idle_window=0.5, cp_changes=2,
               cp_pod_adds=1, cp_cluster=(3, 6, 2))

IPERF_PORT, SOCKPERF_PORT, HTTP_PORT, SVC_PORT, HOST_PORT = 5201, 11111, 8080, 80, 8080
IPERF_VIP = "10.96.0.5"
SVC_BASE = int(ipaddress.IPv4Address("10.96.16.0"))
KP_CIDR = "10.247.0.0/16"
DNS_LATENCY_QPS = 1000   # a steady rate both servers sustain: latency without queueing
# An EDNS option (experimental code, RFC 6891) on every query: the BPF fast path answers only
# plain queries (bpf/include/dns.h), so these reach the daemon's Python server.
DNS_SERVER_ONLY_OPTION = "65001:00"


def vip(i: int) -> str:
    return str(ipaddress.IPv4Address(SVC_BASE + i))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def service_doc(i: int, backends: list[str], port: int = SVC_PORT, target: int = HTTP_PORT) -> dict:
    return {"kind": "service", "name": f"s{i}", "vip": vip(i), "ports": [{"port": port, "target_port": target}],
            "backends": [{"pod": b} for b in backends]}


def _log_time(line: str) -> float:
    return dt.datetime.fromisoformat(json.loads(line)["timestamp"].replace("Z", "+00:00")).timestamp()


class Bench:
    def __init__(self, rig: Rig, cfg: Config = FULL, log: Callable[[str], None] = print):
        self.rig, self.cfg, self.log = rig, cfg, log
        self.rows: list[Row] = []
        self.series: dict[str, dict] = {}    # chart data
        self.facts: dict[str, object] = {}   # one-off figures for the report
        self.uids: list[str] = [rig.uid]      # every rig tag used (names of everything created carry one)

    # ------------------------------------------------------------------ helpers

    def daemons(self):
        return [n.daemon for n in (self.n1, self.n2)]

    def quiet(self):
        return paused(*self.daemons())

    def quietly(self, fn, *args):
        with self.quiet():
            return fn(*args)

    def step(self, text: str) -> None:
        self.log(f"[{time.strftime('%H:%M:%S')}] {text}")

    def atomnet_apply(self, node: Node, docs: list[dict], min_changes: int, prune: bool = False,
                      timeout: float = 600) -> dict:
        """`atomnet apply -f` (the store write), then the daemon's "reconciled" event that
        carries it: wall = apply start -> that event's timestamp; reconcile = its `seconds`;
        cli = the CLI's run (start -> exit); and CPU seconds, which a loaded machine inflates
        less than wall time: cli_cpu the CLI's, daemon_cpu the daemon's (all its threads) from
        the CLI's start until the event is seen (the polling adds up to 10 ms)."""
        path = node.rig.tmp / f"apply-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(docs))
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        d0 = cpu_seconds(node.daemon.pid) if node.daemon else 0.0
        t0 = time.time()
        node.atomnet("apply", *(["--prune"] if prune else []), "-f", path, timeout=timeout)
        cli = time.time() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)   # nsenter execs the CLI: its child is the CLI
        cli_cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in node.log_path.read_text().splitlines():
                if '"event": "reconciled"' not in line:
                    continue
                ev = json.loads(line)
                if ev["changes"] >= min_changes and _log_time(line) >= t0:
                    return {"cli": cli, "reconcile": ev["seconds"], "wall": _log_time(line) - t0,
                            "changes": ev["changes"], "cli_cpu": cli_cpu,
                            "daemon_cpu": cpu_seconds(node.daemon.pid) - d0 if node.daemon else None}
            if node.daemon is None or node.daemon.poll() is not None:
                raise AssertionError(f"daemon on {node.name} exited: {node.log_path.read_text()[-2000:]}")
            time.sleep(0.01)
        raise AssertionError(f"no reconciled event with >= {min_changes} changes in {timeout}s on {node.name}")

    def http_ok(self, netns: str, host: str, port: int) -> None:
        res = in_pod(netns, "curl", "-s", "--max-time", "3", f"http://{host}:{port}/", check=False)
        if res.returncode != 0:
            raise AssertionError(f"no HTTP answer from {host}:{port} in {netns} (curl exit {res.returncode})")

    def kube_proxy_restore(self, services: list[rules.KubeService]) -> float:
        return topo.iptables_restore(self.kp.netns, rules.kube_proxy(services, KP_CIDR), self.cfg.iptables)

    def crr(self, netns: str, host: str, port: int) -> Sample:
        c = self.cfg
        return measure.crr(netns, host, port, c.crr_seconds, c.crr_warmup, c.crr_procs)

    def iperf(self, netns: str, host: str, port: int = IPERF_PORT) -> Sample:
        return measure.iperf3(netns, host, port, self.cfg.iperf_seconds, self.cfg.iperf_omit, self.cfg.iperf_bytes)

    def latency(self, client_ns: str, server_ns: str, host: str) -> Sample:
        """A busy-polling sockperf server for this one run only (idle, it would spin a CPU)."""
        server = topo.spawn_quiet(self.rig, server_ns, *measure.pinned(SERVER_CPU, "sockperf", "server", "--tcp",
                                                                       "--nonblocked", "-i", host, "-p", SOCKPERF_PORT))
        try:
            wait_listening(server_ns, SOCKPERF_PORT)
            return measure.sockperf(client_ns, host, SOCKPERF_PORT, self.cfg.latency_seconds)
        finally:
            server.terminate()
            server.wait(10)

    def serve(self, netns: str, http: bool = True, iperf: bool = True) -> None:
        if iperf:   # pinned by each client's -A
            topo.spawn_quiet(self.rig, netns, "iperf3", "-s", "-p", IPERF_PORT)
        if http:
            nginx(self.rig, netns, HTTP_PORT, cpu=SERVER_CPU)
        if iperf:
            wait_listening(netns, IPERF_PORT)

    # ------------------------------------------------------------------ the world

    def setup(self) -> None:
        rig, t = self.rig, self.cfg.iptables
        # The underlay bridge stands for a physical switch: no netfilter on it, whatever
        # br_netfilter's default is on this machine (bridges *in* nodes keep theirs: Kubernetes
        # and Docker both require bridge-nf-call-iptables=1).
        for key in ("iptables", "ip6tables", "arptables"):
            sh("ip", "netns", "exec", rig.underlay, "sysctl", "-qw", f"net.bridge.bridge-nf-call-{key}=0", check=False)
        self.step("setup: atomnet nodes n1, n2 (daemons, pods a, b on n1, c on n2)")
        self.n1, self.n2 = rig.add_node("n1"), rig.add_node("n2")
        self.n1.start_daemon()
        self.n2.start_daemon()
        self.a, self.b, self.c = self.n1.add_pod("a"), self.n1.add_pod("b"), self.n2.add_pod("c")
        for node, pod in ((self.n1, self.a), (self.n1, self.b), (self.n2, self.c)):
            node.wait_endpoint(pod["ip"])
        for node in (self.n1, self.n2):
            deadline = time.monotonic() + 20
            while len(node.atomnet_json("tunnel", "list")) < 1:
                assert time.monotonic() < deadline, f"{node.name} never learned the other node"
                time.sleep(0.2)

        self.step("setup: routed-veth node, kube-proxy node, flannel hosts, Docker host, external host")
        self.rt = topo.routed_node(rig, "rt")
        self.ra, self.rb = topo.routed_pod(rig, self.rt, "ra", "10.246.1.2"), topo.routed_pod(rig, self.rt, "rb", "10.246.1.3")
        self.kp = topo.routed_node(rig, "kp")
        self.ka, self.kb = topo.routed_pod(rig, self.kp, "ka", "10.247.1.2"), topo.routed_pod(rig, self.kp, "kb", "10.247.1.3")
        topo.iptables_restore(self.kp.netns, rules.jumps(), t)
        self.f1 = topo.flannel_host(rig, "f1", "10.248.1.0/24", "0e:be:00:00:00:01")
        self.f2 = topo.flannel_host(rig, "f2", "10.248.2.0/24", "0e:be:00:00:00:02")
        self.fa, self.fb = topo.flannel_pod(rig, self.f1, "fa"), topo.flannel_pod(rig, self.f2, "fb")
        topo.program_flannel_peers(self.f1, [self.f2])
        topo.program_flannel_peers(self.f2, [self.f1])
        self.dk = topo.docker_host(rig, "dk")
        self.dc = topo.docker_container(rig, self.dk, "dc")
        topo.iptables_restore(self.dk.netns, rules.docker(self.dc.ip, HTTP_PORT, HOST_PORT), t, noflush=False)
        self.ext = rig.add_host("ext")
        # egress baseline: a routed node whose pod's traffic to the outside is masqueraded by
        # the kernel (flannel --ip-masq's iptables rules); the outside is the ext host
        self.mq = topo.routed_node(rig, "mq")
        self.ma = topo.routed_pod(rig, self.mq, "ma", "10.250.1.2")
        topo.iptables_restore(self.mq.netns, rules.ip_masq("10.250.0.0/16"), t, noflush=False)

        self.step("setup: servers (iperf3, sockperf, nginx with one worker), atomnet service and forward")
        self.serve(self.b["name"])
        self.serve(self.c["name"], http=False)
        self.serve(self.rb.name)
        self.serve(self.kb.name)
        self.serve(self.fb.name, http=False)
        self.serve(self.dc.name, iperf=False)
        self.serve(self.ext.netns)
        self.n1.atomnet("service", "add", f"iperf{rig.uid}", "--port", IPERF_PORT, "--vip", IPERF_VIP,
                        "--backend", self.b["name"])
        self.n1.atomnet("forward", "add", f"{self.b['name']}:{HTTP_PORT}", "--host-port", HOST_PORT)
        self.kube_proxy_restore([rules.KubeService("default/iperf", IPERF_VIP, IPERF_PORT,
                                                   ((self.kb.ip, IPERF_PORT),))])
        deadline = time.monotonic() + 20
        while True:
            fronts = {(r["vip"], r["port"]) for r in self.n1.atomnet_json("lb", "list") if r["backends"]}
            if {(IPERF_VIP, IPERF_PORT), (self.n1.ip, HOST_PORT)} <= fronts:
                break
            assert time.monotonic() < deadline, f"service/forward never programmed: {fronts}"
            time.sleep(0.1)

        self.step("setup: every path answers once before anything is measured")
        self.http_ok(self.a["name"], self.b["ip"], HTTP_PORT)
        self.http_ok(self.ra.name, self.rb.ip, HTTP_PORT)
        self.http_ok(self.ka.name, self.kb.ip, HTTP_PORT)
        self.http_ok(self.ext.netns, self.n1.ip, HOST_PORT)
        self.http_ok(self.ext.netns, self.dk.ip, HOST_PORT)
        self.http_ok(self.a["name"], self.ext.ip, HTTP_PORT)
        self.http_ok(self.ma.name, self.ext.ip, HTTP_PORT)
        in_pod(self.a["name"], "ping", "-c1", "-W2", self.c["ip"])
        in_pod(self.fa.name, "ping", "-c1", "-W2", self.fb.ip)

    # ------------------------------------------------------------------ cases

    def throughput_same_node_and_service(self) -> None:
        self.step("case: same-node pod -> pod and pod -> service, established (iperf3)")
        a, b = self.a["name"], self.b["ip"]
        with self.quiet():
            res = interleave(self.cfg.reps, {
                "atomnet": lambda: self.iperf(a, b),
                "routed veth": lambda: self.iperf(self.ra.name, self.rb.ip),
                "atomnet via VIP": lambda: self.iperf(a, IPERF_VIP),
                "kube-proxy via VIP": lambda: self.iperf(self.ka.name, IPERF_VIP),
            }, self.log, "iperf3")
        kp_over_routed = (res["kube-proxy via VIP"].median / res["routed veth"].median
                          if res["kube-proxy via VIP"].median and res["routed veth"].median else None)
        self.rows += [
            Row("same-node pod → pod", "throughput (iperf3, 1 TCP stream)", "Gbit/s", res["atomnet"],
                res["routed veth"], [Target(">=", 1.0, text="≥ 1.0× routed veth")],
                note="atomnet: from_pod + bpf_redirect_peer; baseline: kernel forwarding, /32 route per pod"),
            Row("pod → service, established", "throughput via VIP vs direct pod → pod", "Gbit/s",
                res["atomnet via VIP"], res["atomnet"], [Target(">=", 0.98, text="≥ 0.98× direct pod → pod")],
                note="both atomnet, same pods: the cost of the tc DNAT (conntrack lookup per packet)"),
            Row("pod → service, established", "throughput via VIP: tc DNAT vs kube-proxy", "Gbit/s",
                res["atomnet via VIP"], res["kube-proxy via VIP"], [],
                note=(f"kube-proxy via VIP / routed direct = {kp_over_routed:.2f}" if kp_over_routed else "")),
        ]
        self.series["throughput_same_node"] = {k: v.to_dict() for k, v in res.items()}

    def latency_same_node(self) -> None:
        self.step("case: same-node pod -> pod latency (sockperf ping-pong)")
        with self.quiet():
            res = interleave(self.cfg.reps, {
                "atomnet": lambda: self.latency(self.a["name"], self.b["name"], self.b["ip"]),
                "routed veth": lambda: self.latency(self.ra.name, self.rb.name, self.rb.ip),
            }, self.log, "sockperf")
        self.rows.append(Row("same-node pod → pod", "latency, p50 half round trip (sockperf TCP 64 B, busy-poll)", "µs",
                             res["atomnet"], res["routed veth"], [Target("<=", 0.9, text="≤ 0.9× routed veth")],
                             better="lower"))
        self.series["latency_same_node"] = {k: v.to_dict() for k, v in res.items()}

    def cross_node(self) -> None:
        self.step("case: cross-node pod -> pod (atomnet tc VXLAN vs flannel kernel VXLAN)")
        with self.quiet():
            thr = interleave(self.cfg.reps, {
                "atomnet": lambda: self.iperf(self.a["name"], self.c["ip"]),
                "flannel vxlan": lambda: self.iperf(self.fa.name, self.fb.ip),
            }, self.log, "iperf3")
            lat = interleave(self.cfg.reps, {
                "atomnet": lambda: self.latency(self.a["name"], self.c["name"], self.c["ip"]),
                "flannel vxlan": lambda: self.latency(self.fa.name, self.fb.name, self.fb.ip),
            }, self.log, "sockperf")
        retrans = {k: sum(s.extra.get("retransmits", 0) for s in v.samples) for k, v in thr.items()}
        self.rows += [
            Row("cross-node pod → pod", "throughput (iperf3, 1 TCP stream)", "Gbit/s", thr["atomnet"],
                thr["flannel vxlan"], [Target(">=", 1.0, text="≥ 1.0× flannel")],
                note="atomnet: from_pod sets the tunnel key and redirects to an external-mode (collect_md) VXLAN "
                     "device; flannel: a classic VXLAN device (local, dev, FDB); TCP retransmits over all runs: "
                     f"atomnet {retrans['atomnet']}, flannel {retrans['flannel vxlan']}"),
            Row("cross-node pod → pod", "latency, p50 half round trip (sockperf TCP 64 B, busy-poll)", "µs",
                lat["atomnet"], lat["flannel vxlan"], [Target("<=", 0.9, text="≤ 0.9× flannel")], better="lower"),
        ]
        self.series["throughput_cross_node"] = {k: v.to_dict() for k, v in thr.items()}
        self.series["latency_cross_node"] = {k: v.to_dict() for k, v in lat.items()}
        # n2 is done: stopped (its dataplane stays), so it does not program the 10 000 services too.
        self.n2.stop_daemon()

    def host_port(self) -> None:
        self.step("case: host port from outside (new connections/s)")
        with self.quiet():
            res = interleave(self.cfg.reps, {
                "atomnet": lambda: self.crr(self.ext.netns, self.n1.ip, HOST_PORT),
                "docker iptables": lambda: self.crr(self.ext.netns, self.dk.ip, HOST_PORT),
            }, self.log, "crr")
        self.rows.append(Row("host port from outside", "new connections/s (RST close)", "conn/s", res["atomnet"],
                             res["docker iptables"], [Target(">=", 1.0, text="≥ 1.0× Docker DNAT")],
                             note="atomnet: from_netdev on the uplink; Docker: DOCKER chain DNAT, FORWARD accept, "
                                  "MASQUERADE rules; client on another host of the underlay"))
        self.series["host_port"] = {k: v.to_dict() for k, v in res.items()}

    def egress(self) -> None:
        self.step("case: pod -> outside, masqueraded (tc to_netdev vs iptables MASQUERADE)")
        a, ma, ext = self.a["name"], self.ma.name, self.ext.ip
        with self.quiet():
            thr = interleave(self.cfg.reps, {
                "atomnet": lambda: self.iperf(a, ext),
                "iptables MASQUERADE": lambda: self.iperf(ma, ext),
            }, self.log, "iperf3")
            crr = interleave(self.cfg.reps, {
                "atomnet": lambda: self.crr(a, ext, HTTP_PORT),
                "iptables MASQUERADE": lambda: self.crr(ma, ext, HTTP_PORT),
            }, self.log, "crr")
        flows = self.n1.atomnet_json("ct", "list", "--nat")
        assert flows and all(f["node_ip"] == self.n1.ip for f in flows), "atomnet's runs were masqueraded"
        self.rows += [
            Row("pod → outside (masquerade)", "throughput (iperf3, 1 TCP stream)", "Gbit/s", thr["atomnet"],
                thr["iptables MASQUERADE"], [Target(">=", 1.0, text="≥ 1.0× iptables MASQUERADE")],
                note="atomnet: from_pod, kernel forwarding, to_netdev SNAT at tc egress of the uplink, "
                     "from_netdev reverse SNAT + bpf_redirect_peer; baseline: routed veth node with "
                     "flanneld --ip-masq's MASQUERADE --random-fully (nf_conntrack); server: a host on the underlay"),
            Row("pod → outside (masquerade)", "new connections/s (RST close)", "conn/s", crr["atomnet"],
                crr["iptables MASQUERADE"], [Target(">=", 1.0, text="≥ 1.0× iptables MASQUERADE")],
                note="one destination (ext:8080): every connection takes a port of the masquerade range"),
        ]
        self.series["egress"] = {"throughput": {k: v.to_dict() for k, v in thr.items()},
                                 "crr": {k: v.to_dict() for k, v in crr.items()}}

    def connections_vs_services(self) -> None:
        c = self.cfg
        chart = {}
        for n in c.service_counts:
            self.step(f"case: new connections/s at {n} services (program both systems)")
            prog = self.atomnet_apply(self.n1, [service_doc(i, [self.b["name"]]) for i in range(n)],
                                      min_changes=1, timeout=900)
            kp_seconds = self.kube_proxy_restore([rules.KubeService(f"default/s{i}", vip(i), SVC_PORT,
                                                                    ((self.kb.ip, HTTP_PORT),)) for i in range(n)])
            self.facts[f"program_{n}_services"] = {"atomnet_wall": prog["wall"], "atomnet_reconcile": prog["reconcile"],
                                                   "kube_proxy_restore": kp_seconds}
            target = vip(n - 1)   # kube-proxy: the last rule of KUBE-SERVICES matches (worst case)
            self.http_ok(self.a["name"], target, SVC_PORT)
            self.http_ok(self.ka.name, target, SVC_PORT)
            runs = {
                "atomnet": lambda: self.quietly(self.crr, self.a["name"], target, SVC_PORT),
                "kube-proxy": lambda: self.quietly(self.crr, self.ka.name, target, SVC_PORT),
                "routed pod→pod": lambda: self.quietly(self.crr, self.ra.name, self.rb.ip, HTTP_PORT),
            }
            if n == max(c.service_counts):   # the same, with n1's daemon running (its resync competing)
                runs["atomnet, daemon running"] = lambda: self.crr(self.a["name"], target, SVC_PORT)
            res = interleave(c.reps, runs, self.log, f"crr@{n}")
            label = f"{n:,}".replace(",", " ") + (" service" if n == 1 else " services")
            self.rows += [
                Row(f"pod → service, new connections/s, {label}", "vs kernel-routed pod → pod", "conn/s",
                    res["atomnet"], res["routed pod→pod"], [Target(">=", 0.95, text="≥ 0.95× routed pod → pod")]),
                Row(f"pod → service, new connections/s, {label}", "vs kube-proxy iptables", "conn/s",
                    res["atomnet"], res["kube-proxy"],
                    [Target(">=", 3.0, text="≈ 3× iptables (expected)")] if n >= 10000 else [],
                    note="kube-proxy: the matching KUBE-SERVICES rule is the last one" if n > 1 else ""),
            ]
            if "atomnet, daemon running" in res:
                self.rows.append(Row(f"pod → service, new connections/s, {label}",
                                     "atomnet with its daemon running vs kube-proxy", "conn/s",
                                     res["atomnet, daemon running"], res["kube-proxy"], [],
                                     note="every other row pauses the daemon while measuring; here its periodic "
                                          "full resync competes with the load for the 2 CPUs"))
            chart[n] = {k: v.to_dict() for k, v in res.items()}
        self.series["connections_vs_services"] = chart

    # ------------------------------------------------------------------ names

    def dns(self) -> None:
        """A queries for the service names (all of them, dnsperf cycling through the file) from
        pod a, so each goes through from_pod as a pod's query does: to n1's DNS VIP (answered
        by the BPF fast path at from_pod; the daemon runs: not paused), the same queries with
        an EDNS option the fast path leaves to the daemon's server (the server alone), and to
        dnsmasq in pod b serving the same names from a hosts file (a pod on the same node:
        the same veth path, one hop). All three interleaved in one run."""
        c = self.cfg
        n = max(c.service_counts)   # connections_vs_services left that many services in the store
        self.step(f"case: DNS A queries of {n} service names (dnsperf from a pod: atomnet vs dnsmasq)")
        names = [f"s{i}.svc.cluster.local" for i in range(n)]
        queries = self.rig.tmp / "dnsperf.queries"
        queries.write_text("".join(f"{name} A\n" for name in names))
        hosts = self.rig.tmp / "dnsmasq.hosts"
        hosts.write_text("".join(f"{vip(i)} {name}\n" for i, name in enumerate(names)))
        topo.spawn_quiet(self.rig, self.b["name"], "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
                         "--no-hosts", f"--addn-hosts={hosts}", f"--listen-address={self.b['ip']}", "--bind-interfaces",
                         "--user=root", "--pid-file=", "--local-ttl=30")
        wait_listening(self.b["name"], 53, udp=True)
        dns_vip = "10.96.0.10"
        for server in (dns_vip, self.b["ip"]):   # both answer the last name before anything is measured
            out = in_pod(self.a["name"], "dig", "+short", "+time=2", f"@{server}", names[-1]).stdout.split()
            assert out == [vip(n - 1)], f"{server} answered {out} for {names[-1]}"
        a = self.a["name"]
        secs = max(1.0, c.crr_seconds * 2)
        fast_before = self.fast_answers()
        opt = DNS_SERVER_ONLY_OPTION
        thr = interleave(c.reps, {
            "atomnet": lambda: measure.dnsperf(a, dns_vip, queries, secs),
            "atomnet server": lambda: measure.dnsperf(a, dns_vip, queries, secs, edns_option=opt),
            "dnsmasq": lambda: measure.dnsperf(a, self.b["ip"], queries, secs),
        }, self.log, "dnsperf")
        lat = interleave(c.reps, {
            "atomnet": lambda: measure.dnsperf(a, dns_vip, queries, secs, max_qps=DNS_LATENCY_QPS),
            "atomnet server": lambda: measure.dnsperf(a, dns_vip, queries, secs, max_qps=DNS_LATENCY_QPS,
                                                      edns_option=opt),
            "dnsmasq": lambda: measure.dnsperf(a, self.b["ip"], queries, secs, max_qps=DNS_LATENCY_QPS),
        }, self.log, "dnsperf -Q")
        fast = self.fast_answers() - fast_before
        sent = sum(s.extra.get("sent", 0) for res in (thr, lat) for s in res["atomnet"].samples)
        self.facts["dns_fast_path_answers"] = {"fast_answer_counter": fast, "plain_queries_sent": sent}
        label = f"{n:,}".replace(",", " ")
        p50 = {k: Series(k, [Sample(x.extra["p50_ms"], x.flagged) for x in v.samples]) for k, v in lat.items()}
        self.rows += [
            Row(f"DNS: A queries of service names, {label} services", "queries/s at saturation (dnsperf, UDP)", "q/s",
                thr["atomnet"], thr["dnsmasq"], [Target(">=", 1.0, text="≥ 1.0× dnsmasq")],
                note="dnsperf in a pod (its queries go through from_pod); atomnet: the node-local DNS VIP, answered "
                     "by the BPF fast path, the daemon running; dnsmasq: the same names from a hosts file, in a pod "
                     "of the same node; dnsperf's default 100 queries in flight"),
            Row(f"DNS: A queries of service names, {label} services",
                f"latency p99 at {DNS_LATENCY_QPS} queries/s (dnsperf -Q, UDP)", "ms", lat["atomnet"], lat["dnsmasq"],
                [Target("<=", 1.0, text="≤ 1.0× dnsmasq")], better="lower"),
            Row(f"DNS: A queries of service names, {label} services",
                f"latency p50 at {DNS_LATENCY_QPS} queries/s (same runs)", "ms", p50["atomnet"], p50["dnsmasq"], [],
                better="lower"),
            Row(f"DNS: A queries of service names, {label} services",
                "queries/s at saturation, the server alone (EDNS option: no fast path)", "q/s",
                thr["atomnet server"], thr["dnsmasq"], [],
                note="the daemon's Python server (dnspython) that answers every query the fast path leaves"),
            Row(f"DNS: A queries of service names, {label} services",
                f"latency p99 at {DNS_LATENCY_QPS} queries/s, the server alone", "ms", lat["atomnet server"],
                lat["dnsmasq"], [], better="lower"),
        ]
        self.series["dns"] = {"qps": {k: v.to_dict() for k, v in thr.items()},
                              "p99": {k: v.to_dict() for k, v in lat.items()}}

    def fast_answers(self) -> int:
        rows = self.n1.atomnet_json("stats")
        return next(r["packets"] for r in rows if r["counter"] == "dns_fast_answer")

    def run_dns(self) -> None:
        """Only the DNS rows (`python -m tests.bench.run --only dns`): node n1, pods a and b,
        the largest service count (each service backed by b), then the DNS case."""
        self.step("setup: atomnet node n1 (daemon, pods a, b)")
        self.n1 = self.rig.add_node("n1")
        self.n1.start_daemon()
        self.a, self.b = self.n1.add_pod("a"), self.n1.add_pod("b")
        for pod in (self.a, self.b):
            self.n1.wait_endpoint(pod["ip"])
        n = max(self.cfg.service_counts)
        self.step(f"setup: {n} services")
        self.atomnet_apply(self.n1, [service_doc(i, [self.b["name"]]) for i in range(n)], min_changes=1, timeout=900)
        self.dns()

    # ------------------------------------------------------------------ control plane

    def control_plane(self) -> None:
        """Issue 15's goals: a fresh node per repetition (tests/bench/control_plane.py), each
        service with its own backend set; the same change measured at 1 000 services too."""
        from .control_plane import run_node
        c = self.cfg
        n, nb = c.cp_services, c.cp_backends
        small = max(1, n // 10)
        self.step(f"case: control plane, {n} services x {nb} backends, distinct sets (atomnet vs iptables-restore)")
        keys = ("atomnet program", "atomnet program reconcile", "iptables program", "atomnet change p50",
                "atomnet change p99", "atomnet small change p50", "atomnet small change p99", "iptables change",
                "atomnet rss", "atomnet hwm", "pod add", "pod add remote", "pod add in-process",
                "pod add remote in-process", "pod add python -m", "pod add daemon", "pod add sync", "scrape", "idle",
                "load")
        s = {k: Series(k) for k in keys}
        eps = tuple((f"10.249.1.{10 + j}", HTTP_PORT) for j in range(nb))
        full = [rules.KubeService(f"default/s{i}", vip(i), SVC_PORT, eps) for i in range(n)]
        changed = list(full)
        changed[n // 2] = replace(full[n // 2], endpoints=eps[:-1])
        full_text, changed_text = rules.kube_proxy(full, KP_CIDR), rules.kube_proxy(changed, KP_CIDR)
        self.facts["kube_proxy_rules"] = {"rules": rules.rule_count(full_text),
                                          "chains": full_text.count("\n:") + 1}
        window = c.idle_window or 30.0
        pool = max(nb * 2, 4)
        main = getattr(self, "n1", None)
        with paused(main.daemon if main else None):   # the main node's daemon must not compete
            for r in range(c.reps):
                last = r == c.reps - 1
                # What else ran on the 2 CPUs: the figures are only comparable between runs with it.
                s["load"].samples.append(Sample(os.getloadavg()[0]))
                a = run_node(self.rig.tmp, self.uids, n, nb, pool, c.cp_changes, self.atomnet_apply,
                             idle_window=window if last else 0.0, metrics_port=9641, pod_adds=c.cp_pod_adds,
                             log=self.log)
                b = run_node(self.rig.tmp, self.uids, small, nb, pool, c.cp_changes, self.atomnet_apply, log=self.log)
                for key, value in (("atomnet program", a["program"]["wall"]),
                                   ("atomnet program reconcile", a["program"]["reconcile"]),
                                   ("atomnet change p50", a["change_p50"]), ("atomnet change p99", a["change_p99"]),
                                   ("atomnet small change p50", b["change_p50"]),
                                   ("atomnet small change p99", b["change_p99"]),
                                   ("atomnet rss", a["rss_end_mib"]), ("atomnet hwm", a["hwm_mib"]),
                                   ("scrape", a["scrape"])):
                    s[key].samples.append(Sample(value))
                for p in a.get("pod_add", []):
                    s["pod add"].samples.append(Sample(p["wall"]))
                    s["pod add remote"].samples.append(Sample(p["remote"]))
                    for key, field in (("pod add daemon", "daemon"), ("pod add sync", "sync")):
                        if field in p:
                            s[key].samples.append(Sample(p[field]))
                for p in a.get("pod_add_module", []):
                    s["pod add python -m"].samples.append(Sample(p["wall"]))
                for p in a.get("pod_add_inproc", []):
                    s["pod add in-process"].samples.append(Sample(p["wall"]))
                    s["pod add remote in-process"].samples.append(Sample(p["remote"]))
                if "idle" in a:
                    s["idle"].samples.append(Sample(a["idle"] * 100))
                p, ch = self.cp_iptables_rep(r, full_text, changed_text)
                s["iptables program"].samples.append(Sample(p))
                s["iptables change"].samples.append(Sample(ch))
        label = f"{n:,}".replace(",", " ")
        slabel = f"{small:,}".replace(",", " ")
        lo, hi = s["load"].spread
        contention = (f"1-minute load average before each repetition: median {s['load'].median:.1f} "
                      f"[{lo:.1f}–{hi:.1f}] on {os.cpu_count()} CPUs")
        self.rows += [
            Row(f"control plane: program {label} services × {nb} backends, each its own set", "time (apply → reconciled)",
                "s", s["atomnet program"].renamed("atomnet"), s["iptables program"].renamed("iptables-restore"),
                [Target("<=", 2.0, absolute=True, text="< 2 s")], better="lower",
                note=f"atomnet: `atomnet apply -f` (CLI + one sqlite transaction) to the daemon's reconciled event "
                     f"(reconcile alone: median {s['atomnet program reconcile'].median:.2f} s); {n} distinct Maglev "
                     f"tables; iptables: one `{c.iptables}-restore --noflush --counters` of "
                     f"{self.facts['kube_proxy_rules']['rules']} rules; {contention}"),
            Row(f"control plane: change one service among {label}", "store write → maps updated, p50", "s",
                s["atomnet change p50"].renamed("atomnet"), s["iptables change"].renamed("iptables-restore"),
                [Target("<=", 0.010, absolute=True, text="< 10 ms")], better="lower",
                note=f"{c.cp_changes} adds, {c.cp_changes} backend changes, {c.cp_changes} deletes per repetition, "
                     "each timed from the store write (ctl.state.services, in the bench process) to the "
                     "services map showing it; iptables: kube-proxy-style full restore of the changed rules"),
            Row(f"control plane: change one service among {label}", "store write → maps updated, p99", "s",
                s["atomnet change p99"].renamed("atomnet"), None,
                [Target("<=", 0.050, absolute=True, text="< 50 ms")], better="lower"),
            Row(f"control plane: change one service among {slabel}", "store write → maps updated, p50", "s",
                s["atomnet small change p50"].renamed("atomnet"), None,
                [Target("<=", 0.010, absolute=True, text="< 10 ms")], better="lower",
                note=f"flatness: the same change at {slabel} services (p99 median "
                     f"{s['atomnet small change p99'].median * 1000:.1f} ms)"),
            Row(f"pod add at {label} services", "CLI start → endpoint in the map, p50", "s",
                s["pod add"].renamed("atomnet"), s["pod add in-process"].renamed("in-process (no daemon)"),
                [Target("<=", 0.050, absolute=True, text="< 50 ms")],
                better="lower", note="`atomnet pod add` (the installed command: make build's launcher, Python "
                                     "without site) handed to the node's daemon (node API), which creates netns "
                                     "+ veth and programs the endpoint at once; includes the CLI's interpreter "
                                     "start-up; baseline: the same add done in the CLI's process "
                                     "(ATOMNET_API_SOCKET=off), interleaved; the same add started as "
                                     f"`python -m ctl.cli` (with site): median {_ms(s['pod add python -m'].median)}; "
                                     f"the daemon's part (nodeapi_request): median {_ms(s['pod add daemon'].median)}, "
                                     f"of which the sync programming it {_ms(s['pod add sync'].median)}"),
            Row(f"pod add at {label} services", "CLI start → backend on another node, p50", "s",
                s["pod add remote"].renamed("atomnet"), s["pod add remote in-process"].renamed("in-process (no daemon)"),
                [Target("<=", 0.050, absolute=True, text="< 50 ms")],
                better="lower", note="a second node with its daemon and the same services; a service there selects "
                                     "the new pod (what another node programs for a pod: tunnels are per node lease, "
                                     "a pod add changes none)"),
            Row(f"daemon memory at {label} services × {nb} backends", "RSS after the changes", "MiB",
                s["atomnet rss"].renamed("atomnet"), None, [Target("<=", 100, absolute=True, text="< 100 MiB")],
                better="lower", note=f"peak (VmHWM) median {s['atomnet hwm'].median:.0f} MiB"),
            Row(f"metrics scrape at {label} services", "one /metrics GET (median of 5)", "s",
                s["scrape"].renamed("atomnet"), None, [Target("<=", 0.100, absolute=True, text="< 100 ms")],
                better="lower"),
        ]
        if s["idle"].samples:
            self.rows.append(Row(f"daemon idle CPU at {label} services", f"CPU while nothing changes ({window:g} s "
                                 "window, 1 sample)", "% of one CPU", s["idle"].renamed("atomnet"), None,
                                 [Target("<=", 0.5, absolute=True, text="< 0.5 %")], better="lower",
                                 note="no periodic resync any more: the store watch and netlink wake the daemon; "
                                      "the drift check (ctl/daemon.py DRIFT_SECONDS = 300 s) is outside the window"))
        self.series["control_plane"] = {k: v.to_dict() for k, v in s.items()}
        self.control_plane_cluster()

    def control_plane_cluster(self) -> None:
        """Issue 15's cluster row: simulated nodes and pods in one real etcd, one real daemon."""
        from .cluster import run_cluster
        nodes, pods, services = self.cfg.cp_cluster
        self.step(f"case: control plane, {nodes} simulated nodes, {pods} pods, {services} services in etcd")
        keys = ("follow", "change p50", "change p99", "rss", "idle")
        s = {k: Series(k) for k in keys}
        for _ in range(self.cfg.reps):
            c = run_cluster(self.rig.tmp, self.uids, nodes, pods, services, reps=20 if pods > 100 else 2,
                            idle_window=10.0, log=self.log)
            for key, value in (("follow", c["follow"]), ("change p50", c["change_p50"]),
                               ("change p99", c["change_p99"]), ("rss", c["rss_end_mib"]), ("idle", c["idle"] * 100)):
                s[key].samples.append(Sample(value))
        # the thousands separator only in the number (replacing every "," ate the label's own)
        label = f"{nodes} simulated nodes + {f'{pods:,}'.replace(',', ' ')} pods"
        self.rows += [
            Row(f"control plane: {label} in one etcd", "first write → every tunnel and service programmed", "s",
                s["follow"].renamed("atomnet"), None, [], better="lower",
                note=f"{services} services selecting the remote pods; one real daemon, the other nodes are store writes"),
            Row(f"control plane: {label} in one etcd", "node joins/leaves or a remote pod joins → maps, p50", "s",
                s["change p50"].renamed("atomnet"), None, [Target("<=", 0.010, absolute=True, text="< 10 ms")],
                better="lower"),
            Row(f"control plane: {label} in one etcd", "node joins/leaves or a remote pod joins → maps, p99", "s",
                s["change p99"].renamed("atomnet"), None, [Target("<=", 0.050, absolute=True, text="< 50 ms")],
                better="lower"),
            Row(f"daemon memory with {label} in etcd", "RSS", "MiB", s["rss"].renamed("atomnet"), None,
                [Target("<=", 100, absolute=True, text="< 100 MiB")], better="lower"),
        ]
        self.series["control_plane_cluster"] = {k: v.to_dict() for k, v in s.items()}

    def cp_iptables_rep(self, r: int, full_text: str, changed_text: str) -> tuple[float, float]:
        """A fresh namespace: kube-proxy's jumps, then one full restore (program), then
        another full restore with one service changed (kube-proxy's sync of one change)."""
        t = self.cfg.iptables
        ns = topo.new_netns(self.rig, f"p{self.rig.uid}-ipt{r}")
        try:
            topo.iptables_restore(ns, rules.jumps(), t)
            program = topo.iptables_restore(ns, full_text, t)
            change = topo.iptables_restore(ns, changed_text, t)
            topo.iptables_clear(ns, t)   # synchronously, so the kernel frees them now, not during the next run
            return program, change
        finally:
            sh("ip", "netns", "del", ns, check=False)
            self.rig.extra_netns.remove(ns)

    # ------------------------------------------------------------------

    def run_control_plane(self) -> None:
        """Only the control-plane rows (`python -m tests.bench.run --only control-plane`)."""
        self.control_plane()

    FLAT_COUNTS = (1000, 10000, 50000)

    def run_control_plane_flat(self) -> None:
        """Issue 15's "the same at 1 000 and 50 000 services: flat" row, alone (`python -m
        tests.bench.run --only control-plane-flat`; not in `make bench`: one 50 000-service node
        takes ~3 minutes, ~130 s of it programming, and ~7 GB of kernel memory for its Maglev
        tables). Per repetition a fresh node at each count, in turn; the daemon gets
        --bpf-lb-map-max beyond the compiled map sizes (tests/bench/control_plane.py)."""
        from .control_plane import run_node
        c = self.cfg
        nb, counts = c.cp_backends, (self.FLAT_COUNTS if c.cp_services >= 10000 else (c.cp_services,))
        need_kib = max(counts) * 132 + 3 * 1024 * 1024   # 128 KiB tables + headroom for the rest
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        if avail < need_kib:
            raise RuntimeError(f"{max(counts)} services need ~{need_kib // 1024 ** 2} GiB free, "
                               f"{avail // 1024 ** 2} GiB available: not run")
        self.step(f"case: control plane flat, one change among {', '.join(map(str, counts))} services x {nb}")
        s = {(n, k): Series(f"{n} {k}") for n in counts for k in ("p50", "p99", "program", "rss")}
        for _ in range(c.reps):
            for n in counts:
                a = run_node(self.rig.tmp, self.uids, n, nb, max(nb * 2, 4), c.cp_changes, self.atomnet_apply,
                             log=self.log)
                for k, v in (("p50", a["change_p50"]), ("p99", a["change_p99"]), ("program", a["program"]["wall"]),
                             ("rss", a["rss_end_mib"])):
                    s[(n, k)].samples.append(Sample(v))
        for n in counts:
            label = f"{n:,}".replace(",", " ")
            self.rows += [
                Row(f"control plane flat: change one service among {label}", "store write → maps updated, p50", "s",
                    s[(n, "p50")].renamed("atomnet"), None, [Target("<=", 0.010, absolute=True, text="< 10 ms")],
                    better="lower", note=f"{c.cp_changes} adds, backend changes and deletes per node"),
                Row(f"control plane flat: change one service among {label}", "store write → maps updated, p99", "s",
                    s[(n, "p99")].renamed("atomnet"), None, [Target("<=", 0.050, absolute=True, text="< 50 ms")],
                    better="lower"),
            ]
        top = max(counts)
        label = f"{top:,}".replace(",", " ")
        self.rows += [
            Row(f"control plane flat: program {label} services × {nb} backends", "time (apply → reconciled)", "s",
                s[(top, "program")].renamed("atomnet"), None, better="lower"),
            Row(f"daemon memory at {label} services × {nb} backends", "RSS after the changes", "MiB",
                s[(top, "rss")].renamed("atomnet"), None, better="lower"),
        ]
        self.series["control_plane_flat"] = {f"{n} {k}": v.to_dict() for (n, k), v in s.items()}

    def run(self) -> None:
        self.setup()
        self.throughput_same_node_and_service()
        self.latency_same_node()
        self.cross_node()
        self.host_port()
        self.egress()
        self.connections_vs_services()
        self.dns()
        self.control_plane()
