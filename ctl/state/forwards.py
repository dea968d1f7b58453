"""Forward records in the store (store-only). A (node, protocol, port) is claimed with its
own key, so it is forwarded at most once; validating a forward against the node's kernel
and choosing its port is ctl/node/forwards.py."""
from __future__ import annotations

import structlog

from . import validate
from .model import FORWARDS_PREFIX, HOSTPORTS_PREFIX, Forward, ValidationError, parse_port
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
