"""Store records are untrusted input: one function per kind turns (key, stored text) into a
checked record or raises ValidationError. Pure: no I/O.

Any process with write access to the store (every node, every flannel node on the same
etcd) can write any key, so nothing read from the store may reach a map before passing
here: a lease for 0.0.0.0/0 would capture every destination in the `tunnels` LPM map, a
malformed MAC would raise deep in the reconcile and stop every later change.

`INVALID` records what was skipped: each invalid (key, value) is logged once with its key
and counted per kind (the daemon exports the counts as atomnet_invalid_records_total).
"""
from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter

import structlog

from .model import (DEFAULT_SUBNET_LEN, MAX_AFFINITY_SECONDS, PROTOCOLS, SUBNETS_PREFIX, ClusterConfig, Forward,
                    Lease, NetworkConfig, Node, Pod, Service, ValidationError, parse_network, parse_port,
                    parse_port_range, validate_name)

log = structlog.get_logger("atomnet.validate")

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")          # IFNAMSIZ - 1, no '/', ':' or blanks (kernel rules)
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")   # a hostname
_U32 = 2 ** 32 - 1
_VNI_MAX = 2 ** 24 - 1


KINDS = ("network", "config", "lease", "node", "pod", "service", "forward")


class InvalidRecords:
    """Invalid records seen by this process: logged once per (key, value), counted per kind."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._seen: dict[str, str] = {}

    def reject(self, kind: str, key: str, value: str, error: Exception) -> None:
        if self._seen.get(key) == value:
            return   # already logged and counted: a resync must not flood the log
        self._seen[key] = value
        self.counts[kind] += 1
        log.warning("record_invalid", kind=kind, key=key, error=str(error))

    def accept(self, key: str) -> None:
        self._seen.pop(key, None)   # fixed: a later bad value is news again


INVALID = InvalidRecords()


def screen(kind: str, key: str, value: str, check, *args):
    """check(key, value, *args), or None (logged and counted) when the record is invalid."""
    try:
        record = check(key, value, *args)
    except ValidationError as exc:
        INVALID.reject(kind, key, value, exc)
        return None
    except Exception as exc:   # a case the checks missed (a bug): still only this record is lost
        INVALID.reject(kind, key, value, ValidationError(f"{key}: {type(exc).__name__}: {exc}"))
        return None
    INVALID.accept(key)
    return record


# ---------------------------------------------------------------- field checks

def _doc(key: str, text: str) -> dict:
    try:
        doc = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{key}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValidationError(f"{key}: not a JSON object")
    return doc


def _str(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} {value!r} is not a string")
    return value


def _int(value, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValidationError(f"{what} {value!r} is not an integer {lo}-{hi}")
    return value


def unicast_ip(value, what: str, loopback: bool = False) -> str:
    """An IPv4 address a packet may be sent to: not 0.0.0.0, multicast, broadcast or reserved."""
    try:
        addr = ipaddress.IPv4Address(_str(value, what))
    except ValueError:
        raise ValidationError(f"{what} {value!r} is not an IPv4 address") from None
    if (addr.is_unspecified or addr.is_multicast or addr.is_reserved or addr == ipaddress.IPv4Address(_U32)
            or (addr.is_loopback and not loopback)):
        raise ValidationError(f"{what} {value} is not a unicast address")
    return str(addr)


def unicast_mac(value, what: str) -> str:
    if not _MAC_RE.match(_str(value, what)):
        raise ValidationError(f"{what} {value!r} is not a MAC address")
    if int(value[:2], 16) & 1 or value.replace(":", "") == "0" * 12:
        raise ValidationError(f"{what} {value} is not a unicast MAC address")
    return value.lower()


def _name(value, what: str) -> str:
    return validate_name(what, _str(value, f"{what} name"))


def _node_name(value) -> str:
    if not _NODE_NAME_RE.match(_str(value, "node name")):
        raise ValidationError(f"invalid node name {value!r}")
    return value


def _labels(value, what: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValidationError(f"{what} {value!r} is not a map of strings")
    return value


def _build(cls, key: str, doc: dict):
    try:
        return cls(**doc)
    except TypeError as exc:   # missing or unknown fields
        raise ValidationError(f"{key}: {exc}") from None


# ---------------------------------------------------------------- one function per kind

def network_config(key: str, text: str) -> NetworkConfig:
    _doc(key, text)
    cfg = NetworkConfig.from_json(text)   # parse_network refuses a Network that is not a string
    _int(cfg.vni, "VNI", 0, _VNI_MAX)
    parse_port(cfg.port, "VXLAN port")
    for what, value in (("SubnetMin", cfg.subnet_min), ("SubnetMax", cfg.subnet_max)):
        if value is not None and ipaddress.IPv4Address(unicast_ip(value, what)) not in cfg.net:
            raise ValidationError(f"{key}: {what} {value} is outside {cfg.network}")
    return cfg


def cluster_config(key: str, text: str) -> ClusterConfig:
    _doc(key, text)
    cfg = ClusterConfig.from_json(text)   # parse_network and parse_port_range refuse what is not a string
    parse_port_range(cfg.node_port_range)
    return cfg


_LAST_GOOD: dict[str, object] = {}


def config(kind: str, key: str, value: str, check, default=None):
    """A config record: when the stored one is invalid, the last valid one this process saw
    (or `default`) stays in force, so one bad write cannot renumber or stop a node."""
    record = screen(kind, key, value, check)
    if record is not None:
        _LAST_GOOD[key] = record
        return record
    if key in _LAST_GOOD:
        return _LAST_GOOD[key]
    if default is not None:
        return default
    return check(key, value)   # raises: no valid config ever seen and no default


def lease(key: str, text: str, network: NetworkConfig | None) -> Lease:
    """A subnet lease may only describe one node subnet of the cluster network: exactly
    SubnetLen long (flannel's rule: then no two leases overlap) and inside Network."""
    try:
        addr, sep, plen = key[len(SUBNETS_PREFIX):].partition("-")
        if not key.startswith(SUBNETS_PREFIX) or not sep or not plen.isdigit():
            raise ValueError("not A.B.C.D-N")
        subnet = ipaddress.IPv4Network(f"{addr}/{plen}", strict=True)
    except ValueError as exc:
        raise ValidationError(f"{key}: not a subnet key ({exc})") from None
    if network is None:
        raise ValidationError(f"{key}: no valid network config to check the subnet against")
    if not subnet.subnet_of(network.net) or subnet.prefixlen != (network.subnet_len or DEFAULT_SUBNET_LEN):
        raise ValidationError(f"{key}: subnet {subnet} is not a /{network.subnet_len} of the cluster "
                              f"network {network.network}")
    doc = _doc(key, text)
    data = doc.get("BackendData") or {}
    if not isinstance(data, dict):
        raise ValidationError(f"{key}: BackendData is not an object")
    vtep = data.get("VtepMAC") or ""
    # loopback: the lease of a node with no uplink (ctl/node/netplumb.py NO_UPLINK); it is
    # this node's own to find again, and unreachable for others (desired.py skips it)
    return Lease(subnet=str(subnet), public_ip=unicast_ip(doc.get("PublicIP"), "PublicIP", loopback=True),
                 vni=_int(data.get("VNI", network.vni), "VNI", 0, _VNI_MAX),
                 vtep_mac=unicast_mac(vtep, "VtepMAC") if vtep else "")


def node(key: str, text: str) -> Node:
    n = _build(Node, key, _doc(key, text))
    _node_name(n.name)
    unicast_ip(n.public_ip, "public IP", loopback=True)   # loopback: a node with no uplink (ctl/node)
    if not _IFNAME_RE.match(_str(n.uplink, "uplink")):
        raise ValidationError(f"{key}: uplink {n.uplink!r} is not an interface name")
    _int(n.mtu, "MTU", 68 + 50, 65535)
    parse_network(n.subnet, "subnet")
    unicast_mac(n.vtep_mac, "VtepMAC")
    return n


def pod(key: str, text: str, network: NetworkConfig | None = None) -> Pod:
    p = _build(Pod, key, _doc(key, text))
    _name(p.name, "pod")
    _node_name(p.node)
    unicast_ip(p.ip, "pod IP")
    if network is not None and ipaddress.IPv4Address(p.ip) not in network.net:
        # an endpoint for any other address would hijack it (say 8.8.8.8) into this pod
        raise ValidationError(f"{key}: pod IP {p.ip} is outside the cluster network {network.network}")
    unicast_mac(p.mac, "pod MAC")
    for what, name in (("host interface", p.host_ifname), ("interface", p.ifname)):
        if not _IFNAME_RE.match(_str(name, what)):
            raise ValidationError(f"{key}: {what} {name!r} is not an interface name")
    _str(p.container_id, "container id")
    if not _str(p.netns, "netns") and not _str(p.runtime, "runtime"):
        # a runtime that moves the veth itself (Docker) says where only after Join
        raise ValidationError(f"{key}: empty netns")
    _labels(p.labels, "labels")
    if not isinstance(p.netns_owned, bool):
        raise ValidationError(f"{key}: netns_owned {p.netns_owned!r} is not a boolean")
    return p


def service(key: str, text: str, cluster: ClusterConfig | None = None) -> Service:
    doc = _doc(key, text)
    if not isinstance(doc.get("ports"), list) or not all(isinstance(p, dict) for p in doc["ports"]):
        raise ValidationError(f"{key}: ports is not a list of objects")
    for p in doc["ports"]:   # from_dict coerces with int(): a stored record must already be exact
        for field in ("port", "target_port", "id", "node_port"):
            if p.get(field) is not None:
                _int(p[field], field, 0 if field == "id" else 1, _U32 if field == "id" else 65535)
    svc = Service.from_dict(doc)
    cidr = ipaddress.IPv4Network((cluster or ClusterConfig()).service_cidr)
    vip = unicast_ip(svc.vip, "VIP")
    if ipaddress.IPv4Address(vip) not in cidr:
        raise ValidationError(f"{key}: VIP {vip} is outside the service CIDR {cidr}")
    for p in svc.ports:
        if p.id < 1:
            raise ValidationError(f"{key}: port {p.port}/{p.proto} has no dataplane id")
    for b in svc.backends:
        _name(b.pod, "backend pod")
        if b.port is not None:
            _int(b.port, "backend port", 1, 65535)
    _labels(svc.selector, "selector")
    _int(svc.affinity_timeout, "affinity timeout", 0, MAX_AFFINITY_SECONDS)
    return svc


def forward(key: str, text: str) -> Forward:
    f = _build(Forward, key, _doc(key, text))
    _str(f.id, "forward id")
    _node_name(f.node)
    unicast_ip(f.host_ip, "host IP", loopback=True)
    for what, port in (("host port", f.host_port), ("pod port", f.port)):
        _int(port, what, 1, 65535)
    if _str(f.proto, "protocol") not in PROTOCOLS:
        raise ValidationError(f"{key}: unknown protocol {f.proto!r}")
    _name(f.pod, "pod")
    _int(f.service_id, "service id", 1, _U32)
    return f
