"""The daemon's side of the node API (the wire format and the client: ctl/runtimes/nodeapi.py).

Each request runs on its own thread (20 concurrent CNI ADDs are 20 threads doing netlink
and store writes, as 20 plugin processes would) against the daemon's open store, through
the very functions the in-process path calls (`perform`: ctl/node/pods.add_pod and
delete_pod, the CNI plugin's `run`), so a failure rolls back exactly as it does there and
answers the same one line. Every key a request wrote is handed to `written(keys)`: the
daemon re-reads those keys and programs them at once, not a watch round later, and the
request is answered when that is done (`written` returns an Event; bounded by PROGRAM_WAIT).

Root only: the socket's directory is 0700 and the socket 0600, and a peer that is not uid 0
(SO_PEERCRED) is refused. A request for another store than the daemon's, or another node,
is answered `fallback`: the client does it in-process, as it would with no daemon at all.
"""
from __future__ import annotations

import os
import socket
import socketserver
import struct
import threading
import time
from typing import Callable, Iterable

import structlog

from ..errors import AtomnetError
from ..node import pods as podlib
from ..state.model import parse_labels
from ..state.store import Store
from . import nodeapi
from .cni import plugin as cni_plugin

log = structlog.get_logger("atomnet.nodeapi")

STOP_GRACE = 10.0   # seconds a stopping daemon lets requests in flight finish (an ADD is ~30 ms)
# A request is answered once the daemon has programmed what it wrote (the pod's endpoint is in
# the map when `pod add` or ADD returns), or after this long if the daemon is busy (a big sync).
PROGRAM_WAIT = 5.0


class RecordingStore:
    """The store as a request sees it: every key it writes or deletes is remembered."""

    def __init__(self, store: Store):
        self._store, self.keys = store, []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put(self, key, value, lease=0):
        self.keys.append(key)
        return self._store.put(key, value, lease)

    def create(self, key, value, lease=0):
        self.keys.append(key)
        return self._store.create(key, value, lease)

    def replace(self, key, value, mod_revision, lease=0):
        self.keys.append(key)
        return self._store.replace(key, value, mod_revision, lease)

    def delete(self, key):
        self.keys.append(key)
        return self._store.delete(key)

    def put_many(self, items, deletes=()):
        items, deletes = list(items), list(deletes)
        self.keys += [k for k, _ in items] + deletes
        return self._store.put_many(items, deletes)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None   # the daemon's store outlives the request: never closed here


def _pod_add(store, node: str, args: dict) -> dict:
    labels = parse_labels(list(args.get("labels") or []))
    return podlib.add_pod(store, node, str(args["name"]), labels, args.get("netns")).to_dict()


def _pod_del(store, node: str, args: dict) -> dict | None:
    gone = podlib.delete_pod(store, node, str(args["name"]))
    return gone.to_dict() if gone else None


def _cni(store, node: str, args: dict) -> dict:
    env, stdin = args["env"], args["stdin"]
    if not isinstance(env, dict) or not isinstance(stdin, str):
        raise AtomnetError("cni: env must be an object and stdin a string")
    out, status = cni_plugin.run({str(k): str(v) for k, v in env.items()}, stdin, store=store, node=node)
    return {"out": out, "status": status}


OPS: dict[str, Callable] = {"pod.add": _pod_add, "pod.del": _pod_del, "cni": _cni}


def perform(store, node: str, op: str, args: dict):
    """One operation, in the daemon or in-process (the CLI's fallback): the same code."""
    if op not in OPS:
        raise AtomnetError(f"unknown node API operation {op!r} (known: {', '.join(sorted(OPS))})")
    if not isinstance(args, dict):
        raise AtomnetError("args must be a JSON object")
    try:
        return OPS[op](store, node, args)
    except KeyError as exc:
        raise AtomnetError(f"{op}: missing argument {exc}") from None


