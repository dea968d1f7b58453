"""Pure: the cluster model + this node's links -> the desired content of every map the
daemon owns, and where programs must be attached. No I/O, so it is unit-tested alone.

Keys and values are plain dicts in the shape of the ctypes mirrors' to_dict(), frozen
into sorted tuples so they can be compared and hashed.
"""
from __future__ import annotations

import ipaddress
import zlib
from dataclasses import dataclass, field

from .bpf.types import CFG_F_DEBUG_EVENTS
from ..node.netplumb import LinkInfo
from ..state.model import PROTOCOLS, ClusterConfig, Forward, Lease, Pod, Service, resolve_backends

Frozen = tuple  # tuple of (field, value) pairs, sorted by field

# Maps the daemon writes, in apply order: a map is filled before the maps that point
# into it (backends and their Maglev tables before the service frontends that use them);
# deletions run in the reverse order.
OWNED_MAPS = ("config", "endpoints", "tunnels", "backends", "services")
# Maps whose values belong to the programs (counters): the daemon only adds and removes keys.
KEY_ONLY_MAPS = ("backends",)


def freeze(d: dict) -> Frozen:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@dataclass(frozen=True)
class MaglevSpec:
    """One service port's Maglev table, described by its backends (built only when it changed)."""
    table_size: int
    backends: tuple[tuple[str, int], ...]   # sorted (ip, port)
    digest: int


@dataclass(frozen=True)
class Overlay:
    """This node's overlay: its device, VNI and VtepMAC, and the subnet it owns."""
    ifindex: int
    vni: int
    vtep_mac: str
    subnet: str


@dataclass
class Desired:
    maps: dict[str, dict[Frozen, Frozen]] = field(default_factory=lambda: {m: {} for m in OWNED_MAPS})
    maglev: dict[int, MaglevSpec] = field(default_factory=dict)   # service-port id -> table
    ingress: dict[int, str] = field(default_factory=dict)          # ifindex -> program attached at tc ingress
    egress: dict[int, str] = field(default_factory=dict)           # ifindex -> program attached at tc egress
    missing_links: list[str] = field(default_factory=list)          # pods on this node whose veth is gone
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)   # (frontend, kept, refused)


def maglev_spec(backends: list[tuple[str, int]], table_size_for) -> MaglevSpec:
    key = tuple(sorted(backends))
    size = table_size_for(len(key))
    digest = zlib.crc32(repr((size, key)).encode())
    return MaglevSpec(size, key, digest)


