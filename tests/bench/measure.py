"""One run of each load tool, inside a client namespace, as a Sample.

- throughput: iperf3, one TCP stream, -J; the value is the receiver's Gbit/s after the
  omitted warm-up (-O), retransmits kept as extra.
- latency: sockperf ping-pong over TCP, 64-byte messages; the value is the median
  (p50) of the per-message half round trip in microseconds, p99 and mean kept as extra.
  Chosen over qperf because it reports the distribution of every message (percentiles),
  not only a mean, which on a noisy 2-CPU machine is dragged by a few scheduler hiccups;
  and it runs one persistent TCP connection, so the figure is the path, not the handshake.
- new connections/s: tests/bench/crr.py (RST close, several processes); a run with any
  SYN retransmission or failed connection is flagged, never counted.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from .harness import Sample

CRR = Path(__file__).with_name("crr.py")


def _run(netns: str, *cmd, timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", "netns", "exec", netns, *map(str, cmd)], capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} in {netns} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-1500:]}")
    return res


def iperf3(client_ns: str, host: str, port: int, seconds: int, omit: int) -> Sample:
    args = ["iperf3", "-c", host, "-p", port, "-t", seconds, "-J"] + (["-O", omit] if omit else [])
    res = _run(client_ns, *args, timeout=seconds + omit + 30)
    end = json.loads(res.stdout)["end"]
    gbps = end["sum_received"]["bits_per_second"] / 1e9
    return Sample(gbps, extra={"retransmits": end["sum_sent"].get("retransmits", 0)})


_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_AVG = re.compile(r"avg-latency=([\d.]+)")


def sockperf(client_ns: str, host: str, port: int, seconds: float) -> Sample:
    res = _run(client_ns, "sockperf", "ping-pong", "--tcp", "-i", host, "-p", port, "-t", seconds, "-m", 64,
               timeout=seconds + 30)
    text = res.stdout + res.stderr
    pct = {float(k): float(v) for k, v in _PCT.findall(text)}
    avg = _AVG.search(text)
    if 50.0 not in pct:
        raise RuntimeError(f"sockperf printed no percentiles: {text[-1500:]}")
    return Sample(pct[50.0], extra={"p99_us": pct.get(99.0), "avg_us": float(avg.group(1)) if avg else None})


def crr(client_ns: str, host: str, port: int, seconds: float, warmup: float, procs: int) -> Sample:
    res = _run(client_ns, sys.executable, CRR, host, port, seconds, "--warmup", warmup, "--procs", procs,
               timeout=seconds + warmup + 60)
    r = json.loads(res.stdout)
    flags = []
    if r["syn_retrans"]:
        flags.append(f"{r['syn_retrans']} SYN retransmissions")
    if r["failed"]:
        flags.append(f"{r['failed']} failed: {', '.join(list(r['errors'])[:2])}")
    if not r["connections"]:
        flags.append("no connection completed")
    return Sample(r["rate"], flagged="; ".join(flags),
                  extra={"syn_retrans": r["syn_retrans"], "retrans_segs": r["retrans_segs"], "failed": r["failed"]})