def answer(store: Store, store_url: str, node: str, doc: dict, written: Callable[[list[str]], None]) -> dict:
    """The response to one decoded request (the whole protocol but the socket: unit-tested)."""
    if doc.get("store") != store_url:
        return {"fallback": f"this daemon serves store {store_url}, not {doc.get('store')}"}
    if doc.get("node") != node:
        return {"fallback": f"this daemon is node {node}'s, not {doc.get('node')}'s"}
    recording = RecordingStore(store)
    started, outcome = time.monotonic(), "ok"
    try:
        return {"ok": perform(recording, node, str(doc.get("op")), doc.get("args"))}
    except AtomnetError as exc:
        outcome = "error"
        return {"error": str(exc).strip()}
    except Exception as exc:   # a bug: one line to the client, the traceback in the daemon's log
        outcome = "error"
        log.exception("nodeapi_crashed", op=doc.get("op"))
        return {"error": f"internal error in the daemon: {type(exc).__name__}: {exc}"}
    finally:
        if recording.keys:
            done = written(list(dict.fromkeys(recording.keys)))
            if done is not None and not done.wait(PROGRAM_WAIT):   # answered anyway: it is stored
                log.warning("nodeapi_not_programmed_yet", op=doc.get("op"), waited=PROGRAM_WAIT)
        log.info("nodeapi_request", op=doc.get("op"), outcome=outcome, seconds=round(time.monotonic() - started, 4))


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        srv: NodeAPI = self.server.api
        sock = self.request
        with srv.inflight_lock:
            srv.inflight += 1
        try:
            sock.settimeout(nodeapi.REPLY_TIMEOUT)
            if peer_uid(sock) != 0:
                response = {"error": "the node API is root's only"}
            else:
                try:
                    doc = nodeapi.decode(nodeapi.read_line(sock))
                except ValueError as exc:
                    response = {"error": f"bad request: {exc}"}
                else:
                    response = answer(srv.store, srv.store_url, srv.node, doc, srv.written)
            sock.sendall(nodeapi.encode(response))
        except OSError as exc:   # the client went away: its request was still done (or undone) whole
            log.warning("nodeapi_client_gone", error=str(exc))
        finally:
            with srv.inflight_lock:
                srv.inflight -= 1
                srv.inflight_lock.notify_all()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 64   # 20 concurrent ADDs (and more) queue in the backlog, none refused


class NodeAPI:
    def __init__(self, path: str, store: Store, store_url: str, node: str, written: Callable[[Iterable[str]], None]):
        self.path, self.store, self.store_url, self.node, self.written = path, store, store_url, node, written
        self.inflight, self.inflight_lock = 0, threading.Condition()
        self._server: _Server | None = None
        self._inode = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                raise AtomnetError(f"another daemon serves the node API at {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)   # a killed daemon's socket: nobody listens
            finally:
                probe.close()
        old = os.umask(0o177)   # created 0600: no window in which another user could connect
        try:
            self._server = _Server(self.path, _Handler)
        finally:
            os.umask(old)
        self._server.api = self
        self._inode = os.stat(self.path).st_ino
        threading.Thread(target=self._server.serve_forever, name="nodeapi", daemon=True).start()
        log.info("nodeapi_serving", socket=self.path)

    def stop(self) -> None:
        """Stops taking requests, lets those in flight finish (bounded), removes the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        try:
            if os.stat(self.path).st_ino == self._inode:   # never remove a newer daemon's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        with self.inflight_lock:
            self.inflight_lock.wait_for(lambda: self.inflight == 0, timeout=STOP_GRACE)
        self._server = None


def serve(store: Store, store_url: str, node: str, bpffs: str, written: Callable[[list[str]], None]) -> NodeAPI | None:
    """The daemon's hook: the API on this node's socket, or None when switched off
    (ATOMNET_API_SOCKET=off) or the socket cannot be served (logged: pod add works in-process)."""
    path = nodeapi.socket_path(node, bpffs)
    if path is None:
        return None
    api = NodeAPI(path, store, store_url, node, written)
    try:
        api.start()
    except (AtomnetError, OSError) as exc:
        log.error("nodeapi_failed", socket=path, error=str(exc))
        return None
    return api
