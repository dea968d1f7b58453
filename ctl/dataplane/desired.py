"""Pure: the cluster model + this node's links -> the desired content of every map the
daemon owns, and where programs must be attached. No I/O, so it is unit-tested alone.

Keys and values are plain dicts in the shape of the ctypes mirrors' to_dict(), frozen
into sorted tuples so they can be compared and hashed.
"""
from __future__ import annotations

import ipaddress
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

from .bpf.types import CFG_F_DEBUG_EVENTS, CFG_F_MASQUERADE, SnatExcludeKind
from ..node.netplumb import LinkInfo
from ..state.model import PROTOCOLS, ClusterConfig, Forward, Lease, Pod, Service, resolve_backends

Frozen = tuple  # tuple of (field, value) pairs, sorted by field

# Maps the daemon writes, in apply order: a map is filled before the maps that point
# into it (backends and their Maglev tables before the service frontends that use them);
# deletions run in the reverse order.
OWNED_MAPS = ("config", "endpoints", "tunnels", "snat_exclude", "backends", "services")
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


def snat_exclusions(cluster: ClusterConfig, cluster_cidr: str | None, node_ips: list[str]) -> dict[Frozen, Frozen]:
    """Destinations a pod reaches with its own address (flannel's rule, plus the nodes:
    their replies to a pod address come back through the overlay)."""
    entries = [(cluster_cidr, SnatExcludeKind.EXCL_CLUSTER), (cluster.service_cidr, SnatExcludeKind.EXCL_SERVICES)]
    entries += [(f"{ip}/32", SnatExcludeKind.EXCL_NODE) for ip in node_ips if ip]
    entries += [(cidr, SnatExcludeKind.EXCL_USER) for cidr in cluster.no_masquerade_cidrs]
    out: dict[Frozen, Frozen] = {}
    for cidr, kind in entries:
        if cidr:
            n = ipaddress.IPv4Network(cidr)
            out.setdefault(freeze({"prefixlen": n.prefixlen, "ip": str(n.network_address)}), freeze({"kind": int(kind)}))
    return out


def compute(node: str, pods: list[Pod], links: dict[str, LinkInfo], services: list[Service] = (),
            cluster: ClusterConfig | None = None, table_size_for=None, leases: list[Lease] = (),
            overlay: Overlay | None = None, forwards: list[Forward] = (), node_ip: str | None = None,
            netdevs: list[int] = (), debug_events: bool = False, uplink: int | None = None,
            cluster_cidr: str | None = None, snat_ports: tuple[int, int] | None = None) -> Desired:
    out = Desired()
    cluster = cluster or ClusterConfig()
    net = ipaddress.IPv4Network(cluster.service_cidr)
    # Masquerade needs the uplink (to_netdev), this node's address and a port range.
    masquerade = bool(cluster.masquerade and uplink and node_ip and snat_ports)
    flags = (CFG_F_DEBUG_EVENTS if debug_events else 0) | (CFG_F_MASQUERADE if masquerade else 0)
    out.maps["config"][freeze({"value": 0})] = freeze({
        "service_net": str(net.network_address), "service_mask": str(net.netmask),
        "flags": flags,
        "overlay_ifindex": overlay.ifindex if overlay else 0, "vni": overlay.vni if overlay else 0,
        "vtep_mac": overlay.vtep_mac if overlay else "00:00:00:00:00:00",
        "snat_ip": str(ipaddress.IPv4Network(overlay.subnet).network_address) if overlay else "0.0.0.0",
        "masq_ip": node_ip if masquerade else "0.0.0.0",
        "snat_port_min": snat_ports[0] if masquerade else 0, "snat_port_max": snat_ports[1] if masquerade else 0})
    if uplink:
        out.egress[uplink] = "to_netdev"   # attached either way: it passes everything while masquerade is off
    if masquerade:
        out.maps["snat_exclude"] = snat_exclusions(cluster, cluster_cidr, [node_ip] + [l.public_ip for l in leases])

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


