"""Cluster naming facts, pure: the cluster domain, the DNS VIP and what a pod's resolver is
told. One home for them, so `pod add` (resolv.conf), the CNI result's `dns` and Docker's
container DNS all say the same thing as the server that answers (ctl/dns/)."""
from __future__ import annotations

import ipaddress
import re

from .model import ValidationError

DEFAULT_CLUSTER_DOMAIN = "cluster.local"
# Kubernetes' convention: the cluster DNS service is the 10th address of the service CIDR.
DNS_VIP_INDEX = 10
# Owner written at /atomnet/vips/<dns-vip>: not a valid service name, so no service can ever
# be given (or `apply` take over) the DNS VIP.
DNS_VIP_OWNER = "atomnet:dns"
NDOTS = 5   # Kubernetes' ClusterFirst: every name with fewer than 5 dots tries the search path first
RESOLV_CONF_MARK = "# written by atomnet: cluster DNS"
# Docker containers are pods named after their endpoint (docker-<id>, runtime "docker"); the
# container's Docker name is their label DOCKER_NAME_LABEL, and the cluster DNS answers it as
# an alias under pod.<domain> (ctl/dns/records.py), which is how names span Docker hosts.
DOCKER_RUNTIME = "docker"
DOCKER_NAME_LABEL = "docker-name"

_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def validate_domain(domain: str) -> str:
    """A cluster domain: lowercase DNS labels separated by dots, no trailing dot, 253 chars at most."""
    text = (domain or "").lower().rstrip(".")
    labels = text.split(".")
    if not text or len(text) > 253 or not all(_LABEL_RE.match(lbl) for lbl in labels) or labels[-1].isdigit():
        raise ValidationError(f"invalid cluster domain {domain!r}: use DNS labels separated by dots, "
                              "e.g. cluster.local")
    return text


def default_dns_vip(service_cidr: str) -> str:
    net = ipaddress.IPv4Network(service_cidr)
    if net.num_addresses <= DNS_VIP_INDEX + 1:
        raise ValidationError(f"service CIDR {service_cidr} is too small for the DNS VIP (its .{DNS_VIP_INDEX})")
    return str(net.network_address + DNS_VIP_INDEX)


def check_dns_vip(vip: str, service_cidr: str) -> str:
    net = ipaddress.IPv4Network(service_cidr)
    try:
        addr = ipaddress.IPv4Address(vip)
    except ValueError:
        raise ValidationError(f"invalid DNS VIP {vip!r}") from None
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise ValidationError(f"DNS VIP {vip} is outside the service CIDR {service_cidr} (or its network/broadcast "
                              "address)")
    return vip


def search_path(domain: str) -> list[str]:
    return [f"svc.{domain}", f"pod.{domain}", domain]


def resolver_config(domain: str, dns_vip: str) -> dict:
    """What every pod's resolver is told, in the CNI result's `dns` shape
    (nameservers, search, options); resolv.conf and Docker's --dns flags are renderings of it."""
    return {"nameservers": [dns_vip], "search": search_path(domain), "options": [f"ndots:{NDOTS}"]}


def docker_daemon_dns(cfg: dict) -> dict:
    """The same facts as dockerd's daemon.json keys (or --dns/--dns-search/--dns-opt flags):
    containers on a user-defined network keep Docker's embedded DNS (127.0.0.11) and it
    forwards what it does not know, from inside the container, to these servers. An explicit
    ndots > 0 also makes it answer an unknown one-label name empty instead of forwarding it,
    so the client goes on with the search path (web2 -> web2.pod.<domain>)."""
    return {"dns": list(cfg["nameservers"]), "dns-search": list(cfg["search"]), "dns-opts": list(cfg["options"])}


def render_resolv_conf(cfg: dict) -> str:
    lines = [RESOLV_CONF_MARK]
    lines += [f"nameserver {ns}" for ns in cfg["nameservers"]]
    lines.append("search " + " ".join(cfg["search"]))
    lines.append("options " + " ".join(cfg["options"]))
    return "\n".join(lines) + "\n"


def candidates(name: str, search: list[str], ndots: int = NDOTS) -> list[str]:
    """The names a stub resolver (glibc, musl) tries, in order, for `name`: the search path
    first when it has fewer than ndots dots, the name as given first otherwise; a trailing dot
    means exactly that name."""
    if name.endswith("."):
        return [name.rstrip(".")]
    expanded = [f"{name}.{s}" for s in search]
    return expanded + [name] if name.count(".") < ndots else [name] + expanded
