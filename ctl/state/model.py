"""The cluster model: what is stored, validated and typed. Pure: no I/O.

Store keys (../shared/DESIGN.md):
    /coreos.com/network/config              flannel's network config
    /coreos.com/network/subnets/A.B.C.D-N   flannel's subnet lease
    /atomnet/config                         atomnet's cluster settings (service CIDR, ...)
    /atomnet/nodes/NAME                     what a node told the cluster (uplink, MTU, subnet)
    /atomnet/pods/NAME                      a pod
    /atomnet/ipam/A.B.C.D                   an allocated pod address -> owning pod
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field, fields
from functools import cache

from ..errors import AtomnetError

NETWORK_CONFIG_KEY = "/coreos.com/network/config"
SUBNETS_PREFIX = "/coreos.com/network/subnets/"
ATOMNET_CONFIG_KEY = "/atomnet/config"
NODES_PREFIX = "/atomnet/nodes/"
PODS_PREFIX = "/atomnet/pods/"
IPAM_PREFIX = "/atomnet/ipam/"

# flannel's defaults (backend vxlan)
DEFAULT_SUBNET_LEN = 24
DEFAULT_VNI = 1
DEFAULT_VXLAN_PORT = 8472
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"
DEFAULT_NODE_PORT_RANGE = "30000-32767"
OVERLAY_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8: pod MTU = uplink MTU - 50

# The pod's gateway: link-local, never routed, answered by a permanent neighbour
# entry in the pod that points at the host-side veth (Cilium/Calico style).
POD_GATEWAY = "169.254.1.1"
POD_IFNAME = "eth0"
HOST_IFNAME_PREFIX = "an"

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class ValidationError(AtomnetError):
    pass


def parse_port(value, what: str = "port") -> int:
    """A TCP/UDP port, 1-65535, from an int or its text."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValidationError(f"invalid {what} {value!r}: must be 1-65535") from None
    if not 1 <= port <= 65535:
        raise ValidationError(f"invalid {what} {port}: must be 1-65535")
    return port


def validate_name(kind: str, name: str) -> str:
    """Kubernetes DNS-1123 label rules: what users already know from pod and service names."""
    if not _NAME_RE.match(name or ""):
        raise ValidationError(
            f"invalid {kind} name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit")
    return name


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY_RE.match(key) or not _LABEL_VALUE_RE.match(value):
            raise ValidationError(f"invalid label {item!r}: use key=value (Kubernetes label syntax)")
        labels[key] = value
    return labels


def parse_network(cidr: str, what: str = "cluster network") -> ipaddress.IPv4Network:
    if not isinstance(cidr, str):   # ipaddress reads an int (or bool) as an address: 1 -> 0.0.0.1/32
        raise ValidationError(f"invalid {what} {cidr!r}: not a string")
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as exc:
        raise ValidationError(f"invalid {what} {cidr!r}: {exc}") from None
    return net


