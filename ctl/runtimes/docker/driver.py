"""The Docker driver's state transitions: a libnetwork endpoint is an atomnet pod.

Everything lives in atomnet's store (pods, addresses, forwards), nothing in this process,
so a restarted plugin answers every call as if it had never stopped:
- the pod of endpoint E is named pod_name(E), so every call finds it again;
- the forwards of an endpoint are the forwards whose pod is that pod;
- an address handed out by RequestAddress but not yet used by CreateEndpoint is held in
  the store under PENDING_OWNER(node), then passed on to the pod.
"""
from __future__ import annotations

import ipaddress
import threading

import structlog

from ...errors import AtomnetError
from ...node import forwards as fwdlib
from ...node import pods as podlib
from ...state import cluster
from ...state.forwards import delete_forward, list_forwards
from ...state.model import HOST_IFNAME_PREFIX, host_ifname
from ...state.names import DOCKER_RUNTIME
from ...state.pods import get_pod, list_pods
from ...state.store import Store
from .dockerapi import DockerAPI, pod_labels, wait_for_container
from .protocol import ANY_POOL, PortBinding, portmap_value

log = structlog.get_logger("atomnet.docker")

RUNTIME = DOCKER_RUNTIME
POD_PREFIX = "docker-"
PEER_PREFIX = "ad"   # the pod end's name in the node's namespace until Docker moves it


def pod_name(endpoint_id: str) -> str:
    """Docker does not tell a network driver the container's name: the pod is named after
    the endpoint (12 hex digits, as Docker shortens ids), stable across plugin restarts."""
    eid = endpoint_id.lower()
    if len(eid) < 12 or any(c not in "0123456789abcdef" for c in eid):
        raise AtomnetError(f"invalid endpoint id {endpoint_id!r}")
    return POD_PREFIX + eid[:12]


def peer_ifname(host_if: str) -> str:
    return PEER_PREFIX + host_if[len(HOST_IFNAME_PREFIX):]


def pending_owner(node: str) -> str:
    return f"docker-ipam:{node}"