def compute(node: str, pods: list[Pod], links: dict[str, LinkInfo], services: list[Service] = (),
            cluster: ClusterConfig | None = None, table_size_for=None, leases: list[Lease] = (),
            overlay: Overlay | None = None, forwards: list[Forward] = (), node_ip: str | None = None,
            netdevs: list[int] = (), debug_events: bool = False) -> Desired:
    out = Desired()
    cluster = cluster or ClusterConfig()
    net = ipaddress.IPv4Network(cluster.service_cidr)
    out.maps["config"][freeze({"value": 0})] = freeze({
        "service_net": str(net.network_address), "service_mask": str(net.netmask),
        "flags": CFG_F_DEBUG_EVENTS if debug_events else 0,
        "overlay_ifindex": overlay.ifindex if overlay else 0, "vni": overlay.vni if overlay else 0,
        "vtep_mac": overlay.vtep_mac if overlay else "00:00:00:00:00:00",
        "snat_ip": str(ipaddress.IPv4Network(overlay.subnet).network_address) if overlay else "0.0.0.0"})

    if overlay:
        out.ingress[overlay.ifindex] = "from_overlay"
        out.egress[overlay.ifindex] = "to_overlay"
        for lease in leases:
            if lease.subnet == overlay.subnet or not lease.vtep_mac or lease.public_ip.startswith("127."):
                continue   # our own subnet is local; a lease without a VtepMAC or on loopback cannot be reached
            subnet = ipaddress.IPv4Network(lease.subnet)
            out.maps["tunnels"][freeze({"prefixlen": subnet.prefixlen, "ip": str(subnet.network_address)})] = freeze(
                {"node_ip": lease.public_ip, "vtep_mac": lease.vtep_mac.lower()})

    for pod in sorted(pods, key=lambda p: p.name):
        if pod.node != node:
            continue
        link = links.get(pod.host_ifname)
        if link is None:
            out.missing_links.append(pod.name)
            continue
        out.maps["endpoints"][freeze({"ip": pod.ip})] = freeze(
            {"ifindex": link.ifindex, "mac": pod.mac, "node_mac": link.mac})
        out.ingress[link.ifindex] = "from_pod"

    for ifindex in netdevs:   # uplink (from outside) and lo (the node's own connections)
        out.ingress[ifindex] = "from_netdev"

    if table_size_for is None:
        from .maglev import table_size_for
    by_name = {p.name: p for p in pods}
    remote_subnets = [ipaddress.IPv4Network(dict(k)["ip"] + "/" + str(dict(k)["prefixlen"])) for k in out.maps["tunnels"]]

    def reachable(ip: str) -> bool:
        addr = ipaddress.IPv4Address(ip)
        return any(addr in s for s in remote_subnets)

    owners: dict[Frozen, str] = {}

    def frontend(key: Frozen, value: Frozen, owner: str) -> None:
        """Two frontends on one (address, port, protocol) (a NodePort and a host port, say,
        written behind the CLI's back) would replace each other: the older one (lower id,
        ids only grow) keeps it and the other is reported, never both programmed."""
        old = out.maps["services"].get(key)
        if old is not None and dict(old)["id"] != dict(value)["id"]:
            keep_old = dict(old)["id"] < dict(value)["id"]
            kept, refused = (owners[key], owner) if keep_old else (owner, owners[key])
            d = dict(key)
            out.conflicts.append((f"{d['vip']}:{d['port']}/{d['proto']}", kept, refused))
            if keep_old:
                return
        out.maps["services"][key] = value
        owners[key] = owner

    for svc in sorted(services, key=lambda s: s.name):
        for port in svc.ports:
            # A local backend is ready once its veth exists; a remote one while its node's
            # subnet is leased (reachable through the overlay).
            ready = [b for b in resolve_backends(svc, port, by_name)
                     if (by_name[b.pod].host_ifname in links if b.node == node else reachable(b.ip))]
            spec = maglev_spec([(b.ip, b.port) for b in ready], table_size_for)
            out.maglev[port.id] = spec
            for ip, bport in spec.backends:
                out.maps["backends"][freeze({"service_id": port.id, "ip": ip, "port": bport})] = ()
            value = freeze({"id": port.id, "backend_count": len(spec.backends), "table_size": spec.table_size,
                            "affinity_timeout": svc.affinity_timeout, "digest": spec.digest})
            frontend(freeze({"vip": svc.vip, "port": port.port, "proto": PROTOCOLS[port.proto]}), value,
                     f"service:{svc.name}")
            if port.node_port and node_ip:   # NodePort: the same backends behind this node's address
                frontend(freeze({"vip": node_ip, "port": port.node_port, "proto": PROTOCOLS[port.proto]}), value,
                         f"service:{svc.name}")

    for fwd in sorted(forwards, key=lambda f: f.id):
        if fwd.node != node:
            continue
        pod = by_name.get(fwd.pod)
        ready = [] if pod is None else [(pod.ip, fwd.port)] if (
            pod.host_ifname in links if pod.node == node else reachable(pod.ip)) else []
        spec = maglev_spec(ready, table_size_for)
        out.maglev[fwd.service_id] = spec
        for ip, bport in spec.backends:
            out.maps["backends"][freeze({"service_id": fwd.service_id, "ip": ip, "port": bport})] = ()
        frontend(freeze({"vip": fwd.host_ip, "port": fwd.host_port, "proto": PROTOCOLS[fwd.proto]}),
                 freeze({"id": fwd.service_id, "backend_count": len(spec.backends), "table_size": spec.table_size,
                         "affinity_timeout": 0, "digest": spec.digest}), f"forward:{fwd.id}")
    return out
