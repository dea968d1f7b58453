"""The BPF syscalls atomnet uses, through bcc's libbcc (and the libbpf it links).

bcc's Python module declares only part of what libbcc exports; every function
atomnet calls is declared here, once, with its argtypes and restype. Nothing else
in atomnet talks to libbcc directly.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os

from ...errors import AtomnetError

try:
    from bcc import libbcc as _libbcc
except ImportError as exc:  # bcc is not on PyPI: it ships with the OS
    raise AtomnetError(
        "bcc's Python bindings are missing: apt-get install python3-bpfcc "
        "(and make the virtualenv with --system-site-packages)"
    ) from exc

lib = _libbcc.lib

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_F_NO_PREALLOC = 1
BPF_F_INNER_MAP = 1 << 12
BPF_F_MMAPABLE = 1 << 10
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_LRU_HASH = 9
MAP_IN_MAP_TYPES = {12, 13}  # array_of_maps, hash_of_maps
BPF_OBJ_NAME_LEN = 16

MAP_TYPES = {
    1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
    6: "percpu_array", 9: "lru_hash", 10: "lru_percpu_hash", 11: "lpm_trie", 12: "array_of_maps",
    13: "hash_of_maps", 27: "ringbuf",
}
PROG_TYPES = {3: "sched_cls", 4: "sched_act", 6: "xdp"}
PERCPU_MAP_TYPES = {5, 6, 10}


class BpfInsn(ct.Structure):
    _fields_ = [("code", ct.c_uint8), ("regs", ct.c_uint8), ("off", ct.c_int16), ("imm", ct.c_int32)]


class BpfProgInfo(ct.Structure):
    """struct bpf_prog_info, up to run_cnt (the kernel accepts a shorter info_len)."""
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64), ("name", ct.c_char * BPF_OBJ_NAME_LEN), ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32), ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32), ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32), ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64),
    ]


class BpfMapInfo(ct.Structure):
    """struct bpf_map_info, up to btf_value_type_id."""
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
        ("name", ct.c_char * BPF_OBJ_NAME_LEN), ("ifindex", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32), ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64), ("btf_id", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
    ]


class BpfTestRunOpts(ct.Structure):
    """libbpf's struct bpf_test_run_opts (sz first: libbpf checks it)."""
    _fields_ = [
        ("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
        ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
    ]


class BpfMapCreateOpts(ct.Structure):
    """libbpf's struct bpf_map_create_opts."""
    _fields_ = [
        ("sz", ct.c_size_t), ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32), ("map_flags", ct.c_uint32), ("map_extra", ct.c_uint64),
        ("numa_node", ct.c_uint32), ("map_ifindex", ct.c_uint32),
    ]


class BpfMapBatchOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


