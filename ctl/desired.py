"""Pure: the cluster model + this node's links -> the desired content of every map the
daemon owns, and where programs must be attached. No I/O, so it is unit-tested alone.

Keys and values are plain dicts in the shape of the ctypes mirrors' to_dict(), frozen
into sorted tuples so they can be compared and hashed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .model import Pod

Frozen = tuple  # tuple of (field, value) pairs, sorted by field

# Maps the daemon writes, in apply order: a map is filled before the maps that point
# into it (backends before frontends); deletions run in the reverse order.
OWNED_MAPS = ("endpoints",)


def freeze(d: dict) -> Frozen:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@dataclass(frozen=True)
class LinkInfo:
    ifindex: int
    mac: str


@dataclass
class Desired:
    maps: dict[str, dict[Frozen, Frozen]] = field(default_factory=lambda: {m: {} for m in OWNED_MAPS})
    ingress: dict[int, str] = field(default_factory=dict)   # ifindex -> program attached at tc ingress
    missing_links: list[str] = field(default_factory=list)   # pods on this node whose veth is gone


def compute(node: str, pods: list[Pod], links: dict[str, LinkInfo]) -> Desired:
    out = Desired()
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
    return out
