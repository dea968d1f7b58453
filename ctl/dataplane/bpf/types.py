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
import struct
from functools import lru_cache
from itertools import repeat


class CounterId(enum.IntEnum):
    """enum counter_id: appended, never renumbered."""
    CTR_FWD_LOCAL = 0
    CTR_PASS_STACK = 1
    CTR_DROP_SPOOFED = 2
    CTR_DROP_MALFORMED = 3
    CTR_DROP_UNSUPPORTED_L3 = 4
    CTR_LB_NEW_FLOW = 5
    CTR_LB_REJECT = 6
    CTR_REV_NAT = 7
    CTR_ICMP_ERROR_NAT = 8
    CTR_DROP_FRAGMENT = 9
    CTR_DROP_NAT_FAILED = 10
    CTR_FWD_OVERLAY = 11
    CTR_FROM_OVERLAY = 12
    CTR_DROP_NO_TUNNEL = 13
    CTR_SNAT_NEW = 14
    CTR_SNAT_REV = 15
    CTR_SNAT_ICMP_ERROR = 16
    CTR_SNAT_PORT_EXHAUSTED = 17
    CTR_DNS_FAST_ANSWER = 18
    CTR_DNS_FAST_PASS = 19
    CTR_DROP_TUPLE_CLASH = 20
    CTR_MAX = 21


class CtDir(enum.IntEnum):
    """enum ct_dir"""
    CT_FORWARD = 0
    CT_REPLY = 1
    CT_SNAT_OUT = 2
    CT_SNAT_IN = 3


CT_F_CLOSING, CT_F_HAIRPIN, CT_F_SEEN_REPLY, CT_F_SNAT, CT_F_HOST = 1, 2, 4, 8, 16
CT_F_FIN_OUT, CT_F_FIN_IN, CT_F_RST = 32, 64, 128   # CT_SNAT_IN: how the masqueraded connection ended
CFG_F_DEBUG_EVENTS = 1
CFG_F_MASQUERADE = 2


class SnatExcludeKind(enum.IntEnum):
    """enum snat_exclude_kind: why a destination keeps the pod's address"""
    EXCL_CLUSTER = 1
    EXCL_SERVICES = 2
    EXCL_NODE = 3
    EXCL_USER = 4


class EventType(enum.IntEnum):
    """enum event_type"""
    EV_DROP = 1
    EV_TRANSLATE = 2


IPV4, MAC, BE16, DNSNAME = "ipv4", "mac", "be16", "dnsname"
DNS_NAME_KEY_LEN = 128   # types.h DNS_NAME_KEY_LEN
DNS_MSG_MAX = 176        # types.h DNS_MSG_MAX


class Mirror(ct.Structure):
    """A struct of types.h. `_format_` maps member -> IPV4 | MAC | BE16 (big-endian members)."""
    _format_: dict[str, str] = {}

    def to_dict(self) -> dict:
        return {name: _decode(getattr(self, name), self._format_.get(name))
                for name, _ in self._fields_ if not name.startswith("pad")}

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def pack_many(cls, items) -> bytes:
        """Many entries given as field dicts, or as frozen ((field, value), ...) tuples (the
        desired state's keys), packed back to back: the buffer of a batch syscall. Equal to
        joining from_dict(...).to_bytes() (tests/unit/test_types_pack.py), ~5x cheaper: one
        precompiled struct per mirror instead of a ctypes object and a setattr per member."""
        pack = _packer(cls)
        if pack is None:
            return b"".join(cls.from_dict(dict(i)).to_bytes() for i in items)
        items = items if isinstance(items, list) else list(items)
        columns = _columns(cls, items)
        if columns is not None:
            return b"".join(map(_layout(cls)[0].pack, *columns))
        return b"".join(pack(i if isinstance(i, dict) else dict(i)) for i in items)

    @classmethod
    def from_dict(cls, d: dict) -> "Mirror":
        obj = cls()
        for name, ctype in cls._fields_:
            if name in d:
                setattr(obj, name, _encode(d[name], cls._format_.get(name), ctype))
        return obj


