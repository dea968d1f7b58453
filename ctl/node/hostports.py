"""What the node's kernel says about its ports: the ephemeral range, reserved ports, and
sockets bound by host processes (read from /proc of this network namespace)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .netlink import dump

TCP_LISTEN = "0A"


def ephemeral_range() -> tuple[int, int]:
    lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(lo), int(hi)


def reserved_ports() -> set[int]:
    text = Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text().strip()
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _hex_ip(h: str) -> str:
    return socket.inet_ntoa(bytes.fromhex(h)[::-1]) if len(h) == 8 else "::"


def bound_sockets(proto: str) -> list[tuple[str, int, int]]:
    """(local address, port, inode) of listening TCP or bound UDP sockets, IPv4 and IPv6."""
    out = []
    for table in (proto, proto + "6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            addr, port = fields[1].split(":")
            if proto == "tcp" and fields[3] != TCP_LISTEN:
                continue
            out.append((_hex_ip(addr), int(port, 16), int(fields[9])))
    return out


def owner(inode: int) -> str | None:
    """The process holding a socket, as 'name (pid N)', if /proc lets us see it."""
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                    return f"{name} (pid {pid})"
        except OSError:
            continue
    return None


def bound_by(proto: str, ip: str, port: int) -> tuple[bool, str | None]:
    """Whether a host socket holds (ip, port): a wildcard bind holds every address."""
    for addr, p, inode in bound_sockets(proto):
        if p == port and addr in (ip, "0.0.0.0", "::"):
            return True, owner(inode)
    return False, None


def node_addresses() -> set[str]:
    from .netplumb import ipr
    with ipr() as conn:
        return {a.get_attr("IFA_ADDRESS") for a in dump(lambda: list(conn.get_addr(family=2)))}
