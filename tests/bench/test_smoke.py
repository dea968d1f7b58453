"""The benchmark harness end to end in seconds (tiny counts, one repetition): every case
builds its systems, measures, and reports, so `make bench` cannot rot unnoticed. The
figures of a smoke run mean nothing; that the run finishes, produces the table and the
charts, and leaves nothing behind is what is checked."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import require_root


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _bpffs() -> set[str]:
    root = Path("/sys/fs/bpf")
    return {p.name for p in root.iterdir()} if root.exists() else set()


def _ours(names: set[str], uids: list[str]) -> set[str]:
    """Other test runs may create namespaces meanwhile: only names carrying our tags count."""
    return {n for n in names if any(u in n for u in uids)}


def test_benchmark_smoke_run(tmp_path):
    require_root()
    from tests.bench.cases import SMOKE
    from tests.bench.run import run_bench

    lines: list[str] = []
    bench, path, error = run_bench(SMOKE, tmp_path / "out", "pytest tests/bench/test_smoke.py", log=lines.append)
    print("\n".join(lines))
    assert error is None, error

    text = path.read_text()
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    cases = {r["case"] for r in data["rows"]}
    for expected in ("same-node pod → pod", "pod → service, established", "cross-node pod → pod",
                     "host port from outside", "pod → outside (masquerade)", "pod → service, new connections/s, 1 service",
                     "pod → service, new connections/s, 3 services", "DNS: A queries of service names, 3 services"):
        assert expected in cases, f"{expected} missing from {sorted(cases)}"
    assert any(c.startswith("control plane: program") for c in cases)
    assert any(c.startswith("daemon memory") for c in cases)
    for row in data["rows"]:
        assert row["atomnet"]["median"] is not None, row
        if row["baseline"] is not None:
            assert row["baseline"]["median"] is not None, row
    assert "| case | metric |" in text and data["machine"]["kernel"] in text
    for chart in ("connections_vs_services.png", "throughput.png", "latency.png", "host_port.png",
                  "control_plane.png"):
        png = tmp_path / "out" / chart
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart

    # Nothing left behind: namespaces, pins, processes.
    assert bench is not None and len(bench.uids) >= 2
    assert _ours(_netns(), bench.uids) == set(), "namespaces left behind"
    assert _ours(_bpffs(), bench.uids) == set(), "bpffs pins left behind"
    assert all(p.poll() is not None for p in bench.rig.procs), "processes left running"
