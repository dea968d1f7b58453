"""State store: open one by URL and use the Store contract from base.py.

    sqlite:///ABS/PATH   embedded single-file store (one host, or tests)
    etcd://HOST:PORT     shared cluster store (not built yet)
"""

from __future__ import annotations

from collections.abc import Callable

from .base import KV, Compacted, Event, Store, StoreError
from .sqlite import SqliteStore

__all__ = ["KV", "Compacted", "Event", "SqliteStore", "Store", "StoreError", "open_store"]


def _etcd_not_built(url: str) -> Store:
    raise StoreError("etcd store support is not built yet: use sqlite:///PATH")


# URL scheme -> opener; a new backend is one line here.
_BACKENDS: dict[str, Callable[[str], Store]] = {
    "sqlite": SqliteStore,
    "etcd": _etcd_not_built,
}


def open_store(url: str) -> Store:
    """Open the store at url; StoreError (one readable line) if it cannot be."""
    scheme, sep, _ = url.partition("://")
    opener = _BACKENDS.get(scheme) if sep else None
    if opener is None:
        raise StoreError(f"unknown store URL scheme in {url!r}: use sqlite:///PATH or etcd://HOST:PORT")
    return opener(url)
