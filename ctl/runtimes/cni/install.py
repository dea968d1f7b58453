"""`atomnet cni install`: the plugin executable and the network's conflist, for a runtime's
CNI dirs (podman, containerd, kubelet read the same two).

The executable is a two-line shell script that execs this installation's interpreter on
the plugin module, so the runtime needs neither our venv on PATH nor PYTHONPATH; the
conflist carries this node's --store/--node/--bpffs, because runtimes call plugins with
their own environment, not the user's.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import ctl

from ...errors import AtomnetError

PLUGIN_TYPE = "atomnet"
NETWORK_NAME = "atomnet"
CONFLIST_NAME = "10-atomnet.conflist"
# The conflist's version: 1.0.0, not 1.1.0, because the runtimes here (podman 4.3's and
# containerd 1.6's libcni) and Debian 12's reference plugins stop at 1.0.0. The plugin
# itself speaks 0.4.0, 1.0.0 and 1.1.0 (STATUS/GC).
CONFLIST_VERSION = "1.0.0"


def shim_text(python: str | None = None) -> str:
    python = python or sys.executable
    root = str(Path(ctl.__file__).resolve().parents[1])   # where the ctl package lives
    return ("#!/bin/sh\n# atomnet CNI plugin: written by `atomnet cni install`\n"
            f"PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}} "
            f"exec {shlex.quote(python)} -m ctl.runtimes.cni.entry \"$@\"\n")


def conflist(store: str, node: str, bpffs: str, chain: list[dict] | None = None,
             version: str = CONFLIST_VERSION) -> dict:
    plugin = {"type": PLUGIN_TYPE, "store": store, "node": node, "bpffs": bpffs,
              "capabilities": {"portMappings": True, "ips": True, "mac": True}}
    return {"cniVersion": version, "name": NETWORK_NAME, "plugins": [plugin, *(chain or [])]}


def _write(path: Path, text: str, mode: int) -> None:
    """Atomically: a runtime reading the dir meanwhile sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def install(bin_dir: str, conf_dir: str, store: str, node: str, bpffs: str) -> dict:
    if store.startswith("sqlite://") and not store.startswith("sqlite:///"):
        raise AtomnetError(f"store {store!r}: use an absolute path (sqlite:///PATH); runtimes run plugins "
                           "from their own working directory")
    paths = {}
    for what, d in (("bin", bin_dir), ("conf", conf_dir)):
        p = Path(d)
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AtomnetError(f"cannot create {what} dir {d}: {exc.strerror}") from None
        if not p.is_dir():
            raise AtomnetError(f"{d} is not a directory")
        paths[what] = p
    plugin, conf = paths["bin"] / PLUGIN_TYPE, paths["conf"] / CONFLIST_NAME
    try:
        _write(plugin, shim_text(), 0o755)
        _write(conf, json.dumps(conflist(store, node, bpffs), indent=2) + "\n", 0o644)
    except OSError as exc:
        raise AtomnetError(f"cannot write {exc.filename}: {exc.strerror}") from None
    return {"plugin": str(plugin), "conflist": str(conf), "network": NETWORK_NAME, "store": store, "node": node,
            "bpffs": bpffs}
