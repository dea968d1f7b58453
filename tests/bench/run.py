"""`sudo make bench`: every case of the benchmark in one run, then RESULTS.md, results.json
and PNG charts in --out (default bench/results).

    python -m tests.bench.run [--out DIR] [--reps N] [--smoke] [--iptables legacy|nft]

Everything it creates (namespaces, links, pins, processes) is made through the e2e rig
and removed on exit, also after a failure or SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

from tests.e2e.rig import REPO, Rig, sh

from . import report
from .cases import FULL, SMOKE, Bench, Config
from .harness import ensure_tools, machine


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)   # unwinds through the finally blocks: teardown runs


def run_bench(cfg: Config, outdir: Path, command: str, log=print, only: str | None = None
              ) -> tuple[Bench | None, Path, str | None]:
    """Builds, measures, tears down, writes the report. Returns (bench, RESULTS.md, error or None)."""
    ensure_tools(log)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="atomnet-bench-"))
    uid = uuid.uuid4().hex[:6]
    error, bench = None, None
    try:
        try:
            rig = Rig(uid, tmp)
        except BaseException:
            sh("ip", "netns", "del", f"an{uid}-ul", check=False)
            raise
        try:
            bench = Bench(rig, cfg, log)
            {"control-plane": bench.run_control_plane, "control-plane-flat": bench.run_control_plane_flat,
             "dns": bench.run_dns}.get(only, bench.run)()
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log(traceback.format_exc())
        finally:
            log(f"[{time.strftime('%H:%M:%S')}] teardown")
            rig.teardown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if bench is not None:
        bench.facts["bench_wall_seconds"] = round(time.monotonic() - started, 1)
    path = report.write(outdir, bench.rows if bench else [], bench.series if bench else {}, machine(),
                        dataclasses.asdict(cfg), bench.facts if bench else {}, command, error)
    return bench, path, error


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="where RESULTS.md and the charts go")
    ap.add_argument("--reps", type=int, help="repetitions per case (default 5; smoke 1)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run with tiny counts (what `make test` runs)")
    ap.add_argument("--iptables", choices=("legacy", "nft"), default="legacy",
                    help="iptables backend of the baselines (default legacy: see RESULTS.md)")
    ap.add_argument("--only", choices=("control-plane", "control-plane-flat", "dns"),
                    help="run only these rows (RESULTS.md then holds only them); control-plane-flat (1 000 / "
                         "10 000 / 50 000 services, ~5 min a repetition, ~7 GB of kernel memory) is in no other run")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root (network namespaces, BPF, iptables): sudo make bench", file=sys.stderr)
        return 1
    cfg = SMOKE if args.smoke else FULL
    cfg = dataclasses.replace(cfg, iptables=f"iptables-{args.iptables}")
    if args.reps:
        cfg = dataclasses.replace(cfg, reps=args.reps)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    given = " ".join(sys.argv[1:] if argv is None else argv)
    command = ("sudo make bench" if os.environ.get("MAKELEVEL") else f"python -m tests.bench.run {given}").strip()
    _, path, error = run_bench(cfg, Path(args.out), command, only=args.only)
    print(path.read_text())
    print(f"written: {path} (and results.json, *.png beside it)")
    if error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