class Driver:
    """One per plugin process; calls are serialised (Docker makes few, and the store's
    claims are what make concurrent plugins on other nodes safe)."""

    def __init__(self, store: Store, node: str, docker: DockerAPI | None = None):
        self.store, self.node, self.docker = store, node, docker
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        """Learns the containers of pods made before a restart that never learnt theirs."""
        for pod in list_pods(self.store, self.node):
            if pod.runtime == RUNTIME and not pod.container_id and pod.name.startswith(POD_PREFIX):
                self._learn_later(pod.name[len(POD_PREFIX):])

    def stop(self) -> None:
        self._stop.set()

    def _learn_later(self, endpoint_id: str) -> None:
        if self.docker is not None:
            threading.Thread(target=self._learn_container, args=(endpoint_id,), daemon=True).start()

    def _learn_container(self, endpoint_id: str) -> None:
        """The pod gets its container's id, labels and name (label docker-name), once
        Docker lists the container: services can then select containers by label."""
        found = wait_for_container(self.docker, endpoint_id, stop=self._stop)
        if found is None:
            return
        with self._lock:
            pod = podlib.update_pod(self.store, pod_name(endpoint_id), container_id=found.get("Id", ""),
                                    labels=pod_labels(found))
        if pod is not None:
            log.info("docker_container_learnt", pod=pod.name, container=pod.container_id[:12], labels=pod.labels)

    def locked(self):
        return self._lock

    # ---------------------------------------------------------------- IPAM
    def request_pool(self, pool: str) -> str:
        cfg = cluster.load_network(self.store)
        if pool:
            try:
                net = ipaddress.IPv4Network(pool)
            except ValueError:
                raise AtomnetError(f"invalid subnet {pool!r}") from None
            if str(net) != cfg.network:
                raise AtomnetError(
                    f"subnet {pool} is not atomnet's cluster network {cfg.network}: every atomnet network is "
                    f"that network (create it without --subnet, or with --subnet {cfg.network})")
        return cfg.network

    def request_address(self, pool: str, want: str | None) -> str:
        node = podlib.local_node(self.store, self.node)
        if not ipaddress.IPv4Network(node.subnet).subnet_of(ipaddress.IPv4Network(pool)):
            raise AtomnetError(f"this node's subnet {node.subnet} is not in pool {pool}")
        ip = cluster.allocate_address(self.store, node.subnet, pending_owner(self.node), requested=want)
        log.info("docker_address_reserved", ip=ip)
        return ip

    def release_address(self, ip: str) -> None:
        # Only a reservation no endpoint took: an endpoint's address goes with its pod.
        cluster.release_address(self.store, ip, pending_owner(self.node))

    # ---------------------------------------------------------------- networks
    def create_network(self, network_id: str, pools: list, generic: dict) -> None:
        cfg = cluster.load_network(self.store)
        if pools not in ([cfg.network], [ANY_POOL]):
            raise AtomnetError(f"atomnet networks use atomnet's IPAM: create it with --ipam-driver atomnet "
                               f"(pool {cfg.network}, got {', '.join(map(str, pools)) or 'none'})")
        podlib.local_node(self.store, self.node)   # takes this node's subnet lease if it has none yet
        log.info("docker_network_created", network=network_id[:12], pool=cfg.network)

    def delete_network(self, network_id: str) -> None:
        log.info("docker_network_deleted", network=network_id[:12])

    # ---------------------------------------------------------------- endpoints
    def create_endpoint(self, network_id: str, endpoint_id: str, ip: str, mac: str | None, options: dict) -> str:
        name = pod_name(endpoint_id)
        pod = get_pod(self.store, name)
        if pod is not None:   # Docker retried after we answered (or we restarted meanwhile)
            if pod.ip != ip:
                raise AtomnetError(f"endpoint {endpoint_id[:12]} already exists with address {pod.ip}")
            return pod.mac
        host = host_ifname(name)
        # Hand the reservation over to the pod: released, then claimed again by name at once.
        cluster.release_address(self.store, ip, pending_owner(self.node))
        pod = podlib.add_runtime_pod(self.store, self.node, name, {}, peer_ifname(host), ip=ip, mac=mac,
                                     runtime=RUNTIME)
        log.info("docker_endpoint_created", endpoint=endpoint_id[:12], pod=name, ip=ip)
        return pod.mac

    def endpoint_info(self, network_id: str, endpoint_id: str) -> dict:
        name = pod_name(endpoint_id)
        pod = get_pod(self.store, name)
        if pod is None:
            return {}
        bound = [(PortBinding(f.proto, f.port, f.host_ip, f.host_port), f.host_ip, f.host_port)
                 for f in self._forwards(name)]
        return {"pod": name, "ip": pod.ip, "com.docker.network.portmap": portmap_value(bound, pod.ip)}

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        name = pod_name(endpoint_id)
        self._drop_forwards(name)
        podlib.delete_pod(self.store, self.node, name)
        log.info("docker_endpoint_deleted", endpoint=endpoint_id[:12], pod=name)

    def join(self, network_id: str, endpoint_id: str, sandbox_key: str, options: dict) -> str:
        name = pod_name(endpoint_id)
        pod = podlib.update_pod(self.store, name, netns=sandbox_key) if sandbox_key else get_pod(self.store, name)
        if pod is None:
            raise AtomnetError(f"endpoint {endpoint_id[:12]} does not exist on this node")
        self._learn_later(endpoint_id)
        log.info("docker_joined", endpoint=endpoint_id[:12], pod=name, sandbox=sandbox_key)
        return peer_ifname(pod.host_ifname)

    def leave(self, network_id: str, endpoint_id: str) -> None:
        log.info("docker_left", endpoint=endpoint_id[:12], pod=pod_name(endpoint_id))

    # ---------------------------------------------------------------- published ports
    def program_external(self, network_id: str, endpoint_id: str, bindings: list[PortBinding]) -> None:
        """Every -p/-P of the container as an atomnet forward owned by its pod, all or none.
        A binding an existing forward of the pod already satisfies is kept (a replayed call)."""
        name = pod_name(endpoint_id)
        if get_pod(self.store, name) is None:
            raise AtomnetError(f"endpoint {endpoint_id[:12]} does not exist on this node")
        existing = self._forwards(name)
        added = []
        try:
            for b in bindings:
                same = next((f for f in existing if (f.proto, f.port) == (b.proto, b.port)
                             and b.host_port in (None, f.host_port)), None)
                if same is not None:
                    existing.remove(same)
                    continue
                fwd = fwdlib.add_forward(self.store, self.node, f"{name}:{b.port}",
                                         str(b.host_port) if b.host_port else "auto", b.host_ip, b.proto)
                added.append(fwd)
        except BaseException:
            for fwd in added:
                delete_forward(self.store, fwd.id)
            raise
        for fwd in added:
            log.info("docker_port_published", pod=name, host=f"{fwd.host_ip}:{fwd.host_port}/{fwd.proto}",
                     port=fwd.port)

    def revoke_external(self, network_id: str, endpoint_id: str) -> None:
        self._drop_forwards(pod_name(endpoint_id))

    def _forwards(self, pod: str):
        return [f for f in list_forwards(self.store, self.node) if f.pod == pod]

    def _drop_forwards(self, pod: str) -> None:
        for fwd in self._forwards(pod):
            delete_forward(self.store, fwd.id)
