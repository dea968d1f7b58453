"""Pod records in the store (store-only: the plumbing of a pod on its node is ctl/node/pods.py)."""
from __future__ import annotations

from .model import PODS_PREFIX, Pod
from .store import Store


def get_pod(store: Store, name: str) -> Pod | None:
    kv = store.get(PODS_PREFIX + name)
    return Pod.from_json(kv.value) if kv else None


def list_pods(store: Store, node: str | None = None) -> list[Pod]:
    kvs, _ = store.list(PODS_PREFIX)
    pods = [Pod.from_json(kv.value) for kv in kvs]
    return [p for p in pods if node is None or p.node == node]
