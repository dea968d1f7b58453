"""Pod lifecycle on this node: the CNI-like part of atomnet. `pod add` plumbs the pod itself (it runs
as root on the node, like a CNI plugin); the daemon then programs the dataplane for it.

add: validate -> claim address -> namespace + veth -> claim the name (create-if-absent).
Every step that fails undoes the ones before it, so a failed add leaves nothing behind.
"""
from __future__ import annotations

import dataclasses

import structlog

from ..state import cluster
from . import netplumb, resolvconf
from ..errors import AtomnetError
from ..state.model import PODS_PREFIX, POD_IFNAME, Node, Pod, host_ifname, validate_name, vtep_mac
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


def add_pod(store: Store, node_name: str, name: str, labels: dict[str, str], netns: str | None = None, *,
            ifname: str = POD_IFNAME, ip: str | None = None, mac: str | None = None, container_id: str = "",
            runtime: str = "") -> Pod:
    """`ip`/`mac` request an address (AtomnetError when outside the subnet or taken) and a MAC;
    container_id/runtime record which runtime's container the pod is (CNI, Docker)."""
    validate_name("pod", name)
    path = netplumb.netns_path(netns or name)
    if netns is not None and not path.exists():
        raise AtomnetError(f"network namespace {path} does not exist")
    if netns is None and path.exists():
        raise AtomnetError(f"network namespace {path} already exists: pass --netns {path} to use it")
    owned = netns is None

    def plumb(undo: list, host_if: str, addr: str, mtu: int) -> tuple[str, str]:
        if owned:
            netplumb.create_netns(path)
            undo.append(lambda: netplumb.remove_netns(path))
        pod_mac, _host_mac = netplumb.create_pod_links(path, host_if, addr, mtu, ifname=ifname, mac=mac)
        # the cluster DNS: nameserver <dns-vip>, search svc/pod/<domain>, ndots:5 (ctl/state/names.py);
        # runtimes (CNI, Docker) get the same facts through their own protocols instead
        if resolvconf.write(path, cluster.resolver_config(store)):
            undo.append(lambda: resolvconf.remove(path))
        return pod_mac, str(path)

    return _add(store, node_name, name, labels, ip, plumb, netns_owned=owned, ifname=ifname,
                container_id=container_id, runtime=runtime)


def add_runtime_pod(store: Store, node_name: str, name: str, labels: dict[str, str], peer_ifname: str, *,
                    ip: str | None = None, mac: str | None = None, container_id: str = "",
                    runtime: str = "") -> Pod:
    """A pod whose runtime moves the pod end of the veth into its sandbox itself (Docker's
    libnetwork): the pair is made in the node's namespace, the pod end named `peer_ifname`
    until the runtime takes it. The pod's netns is unknown until then (update_pod)."""
    def plumb(undo: list, host_if: str, addr: str, mtu: int) -> tuple[str, str]:
        peer_mac, _host_mac = netplumb.create_runtime_links(host_if, peer_ifname, addr, mtu, mac=mac)
        return peer_mac, ""

    return _add(store, node_name, name, labels, ip, plumb, netns_owned=False, ifname=POD_IFNAME,
                container_id=container_id, runtime=runtime)


def update_pod(store: Store, name: str, **fields) -> Pod | None:
    """Records what the runtime tells later (where it put the pod, its own id, labels):
    informational fields only, never the address or links."""
    assert set(fields) <= {"netns", "container_id", "labels"}, fields
    pod = get_pod(store, name)
    if pod is None:
        return None
    new = dataclasses.replace(pod, **fields)
    if new != pod:
        store.put(PODS_PREFIX + name, new.to_json())
    return new


def _add(store: Store, node_name: str, name: str, labels: dict[str, str], ip: str | None, plumb, *,
         netns_owned: bool, ifname: str, container_id: str, runtime: str) -> Pod:
    """validate -> claim address -> links (plumb) -> claim the name; undone step by step on failure."""
    validate_name("pod", name)
    if get_pod(store, name) is not None:
        raise AtomnetError(f"pod {name} already exists")
    node = local_node(store, node_name)
    host_if = host_ifname(name)
    ip = cluster.allocate_address(store, node.subnet, name, requested=ip)
    undo = [lambda: cluster.release_address(store, ip, name)]
    try:
        pod_mac, netns = plumb(undo, host_if, ip, node.pod_mtu)
        undo.append(lambda: netplumb.delete_pod_links(host_if))
        pod = Pod(name=name, node=node.name, ip=ip, netns=netns, host_ifname=host_if, mac=pod_mac,
                  labels=labels, netns_owned=netns_owned, ifname=ifname, container_id=container_id,
                  runtime=runtime)
        if not store.create(PODS_PREFIX + name, pod.to_json()):
            raise AtomnetError(f"pod {name} already exists")
    except BaseException:
        for step in reversed(undo):
            try:
                step()
            except Exception as exc:  # keep undoing; report the original failure
                log.warning("pod_add_undo_failed", pod=name, error=str(exc))
        raise
    log.info("pod_added", pod=name, ip=ip, host_ifname=host_if, netns=netns, runtime=runtime)
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


