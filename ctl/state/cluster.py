"""Cluster-wide state transitions on the store: network config, node subnet leases, pod addresses.

Every allocation is a create-if-absent on its own key, so two processes (two
`pod add`s, two daemons) can never be handed the same subnet or address, on
sqlite or etcd alike.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import replace

import structlog

from ..errors import AtomnetError
from .model import (ATOMNET_CONFIG_KEY, IPAM_PREFIX, NETWORK_CONFIG_KEY, NODES_PREFIX, SUBNETS_PREFIX,
                    VIPS_PREFIX, ClusterConfig, Lease, NetworkConfig, Node, ValidationError, parse_network,
                    pod_addresses, subnet_key)
from . import names, validate
from .store import Store

log = structlog.get_logger("atomnet.cluster")

LEASE_TTL = 24 * 3600        # flannel: subnet leases live 24 h ...
LEASE_RENEW_MARGIN = 3600    # ... and are renewed 1 h before they expire


def init_network(store: Store, cidr: str, subnet_len: int, service_cidr: str,
                 cluster_domain: str = names.DEFAULT_CLUSTER_DOMAIN, dns_vip: str | None = None,
                 masquerade: bool | None = None,
                 no_masquerade_cidrs: list[str] | None = None) -> tuple[NetworkConfig, ClusterConfig]:
    """Writes flannel's config and atomnet's; the same values again is a no-op, different ones an error.
    The masquerade settings (None: keep what is stored, else the default) may change on a
    later init: the daemons apply them live."""
    cfg = NetworkConfig(network=cidr, subnet_len=subnet_len)
    ClusterConfig(service_cidr=service_cidr)   # validates the CIDR before the DNS VIP is derived from it
    domain = names.validate_domain(cluster_domain)
    vip = names.check_dns_vip(dns_vip, service_cidr) if dns_vip else names.default_dns_vip(service_cidr)
    cluster = ClusterConfig(service_cidr=service_cidr, cluster_domain=domain, dns_vip=vip)
    if cfg.net.overlaps(ipaddress.IPv4Network(service_cidr)):
        raise ValidationError(f"service CIDR {service_cidr} overlaps the cluster network {cidr}")
    masq = {}
    if masquerade is not None:
        masq["masquerade"] = masquerade
    if no_masquerade_cidrs is not None:
        masq["no_masquerade_cidrs"] = tuple(dict.fromkeys(no_masquerade_cidrs))   # order kept, duplicates dropped
        for extra in masq["no_masquerade_cidrs"]:
            if parse_network(extra, "no-masquerade CIDR").overlaps(cfg.net):
                raise ValidationError(f"no-masquerade CIDR {extra} overlaps the cluster network {cidr} "
                                      "(pod-to-pod traffic is never masqueraded anyway)")
    cluster = replace(cluster, **masq)
    existing = store.get(NETWORK_CONFIG_KEY)
    if existing is not None:
        old = NetworkConfig.from_json(existing.value)
        if (old.network, old.subnet_len) != (cfg.network, cfg.subnet_len):
            raise AtomnetError(
                f"network already initialised with {old.network} (subnet length {old.subnet_len}); "
                "changing it would renumber every pod: tear the cluster down first")
        cfg = old
    old_cluster = store.get(ATOMNET_CONFIG_KEY)
    if old_cluster is not None and ClusterConfig.from_json(old_cluster.value).service_cidr != service_cidr:
        raise AtomnetError(
            f"service CIDR already set to {ClusterConfig.from_json(old_cluster.value).service_cidr}")
    if old_cluster is not None:
        old = ClusterConfig.from_json(old_cluster.value)
        old_vip = dns_vip_of(old)
        if old.cluster_domain != domain or (dns_vip and old_vip != vip):
            raise AtomnetError(f"cluster DNS already set to domain {old.cluster_domain}, VIP {old_vip}: every pod's "
                               "resolver points there")
        cluster = old
    writes = []
    if existing is None:
        writes.append((NETWORK_CONFIG_KEY, cfg.to_json()))
    if old_cluster is None:
        owner = store.get(VIPS_PREFIX + vip)
        if owner is not None and owner.value != names.DNS_VIP_OWNER:
            raise AtomnetError(f"DNS VIP {vip} is already used by service {owner.value}: pass another --dns-vip")
        writes.append((ATOMNET_CONFIG_KEY, cluster.to_json()))
        writes.append((VIPS_PREFIX + vip, names.DNS_VIP_OWNER))   # no service can take it
    else:
        stored = ClusterConfig.from_json(old_cluster.value)
        cluster = replace(stored, **masq)
        if cluster != stored:
            writes.append((ATOMNET_CONFIG_KEY, cluster.to_json()))
    if writes:
        store.put_many(writes)  # both or neither
    return cfg, cluster


def load_network(store: Store) -> NetworkConfig:
    kv = store.get(NETWORK_CONFIG_KEY)
    if kv is None:
        raise AtomnetError("no network configured: run `atomnet network init --cidr 10.244.0.0/16` first")
    return validate.config("network", NETWORK_CONFIG_KEY, kv.value, validate.network_config)


def load_cluster_config(store: Store) -> ClusterConfig:
    kv = store.get(ATOMNET_CONFIG_KEY)
    return validate.config("config", ATOMNET_CONFIG_KEY, kv.value, validate.cluster_config,
                           default=ClusterConfig()) if kv else ClusterConfig()


def dns_vip_of(cfg: ClusterConfig) -> str:
    """The cluster's DNS VIP (configs written before it existed: the Kubernetes default)."""
    return cfg.dns_vip or names.default_dns_vip(cfg.service_cidr)


