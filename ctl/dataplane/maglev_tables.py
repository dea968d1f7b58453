"""The kernel's Maglev tables, one inner map per distinct backend set, shared by every
service port with that set and across reconcile passes (refcounted: a table lives while
some service port's slot in the outer `maglev` map points at it, and is forgotten, so the
kernel frees it, when the last one moves away).

A table is built in a new inner map (created BPF_F_MMAPABLE, filled through mmap by the
compiled populate loop: ctl/dataplane/native/maglev.c) and swapped in with one update of
the outer map: the program sees the old table or the new one, never a half-written one.
Swaps are batched: every map-in-map update makes the kernel wait for an RCU grace period,
a batch waits once.

Pinned outer maps made by an older generation whose inner template was not mmapable
reject mmapable tables (EINVAL): then tables are filled with a batch update instead.
"""
from __future__ import annotations

import ctypes as ct
import errno
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache

import structlog

from . import maglev
from .bpf import syscalls as sc
from .bpf.maps import Map
from .bpf.types import BackendAddr, U32
from .desired import MaglevSpec
from .native import lib

log = structlog.get_logger("atomnet.maglev")

Shape = tuple   # (table_size, sorted ((ip, port), ...)): what a table's content depends on

# ctypes calls release the GIL: tables are built on this many threads at once.
BUILD_THREADS = 2


@dataclass
class Table:
    map_id: int
    refs: int = 0


@cache
def _slot_keys(size: int):
    return (ct.c_uint32 * size)(*range(size))


@lru_cache(maxsize=1 << 16)
def _addr(ip: str, port: int) -> bytes:
    return BackendAddr.from_dict({"ip": ip, "port": port}).to_bytes()


def _packed(spec: MaglevSpec) -> bytes:
    return b"".join(_addr(ip, port) for ip, port in spec.backends)


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
        self.slots: dict[int, Shape] = {}    # service-port id -> the shape its outer slot points at
        self.mmapable = True
        self.built_total = 0

    @staticmethod
    def shape(spec: MaglevSpec) -> Shape:
        return (spec.table_size, spec.backends)

    def adopt(self, sid: int, spec: MaglevSpec) -> bool:
        """At start: a live slot whose service entry carries this spec's digest already holds
        this table (a restarted daemon keeps it instead of rebuilding). False if absent."""
        if self.slots.get(sid) == self.shape(spec):
            return True
        inner = ct.c_uint32()
        if not sc.lookup(self.outer.fd, U32(value=sid), inner):
            return False
        shape = self.shape(spec)
        table = self.tables.setdefault(shape, Table(inner.value))
        table.refs += 1
        self.slots[sid] = shape
        return True

    def live_ids(self) -> set[int]:
        return {k.value for k in self.outer.keys()}

    def set_many(self, specs: dict[int, MaglevSpec]) -> int:
        """Points each service port at the table of its spec, building the missing ones.
        Returns how many tables were built."""
        todo = {sid: spec for sid, spec in specs.items() if self.slots.get(sid) != self.shape(spec)}
        if not todo:
            return 0
        missing = {self.shape(s): s for s in todo.values() if self.shape(s) not in self.tables}
        fds: dict[Shape, int] = {}
        try:
            if missing:
                with ThreadPoolExecutor(BUILD_THREADS) as pool:
                    for shape, fd in zip(missing, pool.map(self._build, missing.values())):
                        fds[shape] = fd
            for shape, table in ((s, self.tables[s]) for s in {self.shape(x) for x in todo.values()} - set(fds)):
                try:
                    fds[shape] = sc.map_fd_by_id(table.map_id)
                except sc.BpfError:   # freed behind our back: build it again
                    del self.tables[shape]
                    fds[shape] = self._build(todo[next(i for i, s in todo.items() if self.shape(s) == shape)])
            sids = list(todo)
            keys = (ct.c_uint32 * len(sids))(*sids)
            values = (ct.c_uint32 * len(sids))(*(fds[self.shape(todo[sid])] for sid in sids))
            sc.update_batch(self.outer.fd, keys, values, len(sids))
            for shape, fd in fds.items():
                if shape not in self.tables:
                    self.tables[shape] = Table(sc.map_info(fd).id)
            for sid, spec in todo.items():
                self._unref(self.slots.get(sid))
                self.slots[sid] = self.shape(spec)
                self.tables[self.shape(spec)].refs += 1
        except sc.BpfError as exc:
            if exc.errno == errno.EINVAL and self.mmapable and missing:
                # An outer map pinned by an older generation: its inner template is not mmapable.
                log.warning("maglev_mmap_unsupported", note="outer map predates mmapable tables: batch-filling")
                self.mmapable = False
                for fd in fds.values():
                    sc.close(fd)
                fds = {}
                return self.set_many(specs)
            raise
        finally:
            for fd in fds.values():
                sc.close(fd)   # the outer map holds the references now
        self.built_total += len(missing)
        return len(missing)

    def remove_many(self, sids) -> int:
        """Drops service ports' slots; a table nobody points at any more is freed by the kernel.
        One batch: the kernel waits for an RCU grace period after every map-in-map update or
        delete syscall (maybe_wait_bpf_programs), so 2 000 single deletes took 32 s here."""
        sids = list(sids)
        removed = 0
        if sids:
            keys = (ct.c_uint32 * len(sids))(*sids)
            removed = sc.delete_batch(self.outer.fd, keys, len(sids))
            for sid in sids[removed:]:   # the kernel stops at the first absent key
                if self.outer.delete(U32(value=sid)):
                    removed += 1
        for sid in sids:
            self._unref(self.slots.pop(sid, None))
        return removed

    def _unref(self, shape: Shape | None) -> None:
        if shape is None:
            return
        table = self.tables.get(shape)
        if table is not None:
            table.refs -= 1
            if table.refs <= 0:
                del self.tables[shape]

    def _build(self, spec: MaglevSpec) -> int:
        flags = sc.BPF_F_INNER_MAP | (sc.BPF_F_MMAPABLE if self.mmapable else 0)
        esize = ct.sizeof(BackendAddr)
        inner = sc.create_map(sc.BPF_MAP_TYPE_ARRAY, "maglev_table", 4, esize, spec.table_size, flags)
        try:
            if not spec.backends:
                pass   # a fresh array is all zero: "no backend"
            elif self.mmapable:
                offsets, skips = maglev.preferences([f"{ip}:{port}" for ip, port in spec.backends], spec.table_size)
                rc = lib().maglev_fill(inner, len(spec.backends), offsets, skips, spec.table_size, _packed(spec), esize)
                if rc:
                    raise sc.BpfError("filling a maglev table", -rc)
            else:
                values = (BackendAddr * spec.table_size).from_buffer_copy(table_bytes(spec))
                sc.update_batch(inner, _slot_keys(spec.table_size), values, spec.table_size)
        except BaseException:
            sc.close(inner)
            raise
        return inner