# ---------------------------------------------------------------- incremental model
#
# The live desired state. Every fact comes from one source: the config (service net,
# overlay, attachments of the overlay device), a subnet lease (a tunnel), a pod (its
# endpoint and attachment), a service or a forward (frontends, backends, Maglev specs),
# the node's netdevs (from_netdev attachments). A change recomputes only the sources it
# touches (found through the indexes below), diffs each source's new contribution against
# its previous one, and records the (map, key) pairs that changed. The daemon drains those
# at sync (kube-proxy's change trackers: many changes to one key in a batching window are
# one write, or none if the key ends up as it was). `compute` above, from scratch, is the
# oracle this must equal (tests/unit/test_desired_incremental.py, and the drift check).

MAGLEV, INGRESS, EGRESS = "maglev", "ingress", "egress"   # pseudo-maps beside OWNED_MAPS

# Memory (100 000 backend entries at 10 000 services): a backend key's (field, value) pairs
# repeat across services (a few hundred pods), and a source's rank is the same for all its
# keys: one shared tuple each instead of one per key (~30 MB less at 10 000 services).
_pair = lru_cache(maxsize=1 << 16)(lambda name, value: (name, value))
_source_rank = lru_cache(maxsize=1 << 17)(lambda rank, name: (rank, name))
_RANK = {"config": 0, "lease": 1, "pod": 2, "svc": 3, "fwd": 4, "netdev": 5}   # compute's write order


def backend_key(sid: int, ip: str, port: int, sid_pair: tuple | None = None) -> Frozen:
    """freeze({"service_id": sid, "ip": ip, "port": port}), built directly (100 000 of them at
    10 000 services); sid_pair: ("service_id", sid), shared by the caller's keys of one port."""
    return (_pair("ip", ip), _pair("port", port), sid_pair or ("service_id", sid))


