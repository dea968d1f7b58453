"""State store: open one by URL and use the Store contract from base.py.

    sqlite:///ABS/PATH   embedded single-file store (one host, or tests)
    etcd://HOST:PORT[,HOST:PORT...]   shared cluster store (etcd v3, see etcd.py)
"""

from __future__ import annotations

import importlib

from .base import KV, Compacted, Event, Store, StoreError

__all__ = ["KV", "Compacted", "EtcdStore", "Event", "SqliteStore", "Store", "StoreError", "open_store"]


# URL scheme -> (module, class); a new backend is one line here. A backend's module is
# imported when a store of its kind is opened: the etcd client (etcd3gw, requests, futurist)
# cost 0.1-0.3 s of every CLI start on a sqlite store.
_BACKENDS: dict[str, tuple[str, str]] = {
    "sqlite": (".sqlite", "SqliteStore"),
    "etcd": (".etcd", "EtcdStore"),
}


def _backend(scheme: str) -> type:
    module, cls = _BACKENDS[scheme]
    return getattr(importlib.import_module(module, __name__), cls)


def __getattr__(name: str):
    """EtcdStore and SqliteStore, imported on first use (PEP 562)."""
    for scheme, (_, cls) in _BACKENDS.items():
        if cls == name:
            return _backend(scheme)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str) -> Store:
    """Open the store at url; StoreError (one readable line) if it cannot be."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in _BACKENDS:
        raise StoreError(f"unknown store URL scheme in {url!r}: use sqlite:///PATH or etcd://HOST:PORT")
    return _backend(scheme)(url)
