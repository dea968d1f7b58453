"""The kernel's Maglev tables, one inner map per distinct backend set, shared by every
service port with that set and across reconcile passes (refcounted).

Why a service entry names its table (service_info.table, the key of the outer `maglev` map)
instead of the outer map being keyed by service port: every update or delete of a map-in-map
from a syscall makes the kernel wait for an RCU grace period (maybe_wait_bpf_programs: ~10 ms
measured here, per syscall; a batch waits once). Keyed by service port, each change of a
service waited one. Now the outer map changes only when the pool of tables grows or
shrinks; a change writes a table's content (through mmap) into a table no service points at,
then points its service entries at it (a plain hash update: the program sees the old entry
or the new one, and so the old table or the new one, never a half-written one).

The pool: a table whose last user moved away cools for COOL_SECONDS (a program that read
the old service entry may still be reading it) and then is a spare; `refill()` (the
reconciler calls it after a pass's map writes, so no change waits for it) keeps
SPARES_LOW..SPARES_MAX spares of the default size in the outer map, adding them in one
batch and deleting the surplus (the kernel frees those) in one batch.

Pinned outer maps made by an older generation whose inner template was not mmapable
reject mmapable tables (EINVAL): then tables are filled with a batch update instead.
"""
from __future__ import annotations

import ctypes as ct
import errno
import threading
from array import array
import time
from collections import deque
from dataclasses import dataclass
from functools import cache, lru_cache

import structlog

from . import maglev
from .bpf import syscalls as sc
from .bpf.maps import Map
from .bpf.types import BackendAddr, U32
from .desired import MaglevSpec
from .native import Job, lib

log = structlog.get_logger("atomnet.maglev")

Shape = tuple   # (table_size, sorted ((ip, port), ...)): what a table's content depends on

# Tables are built by native threads (maglev_build_many): this many for a big batch.
BUILD_THREADS = 2
PARALLEL_FROM = 16          # fewer tables than this are built on the calling thread (a thread start costs more)
BUILD_CHUNK = 4096          # tables built and inserted per native call: fds held at once (RLIMIT_NOFILE)
COOL_SECONDS = 1.0          # an unused table is reused only after this (programs may still read it)
SPARES_LOW, SPARES_BATCH, SPARES_MAX = 16, 64, 256   # spare tables of the default size


@dataclass
class Table:
    key: int          # its key in the outer map (what service_info.table holds)
    map_id: int
    size: int
    refs: int = 0


@cache
def _slot_keys(size: int):
    return (ct.c_uint32 * size)(*range(size))


@lru_cache(maxsize=1 << 16)
def _addr(ip: str, port: int) -> bytes:
    return BackendAddr.from_dict({"ip": ip, "port": port}).to_bytes()


def _packed(spec: MaglevSpec) -> bytes:
    return b"".join(_addr(ip, port) for ip, port in spec.backends)


@lru_cache(maxsize=1 << 16)
def _preference(ip: str, port: int, size: int) -> tuple[int, int]:
    """maglev.permutation of one backend, cached by address: 10 000 tables share 20 pods."""
    return maglev.permutation(f"{ip}:{port}", size)


def _build_inputs(specs: list[MaglevSpec], jobs) -> tuple:
    """maglev_build_many's inputs: every table's backends back to back (offsets, skips, packed
    addresses); each job gets its table's size, backend count and first index."""
    offsets, skips, addrs = array("Q"), array("Q"), []
    for job, spec in zip(jobs, specs):
        job.n, job.first, job.m = len(spec.backends), len(offsets), spec.table_size
        for ip, port in spec.backends:
            off, skip = _preference(ip, port, spec.table_size)
            offsets.append(off)
            skips.append(skip)
        addrs.append(_packed(spec))
    if not offsets:   # every table empty: the C side reads nothing, but wants valid pointers
        offsets.append(0)
        skips.append(1)
    return ((ct.c_uint64 * len(offsets)).from_buffer(offsets), (ct.c_uint64 * len(skips)).from_buffer(skips),
            b"".join(addrs))


