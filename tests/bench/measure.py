"""One run of each load tool, inside a client namespace, as a Sample.

- throughput: iperf3, one TCP stream, -J; the value is the receiver's Gbit/s after the
  omitted warm-up (-O), retransmits kept as extra.
- latency: sockperf ping-pong over TCP, 64-byte messages, both ends busy-polling
  (--nonblocked); the value is the median (p50) of the per-message half round trip in
  microseconds, p99 and mean kept as extra. Chosen over qperf because it reports the
  distribution of every message (percentiles), not only a mean that a few scheduler
  hiccups on a noisy 2-CPU machine drag, and it can busy-poll: on this VM a vCPU that
  went idle takes ~20 us to wake, twice per round trip, the same for every system, which
  buries the 1-3 us the paths differ by (blocking sockets measured ~41 us p50 on a bare
  veth pair, busy-polling ~2.8 us). The server is started for each run and stopped after,
  because an idle busy-polling server spins a whole CPU.
- new connections/s: tests/bench/crr.py (RST close, several processes); a run with any
  SYN retransmission or failed connection is flagged, never counted.

Every client runs on harness.CLIENT_CPU (iperf3 -A also pins its server to SERVER_CPU;
the other servers are pinned where cases.py starts them), whichever system it measures.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from .harness import CLIENT_CPU, SERVER_CPU, Sample

CRR = Path(__file__).with_name("crr.py")


def pinned(cpu: int, *cmd) -> list[str]:
    return ["taskset", "-c", str(cpu), *map(str, cmd)]


def _run(netns: str, *cmd, timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", "netns", "exec", netns, *pinned(CLIENT_CPU, *cmd)], capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} in {netns} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-1500:]}")
    return res


def iperf3(client_ns: str, host: str, port: int, seconds: int, omit: int, nbytes: str = "") -> Sample:
    length = ["-n", nbytes] if nbytes else ["-t", seconds] + (["-O", omit] if omit else [])
    args = ["iperf3", "-c", host, "-p", port, *length, "-J", "-A", f"{CLIENT_CPU},{SERVER_CPU}"]
    res = subprocess.run(["ip", "netns", "exec", client_ns, *map(str, args)], capture_output=True, text=True,
                         timeout=seconds + omit + 30)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = {"error": (res.stderr or res.stdout).strip()[-300:] or f"exit {res.returncode}"}
    if doc.get("error") or "sum_received" not in doc.get("end", {}):
        # e.g. "the server is busy running a test": not a measurement; the harness retries it
        return Sample(0.0, flagged=f"iperf3: {doc.get('error', 'no result')}")
    end = doc["end"]
    gbps = end["sum_received"]["bits_per_second"] / 1e9
    return Sample(gbps, extra={"retransmits": end["sum_sent"].get("retransmits", 0)})


_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_AVG = re.compile(r"avg-latency=([\d.]+)")


def sockperf(client_ns: str, host: str, port: int, seconds: int) -> Sample:
    res = _run(client_ns, "sockperf", "ping-pong", "--tcp", "--nonblocked", "-i", host, "-p", port, "-t", seconds,
               "-m", 64, timeout=seconds + 30)
    text = res.stdout + res.stderr
    pct = {float(k): float(v) for k, v in _PCT.findall(text)}
    avg = _AVG.search(text)
    if 50.0 not in pct and "No valid observations" in text:
        # every message fell in the warm-up or the run was starved of CPU (a loaded
        # machine: busy-polling needs a CPU each): not a measurement, the harness retries
        return Sample(0.0, flagged="sockperf: no valid observations")
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


_QPS = re.compile(r"Queries per second:\s+([\d.]+)")
_LOST = re.compile(r"Queries lost:\s+(\d+)")
_SENT = re.compile(r"Queries sent:\s+(\d+)")
_REPLY = re.compile(r"^> (\S+) .* ([\d.]+)$", re.M)   # dnsperf -v: "> NOERROR name A 0.000123"


def dnsperf(client_ns: str, server: str, datafile: Path, seconds: float, max_qps: int | None = None,
            edns_option: str | None = None) -> Sample:
    """dnsperf over UDP for `seconds`. Unlimited (max_qps None): the value is queries/s at
    saturation. With max_qps: the value is the p99 latency in ms at that steady rate, from
    dnsperf -v's per-query latencies (2.10 prints no percentiles). A run that lost queries
    or got anything but NOERROR is flagged. edns_option ("CODE:HEX"): every query carries it
    (EDNS), e.g. one that atomnet's BPF fast path does not answer, so its server does."""
    cmd = ["dnsperf", "-s", server, "-d", datafile, "-l", seconds, "-t", 2]
    if edns_option:
        cmd += ["-E", edns_option]
    if max_qps:
        cmd += ["-Q", max_qps, "-v"]
    res = _run(client_ns, *cmd, timeout=seconds + 30)
    text = res.stdout + res.stderr
    qps, lost, sent = _QPS.search(text), _LOST.search(text), _SENT.search(text)
    if not (qps and lost and sent):
        raise RuntimeError(f"dnsperf printed no summary: {text[-1500:]}")
    flags = []
    if int(lost.group(1)):
        flags.append(f"{lost.group(1)} of {sent.group(1)} queries lost")
    extra = {"qps": float(qps.group(1)), "lost": int(lost.group(1)), "sent": int(sent.group(1))}
    if not max_qps:
        return Sample(float(qps.group(1)), flagged="; ".join(flags), extra=extra)
    replies = _REPLY.findall(res.stdout)
    bad = sum(1 for rcode, _ in replies if rcode != "NOERROR")
    if bad:
        flags.append(f"{bad} answers not NOERROR")
    lat = sorted(float(v) * 1000 for _, v in replies)
    if not lat:
        raise RuntimeError(f"dnsperf -v printed no per-query latency: {text[-1500:]}")
    extra["p50_ms"] = lat[len(lat) // 2]
    return Sample(lat[min(len(lat) - 1, int(len(lat) * 0.99))], flagged="; ".join(flags), extra=extra)
