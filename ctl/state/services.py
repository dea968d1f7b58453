"""Services in the store: add, delete, show, and the declarative `apply`.

A service's VIP is claimed with its own key (/atomnet/vips/IP -> name), so two services
never share one. Each service port gets a dataplane id from a counter that only grows
(ids are never reused, so a stale conntrack entry can never point at another service).
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import replace

import structlog

from . import cluster, validate
from ..errors import AtomnetError
from .model import (NODEPORTS_PREFIX, PODS_PREFIX, SERVICE_PORT_ID_KEY, SERVICES_PREFIX, VIPS_PREFIX, Pod,
                    Service, ServicePort, ValidationError, parse_port_range, resolve_backends)
from .forwards import check_not_hostport, hostport_users
from .pods import list_pods
from .store import Store

log = structlog.get_logger("atomnet.services")


def list_services(store: Store) -> list[Service]:
    """Every valid service; invalid ones are logged once and skipped (ctl/state/validate.py)."""
    kvs, _ = store.list(SERVICES_PREFIX)
    cfg = cluster.load_cluster_config(store)
    return [s for s in (validate.screen("service", kv.key, kv.value, validate.service, cfg) for kv in kvs)
            if s is not None]


def get_service(store: Store, name: str) -> Service | None:
    kv = store.get(SERVICES_PREFIX + name)
    return validate.screen("service", kv.key, kv.value, validate.service,
                           cluster.load_cluster_config(store)) if kv else None


def pods_by_name(store: Store) -> dict[str, Pod]:
    return {p.name: p for p in list_pods(store)}


def service_cidr(store: Store) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cluster.load_cluster_config(store).service_cidr)


def check_vip(vip: str, cidr: ipaddress.IPv4Network) -> str:
    try:
        addr = ipaddress.IPv4Address(vip)
    except ValueError:
        raise ValidationError(f"invalid VIP {vip!r}") from None
    if addr not in cidr or addr in (cidr.network_address, cidr.broadcast_address):
        raise ValidationError(f"VIP {vip} is outside the service CIDR {cidr} (or its network/broadcast address)")
    return vip


def free_vips(cidr: ipaddress.IPv4Network, taken: set[str]):
    """Lowest free addresses first; .0 and .1 are skipped (.1 is Kubernetes' API service VIP by convention)."""
    for i, addr in enumerate(cidr.hosts()):
        if i == 0:
            continue
        if str(addr) not in taken:
            yield str(addr)


def reserve_ids(store: Store, count: int) -> list[int]:
    """Reserves `count` new service-port ids with a compare-and-swap on the counter key."""
    while True:
        kv = store.get(SERVICE_PORT_ID_KEY)
        last = int(kv.value) if kv else 0
        if kv is None:
            if store.create(SERVICE_PORT_ID_KEY, str(last + count)):
                return list(range(last + 1, last + count + 1))
        elif store.replace(SERVICE_PORT_ID_KEY, str(last + count), kv.mod_revision):
            return list(range(last + 1, last + count + 1))


def with_ids(svc: Service, previous: Service | None, fresh: list[int]) -> Service:
    """Keeps the ids of ports that already existed; new ports take fresh ids."""
    old = {(p.port, p.proto): p.id for p in previous.ports} if previous else {}
    it = iter(fresh)
    ports = tuple(replace(p, id=old.get((p.port, p.proto)) or next(it)) for p in svc.ports)
    return replace(svc, ports=ports)


def check_backends_exist(svc: Service, pods: dict[str, Pod]) -> None:
    for ref in svc.backends:
        if ref.pod not in pods:
            raise AtomnetError(f"service {svc.name}: backend pod {ref.pod} does not exist")


def _nodeport_key(port: ServicePort) -> str:
    return f"{NODEPORTS_PREFIX}{port.proto}/{port.node_port}"


def claim_node_ports(store: Store, svc: Service, request: str | None) -> Service:
    """--node-port auto|N: a port of the cluster's NodePort range, claimed cluster-wide
    (create-if-absent), for every port of the service (N only for a single-port service)."""
    if not request:
        return svc
    lo, hi = parse_port_range(cluster.load_cluster_config(store).node_port_range)
    if request != "auto":
        try:
            wanted = int(request)
        except ValueError:
            raise ValidationError(f"invalid node port {request!r}: auto or a number {lo}-{hi}") from None
        if len(svc.ports) != 1:
            raise ValidationError("--node-port N needs a single-port service; use --node-port auto")
        if not lo <= wanted <= hi:
            raise ValidationError(f"node port {wanted} is outside the NodePort range {lo}-{hi}")
    ports, claimed = [], []
    try:
        for port in svc.ports:
            candidates = [wanted] if request != "auto" else range(lo, hi + 1)
            for n in candidates:
                p = replace(port, node_port=n)
                if store.create(_nodeport_key(p), svc.name):
                    claimed.append(_nodeport_key(p))
                    if hostport_users(store, p.proto, n):   # checked after claiming: ctl/state/forwards.py
                        if request != "auto":
                            check_not_hostport(store, p.proto, n, svc.name)
                        store.delete(claimed.pop())
                        continue
                    ports.append(p)
                    break
            else:
                raise AtomnetError(f"node port {request} is already used" if request != "auto"
                                   else f"NodePort range {lo}-{hi} is exhausted")
    except BaseException:
        store.put_many([], deletes=claimed)
        raise
    return replace(svc, ports=tuple(ports))


def add_service(store: Store, svc: Service, node_port: str | None = None) -> Service:
    cidr = service_cidr(store)
    if get_service(store, svc.name) is not None:
        raise AtomnetError(f"service {svc.name} already exists")
    check_backends_exist(svc, pods_by_name(store))
    if svc.vip:
        check_vip(svc.vip, cidr)
        if not store.create(VIPS_PREFIX + svc.vip, svc.name):
            owner = store.get(VIPS_PREFIX + svc.vip)
            raise AtomnetError(f"VIP {svc.vip} is already used by service {owner.value if owner else '?'}")
        vip = svc.vip
    else:
        vip = _claim_free_vip(store, cidr, svc.name)
    claimed = svc
    try:
        claimed = claim_node_ports(store, svc, node_port)
        stored = with_ids(replace(claimed, vip=vip), None, reserve_ids(store, len(svc.ports)))
        if not store.create(SERVICES_PREFIX + svc.name, stored.to_json()):
            raise AtomnetError(f"service {svc.name} already exists")
    except BaseException:
        store.put_many([], deletes=[VIPS_PREFIX + vip] + [_nodeport_key(p) for p in claimed.ports if p.node_port
                                                          and claimed is not svc])
        raise
    log.info("service_added", service=svc.name, vip=vip, ports=[p.port for p in stored.ports])
    return stored


def _claim_free_vip(store: Store, cidr, name: str) -> str:
    kvs, _ = store.list(VIPS_PREFIX)
    for vip in free_vips(cidr, {kv.key[len(VIPS_PREFIX):] for kv in kvs}):
        if store.create(VIPS_PREFIX + vip, name):
            return vip
    raise AtomnetError(f"service CIDR {cidr} is exhausted: no free VIP left")


def delete_service(store: Store, name: str) -> Service | None:
    svc = get_service(store, name)
    if svc is None:
        return None
    store.put_many([], deletes=[SERVICES_PREFIX + name, VIPS_PREFIX + svc.vip] +
                   [_nodeport_key(p) for p in svc.ports if p.node_port])
    log.info("service_deleted", service=name, vip=svc.vip)
    return svc


def show(svc: Service, pods: dict[str, Pod]) -> dict:
    """The shape `service show -j` prints (and `apply` accepts)."""
    backends = []
    for port in svc.ports:
        backends += [{"pod": b.pod, "ip": b.ip, "port": b.port, "node": b.node}
                     for b in resolve_backends(svc, port, pods) if b not in backends]
    unique = [dict(t) for t in dict.fromkeys(tuple(b.items()) for b in backends)]
    return {
        "kind": "service", "name": svc.name, "vip": svc.vip,
        "ports": [{"port": p.port, "target_port": p.target_port, "proto": p.proto, "node_port": p.node_port}
                  for p in svc.ports],
        "backends": unique,
        "selector": svc.selector,
        "affinity": {"client_ip": svc.affinity_timeout} if svc.affinity_timeout else None,
    }


# ------------------------------------------------------------------ apply

def parse_documents(text: str) -> list[dict]:
    """A JSON or YAML list of objects (or one object)."""
    import yaml
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValidationError(f"not JSON or YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(doc, dict):
        doc = doc.get("items", [doc]) if doc.get("kind") in (None, "List") else [doc]
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise ValidationError("expected a list of objects, each with a kind")
    return doc


def _service_from_doc(doc: dict) -> Service:
    """Accepts the stored/`show -j` shape; explicit backends may carry resolved fields (ip, node): ignored."""
    if doc.get("selector"):
        doc = {**doc, "backends": []}
    return Service.from_dict({**doc, "ports": [{k: v for k, v in p.items() if k != "id"} for p in doc.get("ports", [])]})


def _plan_node_ports(store: Store, wanted: dict[str, Service], existing: dict[str, Service],
                     pruned: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The NodePort claims an apply writes and releases: each node port of the file must be
    in the range, unused by another service and not a host port (ctl/state/forwards.py)."""
    lo, hi = parse_port_range(cluster.load_cluster_config(store).node_port_range)
    writes, keep, seen = [], set(), {}
    for svc in wanted.values():
        for p in svc.ports:
            if not p.node_port:
                continue
            key = _nodeport_key(p)
            if not isinstance(p.node_port, int) or not lo <= p.node_port <= hi:
                raise ValidationError(f"service {svc.name}: node port {p.node_port} is outside the NodePort "
                                      f"range {lo}-{hi}")
            owner = seen.get(key) or (kv.value if (kv := store.get(key)) else None)
            if owner not in (None, svc.name):
                raise ValidationError(f"service {svc.name}: node port {p.node_port}/{p.proto} is already used "
                                      f"by service {owner}")
            check_not_hostport(store, p.proto, p.node_port, svc.name)
            seen[key] = svc.name
            keep.add(key)
            if owner is None:
                writes.append((key, svc.name))
    releases = [_nodeport_key(p) for name, svc in existing.items() if name in wanted or name in pruned
                for p in svc.ports if p.node_port and _nodeport_key(p) not in keep]
    return writes, releases


def apply(store: Store, docs: list[dict], prune: bool = False) -> dict:
    """Validates every object, then writes all changes in one transaction (all or nothing).
    Returns counts: created, updated, unchanged, pruned."""
    wanted: dict[str, Service] = {}
    for i, doc in enumerate(docs):
        kind = doc.get("kind")
        if kind != "service":
            raise ValidationError(f"object {i + 1}: unsupported kind {kind!r} (supported: service, forward)")
        svc = _service_from_doc(doc)
        if svc.name in wanted:
            raise ValidationError(f"object {i + 1}: service {svc.name} appears twice")
        wanted[svc.name] = svc

    cidr = service_cidr(store)
    existing = {s.name: s for s in list_services(store)}
    pods = pods_by_name(store)
    vip_kvs, _ = store.list(VIPS_PREFIX)
    vip_owner = {kv.key[len(VIPS_PREFIX):]: kv.value for kv in vip_kvs}
    pruned = [n for n in existing if n not in wanted] if prune else []
    for name in pruned:
        vip_owner.pop(existing[name].vip, None)

    claimed: dict[str, str] = {}
    for svc in wanted.values():
        check_backends_exist(svc, pods)
        if svc.vip:
            check_vip(svc.vip, cidr)
            owner = claimed.get(svc.vip) or vip_owner.get(svc.vip)
            if owner not in (None, svc.name):
                raise ValidationError(f"service {svc.name}: VIP {svc.vip} is already used by service {owner}")
            claimed[svc.vip] = svc.name

    node_port_writes, node_port_deletes = _plan_node_ports(store, wanted, existing, pruned)

    free = free_vips(cidr, set(vip_owner) | set(claimed))
    changes: list[tuple[str, str]] = []
    deletes: list[str] = []
    created = updated = unchanged = 0
    needing_ids = []
    resolved: dict[str, Service] = {}
    for svc in wanted.values():
        prev = existing.get(svc.name)
        vip = svc.vip or (prev.vip if prev else None)
        if not vip:
            vip = next(free, None)
            if vip is None:
                raise AtomnetError(f"service CIDR {cidr} is exhausted: no free VIP left")
        resolved[svc.name] = replace(svc, vip=vip)
        old_ids = {(p.port, p.proto) for p in prev.ports} if prev else set()
        needing_ids.append(sum(1 for p in svc.ports if (p.port, p.proto) not in old_ids))
    fresh = iter(reserve_ids(store, sum(needing_ids))) if sum(needing_ids) else iter(())
    for svc, n in zip(resolved.values(), needing_ids):
        prev = existing.get(svc.name)
        final = with_ids(svc, prev, [next(fresh) for _ in range(n)])
        if prev is not None and final.to_json() == prev.to_json():
            unchanged += 1
            continue
        created, updated = (created + 1, updated) if prev is None else (created, updated + 1)
        changes.append((SERVICES_PREFIX + svc.name, final.to_json()))
        if prev is None or prev.vip != final.vip:
            changes.append((VIPS_PREFIX + final.vip, svc.name))
            if prev is not None:
                deletes.append(VIPS_PREFIX + prev.vip)
    for name in pruned:
        deletes += [SERVICES_PREFIX + name, VIPS_PREFIX + existing[name].vip]
    changes += node_port_writes
    deletes += node_port_deletes
    if changes or deletes:
        store.put_many(changes, deletes=deletes)
    log.info("applied", created=created, updated=updated, unchanged=unchanged, pruned=len(pruned))
    return {"created": created, "updated": updated, "unchanged": unchanged, "pruned": len(pruned)}
