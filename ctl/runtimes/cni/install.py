"""`atomnet cni install`: the plugin executable and the network's conflist, for a runtime's
CNI dirs (podman, containerd, kubelet read the same two).

The executable is a launcher (ctl/launch.py, like the `atomnet` command's) that runs this
installation's interpreter without site on the plugin's entry, with the ctl package's
directory written in, so the runtime needs neither our venv on PATH nor PYTHONPATH; the
conflist carries this node's --store/--node/--bpffs, because runtimes call plugins with
their own environment, not the user's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ... import launch
from ...errors import AtomnetError

PLUGIN_TYPE = "atomnet"
NETWORK_NAME = "atomnet"
CONFLIST_NAME = "10-atomnet.conflist"
# The conflist's version: 1.0.0, not 1.1.0, because the runtimes here (podman 4.3's and
# containerd 1.6's libcni) and Debian 12's reference plugins stop at 1.0.0. The plugin
# itself speaks 0.4.0, 1.0.0 and 1.1.0 (STATUS/GC).
CONFLIST_VERSION = "1.0.0"
ENTRY = "ctl.runtimes.cni.entry:main"   # what the shim runs: ADD/DEL through the node API, else in-process


def shim_text(python: str | None = None) -> str:
    return launch.script_text(ENTRY, python, what="atomnet CNI plugin, by `atomnet cni install`")


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
