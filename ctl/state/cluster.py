"""Cluster-wide state transitions on the store: network config, node subnet leases, pod addresses.

Every allocation is a create-if-absent on its own key, so two processes (two
`pod add`s, two daemons) can never be handed the same subnet or address, on
sqlite or etcd alike.
"""
from __future__ import annotations

import ipaddress
import random

import structlog

from ..errors import AtomnetError
from .model import (ATOMNET_CONFIG_KEY, IPAM_PREFIX, NETWORK_CONFIG_KEY, NODES_PREFIX, SUBNETS_PREFIX,
                    ClusterConfig, Lease, NetworkConfig, Node, ValidationError, pod_addresses, subnet_key)
from .store import Store

log = structlog.get_logger("atomnet.cluster")

LEASE_TTL = 24 * 3600        # flannel: subnet leases live 24 h ...
LEASE_RENEW_MARGIN = 3600    # ... and are renewed 1 h before they expire


def init_network(store: Store, cidr: str, subnet_len: int, service_cidr: str) -> tuple[NetworkConfig, ClusterConfig]:
    """Writes flannel's config and atomnet's; the same values again is a no-op, different ones an error."""
    cfg = NetworkConfig(network=cidr, subnet_len=subnet_len)
    cluster = ClusterConfig(service_cidr=service_cidr)
    if cfg.net.overlaps(ipaddress.IPv4Network(service_cidr)):
        raise ValidationError(f"service CIDR {service_cidr} overlaps the cluster network {cidr}")
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
    writes = []
    if existing is None:
        writes.append((NETWORK_CONFIG_KEY, cfg.to_json()))
    if old_cluster is None:
        writes.append((ATOMNET_CONFIG_KEY, cluster.to_json()))
    if writes:
        store.put_many(writes)  # both or neither
    return cfg, cluster


def load_network(store: Store) -> NetworkConfig:
    kv = store.get(NETWORK_CONFIG_KEY)
    if kv is None:
        raise AtomnetError("no network configured: run `atomnet network init --cidr 10.244.0.0/16` first")
    return NetworkConfig.from_json(kv.value)


def load_cluster_config(store: Store) -> ClusterConfig:
    kv = store.get(ATOMNET_CONFIG_KEY)
    return ClusterConfig.from_json(kv.value) if kv else ClusterConfig()


def list_leases(store: Store) -> list[tuple[Lease, int]]:
    """Every valid subnet lease with its store lease id; malformed ones are logged and skipped."""
    kvs, _ = store.list(SUBNETS_PREFIX)
    out = []
    for kv in kvs:
        try:
            out.append((Lease.from_kv(kv.key, kv.value), kv.lease))
        except ValidationError as exc:
            log.warning("lease_malformed", key=kv.key, error=str(exc))
    return out


def acquire_subnet(store: Store, cfg: NetworkConfig, public_ip: str, vtep: str,
                   prefer: str | None = None, ttl: float = LEASE_TTL) -> tuple[Lease, int]:
    """flannel's algorithm: reuse the lease carrying our PublicIP, else our previous subnet if
    free, else a random free one, claimed with create-if-absent and retried on a lost race."""
    for lease, _ in list_leases(store):
        if lease.public_ip == public_ip:
            return _hold(store, Lease(lease.subnet, public_ip, cfg.vni, vtep), ttl)
    candidates = cfg.subnets()
    for _attempt in range(len(candidates) + 1):
        taken = {lease.subnet for lease, _ in list_leases(store)}
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
    return Node.from_json(kv.value) if kv else None


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
            raise AtomnetError(f"address {requested} is already in use")
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
