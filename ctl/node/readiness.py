"""This node's daemon readiness, as a file anyone on the node can read (the CNI plugin's
STATUS): /run/atomnet/ready/<bpffs path>.json holds the daemon's pid, written once its
programs are attached and pinned (`dataplane_ready`) and removed when it stops.

Ready = the file exists and its pid is alive. A SIGKILLed daemon leaves the file behind but
not the process, so it reads as not ready; the programs it attached keep forwarding, but
nobody programs new pods until a daemon runs again, which is what STATUS must say.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

READY_DIR = Path("/run/atomnet/ready")


def ready_path(bpffs: str) -> Path:
    # keyed by the bpffs root: one daemon per root, and test nodes on one machine differ in it
    return READY_DIR / (str(Path(bpffs).resolve()).strip("/").replace("/", "_") + ".json")


def mark_ready(bpffs: str, node: str) -> None:
    path = ready_path(bpffs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "node": node, "since": time.time()}))
    tmp.replace(path)


def clear(bpffs: str) -> None:
    path = ready_path(bpffs)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():   # never remove a newer daemon's file
            path.unlink()
    except (OSError, ValueError):
        pass


def not_ready_reason(bpffs: str) -> str | None:
    """None when this node's daemon is ready, else why not (one line)."""
    path = ready_path(bpffs)
    try:
        doc = json.loads(path.read_text())
        pid = int(doc["pid"])
    except FileNotFoundError:
        return f"no atomnet daemon is ready for {bpffs} (no {path})"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable readiness file {path}: {exc}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"the atomnet daemon for {bpffs} (pid {pid}) is not running"
    except PermissionError:
        pass   # alive, owned by another user
    return None


def overflow_path(bpffs: str) -> Path:
    return ready_path(bpffs).with_suffix(".overflow.json")


def write_overflow(bpffs: str, rows: list[dict]) -> None:
    """The service-side maps too small for the desired state ({map, needed, capacity, refused,
    flag} each), for `atomnet map list`; no file while everything fits. Kept when the daemon
    stops: the maps it left are still short of the same entries."""
    path = overflow_path(bpffs)
    if not rows:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "since": time.time(), "maps": rows}))
    tmp.replace(path)


def read_overflow(bpffs: str) -> dict[str, dict]:
    """map name -> its overflow row, as the daemon last wrote it (empty: everything fits)."""
    try:
        return {row["map"]: row for row in json.loads(overflow_path(bpffs).read_text())["maps"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