def _decode(value, fmt):
    if isinstance(value, Mirror):
        return value.to_dict()
    if fmt == IPV4:
        return socket.inet_ntoa(int(value).to_bytes(4, "little"))
    if fmt == MAC:
        return ":".join(f"{b:02x}" for b in bytes(value))
    if fmt == BE16:
        return socket.ntohs(value)
    if fmt == DNSNAME:
        return dns_name_text(bytes(value))
    if isinstance(value, ct.Array):
        return list(value)
    return value


def _encode(value, fmt, ctype):
    if isinstance(value, dict) and issubclass(ctype, Mirror):
        return ctype.from_dict(value)
    if fmt == IPV4:
        return _ipv4_member(value)
    if fmt == MAC:
        return ctype.from_buffer_copy(bytes.fromhex(value.replace(":", "")))
    if fmt == BE16:
        return socket.htons(value)
    if fmt == DNSNAME:
        return ctype.from_buffer_copy(dns_name_wire(value).ljust(ct.sizeof(ctype), b"\0"))
    return value


def dns_name_wire(name: str) -> bytes:
    """A name as struct dns_name_key holds it: wire format, lower-case, the root's 0 byte included."""
    labels = [lbl for lbl in name.lower().rstrip(".").split(".") if lbl] if name.strip(".") else []
    if any(len(lbl) > 63 for lbl in labels):
        raise ValueError(f"label longer than 63 bytes in {name!r}")
    wire = b"".join(bytes([len(lbl)]) + lbl.encode("ascii") for lbl in labels) + b"\0"
    if len(wire) > DNS_NAME_KEY_LEN:
        raise ValueError(f"{name!r} is {len(wire)} bytes in wire format, the fast path's key holds {DNS_NAME_KEY_LEN}")
    return wire


def dns_name_text(wire: bytes) -> str:
    labels, i = [], 0
    while i < len(wire) and wire[i]:
        labels.append(wire[i + 1:i + 1 + wire[i]].decode("ascii", "replace"))
        i += 1 + wire[i]
    return ".".join(labels) + "."


_STRUCT_CODES = {ct.c_uint8: "B", ct.c_uint16: "H", ct.c_uint32: "I", ct.c_uint64: "Q",
                 ct.c_int8: "b", ct.c_int16: "h", ct.c_int32: "i", ct.c_int64: "q"}


def _columns(cls, items: list):
    """A big batch of frozen tuples that all name the same fields (the desired state's keys
    and values: (field, value) pairs sorted by field): the struct's members as columns of
    converted values, for one struct.pack per row through map() (no dict and no Python frame
    per row: 100 000 backend keys in ~0.1 s instead of ~0.6 s). None when the items differ in
    shape or are dicts: the row-by-row path handles those."""
    if len(items) < 64 or not isinstance(items[0], tuple) or _layout(cls) is None:
        return None
    first = items[0]
    width = len(first)
    if any(map(width.__ne__, map(len, items))):
        return None
    where = {name: k for k, (name, _) in enumerate(first)}
    for k, (name, _) in enumerate(first):   # every item has each field at the same position
        if [t[k][0] for t in items].count(name) != len(items):
            return None
    _, convs, codes = _layout(cls)
    columns = []   # (fields the struct does not have are ignored, as the row path does)
    for (name, conv), code in zip(convs, codes):
        if name not in where:
            columns.append(repeat(b"" if code.endswith("s") else 0, len(items)))
            continue
        k = where[name]
        values = [t[k][1] for t in items]
        columns.append(list(map(conv, values)) if conv else values)
    return columns


@lru_cache(maxsize=None)
def _packer(cls):
    """dict -> the struct's bytes, or None for a mirror with members this cannot express
    (nested structs, arrays other than a MAC): those take the from_dict path."""
    layout = _layout(cls)
    if layout is None:
        return None
    st, convs, codes = layout

    def pack(d: dict) -> bytes:
        return st.pack(*[(conv(d[name]) if conv else d[name]) if name in d else (b"" if code.endswith("s") else 0)
                         for (name, conv), code in zip(convs, codes)])
    return pack