def _declare(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


_u32p = ct.POINTER(ct.c_uint32)
# libbpf's bpf_map_create (through libbcc) rather than bcc_create_map: only it takes the
# inner map template that map-in-map (the per-service Maglev tables) needs.
_create_map = _declare("bpf_map_create", ct.c_int, ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32,
                       ct.POINTER(BpfMapCreateOpts))
_prog_load = _declare("bcc_prog_load", ct.c_int, ct.c_int, ct.c_char_p, ct.c_void_p, ct.c_int,
                      ct.c_char_p, ct.c_uint, ct.c_int, ct.c_char_p, ct.c_uint)
_obj_pin = _declare("bpf_obj_pin", ct.c_int, ct.c_int, ct.c_char_p)
_obj_get = _declare("bpf_obj_get", ct.c_int, ct.c_char_p)
_get_info = _declare("bpf_obj_get_info_by_fd", ct.c_int, ct.c_int, ct.c_void_p, _u32p)
_prog_next_id = _declare("bpf_prog_get_next_id", ct.c_int, ct.c_uint32, _u32p)
_map_next_id = _declare("bpf_map_get_next_id", ct.c_int, ct.c_uint32, _u32p)
_prog_fd_by_id = _declare("bpf_prog_get_fd_by_id", ct.c_int, ct.c_uint32)
_map_fd_by_id = _declare("bpf_map_get_fd_by_id", ct.c_int, ct.c_uint32)
_test_run = _declare("bpf_prog_test_run_opts", ct.c_int, ct.c_int, ct.POINTER(BpfTestRunOpts))
_update_batch = _declare("bpf_map_update_batch", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p,
                         _u32p, ct.POINTER(BpfMapBatchOpts))
_delete_batch = _declare("bpf_map_delete_batch", ct.c_int, ct.c_int, ct.c_void_p, _u32p,
                         ct.POINTER(BpfMapBatchOpts))
_lookup_batch = _declare("bpf_map_lookup_batch", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                         ct.c_void_p, _u32p, ct.POINTER(BpfMapBatchOpts))
_lookup = _declare("bpf_lookup_elem", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p)
_update = _declare("bpf_update_elem", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_ulonglong)
_delete = _declare("bpf_delete_elem", ct.c_int, ct.c_int, ct.c_void_p)
_next_key = _declare("bpf_get_next_key", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p)


class BpfError(AtomnetError):
    def __init__(self, what: str, err: int, detail: str = ""):
        self.errno = err
        msg = f"{what}: {os.strerror(err)}"
        super().__init__(f"{msg}\n{detail}" if detail else msg)


def _check(rc: int, what: str) -> int:
    """libbcc/libbpf return -1 with errno set, or (newer libbpf) -errno."""
    if rc < 0:
        err = ct.get_errno() or (-rc if rc < -1 else 0) or errno.EINVAL
        raise BpfError(what, err)
    return rc


def create_map(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int,
               inner_map_fd: int | None = None) -> int:
    opts = BpfMapCreateOpts(sz=ct.sizeof(BpfMapCreateOpts), map_flags=flags,
                            inner_map_fd=inner_map_fd if inner_map_fd is not None else 0)
    ct.set_errno(0)
    return _check(_create_map(map_type, name.encode()[:15], key_size, value_size, max_entries, ct.byref(opts)),
                  f"creating map {name}")


def load_program(prog_type: int, name: str, insns: bytes, license: str) -> int:
    """Loads a program; on rejection the error carries the verifier log's tail."""
    buf = ct.create_string_buffer(len(insns))
    ct.memmove(buf, insns, len(insns))
    log_size = 1 << 22
    log = ct.create_string_buffer(log_size)
    ct.set_errno(0)
    # Log level 0: the verifier formatting a level-1 log of every instruction it walks was most
    # of a load's time (to_netdev 0.16 s -> 0.01 s). On a rejection bcc loads again at level 1
    # into this buffer (and prints that log on stderr), so the error still carries its tail.
    fd = _prog_load(prog_type, name.encode()[:15], buf, len(insns), license.encode(), 0, 0, log, log_size)
    if fd < 0:
        err = ct.get_errno() or errno.EINVAL
        lines = log.value.decode(errors="replace").strip().splitlines()
        tail = "\n".join(lines[-25:])
        raise BpfError(f"verifier rejected program {name}", err, tail)
    return fd


def obj_pin(fd: int, path: str) -> None:
    ct.set_errno(0)
    _check(_obj_pin(fd, path.encode()), f"pinning {path}")


def obj_get(path: str) -> int:
    ct.set_errno(0)
    return _check(_obj_get(path.encode()), f"opening pinned object {path}")


def _obj_info(fd: int, info, what: str):
    size = ct.c_uint32(ct.sizeof(info))
    ct.set_errno(0)
    _check(_get_info(fd, ct.byref(info), ct.byref(size)), f"reading {what} info")
    return info


def prog_info(fd: int) -> BpfProgInfo:
    return _obj_info(fd, BpfProgInfo(), "program")


def map_info(fd: int) -> BpfMapInfo:
    return _obj_info(fd, BpfMapInfo(), "map")


def prog_map_ids(fd: int) -> list[int]:
    n = prog_info(fd).nr_map_ids
    ids = (ct.c_uint32 * max(n, 1))()
    info = BpfProgInfo(nr_map_ids=n, map_ids=ct.addressof(ids))
    size = ct.c_uint32(ct.sizeof(info))
    _check(_get_info(fd, ct.byref(info), ct.byref(size)), "reading program map ids")
    return list(ids[:n])


def _ids(next_fn) -> list[int]:
    out, cur, nxt = [], 0, ct.c_uint32()
    while next_fn(cur, ct.byref(nxt)) == 0:
        out.append(nxt.value)
        cur = nxt.value
    return out


def prog_ids() -> list[int]:
    return _ids(_prog_next_id)


def map_ids() -> list[int]:
    return _ids(_map_next_id)


def prog_fd_by_id(prog_id: int) -> int:
    ct.set_errno(0)
    return _check(_prog_fd_by_id(prog_id), f"opening program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    ct.set_errno(0)
    return _check(_map_fd_by_id(map_id), f"opening map id {map_id}")


def lookup(fd: int, key, value) -> bool:
    ct.set_errno(0)
    if _lookup(fd, ct.byref(key), ct.byref(value)) == 0:
        return True
    if ct.get_errno() == errno.ENOENT:
        return False
    raise BpfError("map lookup", ct.get_errno())


def update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    ct.set_errno(0)
    _check(_update(fd, ct.byref(key), ct.byref(value), flags), "map update")


def delete(fd: int, key) -> bool:
    ct.set_errno(0)
    if _delete(fd, ct.byref(key)) == 0:
        return True
    if ct.get_errno() == errno.ENOENT:
        return False
    raise BpfError("map delete", ct.get_errno())


def next_key(fd: int, key, next_out) -> bool:
    """key None starts the iteration; False at the end."""
    ct.set_errno(0)
    if _next_key(fd, ct.byref(key) if key is not None else None, ct.byref(next_out)) == 0:
        return True
    if ct.get_errno() == errno.ENOENT:
        return False
    raise BpfError("map iteration", ct.get_errno())


def update_batch(fd: int, keys, values, count: int) -> None:
    """keys/values: ctypes arrays of count elements, updated in one syscall."""
    n = ct.c_uint32(count)
    opts = BpfMapBatchOpts(sz=ct.sizeof(BpfMapBatchOpts))
    ct.set_errno(0)
    _check(_update_batch(fd, ct.byref(keys), ct.byref(values), ct.byref(n), ct.byref(opts)), "batch map update")


def lookup_batch(fd: int, key_size: int, value_size: int, max_count: int, chunk: int = 4096) -> tuple[bytes, bytes, int]:
    """Every entry of a hash map in a few syscalls (BPF_MAP_LOOKUP_BATCH): (packed keys,
    packed values, count). value_size is per key (per-CPU maps: per CPU size * CPUs)."""
    keys_out, values_out, total = bytearray(), bytearray(), 0
    token_in, token_out = ct.create_string_buffer(max(key_size, 8)), ct.create_string_buffer(max(key_size, 8))
    keys = ct.create_string_buffer(key_size * chunk)
    values = ct.create_string_buffer(value_size * chunk)
    first = True
    while total < max_count + chunk:
        n = ct.c_uint32(chunk)
        opts = BpfMapBatchOpts(sz=ct.sizeof(BpfMapBatchOpts))
        ct.set_errno(0)
        rc = _lookup_batch(fd, None if first else token_in, token_out, keys, values, ct.byref(n), ct.byref(opts))
        err = ct.get_errno() or (-rc if rc < -1 else 0)
        if rc < 0 and err != errno.ENOENT:
            _check(rc, "batch map lookup")
        keys_out += keys.raw[:n.value * key_size]
        values_out += values.raw[:n.value * value_size]
        total += n.value
        if rc < 0:   # ENOENT: that was the last batch
            break
        ct.memmove(token_in, token_out, len(token_out.raw))
        first = False
    return bytes(keys_out), bytes(values_out), total


def delete_batch(fd: int, keys, count: int) -> int:
    """keys: a ctypes array of count keys, deleted in one syscall. Returns how many were
    deleted (the kernel stops at the first absent key: the caller deletes only keys it wrote)."""
    n = ct.c_uint32(count)
    opts = BpfMapBatchOpts(sz=ct.sizeof(BpfMapBatchOpts))
    ct.set_errno(0)
    rc = _delete_batch(fd, ct.byref(keys), ct.byref(n), ct.byref(opts))
    if rc < 0 and (ct.get_errno() or -rc) != errno.ENOENT:
        _check(rc, "batch map delete")
    return n.value


def test_run(prog_fd: int, packet: bytes, ctx: bytes | None = None, repeat: int = 1) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: returns (program return value, packet after the program, duration ns).
    ctx is a struct __sk_buff image (e.g. to set ingress_ifindex); the kernel rejects
    non-zero fields it does not allow."""
    data_in = ct.create_string_buffer(packet, len(packet))
    out_size = len(packet) + 256
    data_out = ct.create_string_buffer(out_size)
    opts = BpfTestRunOpts(sz=ct.sizeof(BpfTestRunOpts), data_in=ct.addressof(data_in),
                          data_out=ct.addressof(data_out), data_size_in=len(packet),
                          data_size_out=out_size, repeat=repeat)
    if ctx is not None:
        ctx_in = ct.create_string_buffer(ctx, len(ctx))
        opts.ctx_in, opts.ctx_size_in = ct.addressof(ctx_in), len(ctx)
    ct.set_errno(0)
    _check(_test_run(prog_fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, data_out.raw[: opts.data_size_out], opts.duration


# Perf buffers: bcc's own reader (libbcc's declarations in bcc.libbcc are used as they are).
RAW_CB = _libbcc._RAW_CB_TYPE
LOST_CB = _libbcc._LOST_CB_TYPE


def open_perf_buffer(raw_cb, lost_cb, cpu: int, page_cnt: int = 64) -> int:
    """A perf ring for one CPU; returns bcc's reader pointer (its fd goes into the events map)."""
    reader = lib.bpf_open_perf_buffer(raw_cb, lost_cb, None, -1, cpu, page_cnt)
    if not reader:
        raise BpfError(f"opening a perf buffer on CPU {cpu}", ct.get_errno() or errno.EINVAL)
    return reader


def perf_reader_fd(reader: int) -> int:
    return lib.perf_reader_fd(reader)


def perf_poll(readers: list[int], timeout_ms: int) -> int:
    arr = (ct.c_void_p * len(readers))(*readers)
    return lib.perf_reader_poll(len(readers), arr, timeout_ms)


def perf_free(reader: int) -> None:
    lib.perf_reader_free(reader)


def close(fd: int) -> None:
    os.close(fd)
