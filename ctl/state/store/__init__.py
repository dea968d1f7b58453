"""State store: open one by URL and use the Store contract from base.py.

    sqlite:///ABS/PATH   embedded single-file store (one host, or tests)
    etcd://HOST:PORT[,HOST:PORT...]   shared cluster store (etcd v3, see etcd.py)
"""

from __future__ import annotations

from collections.abc import Callable

from .base import KV, Compacted, Event, Store, StoreError
from .etcd import EtcdStore
from .sqlite import SqliteStore

__all__ = ["KV", "Compacted", "EtcdStore", "Event", "SqliteStore", "Store", "StoreError", "open_store"]


# URL scheme -> opener; a new backend is one line here.
_BACKENDS: dict[str, Callable[[str], Store]] = {
    "sqlite": SqliteStore,
    "etcd": EtcdStore,
}


def open_store(url: str) -> Store:
    """Open the store at url; StoreError (one readable line) if it cannot be."""
    scheme, sep, _ = url.partition("://")
    opener = _BACKENDS.get(scheme) if sep else None
    if opener is None:
        raise StoreError(f"unknown store URL scheme in {url!r}: use sqlite:///PATH or etcd://HOST:PORT")
    return opener(url)