@dataclass(frozen=True)
class NetworkConfig:
    """flannel's /coreos.com/network/config, with flannel's defaults."""
    network: str
    subnet_len: int = DEFAULT_SUBNET_LEN
    subnet_min: str | None = None
    subnet_max: str | None = None
    vni: int = DEFAULT_VNI
    port: int = DEFAULT_VXLAN_PORT

    def __post_init__(self):
        net = parse_network(self.network)
        if not net.prefixlen < self.subnet_len <= 30:
            raise ValidationError(
                f"subnet length {self.subnet_len} must be longer than the network's /{net.prefixlen} and at most 30")

    @property
    def net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.network)

    def subnets(self) -> list[ipaddress.IPv4Network]:
        """Candidate node subnets between SubnetMin and SubnetMax (flannel: skip the first)."""
        all_subnets = list(self.net.subnets(new_prefix=self.subnet_len))
        lo = ipaddress.IPv4Address(self.subnet_min) if self.subnet_min else all_subnets[1].network_address \
            if len(all_subnets) > 1 else all_subnets[0].network_address
        hi = ipaddress.IPv4Address(self.subnet_max) if self.subnet_max else all_subnets[-1].network_address
        return [s for s in all_subnets if lo <= s.network_address <= hi]

    def to_json(self) -> str:
        doc = {"Network": self.network, "SubnetLen": self.subnet_len,
               "Backend": {"Type": "vxlan", "VNI": self.vni, "Port": self.port}}
        if self.subnet_min:
            doc["SubnetMin"] = self.subnet_min
        if self.subnet_max:
            doc["SubnetMax"] = self.subnet_max
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> "NetworkConfig":
        try:
            doc = json.loads(text)
            backend = doc.get("Backend") or {}
            if backend.get("Type", "vxlan") != "vxlan":
                raise ValidationError(f"backend type {backend.get('Type')!r} is not supported: atomnet speaks vxlan")
            return cls(network=doc["Network"], subnet_len=int(doc.get("SubnetLen", DEFAULT_SUBNET_LEN)),
                       subnet_min=doc.get("SubnetMin"), subnet_max=doc.get("SubnetMax"),
                       vni=int(backend.get("VNI", DEFAULT_VNI)), port=int(backend.get("Port", DEFAULT_VXLAN_PORT)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValidationError(f"malformed network config at {NETWORK_CONFIG_KEY}: {exc}") from None


@dataclass(frozen=True)
class ClusterConfig:
    """/atomnet/config: the settings flannel's config has no place for."""
    service_cidr: str = DEFAULT_SERVICE_CIDR
    node_port_range: str = DEFAULT_NODE_PORT_RANGE
    cluster_domain: str = "cluster.local"   # names: ctl/state/names.py, served by ctl/dns/
    dns_vip: str = ""                       # "" = the service CIDR's 10th address (names.default_dns_vip)
    # Masquerade (SNAT to the node's address) of pod traffic leaving the cluster: on by
    # default, as Docker does; destinations in no_masquerade_cidrs keep the pod's address.
    masquerade: bool = True
    no_masquerade_cidrs: tuple[str, ...] = ()

    def __post_init__(self):
        parse_network(self.service_cidr, "service CIDR")
        if not isinstance(self.masquerade, bool):
            raise ValidationError(f"masquerade must be true or false, not {self.masquerade!r}")
        object.__setattr__(self, "no_masquerade_cidrs", tuple(self.no_masquerade_cidrs))
        for cidr in self.no_masquerade_cidrs:
            parse_network(cidr, "no-masquerade CIDR")

    def to_json(self) -> str:
        doc = asdict(self)
        doc["no_masquerade_cidrs"] = list(self.no_masquerade_cidrs)
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> "ClusterConfig":
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"malformed {ATOMNET_CONFIG_KEY}: {exc}") from None


def subnet_key(subnet: ipaddress.IPv4Network) -> str:
    """flannel's key: /coreos.com/network/subnets/10.244.1.0-24"""
    return f"{SUBNETS_PREFIX}{subnet.network_address}-{subnet.prefixlen}"


def subnet_from_key(key: str) -> ipaddress.IPv4Network:
    tail = key[len(SUBNETS_PREFIX):]
    addr, _, plen = tail.partition("-")
    return ipaddress.IPv4Network(f"{addr}/{plen}")


@dataclass(frozen=True)
class Lease:
    """flannel's subnet lease value (vxlan backend)."""
    subnet: str
    public_ip: str
    vni: int
    vtep_mac: str

    def to_json(self) -> str:
        return json.dumps({"PublicIP": self.public_ip, "PublicIPv6": None, "BackendType": "vxlan",
                           "BackendData": {"VNI": self.vni, "VtepMAC": self.vtep_mac}})

    @classmethod
    def from_kv(cls, key: str, text: str) -> "Lease":
        try:
            doc = json.loads(text)
            data = doc.get("BackendData") or {}
            ipaddress.IPv4Address(doc["PublicIP"])
            return cls(subnet=str(subnet_from_key(key)), public_ip=doc["PublicIP"],
                       vni=int(data.get("VNI", DEFAULT_VNI)), vtep_mac=data.get("VtepMAC", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValidationError(f"malformed subnet lease {key}: {exc}") from None


@dataclass(frozen=True)
class Node:
    """/atomnet/nodes/NAME: a node's own facts, so CLI commands on it agree with its daemon."""
    name: str
    public_ip: str
    uplink: str
    mtu: int
    subnet: str
    vtep_mac: str

    @property
    def pod_mtu(self) -> int:
        return self.mtu - OVERLAY_OVERHEAD

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Node":
        return cls(**json.loads(text))


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    node: str
    ip: str
    netns: str
    host_ifname: str
    mac: str
    labels: dict = field(default_factory=dict)
    netns_owned: bool = True   # atomnet created the netns, so `pod del` removes it
    ifname: str = POD_IFNAME
    container_id: str = ""     # the runtime's id for it, when a runtime made it (CNI, Docker)
    runtime: str = ""          # "" for `atomnet pod add`; "docker", "cni", ...

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Pod":
        return cls(**json.loads(text))


def host_ifname(pod_name: str) -> str:
    """Host-side veth name: a stable hash of the pod name, within IFNAMSIZ (15)."""
    return HOST_IFNAME_PREFIX + hashlib.sha1(pod_name.encode()).hexdigest()[:11]


def vtep_mac(node_name: str) -> str:
    """A stable, locally administered unicast MAC for the node's overlay device."""
    b = bytearray(hashlib.sha1(b"atomnet-vtep:" + node_name.encode()).digest()[:6])
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def pod_addresses(subnet: ipaddress.IPv4Network) -> list[ipaddress.IPv4Address]:
    """Addresses pods may get: not the network address, not .1 (kept for the node), not broadcast."""
    hosts = list(subnet.hosts())
    return hosts[1:]


# ---------------------------------------------------------------- services

SERVICES_PREFIX = "/atomnet/services/"
VIPS_PREFIX = "/atomnet/vips/"
SERVICE_PORT_ID_KEY = "/atomnet/ids/service-port"   # last id handed out (ids are never reused)
PROTOCOLS = {"tcp": 6, "udp": 17}
DEFAULT_AFFINITY_SECONDS = 10800   # kube-proxy's sessionAffinity ClientIP default (3 h)
MAX_AFFINITY_SECONDS = 86400


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int
    proto: str = "tcp"
    node_port: int | None = None
    id: int = 0   # service-port id in the dataplane (services/maglev/backends maps), set when stored

    def __post_init__(self):
        for what, value in (("port", self.port), ("target port", self.target_port)):
            if not isinstance(value, int):
                raise ValidationError(f"invalid {what} {value!r}: must be 1-65535")
            parse_port(value, what)
        if self.proto not in PROTOCOLS:
            raise ValidationError(f"unknown protocol {self.proto!r}: use tcp or udp")

    @classmethod
    def parse(cls, text: str) -> "ServicePort":
        """PORT[:TARGET][/tcp|udp], like `kubectl expose --port/--target-port` in one word."""
        spec, _, proto = text.partition("/")
        port, _, target = spec.partition(":")
        try:
            p = int(port)
            t = int(target) if target else p
        except ValueError:
            raise ValidationError(f"invalid port {text!r}: use PORT[:TARGET][/tcp|udp]") from None
        return cls(port=p, target_port=t, proto=(proto or "tcp").lower())


@dataclass(frozen=True, slots=True)   # no per-instance dict: 10 000 services hold ~100 000
class BackendRef:
    pod: str
    port: int | None = None   # overrides the service ports' target port for this pod

    @classmethod
    def parse(cls, text: str) -> "BackendRef":
        pod, _, port = text.partition(":")
        validate_name("backend pod", pod)
        return cls(pod, parse_port(port, "backend port")) if port else cls(pod)


def parse_affinity(text: str | None) -> int:
    """client-ip[:SECONDS] -> seconds (0 = none)."""
    if not text or text == "none":
        return 0
    kind, _, seconds = text.partition(":")
    if kind != "client-ip":
        raise ValidationError(f"invalid affinity {text!r}: use client-ip[:SECONDS] or none")
    try:
        value = int(seconds) if seconds else DEFAULT_AFFINITY_SECONDS
    except ValueError:
        raise ValidationError(f"invalid affinity timeout {seconds!r}: seconds, 1-{MAX_AFFINITY_SECONDS}") from None
    if not 1 <= value <= MAX_AFFINITY_SECONDS:
        raise ValidationError(f"invalid affinity timeout {value}: seconds, 1-{MAX_AFFINITY_SECONDS}")
    return value


@cache
def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _flat_dict(obj) -> dict:
    """asdict() of a dataclass whose fields are all scalars: asdict deep-copies every value
    (recursively, through copy.deepcopy), ~5x slower; 10 000 services are 20 000 of these."""
    return {name: getattr(obj, name) for name in _field_names(type(obj))}


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    vip: str
    ports: tuple[ServicePort, ...]
    backends: tuple[BackendRef, ...] = ()
    selector: dict = field(default_factory=dict)
    affinity_timeout: int = 0

    def __post_init__(self):
        validate_name("service", self.name)
        if not self.ports:
            raise ValidationError(f"service {self.name}: at least one --port is required")
        seen = set()
        for p in self.ports:
            if (p.port, p.proto) in seen:
                raise ValidationError(f"service {self.name}: port {p.port}/{p.proto} given twice")
            seen.add((p.port, p.proto))
        if self.backends and self.selector:
            raise ValidationError(f"service {self.name}: use --backend or --selector, not both")

    def to_json(self) -> str:
        return json.dumps({
            "name": self.name, "vip": self.vip,
            "ports": [_flat_dict(p) for p in self.ports],
            "backends": [_flat_dict(b) for b in self.backends],
            "selector": self.selector,
            "affinity": {"client_ip": self.affinity_timeout} if self.affinity_timeout else None,
        }, sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict) -> "Service":
        """The stored shape, which is also what `service show -j` prints and `apply` takes."""
        try:
            ports = tuple(ServicePort(port=int(p["port"]), target_port=int(p.get("target_port") or p["port"]),
                                      proto=str(p.get("proto", "tcp")).lower(), node_port=p.get("node_port"),
                                      id=int(p.get("id", 0)))
                          for p in doc["ports"])
            backends = tuple(BackendRef(b["pod"], b.get("port")) for b in doc.get("backends") or ()
                             if not doc.get("selector"))
            affinity = doc.get("affinity") or {}
            return cls(name=doc["name"], vip=doc.get("vip") or "", ports=ports, backends=backends,
                       selector=dict(doc.get("selector") or {}),
                       affinity_timeout=int(affinity.get("client_ip", 0)) if isinstance(affinity, dict)
                       else parse_affinity(affinity))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ValidationError):
                raise
            raise ValidationError(f"malformed service {doc.get('name', '?') if isinstance(doc, dict) else doc!r}: "
                                  f"{exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Service":
        return cls.from_dict(json.loads(text))

    def selects(self, pod: Pod) -> bool:
        return bool(self.selector) and all(pod.labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True, slots=True)
class Backend:
    """A resolved backend of one service port."""
    pod: str
    ip: str
    port: int
    node: str


def resolve_backends(svc: Service, port: ServicePort, pods: dict[str, Pod]) -> list[Backend]:
    """The backends of one service port now: named pods that exist, or pods the selector matches."""
    if svc.selector:
        refs = [BackendRef(p.name) for p in pods.values() if svc.selects(p)]
    else:
        refs = list(svc.backends)
    out = []
    for ref in refs:
        pod = pods.get(ref.pod)
        if pod is not None:
            out.append(Backend(pod.name, pod.ip, ref.port or port.target_port, pod.node))
    return sorted(out, key=lambda b: (b.ip, b.port))


# ---------------------------------------------------------------- forwards

FORWARDS_PREFIX = "/atomnet/forwards/"
HOSTPORTS_PREFIX = "/atomnet/hostports/"   # /atomnet/hostports/NODE/PROTO/PORT -> forward id
NODEPORTS_PREFIX = "/atomnet/nodeports/"   # /atomnet/nodeports/PROTO/PORT -> service name


@dataclass(frozen=True)
class Forward:
    """A pod port published on a node port (Docker -p / Kubernetes hostPort)."""
    id: str
    node: str
    host_ip: str
    host_port: int
    proto: str
    pod: str
    port: int
    service_id: int   # its frontend's id in the dataplane (shares the service-port id space)
    owner: str = ""   # the pod whose removal removes this forward (CNI portMappings); "" = the user's

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Forward":
        return cls(**json.loads(text))


def forward_id(node: str, proto: str, host_port: int) -> str:
    return f"{node}-{proto}-{host_port}"


def parse_port_range(text: str) -> tuple[int, int]:
    if not isinstance(text, str):
        raise ValidationError(f"invalid port range {text!r}: not a string")
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise ValidationError(f"invalid port range {text!r}: use LOW-HIGH") from None
    if not 1 <= a <= b <= 65535:
        raise ValidationError(f"invalid port range {text!r}")
    return a, b
