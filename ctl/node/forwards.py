"""Port forwarding: publish a pod port on a node port (Docker -p / -P, Kubernetes hostPort).

Validation reads this node's kernel (its addresses, ephemeral range, reserved ports and
bound sockets), so `forward add` runs on the node, like `pod add`. A (node, protocol,
port) is claimed with its own key, so it is forwarded at most once.
"""
from __future__ import annotations

import structlog

from . import hostports, pods as podlib
from ..errors import AtomnetError
from ..state.model import (FORWARDS_PREFIX, HOSTPORTS_PREFIX, PODS_PREFIX, PROTOCOLS, Forward, Pod, ValidationError,
                    forward_id, parse_port)
from ..state.pods import get_pod
from ..state.services import reserve_ids
from ..state.forwards import (check_not_nodeport, claim_key, delete_forward, list_forwards, nodeport_owner,
                              parse_target)
from ..state.store import Store

log = structlog.get_logger("atomnet.forwards")


def _pick_port(store: Store, node: str, proto: str, host_ip: str) -> int:
    """Like Docker's -P: the lowest port of the kernel's ephemeral range that is not
    reserved, not forwarded already and not bound by a host socket."""
    lo, hi = hostports.ephemeral_range()
    reserved = hostports.reserved_ports()
    bound = {p for addr, p, _ in hostports.bound_sockets(proto) if addr in (host_ip, "0.0.0.0", "::")}
    taken = {int(kv.key.rsplit("/", 1)[1]) for kv in store.list(f"{HOSTPORTS_PREFIX}{node}/{proto}/")[0]}
    for port in range(lo, hi + 1):
        if port in reserved or port in bound or port in taken:
            continue
        if store.create(claim_key(node, proto, port), forward_id(node, proto, port)):
            if nodeport_owner(store, proto, port) is None:
                return port
            store.delete(claim_key(node, proto, port))   # a NodePort (claimed meanwhile): next one
    raise AtomnetError(f"no free {proto} port left in the ephemeral range {lo}-{hi}")


def validate(store: Store, node_name: str, target: str, host_port, host_ip: str | None, proto: str,
             check_bound: bool = True):
    """Everything about a forward that can be checked before writing: (proto, pod, pod port,
    host IP, host port or None for auto)."""
    proto = (proto or "tcp").lower()
    if proto not in PROTOCOLS:
        raise ValidationError(f"unknown protocol {proto!r}: use tcp or udp")
    pod_name, pod_port = parse_target(target)
    if get_pod(store, pod_name) is None:
        raise AtomnetError(f"pod {pod_name} does not exist")
    node = podlib.local_node(store, node_name)
    host_ip = host_ip or node.public_ip
    if host_ip not in hostports.node_addresses():
        raise AtomnetError(f"host IP {host_ip} is not an address of node {node_name}")
    if host_port in (None, "auto"):
        return proto, pod_name, pod_port, host_ip, None
    port = parse_port(host_port, "host port")
    check_not_nodeport(store, proto, port)
    if check_bound:
        bound, who = hostports.bound_by(proto, host_ip, port)
        if bound:
            raise AtomnetError(f"host port {port}/{proto} is already bound on this node" + (f" by {who}" if who else ""))
    return proto, pod_name, pod_port, host_ip, port


def add_forward(store: Store, node_name: str, target: str, host_port: str | None, host_ip: str | None,
                proto: str, *, owner: str = "") -> Forward:
    """`owner`: the pod whose deletion deletes this forward too (CNI portMappings)."""
    proto, pod_name, pod_port, host_ip, port = validate(store, node_name, target, host_port, host_ip, proto)
    if port is None:
        port = _pick_port(store, node_name, proto, host_ip)
    else:
        if not store.create(claim_key(node_name, proto, port), forward_id(node_name, proto, port)):
            raise AtomnetError(f"host port {port}/{proto} is already forwarded on node {node_name} "
                               f"(forward {forward_id(node_name, proto, port)})")
    try:
        check_not_nodeport(store, proto, port)   # again, after claiming: see ctl/state/forwards.py
        fwd = Forward(id=forward_id(node_name, proto, port), node=node_name, host_ip=host_ip, host_port=port,
                      proto=proto, pod=pod_name, port=pod_port, service_id=reserve_ids(store, 1)[0], owner=owner)
        if not store.create(FORWARDS_PREFIX + fwd.id, fwd.to_json()):
            raise AtomnetError(f"forward {fwd.id} already exists")
    except BaseException:
        store.delete(claim_key(node_name, proto, port))
        raise
    log.info("forward_added", id=fwd.id, host=f"{host_ip}:{port}/{proto}", pod=f"{pod_name}:{pod_port}")
    return fwd


def plan_apply(store: Store, node_name: str, docs: list[dict], prune: bool = False,
               node_ports: set[tuple[str, int]] = frozenset()):
    """The forwards of an `apply` file, for this node, all validated before anything is
    written: returns the plan that apply_plan() carries out. `prune` removes this node's
    forwards the file does not list; a listed forward equal to a stored one (same host
    port, protocol, pod and port) is left alone."""
    existing = {f.id: f for f in list_forwards(store, node_name)}
    wanted = []
    for doc in docs:
        try:
            target, host_port = f"{doc['pod']}:{doc['port']}", doc.get("host_port", "auto")
        except KeyError as exc:
            raise ValidationError(f"forward {doc}: missing {exc.args[0]}") from None
        proto = str(doc.get("proto", "tcp")).lower()
        fid = forward_id(node_name, proto, int(host_port)) if host_port not in (None, "auto") else None
        same = existing.get(fid) if fid else None
        keep = same is not None and (same.pod, same.port) == (doc["pod"], int(doc["port"]))
        validate(store, node_name, target, host_port, doc.get("host_ip"), proto, check_bound=not keep)
        if host_port not in (None, "auto") and (proto, int(host_port)) in node_ports:   # a NodePort of the same file
            raise ValidationError(f"host port {host_port}/{proto} is a NodePort in the same file: "
                                  "a port is a host port or a NodePort, not both")
        if fid and not keep and fid in existing:
            raise ValidationError(f"host port {host_port}/{proto} is already forwarded to another pod "
                                  f"(forward {fid}): delete it first")
        wanted.append((fid if keep else None, target, host_port, doc.get("host_ip"), proto))
    kept = {fid for fid, *_ in wanted if fid}
    return node_name, wanted, [fid for fid in existing if prune and fid not in kept], len(kept)


def apply_plan(store: Store, plan) -> dict:
    node_name, wanted, to_prune, unchanged = plan
    added = [add_forward(store, node_name, t, hp, hip, pr) for fid, t, hp, hip, pr in wanted if fid is None]
    for fid in to_prune:
        delete_forward(store, fid)
    return {"created": len(added), "unchanged": unchanged, "pruned": len(to_prune)}
