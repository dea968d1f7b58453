"""New TCP connections per second, netperf TCP_CRR style, run inside the client's network
namespace: each connection is connect, one HTTP request, the whole response, then close
with RST (SO_LINGER 0), so neither side keeps TIME_WAIT sockets that would reject reused
client ports (see "Measuring connection rates here" in DESIGN.md).

Several processes (no C, no threads: CPython's GIL would serialise them) start at one
instant, run a warm-up, then count only the connections completed inside the window.
The SYN retransmissions (TcpExt TCPSynRetrans) and retransmitted segments (Tcp
RetransSegs) of this namespace are read before and after: a run with any SYN
retransmission is not a measurement. They count every socket of the namespace; the
connections of this run whose connect took a retransmission's time (the initial RTO is
1 s) are counted apart, as slow_connects, to tell its SYNs from another program's.
Prints one JSON object.

usage: crr.py HOST PORT SECONDS [--warmup S] [--procs N]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import struct
import time

LINGER_RST = struct.pack("ii", 1, 0)


def parse_counters(*texts: str) -> dict[str, int]:
    """Proto.Name -> value, from /proc/net/netstat or /proc/net/snmp text (a line of names, then their values)."""
    out: dict[str, int] = {}
    for text in texts:
        lines = text.splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            proto, _, names = names.partition(":")
            _, _, values = values.partition(":")
            for n, v in zip(names.split(), values.split()):
                out[f"{proto}.{n}"] = int(v)
    return out


def counters() -> dict[str, int]:
    """TcpExt and Tcp counters of the calling process's network namespace."""
    return parse_counters(*(open(path).read() for path in ("/proc/net/netstat", "/proc/net/snmp")))


# A connect this slow waited for a SYN retransmission (initial RTO 1 s), not for a busy CPU.
SLOW_CONNECT_S = 0.9


def one(addr: tuple[str, int], request: bytes) -> bool:
    """One connection; True when its connect waited for a retransmitted SYN."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        s.settimeout(3.0)
        began = time.monotonic()
        s.connect(addr)
        slow = time.monotonic() - began >= SLOW_CONNECT_S
        s.sendall(request)
        data = s.recv(4096)
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the response headers")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace") or "empty reply")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        while len(body) < length:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the whole body")
            body += chunk
        return slow
    finally:
        s.close()   # SO_LINGER 0: RST


def worker(host: str, port: int, start: float, warmup: float, seconds: float, out) -> None:
    addr, request = (host, port), f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    count_from, end = start + warmup, start + warmup + seconds
    ok = failed = slow = 0
    errors: dict[str, int] = {}
    while time.monotonic() < start:
        time.sleep(0.001)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        try:
            slow += one(addr, request)
            if now >= count_from:
                ok += 1
        except OSError as exc:
            failed += 1
            key = f"{type(exc).__name__}: {exc}"
            errors[key] = errors.get(key, 0) + 1
    out.put({"ok": ok, "failed": failed, "slow": slow, "errors": errors})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("seconds", type=float)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--procs", type=int, default=4)
    a = ap.parse_args()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start = time.monotonic() + 0.2
    before = counters()
    procs = [ctx.Process(target=worker, args=(a.host, a.port, start, a.warmup, a.seconds, q)) for _ in range(a.procs)]
    for p in procs:
        p.start()
    results = [q.get(timeout=a.warmup + a.seconds + 30) for _ in procs]
    for p in procs:
        p.join(10)
    after = counters()
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    ok = sum(r["ok"] for r in results)
    print(json.dumps({
        "connections": ok, "seconds": a.seconds, "rate": ok / a.seconds, "procs": a.procs,
        "failed": sum(r["failed"] for r in results), "errors": errors,
        "slow_connects": sum(r["slow"] for r in results),
        "syn_retrans": after.get("TcpExt.TCPSynRetrans", 0) - before.get("TcpExt.TCPSynRetrans", 0),
        "retrans_segs": after.get("Tcp.RetransSegs", 0) - before.get("Tcp.RetransSegs", 0),
    }))


if __name__ == "__main__":
    main()
