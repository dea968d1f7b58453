"""Evidence a load test gathers while it runs and reads only when it fails: a tcpdump of
the few packets that explain a connection's fate (SYN, FIN, RST), and the kernel's own
drop counters (a namespace's TcpExt/Tcp counters, the host's per-CPU backlog drops).
A rare failure seen once in several CI runs cannot be re-run at will: its message has to
say where the packet went."""
from __future__ import annotations

import re
import select
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from tests.bench.crr import parse_counters
from tests.e2e.rig import in_pod

# Segments that open, close or reset a connection: a handful per connection, whatever its volume.
CONTROL_FLAGS = "tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0"


class Capture:
    """tcpdump in a namespace, written to a file until stop(); lines() decodes it."""

    def __init__(self, netns: str, iface: str, bpf_filter: str, path: Path):
        self.netns, self.path = netns, path
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-nn", "-U",
                                      "-w", str(path), bpf_filter],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10) -> None:
        """Until tcpdump says it is listening (its filter attached): packets before that are lost."""
        deadline, said = time.monotonic() + timeout, ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stderr], [], [], 0.1)[0]:
                said = self.proc.stderr.readline()
                if "listening on" in said:
                    return
        self.stop()
        raise AssertionError(f"tcpdump in {self.netns} never started: {said.strip()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()   # tcpdump flushes its file on SIGTERM
            self.proc.wait(10)
        self.proc.stderr.close()

    def lines(self) -> list[str]:
        self.stop()
        return subprocess.run(["tcpdump", "-r", str(self.path), "-nn", "-tt"], capture_output=True,
                              text=True).stdout.splitlines()


SYN = re.compile(r"IP (\S+) > (\S+): Flags \[S\], seq (\d+),")


def retransmitted_syns(lines: list[str]) -> dict[str, list[str]]:
    """SYNs sent more than once (same tuple, same sequence number): seq -> their lines."""
    seen: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        if m := SYN.search(line):
            seen[m.group(3)].append(line)
    return {seq: got for seq, got in seen.items() if len(got) > 1}


def explain_syn_retransmissions(client: list[str], server: list[str], limit: int = 3) -> str:
    """For each SYN the client sent again: what the server side saw of it (found by its
    sequence number, which masquerade keeps) and every earlier segment there of the same
    translated tuple (a previous connection on that port)."""
    parts = []
    for seq, sent in list(retransmitted_syns(client).items())[:limit]:
        there = [line for line in server if f"seq {seq}," in line or f"ack {int(seq) + 1}," in line]
        tuples = {m.group(1) for line in there if (m := SYN.search(line))}
        history = [line for line in server if any(f" {t} " in line or f" {t}:" in line for t in tuples)]
        parts.append(f"SYN seq {seq} sent {len(sent)}x by the client: {sent}; the server side saw "
                     f"{history[-12:] or there or 'none of it'}")
    return "; ".join(parts) or "no SYN sent twice in the client's capture"


# Counters whose increase says the kernel refused or lost something (not volume).
TROUBLE = ("TcpExt.ListenOverflows", "TcpExt.ListenDrops", "TcpExt.TCPReqQFullDrop", "TcpExt.TCPBacklogDrop",
           "TcpExt.PAWSActive", "TcpExt.PAWSEstab", "TcpExt.TWRecycled", "TcpExt.TWKilled",
           "TcpExt.TCPChallengeACK", "TcpExt.TCPSYNChallenge", "TcpExt.TCPTimeWaitOverflow",
           "TcpExt.TCPACKSkippedSynRecv", "TcpExt.TCPACKSkippedTimeWait", "TcpExt.TCPAbortOnData",
           "TcpExt.TCPSynRetrans", "TcpExt.OutOfWindowIcmps", "Tcp.AttemptFails", "Tcp.EstabResets",
           "Tcp.InErrs", "Tcp.OutRsts", "Tcp.InCsumErrors", "Ip.InDiscards", "Ip.InAddrErrors",
           "Ip.InNoRoutes", "Ip.OutDiscards", "Ip.OutNoRoutes")


def netns_counters(netns: str) -> dict[str, int]:
    # one process for both files: each is whole lines of names then values, so their concatenation parses too
    return parse_counters(in_pod(netns, "cat", "/proc/net/netstat", "/proc/net/snmp").stdout)


def softnet_drops() -> list[int]:
    """Per CPU: packets dropped because its input backlog was full (netdev_max_backlog)."""
    return [int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines()]


class KernelDrops:
    """The trouble counters of some namespaces and the host's backlog drops, from now on."""

    def __init__(self, *netns: str):
        self.netns = netns
        self.before = {ns: netns_counters(ns) for ns in netns}
        self.backlog = softnet_drops()

    def increases(self) -> dict[str, dict[str, int]]:
        out = {}
        for ns in self.netns:
            now = netns_counters(ns)
            if grew := {k: now.get(k, 0) - self.before[ns].get(k, 0) for k in TROUBLE
                        if now.get(k, 0) > self.before[ns].get(k, 0)}:
                out[ns] = grew
        if backlog := {f"cpu{i}": now - was for i, (now, was) in enumerate(zip(softnet_drops(), self.backlog))
                       if now > was}:
            out["host backlog drops"] = backlog
        return out