@lru_cache(maxsize=None)
def _layout(cls):
    """(struct.Struct, [(member, converter or None)], [struct code]) of a mirror, or None."""
    codes, convs = [], []
    for name, ctype in cls._fields_:
        fmt = cls._format_.get(name)
        if fmt == MAC:
            codes.append(f"{ct.sizeof(ctype)}s")
            convs.append((name, lambda v: _mac_member(v) if v else b""))
        elif ctype in _STRUCT_CODES:
            codes.append(_STRUCT_CODES[ctype])
            convs.append((name, _ipv4_member if fmt == IPV4 else socket.htons if fmt == BE16 else None))
        else:
            return None
    st = struct.Struct("=" + "".join(codes))
    if st.size != ct.sizeof(cls) or any(getattr(cls, n).offset != o for (n, _), o in
                                        zip(cls._fields_, _offsets(codes))):
        return None   # alignment padding this format does not reproduce: the slow path is exact
    return st, convs, codes


def _offsets(codes: list[str]) -> list[int]:
    out, off = [], 0
    for code in codes:
        out.append(off)
        off += struct.calcsize("=" + code)
    return out


@lru_cache(maxsize=1 << 12)
def _mac_member(value: str) -> bytes:
    return bytes.fromhex(value.replace(":", ""))


@lru_cache(maxsize=1 << 16)
def _ipv4_member(value) -> int:
    """The member holds network order; ctypes reads it as a little-endian u32. Cached: a
    control plane writes the same few thousand addresses (pods, VIPs) again and again, and
    ipaddress's strict parse is most of the cost of a map entry (10 000 services: 1.9 s)."""
    return int.from_bytes(ipaddress.IPv4Address(value).packed, "little")


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


class Config(Mirror):
    _fields_ = [("service_net", ct.c_uint32), ("service_mask", ct.c_uint32), ("flags", ct.c_uint32),
                ("overlay_ifindex", ct.c_uint32), ("vni", ct.c_uint32), ("vtep_mac", ct.c_uint8 * 6),
                ("pad", ct.c_uint16), ("snat_ip", ct.c_uint32), ("masq_ip", ct.c_uint32),
                ("snat_port_min", ct.c_uint16), ("snat_port_max", ct.c_uint16)]
    _format_ = {"service_net": IPV4, "service_mask": IPV4, "vtep_mac": MAC, "snat_ip": IPV4, "masq_ip": IPV4}


class TunnelKey(Mirror):
    _fields_ = [("prefixlen", ct.c_uint32), ("ip", ct.c_uint32)]
    _format_ = {"ip": IPV4}


class TunnelInfo(Mirror):
    _fields_ = [("node_ip", ct.c_uint32), ("vtep_mac", ct.c_uint8 * 6), ("pad", ct.c_uint16)]
    _format_ = {"node_ip": IPV4, "vtep_mac": MAC}


class SnatExcludeKey(Mirror):
    _fields_ = [("prefixlen", ct.c_uint32), ("ip", ct.c_uint32)]
    _format_ = {"ip": IPV4}


class SnatExcludeValue(Mirror):
    _fields_ = [("kind", ct.c_uint32)]


