"""Minimal IPv4 packet building and reading for `atomnet explain` (no scapy at run time:
it is a test dependency). Checksums are computed in full."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
PROTOS = {"tcp": 6, "udp": 17, "icmp": 1}
TCP_SYN, TCP_ACK, TCP_RST = 0x02, 0x10, 0x04


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def build(src_mac: str, dst_mac: str, src: str, dst: str, proto: str, sport: int, dport: int,
          payload: bytes = b"atomnet explain") -> bytes:
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    p = PROTOS[proto]
    if proto == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, TCP_SYN, 64240, 0, 0)
        payload = b""
    elif proto == "udp":
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    else:
        l4 = struct.pack("!BBHHH", 8, 0, 0, sport, 1)   # echo request, id = sport
    body = l4 + payload
    if proto in ("tcp", "udp"):
        pseudo = s + d + struct.pack("!BBH", 0, p, len(body))
        csum = checksum(pseudo + body)
        off = 16 if proto == "tcp" else 6
    else:
        csum, off = checksum(body), 2
    body = body[:off] + struct.pack("!H", csum) + body[off + 2:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0x4242, 0x4000, 64, p, 0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_IP) + ip + body


@dataclass
class Parsed:
    src_mac: str
    dst_mac: str
    ethertype: int
    src: str | None = None
    dst: str | None = None
    proto: int | None = None
    ttl: int | None = None
    sport: int | None = None
    dport: int | None = None
    tcp_flags: int | None = None
    icmp_type: int | None = None


def parse(frame: bytes) -> Parsed:
    fmt = lambda b: ":".join(f"{x:02x}" for x in b)   # noqa: E731
    out = Parsed(src_mac=fmt(frame[6:12]), dst_mac=fmt(frame[0:6]), ethertype=struct.unpack("!H", frame[12:14])[0])
    if out.ethertype != ETH_P_IP or len(frame) < 34:
        return out
    ihl = (frame[14] & 0x0F) * 4
    out.ttl, out.proto = frame[22], frame[23]
    out.src, out.dst = str(ipaddress.IPv4Address(frame[26:30])), str(ipaddress.IPv4Address(frame[30:34]))
    l4 = frame[14 + ihl:]
    if out.proto in (6, 17) and len(l4) >= 4:
        out.sport, out.dport = struct.unpack("!HH", l4[:4])
        if out.proto == 6 and len(l4) >= 14:
            out.tcp_flags = l4[13]
    elif out.proto == 1 and l4:
        out.icmp_type = l4[0]
    return out
