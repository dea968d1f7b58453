"""The node API: `atomnet pod add/del` and the CNI plugin's ADD/DEL hand their work to this
node's running daemon over a root-only unix socket (what Cilium's CNI plugin does with its
agent), and do it in-process when no daemon answers. The daemon already has pyroute2 and
the store open, and programs the new endpoint at once instead of waiting for its own watch:
a pod add costs one connect instead of an interpreter importing half the control plane.

This module is the client and the wire format, and stays light to import (stdlib only): it
is what the CLI's pod verbs and the CNI plugin's entry load before they know whether they
need anything else. The daemon's side is ctl/runtimes/nodeapi_server.py.

Wire format: one JSON object per line each way, one request per connection.
  request   {"op": "pod.add" | "pod.del" | "cni", "store": URL, "node": NAME, "args": {...}}
  response  {"ok": RESULT}                 done; RESULT is the op's result
            {"error": MSG}                 refused or failed, nothing left half-made (one line)
            {"fallback": REASON}           not for this daemon (another store): do it in-process
The socket: /run/atomnet/api/<node>.sock for the default bpffs root, else
<node>@<root's path>.sock (test nodes on one machine differ in their root; the path is
hashed when longer than a unix socket address allows); ATOMNET_API_SOCKET overrides it, for
daemon and clients alike, and `off` disables the API (clients work in-process).
"""
from __future__ import annotations

import errno
import json
import os
import socket

from ..defaults import DEFAULT_BPFFS
from ..errors import AtomnetError

API_DIR = "/run/atomnet/api"
ENV = "ATOMNET_API_SOCKET"
OFF = "off"
CONNECT_TIMEOUT = 2.0
# An ADD among 20 concurrent ones on a loaded node waits for netlink and the store: generous,
# but bounded so a wedged daemon is reported instead of hanging the runtime forever.
REPLY_TIMEOUT = 120.0
MAX_LINE = 1 << 20
_SUN_PATH_MAX = 107   # sockaddr_un.sun_path is 108 bytes with its NUL


class Unavailable(Exception):
    """No daemon took the request (no socket, nobody listening, or not for it): the caller
    does the work in-process. Nothing was done by a daemon."""


def socket_path(node: str, bpffs: str = DEFAULT_BPFFS, env: dict | None = None) -> str | None:
    """This node's API socket; None when the API is switched off."""
    override = (os.environ if env is None else env).get(ENV, "")
    if override:
        return None if override == OFF else override
    name = node.replace("/", "_")
    root = os.path.normpath(bpffs)
    if root != DEFAULT_BPFFS:
        name += "@" + root.strip("/").replace("/", "_")
    path = f"{API_DIR}/{name}.sock"
    if len(path.encode()) > _SUN_PATH_MAX:
        import hashlib   # here: its OpenSSL binding costs ~2 ms of every client's start-up
        path = f"{API_DIR}/{hashlib.sha256(name.encode()).hexdigest()[:32]}.sock"
    return path


def encode(doc: dict) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict:
    """One message; ValueError for anything that is not one JSON object on one line."""
    if not line.endswith(b"\n"):
        raise ValueError("truncated message (no newline)")
    doc = json.loads(line)
    if not isinstance(doc, dict):
        raise ValueError("a message is a JSON object")
    return doc


def request(op: str, store: str, node: str, args: dict) -> dict:
    return {"op": op, "store": store, "node": node, "args": args}


def result_of(response: dict):
    """A response -> its result, AtomnetError(msg) or Unavailable(reason)."""
    if "ok" in response:
        return response["ok"]
    if "fallback" in response:
        raise Unavailable(str(response["fallback"]))
    if "error" in response:
        raise AtomnetError(" ".join(str(response["error"]).split()) or "the daemon refused the request")
    raise AtomnetError(f"the atomnet daemon answered something unexpected: {sorted(response)}")


def read_line(sock: socket.socket) -> bytes:
    """Up to and including the first newline (or what came before EOF)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ValueError("message too long")
    return bytes(buf)


def call(path: str | None, op: str, store: str, node: str, args: dict, timeout: float = REPLY_TIMEOUT):
    """Send one request to the daemon at `path` and return its result. Unavailable when no
    daemon took it; AtomnetError for a refusal, a failure, or a daemon that went away after
    taking the request (then it may have done part of it: say so, do not redo it blindly)."""
    if path is None:
        raise Unavailable("node API switched off")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.EACCES, errno.EPERM) \
                    or isinstance(exc, TimeoutError):
                raise Unavailable(f"no daemon at {path}: {exc.strerror or exc}") from None
            raise
        sock.settimeout(timeout)
        try:
            sock.sendall(encode(request(op, store, node, args)))
            line = read_line(sock)
        except TimeoutError:
            raise AtomnetError(f"the atomnet daemon at {path} did not answer {op} within {timeout:.0f}s") from None
        except OSError as exc:
            line, lost = b"", exc.strerror or str(exc)
        else:
            lost = "closed the connection"
        if not line:
            raise AtomnetError(f"the atomnet daemon at {path} went away during {op} ({lost}): it may have done "
                               "part of it; check with `atomnet pod list` and retry (pod del is idempotent)")
        try:
            response = decode(line)
        except ValueError as exc:
            raise AtomnetError(f"the atomnet daemon at {path} answered garbage to {op}: {exc}") from None
        return result_of(response)
    finally:
        sock.close()