class ServiceKey(Mirror):
    _fields_ = [("vip", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]
    _format_ = {"vip": IPV4, "port": BE16}


class ServiceInfo(Mirror):
    _fields_ = [("id", ct.c_uint32), ("backend_count", ct.c_uint32), ("table_size", ct.c_uint32),
                ("affinity_timeout", ct.c_uint32), ("digest", ct.c_uint32), ("table", ct.c_uint32)]


class BackendAddr(Mirror):
    _fields_ = [("ip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]
    _format_ = {"ip": IPV4, "port": BE16}


class BackendKey(Mirror):
    _fields_ = [("service_id", ct.c_uint32), ("ip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]
    _format_ = {"ip": IPV4, "port": BE16}


class CtKey(Mirror):
    _fields_ = [("saddr", ct.c_uint32), ("daddr", ct.c_uint32), ("sport", ct.c_uint16), ("dport", ct.c_uint16),
                ("proto", ct.c_uint8), ("dir", ct.c_uint8), ("pad", ct.c_uint16)]
    _format_ = {"saddr": IPV4, "daddr": IPV4, "sport": BE16, "dport": BE16}


class CtEntry(Mirror):
    _fields_ = [("created_ns", ct.c_uint64), ("last_seen_ns", ct.c_uint64), ("nat_ip", ct.c_uint32),
                ("nat_port", ct.c_uint16), ("flags", ct.c_uint8), ("pad", ct.c_uint8), ("snat_ip", ct.c_uint32),
                ("service_id", ct.c_uint32), ("packets", ct.c_uint64), ("bytes", ct.c_uint64)]
    _format_ = {"nat_ip": IPV4, "nat_port": BE16, "snat_ip": IPV4}


class AffinityKey(Mirror):
    _fields_ = [("client", ct.c_uint32), ("service_id", ct.c_uint32)]
    _format_ = {"client": IPV4}


class AffinityValue(Mirror):
    _fields_ = [("last_used_ns", ct.c_uint64), ("backend", BackendAddr)]


class FragKey(Mirror):
    _fields_ = [("saddr", ct.c_uint32), ("daddr", ct.c_uint32), ("id", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8)]
    _format_ = {"saddr": IPV4, "daddr": IPV4, "id": BE16}


class FragPorts(Mirror):
    _fields_ = [("sport", ct.c_uint16), ("dport", ct.c_uint16)]
    _format_ = {"sport": BE16, "dport": BE16}


class Event(Mirror):
    _fields_ = [("ts_ns", ct.c_uint64), ("ifindex", ct.c_uint32), ("type", ct.c_uint8), ("reason", ct.c_uint8),
                ("proto", ct.c_uint8), ("pad", ct.c_uint8), ("saddr", ct.c_uint32), ("daddr", ct.c_uint32),
                ("sport", ct.c_uint16), ("dport", ct.c_uint16), ("nat_ip", ct.c_uint32), ("nat_port", ct.c_uint16),
                ("pad2", ct.c_uint16), ("len", ct.c_uint32), ("service_id", ct.c_uint32)]
    _format_ = {"saddr": IPV4, "daddr": IPV4, "sport": BE16, "dport": BE16, "nat_ip": IPV4, "nat_port": BE16}


class DnsNameKey(Mirror):
    _fields_ = [("name", ct.c_uint8 * DNS_NAME_KEY_LEN)]
    _format_ = {"name": DNSNAME}


class DnsNameValue(Mirror):
    _fields_ = [("ip", ct.c_uint32), ("ttl", ct.c_uint32)]
    _format_ = {"ip": IPV4}


class DnsConfig(Mirror):
    _fields_ = [("vip", ct.c_uint32), ("flags", ct.c_uint32)]
    _format_ = {"vip": IPV4}


class DnsScratch(Mirror):
    _fields_ = [("key", DnsNameKey), ("msg", ct.c_uint8 * DNS_MSG_MAX), ("namelen", ct.c_uint32),
                ("pad", ct.c_uint32)]


class U32(Mirror):
    """A bare __u32 key (array index)."""
    _fields_ = [("value", ct.c_uint32)]


# C type name (as the DWARF of a map's key/value names it) -> mirror class.
MIRRORS: dict[str, type[Mirror]] = {
    "endpoint_key": EndpointKey,
    "endpoint_info": EndpointInfo,
    "counter": Counter,
    "config": Config,
    "service_key": ServiceKey,
    "service_info": ServiceInfo,
    "backend_addr": BackendAddr,
    "backend_key": BackendKey,
    "ct_key": CtKey,
    "ct_entry": CtEntry,
    "affinity_key": AffinityKey,
    "affinity_value": AffinityValue,
    "frag_key": FragKey,
    "frag_ports": FragPorts,
    "tunnel_key": TunnelKey,
    "tunnel_info": TunnelInfo,
    "snat_exclude_key": SnatExcludeKey,
    "snat_exclude_value": SnatExcludeValue,
    "event": Event,
    "dns_name_key": DnsNameKey,
    "dns_name_value": DnsNameValue,
    "dns_config": DnsConfig,
    "dns_scratch": DnsScratch,
    "__u32": U32,
}

# C enum name -> mirror enum, checked against the DWARF too.
# (enum snat_exclude_kind is only written by the daemon, never named by a program: no DWARF to check.)
ENUMS: dict[str, type[enum.IntEnum]] = {"counter_id": CounterId, "ct_dir": CtDir, "event_type": EventType}
