"""Host code compiled by `make build` (maglev.c -> _maglev.so), bound with ctypes once here."""
from __future__ import annotations

import ctypes as ct
from functools import cache
from pathlib import Path

from ...errors import AtomnetError

_SO = Path(__file__).with_name("_maglev.so")
_u64p = ct.POINTER(ct.c_uint64)


class Job(ct.Structure):
    """struct maglev_job (maglev.c): one table of a maglev_build_many call."""
    _fields_ = [("fd", ct.c_int32), ("n", ct.c_uint32), ("first", ct.c_uint32), ("m", ct.c_uint32),
                ("map_id", ct.c_uint32), ("err", ct.c_int32)]


@cache
def lib() -> ct.CDLL:
    try:
        so = ct.CDLL(str(_SO), use_errno=True)
    except OSError:
        raise AtomnetError(f"{_SO} is missing or unloadable: run `make build` (it compiles maglev.c)") from None
    so.maglev_populate.restype = ct.c_int
    so.maglev_populate.argtypes = [ct.c_uint32, _u64p, _u64p, ct.c_uint32, ct.POINTER(ct.c_int32)]
    so.maglev_fill.restype = ct.c_int
    so.maglev_fill.argtypes = [ct.c_int, ct.c_uint32, _u64p, _u64p, ct.c_uint32, ct.c_char_p, ct.c_uint32]
    so.maglev_build_many.restype = ct.c_int
    so.maglev_build_many.argtypes = [ct.POINTER(Job), ct.c_uint32, _u64p, _u64p, ct.c_char_p, ct.c_uint32,
                                     ct.c_uint32, ct.c_uint32]
    return so
