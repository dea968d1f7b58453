"""A cache of one kernel map (Calico felix's bpf/cachingmap): the kernel's content is read
once at start; after that only pending changes are written (batch syscalls), and the cache
says what the kernel holds without reading it. A drift check (rare) re-reads the kernel and
repairs what differs from the cache, logging and counting each repair.

Keys and values are the frozen dicts of ctl/dataplane/desired.py. A key-only map (per-CPU
counters owned by the programs) is only given keys: an existing key is never overwritten.
"""
from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field

import structlog

from .bpf import syscalls as sc
from .bpf.maps import Map
from .desired import Frozen, freeze

log = structlog.get_logger("atomnet.reconcile")

# Changes listed one event each up to this many per map and flush; beyond it one summary
# event (10 000 services would otherwise log 100 000 lines).
LOG_EACH_LIMIT = 50
# Batch writes go in chunks: a per-CPU hash without preallocation takes each new element's
# per-CPU memory from pages the kernel populates in the background, and a batch of 100 000
# new keys outruns it (ENOMEM, seen on 6.18 from ~100k keys in one batch, and with chunks
# of 8 192 written back to back under load); a chunk that hits it is retried once the
# kernel has had a moment to populate more. (The backends map, the one such map, is now
# preallocated, bpf/include/maps.h; the retry stays for any map defined without it.)
CHUNK = 4096
ENOMEM_RETRIES = 15   # 1 ms doubling: ~65 s in all (the kernel's populating work runs late under load)


def put_chunked(m: Map, items: list) -> None:
    """items: (frozen key, frozen value) pairs, packed chunk by chunk (Mirror.pack_many)."""
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        keys = m.key_cls.pack_many([k for k, _ in chunk])
        values = m.value_cls.pack_many([v for _, v in chunk])
        for attempt in range(ENOMEM_RETRIES + 1):
            try:
                m.put_packed(keys, values, len(chunk))
                break
            except sc.BpfError as exc:
                if exc.errno != errno.ENOMEM or attempt == ENOMEM_RETRIES:
                    raise
                log.debug("map_write_enomem_retry", map=m.name, attempt=attempt + 1)
                time.sleep(0.001 * 2 ** attempt)   # backoff for a kernel resource


def log_changes(name: str, event: str, items, describe, level: str = "info") -> None:
    """One event per item (describe(item) -> its fields) up to LOG_EACH_LIMIT, then one
    summary: only the logged items are described (a dict per entry of 100 000 is not free)."""
    items = items if isinstance(items, (list, tuple)) else list(items)
    emit = getattr(log, level)
    for item in items[:LOG_EACH_LIMIT]:
        emit(event, map=name, **describe(item))
    if len(items) > LOG_EACH_LIMIT:
        emit(event + "_more", map=name, count=len(items) - LOG_EACH_LIMIT)


@dataclass
class Flushed:
    upserts: dict[Frozen, Frozen] = field(default_factory=dict)
    deletes: list[Frozen] = field(default_factory=list)

    def __len__(self):
        return len(self.upserts) + len(self.deletes)


class MapCache:
    def __init__(self, m: Map, name: str, keys_only: bool = False):
        self.map = m
        self.name = name
        self.keys_only = keys_only
        self.cache: dict[Frozen, Frozen] = self.read_kernel()
        self.version = 0   # bumped by every write: what is derived from the cache knows it is stale

    def read_kernel(self) -> dict[Frozen, Frozen]:
        if self.keys_only:
            return {freeze(k.to_dict()): () for k in self.map.keys()}
        return {freeze(k.to_dict()): freeze(v.to_dict()) for k, v in self.map.items()}

    def __len__(self):
        return len(self.cache)

    def get(self, key: Frozen):
        return self.cache.get(key)

    def upsert(self, items: dict[Frozen, Frozen]) -> Flushed:
        """Writes the entries whose cached value differs (all in one batch syscall)."""
        out = Flushed({k: v for k, v in items.items() if self.cache.get(k) != v})
        if out.upserts:
            m = self.map
            put_chunked(m, list(out.upserts.items()))
            self.cache.update(out.upserts)
            self.version += 1
            log_changes(self.name, "map_upsert", list(out.upserts.items()),
                        lambda kv: {"key": dict(kv[0]), "value": dict(kv[1])} if kv[1] else {"key": dict(kv[0])})
        return out

    def delete(self, keys) -> Flushed:
        out = Flushed(deletes=[k for k in keys if k in self.cache])
        if out.deletes:
            m = self.map
            batch = (m.key_cls * len(out.deletes)).from_buffer_copy(m.key_cls.pack_many(out.deletes))
            done = sc.delete_batch(m.fd, batch, len(out.deletes))
            for k in batch[done:]:   # the kernel stopped at a key that was already gone
                m.delete(k)
            for k in out.deletes:
                del self.cache[k]
            self.version += 1
            log_changes(self.name, "map_delete", out.deletes, lambda k: {"key": dict(k)})
        return out

    def drift_check(self) -> int:
        """Re-reads the kernel; every entry that differs from the cache is written back (and
        every entry the cache does not have is removed). Returns the number of repairs."""
        live = self.read_kernel()
        wrong = {k: v for k, v in self.cache.items() if k not in live or (not self.keys_only and live[k] != v)}
        extra = [k for k in live if k not in self.cache]
        if wrong:
            m = self.map
            put_chunked(m, list(wrong.items()))
        for k in extra:
            self.map.delete(self.map.key_cls.from_dict(dict(k)))
        # bounded like every change log: a map the kernel refuses wholesale repairs every entry
        log_changes(self.name, "drift_repaired", list(wrong.items()) + [(k, None) for k in extra],
                    lambda kv: {"key": dict(kv[0]), "kernel": dict(live[kv[0]]) if live.get(kv[0]) else None,
                                "value": dict(kv[1]) if kv[1] else None}, level="warning")
        return len(wrong) + len(extra)