def table_bytes(spec: MaglevSpec) -> bytes:
    """The inner map's content, one struct backend_addr per slot (all zero when empty)."""
    esize = ct.sizeof(BackendAddr)
    if not spec.backends:
        return bytes(esize * spec.table_size)
    packed = _packed(spec)
    slots = maglev.fast_table([f"{ip}:{port}" for ip, port in spec.backends], spec.table_size)
    return b"".join(packed[i * esize:(i + 1) * esize] for i in slots)


class MaglevTables:
    def __init__(self, outer: Map):
        self.outer = outer
        self.tables: dict[Shape, Table] = {}
        self.slots: dict[int, Shape] = {}    # service-port id -> the shape of the table it uses
        self.spares: dict[int, list[Table]] = {}       # table size -> tables ready for reuse
        self.cooling: deque[tuple[float, Table]] = deque()   # (when it was released, table)
        self.keys_used: set[int] = self.live_ids()     # every outer key: ours, and an older generation's
        self.stale: set[int] = set()                   # outer keys nobody adopted (deleted by refill)
        self.next_key = 1
        self.mmapable = True
        self.built_total = 0

    @staticmethod
    def shape(spec: MaglevSpec) -> Shape:
        return (spec.table_size, spec.backends)

    def key_of(self, sid: int) -> int:
        """The outer key of a service port's table (service_info.table); 0 when it has none."""
        shape = self.slots.get(sid)
        return self.tables[shape].key if shape is not None else 0

    def adopt(self, sid: int, spec: MaglevSpec, key: int) -> bool:
        """At start: a live service entry that carries this spec's digest points at outer key
        `key`, which holds this table (a restarted daemon keeps it instead of rebuilding)."""
        shape = self.shape(spec)
        if self.slots.get(sid) == shape:
            return True
        table = self.tables.get(shape)
        if table is None:
            inner = ct.c_uint32()
            if not key or not sc.lookup(self.outer.fd, U32(value=key), inner):
                return False
            table = self.tables[shape] = Table(key, inner.value, spec.table_size)
        elif table.key != key:
            return False
        self.stale.discard(key)
        self._unref(self.slots.get(sid))
        table.refs += 1
        self.slots[sid] = shape
        return True

    def live_ids(self) -> set[int]:
        return {k.value for k in self.outer.keys()}

    def mark_stale(self, keys) -> None:
        """Outer keys in the kernel that no adopted table uses (an older generation's)."""
        self.stale.update(keys)

    def set_many(self, specs: dict[int, MaglevSpec]) -> int:
        """Points each service port at the table of its spec (key_of then says which),
        filling the missing ones: into spares where there are, else into new inner maps
        added to the outer map in one batch. Returns how many tables were filled."""
        return self.begin(specs)()

    def begin(self, specs: dict[int, MaglevSpec]):
        """set_many in two halves, so a big sync writes its other maps while the tables are
        built: many missing tables are built on a thread from now on (its native call releases
        the GIL); the returned function waits for them, then points the service ports at them
        and returns how many were filled (it raises what the build raised). Nothing else may
        use this object until it has been called."""
        todo = {sid: spec for sid, spec in specs.items() if self.slots.get(sid) != self.shape(spec)}
        if not todo:
            return lambda: 0
        self._cool()
        missing = {self.shape(s): s for s in todo.values() if self.shape(s) not in self.tables}
        if len(missing) < PARALLEL_FROM:
            if missing:
                self._fill_missing(missing)
            return lambda: self._point(todo, len(missing))
        failed: list[BaseException] = []

        def build() -> None:
            try:
                self._fill_missing(missing)
            except BaseException as exc:   # handed to the waiter
                failed.append(exc)

        thread = threading.Thread(target=build, name="maglev-build", daemon=True)
        thread.start()

        def wait() -> int:
            thread.join()
            if failed:
                raise failed[0]
            return self._point(todo, len(missing))
        return wait

    def _point(self, todo: dict[int, MaglevSpec], built: int) -> int:
        # Every new reference first, then the old ones dropped: in one batch a service port may
        # move onto the table another one moves off (unreferencing first would free it).
        for spec in todo.values():
            self.tables[self.shape(spec)].refs += 1
        for sid, spec in todo.items():
            self._unref(self.slots.get(sid))
            self.slots[sid] = self.shape(spec)
        self.built_total += built
        return built

    def remove_many(self, sids) -> int:
        """Service ports that no longer have a table: no kernel write (their service entries
        are gone); a table nobody uses any more starts cooling. Returns how many had one."""
        removed = 0
        for sid in sids:
            shape = self.slots.pop(sid, None)
            if shape is not None:
                removed += 1
                self._unref(shape)
        return removed

    def refill(self) -> None:
        """Off the change path (after a pass's writes): spares of the default size topped up
        to SPARES_LOW (+ a batch), surplus and stale keys deleted; one outer syscall each."""
        self._cool()
        size = maglev.TABLE_SIZE
        have = self.spares.setdefault(size, [])
        room = self.outer.info.max_entries - len(self.keys_used)
        if len(have) < SPARES_LOW and room > 0:
            fds = []
            try:
                for _ in range(min(SPARES_BATCH, room)):
                    fds.append(self._create(size))
                keys = self._insert(fds)
                have += [Table(k, sc.map_info(fd).id, size) for k, fd in zip(keys, fds)]
            finally:
                for fd in fds:
                    sc.close(fd)
        drop = sorted(self.stale)
        for tsize, spares in self.spares.items():
            keep = SPARES_MAX if tsize == size else 0
            while len(spares) > keep:
                drop.append(spares.pop().key)
        if drop:
            keys = (ct.c_uint32 * len(drop))(*drop)
            done = sc.delete_batch(self.outer.fd, keys, len(drop))
            for key in drop[done:]:   # the kernel stops at the first absent key
                self.outer.delete(U32(value=key))
            self.keys_used.difference_update(drop)
            self.stale.clear()

    # ---------------------------------------------------------------- internals
    def _unref(self, shape: Shape | None) -> None:
        if shape is None:
            return
        table = self.tables.get(shape)
        if table is not None:
            table.refs -= 1
            if table.refs <= 0:
                del self.tables[shape]
                self.cooling.append((time.monotonic(), table))

    def _cool(self) -> None:
        now = time.monotonic()
        while self.cooling and now - self.cooling[0][0] >= COOL_SECONDS:
            table = self.cooling.popleft()[1]
            table.refs = 0
            self.spares.setdefault(table.size, []).append(table)

    def _fill_missing(self, missing: dict[Shape, MaglevSpec]) -> None:
        """The missing tables, BUILD_CHUNK at a time: each holds an fd until the outer map has
        it, and 50 000 tables at once are more fds than a process may open (EMFILE)."""
        specs = list(missing.items())
        for start in range(0, len(specs), BUILD_CHUNK):
            self._fill_chunk(dict(specs[start:start + BUILD_CHUNK]))

    def _fill_chunk(self, missing: dict[Shape, MaglevSpec]) -> None:
        """Missing tables in one native call (maglev_build_many, on BUILD_THREADS threads of
        its own, the GIL released): spares are refilled, the rest created there; then the
        new ones go into the outer map in one batch (one RCU wait)."""
        if not self.mmapable:
            return self._fill_missing_batched(missing)
        specs = list(missing.values())
        jobs = (Job * len(specs))()
        spares: list[Table | None] = []
        try:
            for job, spec in zip(jobs, specs):
                spare = self._take_spare(spec.table_size)
                job.fd = -1
                if spare is not None:
                    try:
                        job.fd = sc.map_fd_by_id(spare.map_id)
                    except sc.BpfError:   # freed behind our back: forget it
                        self.keys_used.discard(spare.key)
                        spare = None
                spares.append(spare)
            offsets, skips, addrs = _build_inputs(specs, jobs)
            flags = sc.BPF_F_INNER_MAP | sc.BPF_F_MMAPABLE
            if lib().maglev_build_many(jobs, len(specs), offsets, skips, addrs, ct.sizeof(BackendAddr), flags,
                                       BUILD_THREADS if len(specs) >= PARALLEL_FROM else 1):
                err = next(job.err for job in jobs if job.err)
                for spare in spares:   # back to the pool: each is rewritten whole when next used
                    if spare is not None:
                        self.spares.setdefault(spare.size, []).append(spare)
                raise sc.BpfError("building maglev tables", -err)
            fresh = [k for k, spare in enumerate(spares) if spare is None]
            try:
                keys = self._insert([jobs[k].fd for k in fresh])
            except sc.BpfError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # An outer map pinned by an older generation: its inner template is not mmapable.
                log.warning("maglev_mmap_unsupported", note="outer map predates mmapable tables: batch-filling")
                self.mmapable = False
                self.spares = {}   # mmapable spares cannot be filled that way either: leave them
                return self._fill_missing_batched(missing)
            for k, key in zip(fresh, keys):
                self.tables[self.shape(specs[k])] = Table(key, jobs[k].map_id, specs[k].table_size)
            for spec, spare in zip(specs, spares):
                if spare is not None:
                    self.tables[self.shape(spec)] = spare
        finally:
            for job in jobs:
                if job.fd >= 0:
                    sc.close(job.fd)   # the outer map holds the references now

    def _fill_missing_batched(self, missing: dict[Shape, MaglevSpec]) -> None:
        """The fallback for an outer map whose tables cannot be mmapped: one batch update each."""
        jobs: list[tuple[MaglevSpec, int]] = []
        try:
            for spec in missing.values():
                jobs.append((spec, self._create(spec.table_size)))
                self._fill(jobs[-1][1], spec)
            keys = self._insert([fd for _, fd in jobs])
            for (spec, fd), key in zip(jobs, keys):
                self.tables[self.shape(spec)] = Table(key, sc.map_info(fd).id, spec.table_size)
        finally:
            for _, fd in jobs:
                sc.close(fd)

    def _take_spare(self, size: int) -> Table | None:
        spares = self.spares.get(size)
        return spares.pop() if spares else None

    def _insert(self, fds: list[int]) -> list[int]:
        """New inner maps into the outer map under fresh keys: one batch, one RCU wait."""
        if not fds:
            return []
        self._make_room(len(fds))
        keys = []
        while len(keys) < len(fds):
            if self.next_key not in self.keys_used:
                keys.append(self.next_key)
            self.next_key += 1
        sc.update_batch(self.outer.fd, (ct.c_uint32 * len(keys))(*keys), (ct.c_uint32 * len(fds))(*fds), len(keys))
        self.keys_used.update(keys)
        return keys

    def _make_room(self, count: int) -> None:
        """A full outer map (the daemon's --bpf-lb-maglev-map-max reached) is full of spares
        the refill put there, of the default size: spares this batch did not take give their
        keys to its new tables (one batch delete; the kernel frees them)."""
        short = count - (self.outer.info.max_entries - len(self.keys_used))
        drop: list[int] = []
        for spares in self.spares.values():
            while spares and len(drop) < short:
                drop.append(spares.pop().key)
        if drop:
            done = sc.delete_batch(self.outer.fd, (ct.c_uint32 * len(drop))(*drop), len(drop))
            for key in drop[done:]:
                self.outer.delete(U32(value=key))
            self.keys_used.difference_update(drop)
            log.debug("maglev_spares_dropped", count=len(drop), note="outer map full: room for new tables")

    def _create(self, size: int) -> int:
        flags = sc.BPF_F_INNER_MAP | (sc.BPF_F_MMAPABLE if self.mmapable else 0)
        return sc.create_map(sc.BPF_MAP_TYPE_ARRAY, "maglev_table", 4, ct.sizeof(BackendAddr), size, flags)

    def _fill(self, fd: int, spec: MaglevSpec) -> None:
        """Writes the whole table with one batch update (the non-mmapable fallback)."""
        values = (BackendAddr * spec.table_size).from_buffer_copy(table_bytes(spec))
        sc.update_batch(fd, _slot_keys(spec.table_size), values, spec.table_size)
