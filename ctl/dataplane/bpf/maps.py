"""Typed access to BPF maps: keys and values are the ctypes mirrors of types.h."""
from __future__ import annotations

import ctypes as ct
import errno
from functools import cache
from typing import Iterator

from . import syscalls as sc
from .types import MIRRORS, Mirror
from ...errors import AtomnetError


@cache
def possible_cpus() -> int:
    """Per-CPU maps hold one value per *possible* CPU (not online): /sys says how many."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def mirror(type_name: str, size: int) -> type[Mirror]:
    cls = MIRRORS.get(type_name)
    if cls is None:
        raise AtomnetError(f"no Python mirror for C type {type_name}: add it to ctl/dataplane/bpf/types.py")
    if ct.sizeof(cls) != size:
        raise AtomnetError(f"mirror {cls.__name__} is {ct.sizeof(cls)} bytes, the map says {size}")
    return cls


class Map:
    """An open map fd with its key/value mirrors. Per-CPU values come back as a list, one per CPU."""

    def __init__(self, fd: int, key_cls: type[Mirror], value_cls: type[Mirror], name: str | None = None):
        self.fd = fd
        self.info = sc.map_info(fd)
        self.name = name or self.info.name.decode()
        self.key_cls = key_cls
        self.value_cls = value_cls
        self.percpu = self.info.type in sc.PERCPU_MAP_TYPES

    @property
    def id(self) -> int:
        return self.info.id

    def _value_buffer(self):
        if self.percpu:
            # The kernel copies each CPU's value rounded up to 8 bytes.
            assert ct.sizeof(self.value_cls) % 8 == 0, "per-CPU values must be 8-byte multiples"
            return (self.value_cls * possible_cpus())()
        return self.value_cls()

    def get(self, key: Mirror):
        value = self._value_buffer()
        if not sc.lookup(self.fd, key, value):
            return None
        return list(value) if self.percpu else value

    def put(self, key: Mirror, value: Mirror) -> None:
        if self.percpu:
            values = (self.value_cls * possible_cpus())(*([value] * possible_cpus()))
            sc.update(self.fd, key, values)
        else:
            sc.update(self.fd, key, value)

    def delete(self, key: Mirror) -> bool:
        return sc.delete(self.fd, key)

    def keys(self) -> Iterator[Mirror]:
        cur = None
        while True:
            nxt = self.key_cls()
            if not sc.next_key(self.fd, cur, nxt):
                return
            yield nxt
            cur = nxt

    def items(self) -> Iterator[tuple[Mirror, object]]:
        for key in list(self.keys()):
            value = self.get(key)
            if value is not None:  # deleted between iteration and lookup
                yield key, value

    def put_many(self, pairs: list[tuple[Mirror, Mirror]]) -> None:
        """One BPF_MAP_UPDATE_BATCH syscall for many entries. A per-CPU map takes one value
        per possible CPU for each key: the same value is given to every CPU."""
        if not pairs:
            return
        keys = (self.key_cls * len(pairs))(*[k for k, _ in pairs])
        if self.percpu:
            cpus = possible_cpus()
            values = (self.value_cls * (len(pairs) * cpus))(*[v for _, v in pairs for _ in range(cpus)])
        else:
            values = (self.value_cls * len(pairs))(*[v for _, v in pairs])
        sc.update_batch(self.fd, keys, values, len(pairs))

    def put_packed(self, keys: bytes, values: bytes, count: int) -> None:
        """put_many with the keys and values already packed (Mirror.pack_many): one value
        per key; a per-CPU map gives it to every CPU."""
        if not count:
            return
        if self.percpu:
            cpus, vsize = possible_cpus(), ct.sizeof(self.value_cls)
            values = b"".join(values[i:i + vsize] * cpus for i in range(0, len(values), vsize)) \
                if any(values) else bytes(vsize * cpus * count)
        sc.update_batch(self.fd, ct.create_string_buffer(keys, len(keys)),
                        ct.create_string_buffer(values, len(values)), count)

    def close(self) -> None:
        sc.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def copy_entries(src: Map, dst: Map, only_missing: bool = False) -> int:
    """Copies every entry of src into dst (a map being replaced by one with another
    definition, e.g. more entries): raw values, so per-CPU maps keep each CPU's value and
    map-in-map entries keep pointing at the same inner maps. Entries that do not fit the
    new map are skipped. Returns how many were copied."""
    copied = 0
    flags = sc.BPF_NOEXIST if only_missing else sc.BPF_ANY
    in_map = src.info.type in sc.MAP_IN_MAP_TYPES
    for key in list(src.keys()):
        value = ct.c_uint32() if in_map else src._value_buffer()
        if not sc.lookup(src.fd, key, value):
            continue
        inner = sc.map_fd_by_id(value.value) if in_map else None
        try:
            sc.update(dst.fd, key, ct.c_uint32(inner) if in_map else value, flags)
            copied += 1
        except sc.BpfError as exc:
            if exc.errno not in (errno.EEXIST, errno.E2BIG, errno.ENOSPC):
                raise
        finally:
            if inner is not None:
                sc.close(inner)
    return copied
