"""The masquerade port range of this node: ports the programs may give to pod flows
leaving the cluster, chosen so that they never meet the node's own connections.

The node's kernel picks source ports for its own connections from
net.ipv4.ip_local_port_range (per network namespace), and NodePorts come from the
cluster's range. The masquerade range is the stretch above the ephemeral range when it
holds at least PREFERRED_SPAN ports (on a default node: 61000-65535, 4536 ports per
destination), since servers of the node itself listen below it; else the largest stretch
of 1024-65535 outside both. Host-port forwards inside
it are skipped by the programs port by port (they look up the services map).
"""
from __future__ import annotations

from pathlib import Path

MIN_PORT, MAX_PORT = 1024, 65535
MIN_SPAN = 256   # fewer ports than this towards one destination is no masquerade worth running
PREFERRED_SPAN = 1024


def ephemeral_range(proc: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    lo, hi = proc.read_text().split()
    return int(lo), int(hi)


def masquerade_port_range(ephemeral: tuple[int, int], node_ports: tuple[int, int]) -> tuple[int, int] | None:
    """See the module docstring. None: no room."""
    taken = sorted([ephemeral, node_ports])
    gaps, start = [], MIN_PORT
    for lo, hi in taken:
        if lo > start:
            gaps.append((start, lo - 1))
        start = max(start, hi + 1)
    if start <= MAX_PORT:
        gaps.append((start, MAX_PORT))
    above = [g for g in gaps if g[0] > ephemeral[1] and g[1] - g[0] + 1 >= PREFERRED_SPAN]
    if above:
        return above[0]
    gaps = [g for g in gaps if g[1] - g[0] + 1 >= MIN_SPAN]
    return max(gaps, key=lambda g: g[1] - g[0]) if gaps else None
