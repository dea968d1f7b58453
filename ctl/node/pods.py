"""Pod lifecycle on this node: the CNI-like part of atomnet. `pod add` plumbs the pod itself (it runs
as root on the node, like a CNI plugin); the daemon then programs the dataplane for it.

add: validate -> claim address -> namespace + veth -> claim the name (create-if-absent).
Every step that fails undoes the ones before it, so a failed add leaves nothing behind.
"""
from __future__ import annotations

import structlog

from ..state import cluster
from . import netplumb, resolvconf
from ..errors import AtomnetError
from ..state.model import PODS_PREFIX, Node, Pod, host_ifname, validate_name, vtep_mac
from ..state.pods import get_pod
from ..state.store import Store

log = structlog.get_logger("atomnet.pods")


def ensure_node(store: Store, name: str, public_ip: str | None = None, uplink: str | None = None,
                ttl: float = cluster.LEASE_TTL) -> tuple[Node, int]:
    """This node's record and subnet lease, acquired if needed (by the daemon or the first
    command that needs a subnet). Returns the node and its store lease id."""
    cfg = cluster.load_network(store)
    previous = cluster.load_node(store, name)
    if previous and not public_ip and not uplink:
        public_ip, uplink = previous.public_ip, previous.uplink
    up = netplumb.detect_uplink(public_ip, uplink)
    lease, lease_id = cluster.acquire_subnet(store, cfg, up.ip, vtep_mac(name),
                                             prefer=previous.subnet if previous else None, ttl=ttl)
    node = Node(name=name, public_ip=up.ip, uplink=up.ifname, mtu=up.mtu, subnet=lease.subnet,
                vtep_mac=lease.vtep_mac)
    if node != previous:
        cluster.save_node(store, node)
    return node, lease_id


def local_node(store: Store, name: str) -> Node:
    node = cluster.load_node(store, name)
    if node is None:
        node, _ = ensure_node(store, name)
    return node


def add_pod(store: Store, node_name: str, name: str, labels: dict[str, str], netns: str | None = None) -> Pod:
    validate_name("pod", name)
    if get_pod(store, name) is not None:
        raise AtomnetError(f"pod {name} already exists")
    node = local_node(store, node_name)
    path = netplumb.netns_path(netns or name)
    owned = False
    if netns is not None and not path.exists():
        raise AtomnetError(f"network namespace {path} does not exist")
    if netns is None and path.exists():
        raise AtomnetError(f"network namespace {path} already exists: pass --netns {path} to use it")
    host_if = host_ifname(name)
    ip = cluster.allocate_address(store, node.subnet, name)
    undo = [lambda: cluster.release_address(store, ip, name)]
    try:
        if netns is None:
            netplumb.create_netns(path)
            owned = True
            undo.append(lambda: netplumb.remove_netns(path))
        pod_mac, _host_mac = netplumb.create_pod_links(path, host_if, ip, node.pod_mtu)
        undo.append(lambda: netplumb.delete_pod_links(host_if))
        # the cluster DNS: nameserver <dns-vip>, search svc/pod/<domain>, ndots:5 (ctl/state/names.py)
        if resolvconf.write(path, cluster.resolver_config(store)):
            undo.append(lambda: resolvconf.remove(path))
        pod = Pod(name=name, node=node.name, ip=ip, netns=str(path), host_ifname=host_if, mac=pod_mac,
                  labels=labels, netns_owned=owned)
        if not store.create(PODS_PREFIX + name, pod.to_json()):
            raise AtomnetError(f"pod {name} already exists")
    except BaseException:
        for step in reversed(undo):
            try:
                step()
            except Exception as exc:  # keep undoing; report the original failure
                log.warning("pod_add_undo_failed", pod=name, error=str(exc))
        raise
    log.info("pod_added", pod=name, ip=ip, host_ifname=host_if, netns=str(path))
    return pod


def delete_pod(store: Store, node_name: str, name: str) -> Pod | None:
    """Idempotent: a pod that is already gone is not an error. Returns what was removed."""
    validate_name("pod", name)
    pod = get_pod(store, name)
    if pod is None:
        return None
    if pod.node != node_name:
        raise AtomnetError(f"pod {name} lives on node {pod.node}: delete it there")
    netplumb.delete_pod_links(pod.host_ifname)
    resolvconf.remove(netplumb.netns_path(pod.netns))
    if pod.netns_owned:
        netplumb.remove_netns(netplumb.netns_path(pod.netns))
    # Record last: a crash midway leaves the record, so running `pod del` again finishes the job.
    cluster.release_address(store, pod.ip, name)
    store.delete(PODS_PREFIX + name)
    log.info("pod_deleted", pod=name, ip=pod.ip)
    return pod


