"""Loads atomnet's compiled objects into the kernel against maps pinned under one bpffs root.

Layout under the root (default /sys/fs/bpf/atomnet):
    maps/NAME    every map with LIBBPF_PIN_BY_NAME (shared by all programs and daemon generations)
    progs/NAME   the programs currently attached (inspection, explain, next generation)

A pinned map is reused when its definition (type, sizes, entries, flags) matches the
object's; otherwise a fresh map is created and pinned only by commit(), after the
caller has filled it and attached the programs that use it, so traffic never meets
an empty map.
"""
from __future__ import annotations

import ctypes as ct
import ctypes.util
import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from . import syscalls as sc
from .elf import BpfObject, MapDef, patch_map_fds
from .maps import Map, copy_entries, mirror, possible_cpus
from ...defaults import DEFAULT_BPFFS
from ...errors import AtomnetError

log = structlog.get_logger("atomnet.loader")

BPF_FS_MAGIC = 0xCAFE4A11
OBJECT_NAMES = ("from_pod", "from_overlay", "to_overlay", "from_netdev", "to_netdev")  # bpf/NAME.c, one per attach point


def objects_dir() -> Path:
    return Path(os.environ.get("ATOMNET_BPF_OBJECTS", Path(__file__).parent / "objects"))


def object_path(name: str) -> Path:
    return objects_dir() / f"{name}.o"


def map_catalog() -> dict[str, MapDef]:
    """Every map any built object defines, by name (the definitions are shared via maps.h).
    Cached per set of object files (path, size, mtime): reading the DWARF of every object
    costs about 0.2 s each, and a metrics scrape asks several times."""
    files = tuple((str(p), st.st_size, st.st_mtime_ns) for p in map(object_path, OBJECT_NAMES)
                  for st in (p.stat(),))
    return dict(_catalog_of(files))


@functools.lru_cache(maxsize=4)
def _catalog_of(files: tuple) -> dict[str, MapDef]:
    out: dict[str, MapDef] = {}
    for path, _, _ in files:
        obj = BpfObject(Path(path))
        out.update(obj.maps)
        obj.close()
    return out


def _fs_type(path: str) -> int:
    class Statfs(ct.Structure):
        _fields_ = [("f_type", ct.c_long), ("rest", ct.c_byte * 112)]
    libc = ct.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = Statfs()
    if libc.statfs(path.encode(), ct.byref(buf)) != 0:
        raise AtomnetError(f"statfs {path}: {os.strerror(ct.get_errno())}")
    return buf.f_type & 0xFFFFFFFF


def ensure_bpffs(root: str) -> None:
    """Mounts a bpffs where the root needs one (like `mount -t bpf bpf /sys/fs/bpf`), then creates the root."""
    probe = Path(root)
    while not probe.exists():
        probe = probe.parent
    if _fs_type(str(probe)) != BPF_FS_MAGIC:
        target = "/sys/fs/bpf" if root.startswith("/sys/fs/bpf/") else root
        Path(target).mkdir(parents=True, exist_ok=True)
        libc = ct.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.mount(b"bpf", target.encode(), b"bpf", 0, b"mode=0700") != 0:
            raise AtomnetError(f"cannot mount bpffs at {target}: {os.strerror(ct.get_errno())}")
        log.info("bpffs_mounted", path=target)
    for sub in ("maps", "progs"):
        Path(root, sub).mkdir(parents=True, exist_ok=True)


def effective_max_entries(d: MapDef) -> int:
    """libbpf's rule: a perf event array declared with 0 entries gets one per possible CPU."""
    if d.type == sc.BPF_MAP_TYPE_PERF_EVENT_ARRAY and d.max_entries == 0:
        return possible_cpus()
    return d.max_entries


def create_map(d: MapDef) -> int:
    """Creates a map from its definition; a map-in-map gets a throwaway inner template."""
    inner_fd = create_map(d.inner) if d.inner else None
    try:
        return sc.create_map(d.type, d.name, d.key_size, d.value_size, effective_max_entries(d), d.flags,
                             inner_map_fd=inner_fd)
    finally:
        if inner_fd is not None:
            sc.close(inner_fd)


def load_program(obj: BpfObject, name: str, map_fds: dict[str, int]) -> int:
    """Loads one program of an object against the given map fds (by map name)."""
    prog = obj.programs[name]
    return sc.load_program(sc.BPF_PROG_TYPE_SCHED_CLS, prog.name, patch_map_fds(prog, map_fds), obj.license)


def definition_matches(info: sc.BpfMapInfo, d: MapDef) -> bool:
    return (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags) == (
        d.type, d.key_size, d.value_size, effective_max_entries(d), d.flags)


def open_map(path: Path, d: MapDef) -> Map:
    fd = sc.obj_get(str(path))
    return Map(fd, mirror(d.key_type, d.key_size), mirror(d.value_type, d.value_size), d.name)


