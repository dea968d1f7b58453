"""The CNI plugin executable's entry (`atomnet cni install` writes a shim that runs this
module). It stays light to import: a runtime starts one plugin process per container, and
an interpreter importing pyroute2, the store clients and the dataplane model costs more
than the work itself (1.4 s of imports per ADD under load was what 20 concurrent `podman
run`s spent their time on).

ADD and DEL are handed to this node's running daemon over the node API
(ctl/runtimes/nodeapi.py), which runs ctl/runtimes/cni/plugin.run with its open store and
programs the endpoint at once. Only when no daemon takes them, and for CHECK, STATUS, GC
and VERSION, is the plugin imported and run in this process: the same code either way.

stdout carries only the result or the error object; logs go to stderr.
"""
from __future__ import annotations

import json
import os
import socket
import sys

from ... import launch
from ...defaults import DEFAULT_BPFFS, DEFAULT_STORE
from ...errors import AtomnetError
from .. import nodeapi
from . import protocol as p

DELEGATED = ("ADD", "DEL")


def settings(req: p.Request, env=None) -> tuple[str, str, str]:
    """store, node, bpffs: the conflist's (written by `atomnet cni install`), else atomnet's env/defaults."""
    env = os.environ if env is None else env
    return (req.store or env.get("ATOMNET_STORE", DEFAULT_STORE),
            req.node or env.get("ATOMNET_NODE") or socket.gethostname(),
            req.bpffs or env.get("ATOMNET_BPFFS", DEFAULT_BPFFS))


def delegate(env, stdin: str) -> tuple[dict | None, int]:
    """ADD/DEL through the daemon; nodeapi.Unavailable when none takes it."""
    try:
        req = p.parse_request(env, stdin)
    except p.CniError as exc:
        raise nodeapi.Unavailable(f"invalid request: {exc.msg}") from None   # in-process answers it, as always
    store, node, bpffs = settings(req, env)
    cni_env = {k: v for k, v in env.items() if k.startswith("CNI_")}
    try:
        res = nodeapi.call(nodeapi.socket_path(node, bpffs, env), "cni", store, node,
                           {"env": cni_env, "stdin": stdin})
    except nodeapi.Unavailable:
        raise
    except AtomnetError as exc:   # taken, then lost or refused as a whole: the runtime may retry
        return p.CniError(p.TRY_AGAIN_LATER, str(exc)).to_dict(p.response_version(stdin)), 1
    return res["out"], int(res["status"])


def run(env, stdin: str) -> tuple[dict | None, int]:
    """One invocation: (what to print on stdout, exit status)."""
    if env.get("CNI_COMMAND") in DELEGATED:
        try:
            return delegate(env, stdin)
        except nodeapi.Unavailable:
            pass
    launch.full_environment()   # the plugin imports pyroute2 and the store clients
    from ... import logs
    logs.configure("console", env.get("ATOMNET_LOG_LEVEL", "warning"))
    from .plugin import run as run_here
    return run_here(env, stdin)


def main() -> int:
    out, status = run(os.environ, sys.stdin.read())
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
