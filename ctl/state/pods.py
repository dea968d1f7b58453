"""Pod records in the store (store-only: the plumbing of a pod on its node is ctl/node/pods.py)."""
from __future__ import annotations

from . import validate
from ..errors import AtomnetError
from .model import PODS_PREFIX, Pod
from .store import Store


def get_pod(store: Store, name: str) -> Pod | None:
    """The pod, or None if absent or invalid (logged and counted by ctl/state/validate.py)."""
    kv = store.get(PODS_PREFIX + name)
    return validate.screen("pod", kv.key, kv.value, validate.pod) if kv else None


def list_pods(store: Store, node: str | None = None) -> list[Pod]:
    from .cluster import load_network
    try:
        network = load_network(store)
    except AtomnetError:
        network = None   # before `network init`: addresses are checked for shape only
    kvs, _ = store.list(PODS_PREFIX)
    pods = [p for p in (validate.screen("pod", kv.key, kv.value, validate.pod, network) for kv in kvs)
            if p is not None]
    return [p for p in pods if node is None or p.node == node]
