"""Forward records in the store (store-only). A (node, protocol, port) is claimed with its
own key, so it is forwarded at most once; validating a forward against the node's kernel
and choosing its port is ctl/node/forwards.py."""
from __future__ import annotations

import structlog

from . import validate
from .model import FORWARDS_PREFIX, HOSTPORTS_PREFIX, NODEPORTS_PREFIX, Forward, ValidationError, parse_port
from .store import Store

log = structlog.get_logger("atomnet.forwards")


def parse_target(text: str) -> tuple[str, int]:
    pod, sep, port = text.rpartition(":")
    if not sep or not pod:
        raise ValidationError(f"invalid target {text!r}: use POD:PORT")
    return pod, parse_port(port, "pod port")


def list_forwards(store: Store, node: str | None = None) -> list[Forward]:
    kvs, _ = store.list(FORWARDS_PREFIX)
    out = [f for f in (validate.screen("forward", kv.key, kv.value, validate.forward) for kv in kvs) if f is not None]
    return [f for f in out if node is None or f.node == node]


def claim_key(node: str, proto: str, port: int) -> str:
    return f"{HOSTPORTS_PREFIX}{node}/{proto}/{port}"


# A NodePort is served on every node's address, a host port on one node's: the same
# (node IP, port, protocol) would be one key in the `services` map, and the later write
# would silently replace the other. So a port is a NodePort or a host port, never both.
# Both sides claim their own key first and then look for the other's (claim, then check):
# of two racing adds at least one sees the other and backs off, so both never succeed.

def nodeport_owner(store: Store, proto: str, port: int) -> str | None:
    """The service whose NodePort this is, or None."""
    kv = store.get(f"{NODEPORTS_PREFIX}{proto}/{port}")
    return kv.value if kv else None


def hostport_users(store: Store, proto: str, port: int) -> list[str]:
    """Forwards (ids) publishing this port as a host port, on any node."""
    kvs, _ = store.list(HOSTPORTS_PREFIX)
    return sorted(kv.value for kv in kvs if kv.key.endswith(f"/{proto}/{port}"))


def check_not_nodeport(store: Store, proto: str, port: int) -> None:
    owner = nodeport_owner(store, proto, port)
    if owner is not None:
        raise ValidationError(f"host port {port}/{proto} is the NodePort of service {owner}: "
                              "a port is a host port or a NodePort, not both")


def check_not_hostport(store: Store, proto: str, port: int, service: str) -> None:
    users = hostport_users(store, proto, port)
    if users:
        raise ValidationError(f"service {service}: node port {port}/{proto} is a host port already "
                              f"(forward {', '.join(users)}): a port is a host port or a NodePort, not both")


def delete_forward(store: Store, forward: str) -> Forward | None:
    kv = store.get(FORWARDS_PREFIX + forward)
    if kv is None:
        return None
    fwd = validate.screen("forward", kv.key, kv.value, validate.forward)
    if fwd is None:   # an invalid record was never programmed: removing its key is the whole fix
        store.delete(kv.key)
        log.info("forward_deleted", id=forward, invalid=True)
        return None
    store.put_many([], deletes=[FORWARDS_PREFIX + fwd.id, claim_key(fwd.node, fwd.proto, fwd.host_port)])
    log.info("forward_deleted", id=fwd.id)
    return fwd