class Model:
    def __init__(self, node: str, table_size_for=None, debug_events: bool = False):
        if table_size_for is None:
            from .maglev import table_size_for
        self.node = node
        self.table_size_for = table_size_for
        self.debug_events = debug_events
        self.cluster = ClusterConfig()
        self.overlay: Overlay | None = None
        self.node_ip: str | None = None
        self.netdevs: tuple[int, ...] = ()
        self.uplink = 0                                   # to_netdev's device (masquerade)
        self.cluster_cidr: str | None = None              # never masqueraded
        self.snat_ports: tuple[int, int] | None = None    # masquerade source ports (ctl/node/snatports.py)
        self.pods: dict[str, Pod] = {}
        self.services: dict[str, Service] = {}
        self.forwards: dict[str, Forward] = {}
        self.leases: dict[str, Lease] = {}
        self.links: dict[str, LinkInfo] = {}
        # indexes: what a change touches
        self.svc_by_label: dict[tuple[str, str], set[str]] = {}   # selector pair -> services
        self.svc_by_pod: dict[str, set[str]] = {}                 # pod -> services that name or select it
        self.svc_pods: dict[str, set[str]] = {}                   # the reverse: service -> those pods
        self.pods_by_label: dict[tuple[str, str], set[str]] = {}  # label pair -> pods
        self.fwd_by_pod: dict[str, set[str]] = {}                 # pod -> forwards to it
        self.pod_by_ifname: dict[str, str] = {}                   # host veth -> pod
        self.pods_by_ip: dict[int, set[str]] = {}                 # address -> pods (leases cover ranges)
        self.remote: dict[int, set[int]] = {}                     # prefixlen -> network ints with a tunnel
        # state
        # source -> map -> the keys it contributes (the values live in self.values once)
        self.contrib: dict[tuple[str, str], dict[str, tuple]] = {}
        self.values: dict[str, dict] = {m: {} for m in (*OWNED_MAPS, MAGLEV, INGRESS, EGRESS)}
        self.owner: dict[str, dict] = {m: {} for m in self.values}     # map -> key -> winning source's rank
        self.others: dict[tuple[str, object], dict[tuple, object]] = {}  # losing contributions (rare)
        self.missing_links: set[str] = set()
        self.pending: set[tuple[str, object]] = set()
        self.dirty: set[tuple[str, str]] = {("config", ""), ("netdev", "")}

    # ---------------------------------------------------------------- inputs
    def set_node(self, cluster: ClusterConfig | None = None, overlay: Overlay | None = None,
                 node_ip: str | None = None, netdevs=None, uplink: int | None = None,
                 cluster_cidr: str | None = None, snat_ports=False) -> None:
        """Config-level facts: rare, and they touch everything. (snat_ports=None is a value:
        no usable port range, so no masquerade; leaving it out keeps the current one.)"""
        if cluster is not None:
            self.cluster = cluster
        if uplink is not None:
            self.uplink = uplink
        if cluster_cidr is not None:
            self.cluster_cidr = cluster_cidr
        if snat_ports is not False:
            self.snat_ports = snat_ports
        if overlay is not None:
            self.overlay = overlay
        if node_ip is not None:
            self.node_ip = node_ip
        if netdevs is not None:
            self.netdevs = tuple(netdevs)
        self.dirty.update(self.contrib)
        self.dirty.update({("config", ""), ("netdev", "")})
        self.dirty.update(("lease", s) for s in self.leases)
        self.dirty.update(("pod", p) for p in self.pods)
        self.dirty.update(("svc", s) for s in self.services)
        self.dirty.update(("fwd", f) for f in self.forwards)

    def set_links(self, links: dict[str, LinkInfo]) -> None:
        """This node's link table (from a netlink dump or event): only pods whose veth changed."""
        changed = {n for n in set(links) | set(self.links) if links.get(n) != self.links.get(n)}
        self.links = dict(links)
        for ifname in changed:
            pod = self.pod_by_ifname.get(ifname)
            if pod:
                self._touch_pod(pod)

    def set_link(self, ifname: str, link: LinkInfo | None) -> None:
        if self.links.get(ifname) == link:
            return
        if link is None:
            self.links.pop(ifname, None)
        else:
            self.links[ifname] = link
        pod = self.pod_by_ifname.get(ifname)
        if pod:
            self._touch_pod(pod)

    def set_pod(self, name: str, pod: Pod | None) -> None:
        old = self.pods.get(name)
        if old == pod:
            return
        for p, add in ((old, False), (pod, True)):
            if p is None:
                continue
            (self._index_add if add else self._index_del)(self.pod_by_ifname, p.host_ifname, name, single=True)
            (self._index_add if add else self._index_del)(self.pods_by_ip, int(ipaddress.IPv4Address(p.ip)), name)
            for pair in p.labels.items():
                (self._index_add if add else self._index_del)(self.pods_by_label, pair, name)
        if pod is None:
            self.pods.pop(name, None)
        else:
            self.pods[name] = pod
        self._touch_pod(name)
        for p in (old, pod):   # services whose selector may start or stop matching
            if p is not None:
                for pair in p.labels.items():
                    self.dirty.update(("svc", s) for s in self.svc_by_label.get(pair, ()))

    def set_service(self, name: str, svc: Service | None) -> None:
        old = self.services.get(name)
        if old == svc:
            return
        if old is not None:
            for pair in old.selector.items():
                self._index_del(self.svc_by_label, pair, name)
        if svc is None:
            self.services.pop(name, None)
        else:
            self.services[name] = svc
            for pair in svc.selector.items():
                self._index_add(self.svc_by_label, pair, name)
        self.dirty.add(("svc", name))

    def set_forward(self, fid: str, fwd: Forward | None) -> None:
        old = self.forwards.get(fid)
        if old == fwd:
            return
        if old is not None:
            self._index_del(self.fwd_by_pod, old.pod, fid)
        if fwd is None:
            self.forwards.pop(fid, None)
        else:
            self.forwards[fid] = fwd
            self._index_add(self.fwd_by_pod, fwd.pod, fid)
        self.dirty.add(("fwd", fid))

    def set_lease(self, subnet: str, lease: Lease | None) -> None:
        old = self.leases.get(subnet)
        if old == lease:
            return
        if lease is None:
            self.leases.pop(subnet, None)
        else:
            self.leases[subnet] = lease
        self.dirty.add(("lease", subnet))
        if (old and old.public_ip) != (lease and lease.public_ip):
            self.dirty.add(("config", ""))   # the nodes' addresses are never masqueraded
        # Remote backends in that subnet become reachable or not: their services and forwards.
        net = ipaddress.IPv4Network(subnet)
        lo = int(net.network_address)
        for ip in range(lo, lo + net.num_addresses):
            for pod in self.pods_by_ip.get(ip, ()):
                self.dirty.update(("svc", s) for s in self.svc_by_pod.get(pod, ()))
                self.dirty.update(("fwd", f) for f in self.fwd_by_pod.get(pod, ()))

    # ---------------------------------------------------------------- sync
    def update(self) -> int:
        """Recomputes every dirty source; returns how many (map, key) pairs changed."""
        before = len(self.pending)
        # Tunnels first: services read reachability from them.
        order = sorted(self.dirty, key=lambda s: _RANK[s[0]])
        self.dirty = set()
        for source in order:
            self._replace(source, getattr(self, "_contrib_" + source[0])(source[1]))
        return len(self.pending) - before

    def drain(self) -> dict[str, dict]:
        """The pending changes by map: key -> current value, or None where the key is gone."""
        out: dict[str, dict] = {}
        for name, key in self.pending:
            out.setdefault(name, {})[key] = self.values[name].get(key)
        self.pending = set()
        return out

    def snapshot(self) -> Desired:
        """The whole desired state, in compute()'s shape (tests, drift check, full sync)."""
        out = Desired()
        for name in OWNED_MAPS:
            out.maps[name] = dict(self.values[name])
        out.maglev = dict(self.values[MAGLEV])
        out.ingress = dict(self.values[INGRESS])
        out.egress = dict(self.values[EGRESS])
        out.missing_links = sorted(self.missing_links)
        return out

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _index_add(index: dict, key, value, single: bool = False) -> None:
        if single:
            index[key] = value
        else:
            index.setdefault(key, set()).add(value)

    @staticmethod
    def _index_del(index: dict, key, value, single: bool = False) -> None:
        if single:
            if index.get(key) == value:
                del index[key]
            return
        members = index.get(key)
        if members is not None:
            members.discard(value)
            if not members:
                del index[key]

    def _touch_pod(self, name: str) -> None:
        self.dirty.add(("pod", name))
        self.dirty.update(("svc", s) for s in self.svc_by_pod.get(name, ()))
        self.dirty.update(("fwd", f) for f in self.fwd_by_pod.get(name, ()))

    @staticmethod
    def _rank(source: tuple[str, str], name: str, value) -> tuple:
        """Where two sources give the same key, the higher rank wins, as compute() decides: the
        later one in its write order; for a contested frontend (a NodePort and a host port on
        one address, port and protocol) the older one, lower id (ids only grow)."""
        base = _source_rank(_RANK[source[0]], source[1])
        return (-dict(value)["id"], *base) if name == "services" else base

    def _replace(self, source: tuple[str, str], new: dict) -> None:
        """Diffs a source's new contribution against its previous one."""
        old = self.contrib.pop(source, None) or {}
        now: dict[str, dict] = {}
        for (name, key), value in new.items():
            rank = self._rank(source, name, value)
            before = old.get(name, {}).get(key)
            if before is not None and before != rank:
                self._withdraw(name, key, before)
            self._offer(name, key, rank, value)
            now.setdefault(name, {})[key] = rank
        for name, keys in old.items():
            for key, rank in keys.items():
                if key not in now.get(name, {}):
                    self._withdraw(name, key, rank)
        if now:
            self.contrib[source] = now

    def conflicts(self) -> list[tuple[str, str, str]]:
        """(frontend, kept, refused) for every contested frontend, as compute() reports them."""
        label = {_RANK["svc"]: "service", _RANK["fwd"]: "forward"}
        out = []
        for (name, key), losers in self.others.items():
            if name != "services":
                continue
            d, kept = dict(key), self.owner[name][key]
            for rank in sorted(losers):
                out.append((f"{d['vip']}:{d['port']}/{d['proto']}", f"{label[kept[1]]}:{kept[2]}",
                            f"{label[rank[1]]}:{rank[2]}"))
        return sorted(out)

    def _offer(self, name: str, key, rank: tuple, value) -> None:
        owner, values = self.owner[name], self.values[name]
        cur = owner.get(key)
        if cur is None or cur == rank:
            owner[key] = rank
            if cur is None or values[key] != value:
                values[key] = value
                self.pending.add((name, key))
        elif rank > cur:   # takes the key over; the previous owner's value is kept aside
            self.others.setdefault((name, key), {})[cur] = values[key]
            owner[key] = rank
            if values[key] != value:
                values[key] = value
                self.pending.add((name, key))
        else:
            self.others.setdefault((name, key), {})[rank] = value

    def _withdraw(self, name: str, key, rank: tuple) -> None:
        owner, values = self.owner[name], self.values[name]
        alt = self.others.get((name, key))
        if owner.get(key) != rank:
            if alt is not None:
                alt.pop(rank, None)
                if not alt:
                    del self.others[(name, key)]
            return
        if alt:
            best = max(alt)
            value = alt.pop(best)
            if not alt:
                del self.others[(name, key)]
            owner[key] = best
            if values[key] != value:
                values[key] = value
                self.pending.add((name, key))
        else:
            del owner[key]
            del values[key]
            self.pending.add((name, key))

    def _reachable(self, ip: str) -> bool:
        if not self.remote:
            return False
        addr = int(ipaddress.IPv4Address(ip))
        return any((addr >> (32 - plen) << (32 - plen)) in nets for plen, nets in self.remote.items())

    def _ready(self, pod: Pod) -> bool:
        """A local backend is ready once its veth exists; a remote one while its node's subnet
        is leased (reachable through the overlay)."""
        return pod.host_ifname in self.links if pod.node == self.node else self._reachable(pod.ip)

    def _contrib_config(self, _name: str) -> dict:
        net = ipaddress.IPv4Network(self.cluster.service_cidr)
        ov = self.overlay
        ports = self.snat_ports
        # Masquerade needs the uplink (to_netdev), this node's address and a port range.
        masquerade = bool(self.cluster.masquerade and self.uplink and self.node_ip and ports)
        flags = (CFG_F_DEBUG_EVENTS if self.debug_events else 0) | (CFG_F_MASQUERADE if masquerade else 0)
        out: dict = {("config", freeze({"value": 0})): freeze({
            "service_net": str(net.network_address), "service_mask": str(net.netmask),
            "flags": flags,
            "overlay_ifindex": ov.ifindex if ov else 0, "vni": ov.vni if ov else 0,
            "vtep_mac": ov.vtep_mac if ov else "00:00:00:00:00:00",
            "snat_ip": str(ipaddress.IPv4Network(ov.subnet).network_address) if ov else "0.0.0.0",
            "masq_ip": self.node_ip if masquerade else "0.0.0.0",
            "snat_port_min": ports[0] if masquerade else 0, "snat_port_max": ports[1] if masquerade else 0})}
        if self.uplink:
            out[(EGRESS, self.uplink)] = "to_netdev"   # attached either way: it passes everything while off
        if masquerade:
            node_ips = [self.node_ip] + [lease.public_ip for lease in self.leases.values()]
            for key, value in snat_exclusions(self.cluster, self.cluster_cidr, node_ips).items():
                out[("snat_exclude", key)] = value
        if ov:
            out[(INGRESS, ov.ifindex)] = "from_overlay"
            out[(EGRESS, ov.ifindex)] = "to_overlay"
        return out

    def _contrib_netdev(self, _name: str) -> dict:
        return {(INGRESS, ifindex): "from_netdev" for ifindex in self.netdevs}

    def _contrib_lease(self, subnet: str) -> dict:
        lease = self.leases.get(subnet)
        net = ipaddress.IPv4Network(subnet)
        nets = self.remote.get(net.prefixlen)
        if nets is not None:
            nets.discard(int(net.network_address))
            if not nets:
                del self.remote[net.prefixlen]
        if (lease is None or self.overlay is None or lease.subnet == self.overlay.subnet or not lease.vtep_mac
                or lease.public_ip.startswith("127.")):
            return {}   # our own subnet is local; a lease without a VtepMAC or on loopback cannot be reached
        self.remote.setdefault(net.prefixlen, set()).add(int(net.network_address))
        return {("tunnels", freeze({"prefixlen": net.prefixlen, "ip": str(net.network_address)})): freeze(
            {"node_ip": lease.public_ip, "vtep_mac": lease.vtep_mac.lower()})}

    def _contrib_pod(self, name: str) -> dict:
        pod = self.pods.get(name)
        self.missing_links.discard(name)
        if pod is None or pod.node != self.node:
            return {}
        link = self.links.get(pod.host_ifname)
        if link is None:
            self.missing_links.add(name)
            return {}
        return {("endpoints", freeze({"ip": pod.ip})): freeze({"ifindex": link.ifindex, "mac": pod.mac,
                                                               "node_mac": link.mac}),
                (INGRESS, link.ifindex): "from_pod"}

    def _frontend(self, out: dict, sid: int, ready: list[tuple[str, int]]) -> dict:
        spec = maglev_spec(ready, self.table_size_for)
        out[(MAGLEV, sid)] = spec
        sid_pair = ("service_id", sid)
        for ip, bport in spec.backends:
            out[("backends", backend_key(sid, ip, bport, sid_pair))] = ()
        return spec

    def _contrib_svc(self, name: str) -> dict:
        svc = self.services.get(name)
        for pod in self.svc_pods.pop(name, ()):   # forget what it depended on last time
            self._index_del(self.svc_by_pod, pod, name)
        if svc is None:
            return {}
        if svc.selector:   # candidates from the label index, not a scan of every pod
            first = min(svc.selector.items(), key=lambda pair: len(self.pods_by_label.get(pair, ())))
            names = set(self.pods_by_label.get(first, ()))
            candidates = {p: self.pods[p] for p in names}
        else:   # named pods, present or not yet (a pod added later must find this service)
            names = {b.pod for b in svc.backends}
            candidates = {p: self.pods[p] for p in names if p in self.pods}
        self.svc_pods[name] = names
        for pod in names:
            self._index_add(self.svc_by_pod, pod, name)
        out: dict = {}
        for port in svc.ports:
            ready = [(b.ip, b.port) for b in resolve_backends(svc, port, candidates) if self._ready(candidates[b.pod])]
            spec = self._frontend(out, port.id, ready)
            # freeze()'s sorted field order, built directly (10 000 services: it shows)
            value = (("affinity_timeout", svc.affinity_timeout), ("backend_count", len(spec.backends)),
                     ("digest", spec.digest), ("id", port.id), ("table_size", spec.table_size))
            out[("services", (("port", port.port), ("proto", PROTOCOLS[port.proto]), ("vip", svc.vip)))] = value
            if port.node_port and self.node_ip:   # NodePort: the same backends behind this node's address
                out[("services", (("port", port.node_port), ("proto", PROTOCOLS[port.proto]),
                                  ("vip", self.node_ip)))] = value
        return out

    def _contrib_fwd(self, fid: str) -> dict:
        fwd = self.forwards.get(fid)
        if fwd is None or fwd.node != self.node:
            return {}
        pod = self.pods.get(fwd.pod)
        ready = [(pod.ip, fwd.port)] if pod is not None and self._ready(pod) else []
        out: dict = {}
        spec = self._frontend(out, fwd.service_id, ready)
        out[("services", freeze({"vip": fwd.host_ip, "port": fwd.host_port, "proto": PROTOCOLS[fwd.proto]}))] = \
            freeze({"id": fwd.service_id, "backend_count": len(spec.backends), "table_size": spec.table_size,
                    "affinity_timeout": 0, "digest": spec.digest})
        return out


