"""The benchmark harness: interleaved repetitions, statistics, targets, the machine's
description, and the Debian tools the baselines need.

A case runs its systems in one loop, A B A B ... (the same order in every round), so slow
drift of a noisy machine hits every system alike. Each run yields a Sample; a run that is
not a measurement (e.g. it saw SYN retransmissions) is flagged, retried right away up to
RETRIES times, and never counted in the median.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

RETRIES = 2

# Both sides of every comparison get the same pinning: clients on CLIENT_CPU, servers on
# SERVER_CPU (the softirq work of a veth/VXLAN path runs on the sending CPU, so each
# system's packet work lands on the same CPUs as its rival's). One CPU: both on CPU 0.
CLIENT_CPU = 0
SERVER_CPU = 1 if (os.cpu_count() or 1) > 1 else 0

# A target's verdicts. "within noise": the min–max range of atomnet's runs overlaps the
# range the goal sets from the baseline's runs (goal × [baseline min, max]), so this run
# cannot tell met from missed, whatever the medians say.
MET, MISSED, NOISE = "met", "missed", "within noise"

# Debian packages the benchmark uses beyond `make test`'s (binary -> package).
TOOLS = {"iperf3": "iperf3", "nginx": "nginx-light", "sockperf": "sockperf", "iptables-legacy": "iptables"}


@dataclass
class Sample:
    value: float
    flagged: str = ""          # why this run is not a measurement ("" = it is one)
    extra: dict = field(default_factory=dict)


@dataclass
class Series:
    system: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def valid(self) -> list[float]:
        return [s.value for s in self.samples if not s.flagged]

    @property
    def flagged(self) -> list[Sample]:
        return [s for s in self.samples if s.flagged]

    @property
    def median(self) -> float | None:
        return statistics.median(self.valid) if self.valid else None

    @property
    def spread(self) -> tuple[float, float] | None:
        return (min(self.valid), max(self.valid)) if self.valid else None

    def renamed(self, system: str) -> "Series":
        return Series(system, self.samples)

    def to_dict(self) -> dict:
        return {"system": self.system, "median": self.median, "min_max": self.spread, "n": len(self.valid),
                "samples": [{"value": s.value, "flagged": s.flagged, **({"extra": s.extra} if s.extra else {})}
                            for s in self.samples]}


@dataclass
class Target:
    """ratio = atomnet / baseline (or an absolute value when absolute=True) compared with `value`."""
    op: str                  # ">=" or "<="
    value: float
    absolute: bool = False   # compare atomnet's own median, not the ratio
    text: str = ""

    def met(self, x: float | None) -> bool | None:
        if x is None:
            return None
        return x >= self.value if self.op == ">=" else x <= self.value

    def verdict(self, x: float | None, ours: tuple[float, float] | None = None,
                theirs: tuple[float, float] | None = None) -> str | None:
        """met / missed by the median `x`, or NOISE when atomnet's range `ours` overlaps the
        goal's range, this target's value times the baseline's range `theirs` (ratio
        targets only: an absolute target has no baseline runs to be noisy against)."""
        if x is None:
            return None
        if not self.absolute and ours and theirs and overlaps(ours, (theirs[0] * self.value, theirs[1] * self.value)):
            return NOISE
        return MET if self.met(x) else MISSED


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


@dataclass
class Row:
    case: str
    metric: str
    unit: str
    atomnet: Series
    baseline: Series | None = None
    targets: list[Target] = field(default_factory=list)
    note: str = ""
    better: str = "higher"   # which way is better for this metric

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.atomnet.median or not self.baseline.median:
            return None
        return self.atomnet.median / self.baseline.median

    def verdicts(self) -> list[tuple[Target, str | None, float | None]]:
        """(target, MET / MISSED / NOISE or None without data, the measured ratio or value)."""
        out = []
        theirs = self.baseline.spread if self.baseline else None
        for t in self.targets:
            x = self.atomnet.median if t.absolute else self.ratio
            out.append((t, t.verdict(x, self.atomnet.spread, theirs), x))
        return out

    def to_dict(self) -> dict:
        return {"case": self.case, "metric": self.metric, "unit": self.unit, "better": self.better,
                "atomnet": self.atomnet.to_dict(), "baseline": self.baseline.to_dict() if self.baseline else None,
                "ratio": self.ratio, "note": self.note,
                "targets": [{"text": t.text, "op": t.op, "value": t.value, "absolute": t.absolute,
                             "met": t.met(x), "verdict": v, "measured": x} for t, v, x in self.verdicts()]}


def interleave(reps: int, runs: dict[str, Callable[[], Sample]], log: Callable[[str], None] = print,
               label: str = "") -> dict[str, Series]:
    """Runs every system once per round, in the given order, `reps` rounds. A flagged run
    is kept (reported) and retried at once, at most RETRIES times per round."""
    out = {name: Series(name) for name in runs}
    for r in range(reps):
        for name, fn in runs.items():
            for attempt in range(RETRIES + 1):
                s = fn()
                out[name].samples.append(s)
                log(f"  {label} {name} #{r + 1}: {s.value:.4g}" + (f" FLAGGED ({s.flagged})" if s.flagged else ""))
                if not s.flagged:
                    break
    return out


# ------------------------------------------------------------------ processes

@contextmanager
def paused(*procs: subprocess.Popen | None):
    """SIGSTOP the given processes (ours, by PID) for the duration; SIGCONT after, always."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in live:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


# ------------------------------------------------------------------ tools and machine

def missing_tools() -> list[str]:
    return sorted({pkg for binary, pkg in TOOLS.items() if shutil.which(binary) is None})


def ensure_tools(log: Callable[[str], None] = print) -> None:
    """Installs the Debian packages the baselines need, if missing (as `make` does for its own)."""
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing {' '.join(missing)}: apt-get install {' '.join(missing)} (as root)")
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", *missing]
    if subprocess.run(apt, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"], env=env, check=True,
                       capture_output=True)
        subprocess.run(apt, env=env, check=True, capture_output=True)
    still = missing_tools()
    if still:
        raise RuntimeError(f"still missing after apt-get install: {' '.join(still)}")


def _version(cmd: list[str], pattern: str = r"(\d+\.\d+(?:\.\d+)?)") -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, res.stdout + res.stderr)
    return m.group(1) if m else "?"


def machine() -> dict:
    cpu_model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_gib, 1),
        "os": _os_release(),
        "python": platform.python_version(),
        "br_netfilter": os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"),
        "tools": {
            "iperf3": _version(["iperf3", "--version"]),
            "sockperf": _version(["sockperf", "--version"]),
            "nginx": _version(["nginx", "-v"]),
            "iptables": _version(["iptables-legacy", "--version"], r"v(\S+)") + " (legacy)",
            "iproute2": _version(["ip", "-V"], r"(\d[\w.-]*)"),
            "clang": _version(["clang", "--version"]),
        },
    }


def _os_release() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "?"
