"""iptables rule sets written the way kube-proxy (iptables mode) and dockerd write them,
as iptables-restore input. Pure: no I/O.

kube-proxy (pkg/proxy/iptables/proxier.go, v1.2x): chain names are KUBE-SVC-/KUBE-SEP- +
the first 16 characters of base32(sha256(...)); every sync writes all of its chains
(":CHAIN - [0:0]" flushes them) with `iptables-restore --noflush --counters`; the jumps
from the built-in chains are ensured once, outside that restore (`jumps()` here).
Endpoint selection is a chain of `-m statistic --mode random --probability 1/(n-i)`
rules; DNAT happens in the KUBE-SEP chain. ClusterIP rules are one list, KUBE-SERVICES,
walked rule by rule until one matches: the cost the benchmark measures.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

MASQ_MARK = "0x4000/0x4000"


@dataclass(frozen=True)
class KubeService:
    name: str                          # "default/NAME"
    vip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]   # (pod IP, target port)
    proto: str = "tcp"

    @property
    def port_name(self) -> str:
        return f"{self.name}:p{self.port}"


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(svc: KubeService) -> str:
    return "KUBE-SVC-" + _hash16(svc.port_name + svc.proto)


def sep_chain(svc: KubeService, ip: str, port: int) -> str:
    return "KUBE-SEP-" + _hash16(svc.port_name + svc.proto + f"{ip}:{port}")


def jumps() -> str:
    """The jumps from built-in chains that kube-proxy ensures once (iptables -C / -I)."""
    return "\n".join([
        "*filter",
        ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]",
        ":KUBE-FORWARD - [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-PROXY-CANARY - [0:0]",
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "COMMIT",
        "*nat",
        ":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-PROXY-CANARY - [0:0]",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "COMMIT", ""])


def kube_proxy(services: list[KubeService], cluster_cidr: str) -> str:
    """One full kube-proxy sync: every KUBE-* chain of filter and nat, in kube-proxy's order."""
    out = ["*filter"]
    out += [f":{c} - [0:0]" for c in ("KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES",
                                      "KUBE-FORWARD", "KUBE-PROXY-FIREWALL")]
    out += [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
        "*nat",
    ]
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
              ":KUBE-MARK-MASQ - [0:0]"]
    rules = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
    ]
    portals, svc_rules, sep_rules = [], [], []
    for svc in services:
        sc = svc_chain(svc)
        chains.append(f":{sc} - [0:0]")
        comment = f'"{svc.port_name} cluster IP"'
        portals.append(f"-A KUBE-SERVICES -d {svc.vip}/32 -p {svc.proto} -m comment --comment {comment} "
                       f"-m {svc.proto} --dport {svc.port} -j {sc}")
        svc_rules.append(f"-A {sc} ! -s {cluster_cidr} -d {svc.vip}/32 -p {svc.proto} -m comment --comment "
                         f"{comment} -m {svc.proto} --dport {svc.port} -j KUBE-MARK-MASQ")
        n = len(svc.endpoints)
        for i, (ip, port) in enumerate(svc.endpoints):
            ep = sep_chain(svc, ip, port)
            chains.append(f":{ep} - [0:0]")
            c = f'"{svc.port_name} -> {ip}:{port}"'
            if i < n - 1:
                svc_rules.append(f"-A {sc} -m comment --comment {c} -m statistic --mode random "
                                 f"--probability {1.0 / (n - i):0.10f} -j {ep}")
            else:
                svc_rules.append(f"-A {sc} -m comment --comment {c} -j {ep}")
            sep_rules.append(f'-A {ep} -s {ip}/32 -m comment --comment "{svc.port_name}" -j KUBE-MARK-MASQ')
            sep_rules.append(f'-A {ep} -p {svc.proto} -m comment --comment "{svc.port_name}" -m {svc.proto} '
                             f"-j DNAT --to-destination {ip}:{port}")
    portals.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
                   'last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    out += chains + rules + portals + svc_rules + sep_rules + ["COMMIT", ""]
    return "\n".join(out)


def rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


def docker(container_ip: str, container_port: int, host_port: int, bridge: str = "docker0",
           subnet: str = "172.17.0.0/16") -> str:
    """dockerd's rules for one bridge network and one `-p HOST:CONTAINER` (iptables-save of
    a Docker 24 host, in restore form). FORWARD's policy is DROP, as Docker sets it."""
    return "\n".join([
        "*nat",
        ":DOCKER - [0:0]",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
        f"-A POSTROUTING -s {subnet} ! -o {bridge} -j MASQUERADE",
        f"-A POSTROUTING -s {container_ip}/32 -d {container_ip}/32 -p tcp -m tcp --dport {container_port} -j MASQUERADE",
        f"-A DOCKER -i {bridge} -j RETURN",
        f"-A DOCKER ! -i {bridge} -p tcp -m tcp --dport {host_port} -j DNAT --to-destination {container_ip}:{container_port}",
        "COMMIT",
        "*filter",
        ":FORWARD DROP [0:0]",
        ":DOCKER - [0:0]",
        ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
        ":DOCKER-ISOLATION-STAGE-2 - [0:0]",
        ":DOCKER-USER - [0:0]",
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
        f"-A FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A FORWARD -o {bridge} -j DOCKER",
        f"-A FORWARD -i {bridge} ! -o {bridge} -j ACCEPT",
        f"-A FORWARD -i {bridge} -o {bridge} -j ACCEPT",
        f"-A DOCKER -d {container_ip}/32 ! -i {bridge} -o {bridge} -p tcp -m tcp --dport {container_port} -j ACCEPT",
        f"-A DOCKER-ISOLATION-STAGE-1 -i {bridge} ! -o {bridge} -j DOCKER-ISOLATION-STAGE-2",
        "-A DOCKER-ISOLATION-STAGE-1 -j RETURN",
        f"-A DOCKER-ISOLATION-STAGE-2 -o {bridge} -j DROP",
        "-A DOCKER-ISOLATION-STAGE-2 -j RETURN",
        "-A DOCKER-USER -j RETURN",
        "COMMIT", ""])


def ip_masq(pod_cidr: str) -> str:
    """flanneld --ip-masq's rules (flannel 0.2x, iptables-save form): pod traffic leaving the
    pod network is masqueraded, with fully random source ports."""
    return "\n".join([
        "*nat",
        ":FLANNEL-POSTRTG - [0:0]",
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        f"-A FLANNEL-POSTRTG -s {pod_cidr} -d {pod_cidr} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {pod_cidr} ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
        "COMMIT",
        "",
    ])