def resolver_config(store: Store) -> dict:
    """nameservers/search/options for this cluster's pods: resolv.conf, CNI `dns`, Docker."""
    cfg = load_cluster_config(store)
    return names.resolver_config(cfg.cluster_domain, dns_vip_of(cfg))


def list_leases(store: Store, network: NetworkConfig | None = None) -> list[tuple[Lease, int]]:
    """Every valid subnet lease with its store lease id; invalid ones (malformed, or not a
    node subnet of the cluster network) are logged once and skipped (ctl/state/validate.py)."""
    if network is None:
        try:
            network = load_network(store)
        except AtomnetError:
            network = None   # no valid network config: no lease can be checked, none is used
    kvs, _ = store.list(SUBNETS_PREFIX)
    out = []
    for kv in kvs:
        lease = validate.screen("lease", kv.key, kv.value, validate.lease, network)
        if lease is not None:
            out.append((lease, kv.lease))
    return out


def acquire_subnet(store: Store, cfg: NetworkConfig, public_ip: str, vtep: str,
                   prefer: str | None = None, ttl: float = LEASE_TTL) -> tuple[Lease, int]:
    """flannel's algorithm: reuse the lease carrying our PublicIP, else our previous subnet if
    free, else a random free one, claimed with create-if-absent and retried on a lost race."""
    for lease, _ in list_leases(store, cfg):
        if lease.public_ip == public_ip:
            return _hold(store, Lease(lease.subnet, public_ip, cfg.vni, vtep), ttl)
    candidates = cfg.subnets()
    for _attempt in range(len(candidates) + 1):
        # every stored key is taken, valid or not: its create-if-absent would fail anyway
        taken = {kv.key[len(SUBNETS_PREFIX):].replace("-", "/") for kv in store.list(SUBNETS_PREFIX)[0]}
        free = [s for s in candidates if str(s) not in taken]
        if not free:
            raise AtomnetError(f"subnet space exhausted: every /{cfg.subnet_len} of {cfg.network} is leased")
        subnet = next((s for s in free if str(s) == prefer), None) or random.choice(free)
        lease = Lease(str(subnet), public_ip, cfg.vni, vtep)
        lease_id = store.grant(ttl)
        if store.create(subnet_key(subnet), lease.to_json(), lease=lease_id):
            log.info("subnet_acquired", subnet=str(subnet), public_ip=public_ip, ttl=ttl)
            return lease, lease_id
        store.revoke(lease_id)  # somebody else won that subnet: pick again
    raise AtomnetError("could not acquire a subnet: too much contention")


def _hold(store: Store, lease: Lease, ttl: float) -> tuple[Lease, int]:
    lease_id = store.grant(ttl)
    store.put(subnet_key(ipaddress.IPv4Network(lease.subnet)), lease.to_json(), lease=lease_id)
    log.info("subnet_reused", subnet=lease.subnet, public_ip=lease.public_ip, ttl=ttl)
    return lease, lease_id


def load_node(store: Store, name: str) -> Node | None:
    kv = store.get(NODES_PREFIX + name)
    return validate.screen("node", kv.key, kv.value, validate.node) if kv else None


def save_node(store: Store, node: Node) -> None:
    store.put(NODES_PREFIX + node.name, node.to_json())


def allocate_address(store: Store, subnet: str, owner: str, requested: str | None = None) -> str:
    """Lowest free pod address in the node's subnet (or `requested`, which must be a pod
    address of it and free), claimed with create-if-absent."""
    net = ipaddress.IPv4Network(subnet)
    if requested is not None:
        try:
            want = ipaddress.IPv4Address(requested)
        except ValueError:
            raise AtomnetError(f"invalid address {requested!r}") from None
        if want not in pod_addresses(net):
            raise AtomnetError(f"address {requested} is not a pod address of this node's subnet {subnet}")
        if not store.create(IPAM_PREFIX + str(want), owner):
            holder = store.get(IPAM_PREFIX + str(want))
            raise AtomnetError(f"requested address {want} is already in use" + (f" (taken by {holder.value})" if holder else ""))
        return str(want)
    kvs, _ = store.list(IPAM_PREFIX)
    taken = {kv.key[len(IPAM_PREFIX):] for kv in kvs}
    for addr in pod_addresses(net):
        if str(addr) in taken:
            continue
        if store.create(IPAM_PREFIX + str(addr), owner):
            return str(addr)
        # lost a race for this address: try the next one
    raise AtomnetError(f"no free pod address left in {subnet}")


def release_address(store: Store, ip: str, owner: str) -> None:
    kv = store.get(IPAM_PREFIX + ip)
    if kv is not None and kv.value == owner:  # never free an address another pod now holds
        store.delete(IPAM_PREFIX + ip)