@dataclass
class Loaded:
    maps: dict[str, Map] = field(default_factory=dict)
    programs: dict[str, int] = field(default_factory=dict)   # name -> prog fd
    unpinned: list[str] = field(default_factory=list)          # maps created anew, pinned by commit()
    migrating: dict[str, Map] = field(default_factory=dict)    # name -> the pinned map being replaced


class Loader:
    def __init__(self, root: str = DEFAULT_BPFFS, sizes: dict[str, int] | None = None):
        """sizes: max_entries by map name where the node's configuration differs from the
        objects' (ctl/dataplane/mapsizes.py), as libbpf's bpf_map__set_max_entries before load."""
        self.root = Path(root)
        self.sizes = dict(sizes or {})

    def map_pin(self, name: str) -> Path:
        return self.root / "maps" / name

    def prog_pin(self, name: str) -> Path:
        return self.root / "progs" / name

    def ensure_maps(self, defs: dict[str, MapDef], loaded: Loaded) -> None:
        for d in defs.values():
            if d.name in loaded.maps:
                continue
            if d.name in self.sizes:
                d = replace(d, max_entries=self.sizes[d.name])
            pin = self.map_pin(d.name)
            if d.pinned and pin.exists():
                m = open_map(pin, d)
                if definition_matches(m.info, d):
                    loaded.maps[d.name] = m
                    log.debug("map_reused", map=d.name, id=m.id)
                    continue
                log.warning("map_definition_changed", map=d.name, pinned_id=m.id,
                            pinned_max_entries=m.info.max_entries, wanted_max_entries=effective_max_entries(d))
                if (m.info.type, m.info.key_size, m.info.value_size) == (d.type, d.key_size, d.value_size):
                    loaded.migrating[d.name] = m   # same entries, other size or flags: carried over
                else:
                    m.close()                      # another layout: the daemon refills what it owns
            fd = create_map(d)
            loaded.maps[d.name] = Map(fd, mirror(d.key_type, d.key_size), mirror(d.value_type, d.value_size), d.name)
            if d.pinned:
                loaded.unpinned.append(d.name)
            log.info("map_created", map=d.name, id=loaded.maps[d.name].id, max_entries=effective_max_entries(d))
            if d.name in loaded.migrating:
                copied = copy_entries(loaded.migrating[d.name], loaded.maps[d.name])
                log.info("map_migrated", map=d.name, entries=copied, from_id=loaded.migrating[d.name].id,
                         to_id=loaded.maps[d.name].id)

    def load(self, names=OBJECT_NAMES) -> Loaded:
        """Opens or creates every map, then loads every program against them (not attached, not pinned)."""
        loaded = Loaded()
        try:
            for name in names:
                obj = BpfObject(object_path(name))
                self.ensure_maps(obj.maps, loaded)
                fds = {m: loaded.maps[m].fd for m in obj.maps}
                for prog in obj.programs.values():
                    loaded.programs[prog.name] = load_program(obj, prog.name, fds)
                    log.info("program_loaded", program=prog.name, id=sc.prog_info(loaded.programs[prog.name]).id)
                obj.close()
        except Exception:
            close_loaded(loaded)
            raise
        return loaded

    def commit(self, loaded: Loaded) -> None:
        """After the programs are attached: pin new maps (replacing stale pins) and the programs.
        A migrated map the programs add entries to (conntrack, affinity, fragments: the LRU
        maps) first takes what the old programs added since the first copy (they kept running
        until the attach), without overwriting what the new ones wrote. The daemon's own maps
        do not: the old programs add nothing to them, and what the first sync deleted there
        (a service gone while the daemon was down, a service left out of a map too small)
        would come back behind the daemon's caches."""
        for name, old in loaded.migrating.items():
            if old.info.type == sc.BPF_MAP_TYPE_LRU_HASH:
                late = copy_entries(old, loaded.maps[name], only_missing=True)
                log.info("map_migration_finished", map=name, late_entries=late)
            else:
                log.info("map_migration_finished", map=name, late_entries=0)
            old.close()
        loaded.migrating.clear()
        for name in loaded.unpinned:
            _replace_pin(self.map_pin(name), loaded.maps[name].fd)
        loaded.unpinned.clear()
        for name, fd in loaded.programs.items():
            _replace_pin(self.prog_pin(name), fd)

    def pinned_program(self, name: str) -> int:
        pin = self.prog_pin(name)
        if not pin.exists():
            raise AtomnetError(f"program {name} is not pinned under {self.root}: is the daemon running?")
        return sc.obj_get(str(pin))


def _replace_pin(path: Path, fd: int) -> None:
    # A pin cannot be overwritten; unlinking first leaves a moment with no pin, which is
    # harmless: attached programs and open fds hold the objects, not the pins.
    path.unlink(missing_ok=True)
    sc.obj_pin(fd, str(path))


def close_loaded(loaded: Loaded) -> None:
    for m in [*loaded.maps.values(), *loaded.migrating.values()]:
        m.close()
    for fd in loaded.programs.values():
        sc.close(fd)
