"""ctypes mirrors of bpf/include/types.h: the one Python copy of the binary contract.

tests/unit/test_types_contract.py compares every class here with the DWARF of the
built objects (size, member offsets and sizes, and which members are big-endian).
Each struct declares how its members read for people (`_format_`): an IPv4
address, a MAC, a big-endian port; everything else is a host-order integer.
"""
from __future__ import annotations

import ctypes as ct
import enum
import ipaddress
import socket


class CounterId(enum.IntEnum):
    """enum counter_id: appended, never renumbered."""
    CTR_FWD_LOCAL = 0
    CTR_PASS_STACK = 1
    CTR_DROP_SPOOFED = 2
    CTR_DROP_MALFORMED = 3
    CTR_DROP_UNSUPPORTED_L3 = 4
    CTR_MAX = 5


IPV4, MAC, BE16 = "ipv4", "mac", "be16"


class Mirror(ct.Structure):
    """A struct of types.h. `_format_` maps member -> IPV4 | MAC | BE16 (big-endian members)."""
    _format_: dict[str, str] = {}

    def to_dict(self) -> dict:
        return {name: _decode(getattr(self, name), self._format_.get(name))
                for name, _ in self._fields_ if not name.startswith("pad")}

    @classmethod
    def from_dict(cls, d: dict) -> "Mirror":
        obj = cls()
        for name, ctype in cls._fields_:
            if name in d:
                setattr(obj, name, _encode(d[name], cls._format_.get(name), ctype))
        return obj


def _decode(value, fmt):
    if fmt == IPV4:
        return socket.inet_ntoa(int(value).to_bytes(4, "little"))
    if fmt == MAC:
        return ":".join(f"{b:02x}" for b in bytes(value))
    if fmt == BE16:
        return socket.ntohs(value)
    if isinstance(value, ct.Array):
        return list(value)
    return value


def _encode(value, fmt, ctype):
    if fmt == IPV4:
        # The member holds network order; ctypes reads it as a little-endian u32.
        return int.from_bytes(ipaddress.IPv4Address(value).packed, "little")
    if fmt == MAC:
        return ctype.from_buffer_copy(bytes.fromhex(value.replace(":", "")))
    if fmt == BE16:
        return socket.htons(value)
    return value


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


class EndpointKey(Mirror):
    _fields_ = [("ip", ct.c_uint32)]
    _format_ = {"ip": IPV4}


class EndpointInfo(Mirror):
    _fields_ = [("ifindex", ct.c_uint32), ("mac", ct.c_uint8 * 6), ("node_mac", ct.c_uint8 * 6)]
    _format_ = {"mac": MAC, "node_mac": MAC}


class Counter(Mirror):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class U32(Mirror):
    """A bare __u32 key (array index)."""
    _fields_ = [("value", ct.c_uint32)]


# C type name (as the DWARF of a map's key/value names it) -> mirror class.
MIRRORS: dict[str, type[Mirror]] = {
    "endpoint_key": EndpointKey,
    "endpoint_info": EndpointInfo,
    "counter": Counter,
    "__u32": U32,
}

# C enum name -> mirror enum, checked against the DWARF too.
ENUMS: dict[str, type[enum.IntEnum]] = {"counter_id": CounterId}
