"""Cluster store backend: etcd v3 through its gRPC gateway (JSON over HTTP), with etcd3gw.

    etcd://HOST:PORT[,HOST:PORT...]      (port defaults to 2379; [v6addr]:PORT)

Requests go to the first endpoint that accepts a connection; on a connection
failure (refused, connect timeout, unresolvable name) the next one is tried,
and the one that answered is used from then on. A failure after the request
was sent is not retried elsewhere, since a write may already have been applied;
it is a StoreError like everything else. Every error is one line naming the URL.

The contract maps onto etcd directly: create is a transaction comparing
create_revision with 0, replace one comparing mod_revision, put_many one
transaction (one revision), delete_prefix a range delete, revoke/expiry etcd's
own lease revocation (one revision, delete events in key order). Keys and
values travel as base64 of their UTF-8 bytes, so prefixes are byte ranges,
which sort like the code points the sqlite backend sorts by.

Cluster requirements for bulk applies: put_many sends one transaction with
one operation per key, so the cluster must run with --max-txn-ops above the
largest apply (default 128; e.g. 100000) and --max-request-bytes above its
size (default 1.5 MiB; e.g. 67108864). Otherwise put_many fails with a
StoreError saying so.

Where etcd differs from the contract (and from the sqlite backend):
- Lease TTLs are whole seconds: grant() rounds up (at least 1 s), and the
  server may raise it to its minimum (1.5 election timeouts, 2 s with the
  default flags). Expiry is checked by the leader every 500 ms, so keys of an
  expired lease go up to about half a second late.
- etcd reports a lease's time to live in whole seconds (truncated). lease_ttl()
  narrows it with the grant/refresh time when this store object granted or
  refreshed the lease itself; otherwise it returns the middle of the second.
- watch() history comes from etcd's watch: a watch that starts at or before
  the current revision opens a stream over the whole key space (filtered
  here) until it has seen the current revision, since etcd does not say when
  a catch-up is done; following changes (start = last revision + 1) watches
  only the prefix. After compact(R), watch(prefix, R) still returns the puts
  of revision R but no longer its deletes (etcd drops those tombstones).
- compact() of a revision at or below an earlier compaction is a no-op, as
  in sqlite.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import requests
import urllib3.exceptions
from etcd3gw import exceptions as gw_exceptions
from etcd3gw.client import Etcd3Client

from .base import KV, Compacted, Event, Store, StoreError, split_batch

DEFAULT_PORT = 2379
CONNECT_TIMEOUT = 3.0  # seconds to wait for a TCP connection before trying the next endpoint
REQUEST_TIMEOUT = 30.0  # seconds to wait for an answer (a refresh may wait for a revocation)

_ALL = base64.b64encode(b"\0").decode()  # key "\0" with range_end "\0": the whole key space
_URL_HELP = "use etcd://HOST:PORT[,HOST:PORT...]"


# --- encoding ---------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str | None) -> str:
    return base64.b64decode(data).decode() if data else ""


def _range(prefix: str) -> dict[str, str]:
    """key/range_end selecting every key that starts with prefix ("" = all keys)."""
    raw = prefix.encode()
    while raw and raw[-1] == 0xFF:  # cannot happen for UTF-8, kept for correctness
        raw = raw[:-1]
    if not raw:
        return {"key": _ALL, "range_end": _ALL}
    end = raw[:-1] + bytes([raw[-1] + 1])
    return {"key": _b64(prefix), "range_end": base64.b64encode(end).decode()}


def _kv(d: dict[str, Any]) -> KV:
    return KV(
        key=_unb64(d["key"]),
        value=_unb64(d.get("value")),
        create_revision=int(d.get("create_revision", 0)),
        mod_revision=int(d.get("mod_revision", 0)),
        version=int(d.get("version", 0)),
        lease=int(d.get("lease", 0)),
    )


def _event(d: dict[str, Any]) -> Event:
    kv = d["kv"]
    if d.get("type") == "DELETE":
        return Event("delete", _unb64(kv["key"]), None, int(kv["mod_revision"]))
    return Event("put", _unb64(kv["key"]), _unb64(kv.get("value")), int(kv["mod_revision"]))


def _revision(resp: dict[str, Any]) -> int:
    return int(resp["header"]["revision"])


# --- URLs -------------------------------------------------------------------


def _parse_url(url: str) -> list[tuple[str, int]]:
    rest = url.removeprefix("etcd://")
    bad = StoreError(f"bad etcd store URL {url!r}: {_URL_HELP}")
    if rest == url:
        raise bad
    endpoints = []
    for part in rest.removesuffix("/").split(","):
        part = part.strip()
        if part.startswith("["):  # [v6addr] or [v6addr]:port
            host, _, tail = part[1:].partition("]")
            if tail and not tail.startswith(":"):
                raise bad
            port = tail[1:] if tail else ""
        else:
            host, sep, port = part.rpartition(":")
            if not sep:
                host, port = part, ""
            if ":" in host:
                raise bad
        if not host or "/" in host or any(c.isspace() for c in host):
            raise bad
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise bad
        endpoints.append((host, int(port) if port else DEFAULT_PORT))
    return endpoints


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- errors -----------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and every exception it wraps (causes, contexts, urllib3 reasons, args)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _is_connect_failure(exc: BaseException) -> bool:
    """The request never reached the server, so another endpoint may be tried safely."""
    return any(
        isinstance(e, (urllib3.exceptions.ConnectTimeoutError, requests.exceptions.ConnectTimeout))
        for e in _chain(exc)
    )


def _socket_reason(exc: BaseException, timeout: float) -> str:
    """A short lowercase reason for a socket-level failure, e.g. 'connection refused'."""
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, socket.gaierror):
            return f"cannot resolve host name ({e.strerror})"
    for e in chain:
        if isinstance(e, TimeoutError) or (
            isinstance(e, urllib3.exceptions.ConnectTimeoutError)
            and not isinstance(e, urllib3.exceptions.NewConnectionError)
        ):
            return f"timed out after {timeout:g}s"
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno).lower()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _server_message(exc: gw_exceptions.Etcd3Exception) -> tuple[str, int | None]:
    """The gateway's error text and gRPC code from an HTTP error answer."""
    text = exc.detail_text or ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        msg = body.get("message") or body.get("error") or text
        return " ".join(str(msg).split()), body.get("code")
    # Not the gateway's JSON: something else answered (wrong port, a proxy, an old etcd).
    reason = " ".join(str(a) for a in exc.args) or type(exc).__name__
    snippet = " ".join(text.split())[:120]
    detail = f"unexpected answer: {reason}" + (f": {snippet}" if snippet else "")
    return f"{detail} (is this an etcd v3 client URL?)", None


class EtcdRequestError(StoreError):
    """etcd answered a request with an error; server_message and grpc_code say which."""

    def __init__(self, text: str, server_message: str, grpc_code: int | None) -> None:
        super().__init__(text)
        self.server_message = server_message
        self.grpc_code = grpc_code


def _server_said(exc: StoreError, *needles: str) -> bool:
    return isinstance(exc, EtcdRequestError) and any(n in exc.server_message for n in needles)


# --- the store --------------------------------------------------------------


# A watch stream may stay open for minutes with nothing on it; the kernel's TCP keepalive
# probes find a peer that went away without closing (a partition, a host that died) in
# IDLE + INTERVAL * COUNT seconds, without any wake-up of ours while it is alive.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3


def _keepalive(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except (OSError, AttributeError):
        pass   # not a TCP socket on Linux: the watch's own timeout still ends it


class _LiveWatch:
    """An open watch stream of prefix parked between watch() calls: every event before
    position was read and returned, so a watch(prefix, position) goes on reading it."""
    __slots__ = ("conn", "sock", "resp", "prefix", "position")

    def __init__(self, conn, sock, resp, prefix: str, position: int) -> None:
        self.conn, self.sock, self.resp, self.prefix, self.position = conn, sock, resp, prefix, position


class EtcdStore(Store):
    """The Store contract on an etcd v3 cluster; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.url = url
        self.endpoints = _parse_url(url)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._session: requests.Session | None = requests.Session()
        # One etcd3gw client per endpoint, sharing the session (its connection pool).
        # The API path (/v3/ on etcd >= 3.4) is discovered per endpoint from /version.
        self._clients = [
            Etcd3Client(host=h, port=p, timeout=(connect_timeout, request_timeout), session=self._session)
            for h, p in self.endpoints
        ]
        self._current = 0  # index of the endpoint that answered last
        self._lock = threading.Lock()
        # lease id -> local monotonic time it expires at, for leases this object granted or refreshed
        self._lease_deadlines: dict[int, float] = {}
        self._live: _LiveWatch | None = None   # the watch stream kept between watch() calls
        try:
            self.revision()  # fail now, with one line, if the cluster cannot be reached
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"EtcdStore({self.url!r})"

    # --- requests ------------------------------------------------------

    def _check_open(self) -> None:
        if self._session is None:
            raise StoreError(f"etcd store {self.url} is closed")

    def _each_endpoint(self) -> Iterator[int]:
        with self._lock:
            first = self._current
        n = len(self.endpoints)
        return ((first + i) % n for i in range(n))

    def _unreachable(self, failures: list[tuple[int, str]]) -> StoreError:
        if len(self.endpoints) == 1:
            reasons = failures[0][1]
        else:
            reasons = "; ".join(f"{_hostport(*self.endpoints[i])} {r}" for i, r in failures)
        return StoreError(f"etcd store {self.url} unreachable: {reasons}")

    def _call(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        """POST body to the gateway path (e.g. "/kv/range") through etcd3gw; the JSON answer."""
        self._check_open()
        failures: list[tuple[int, str]] = []
        for i in self._each_endpoint():
            client = self._clients[i]
            try:
                resp = client.post(client.get_url(path), json=body)
            except gw_exceptions.Etcd3Exception as e:
                if _is_connect_failure(e):
                    failures.append((i, _socket_reason(e, self.connect_timeout)))
                    continue
                raise self._error(e, i, what) from None
            except requests.exceptions.RequestException as e:  # e.g. an answer that is not JSON
                raise StoreError(f"etcd store {self.url}: {what} via {_hostport(*self.endpoints[i])}: {e}") from None
            with self._lock:
                self._current = i
            # Streaming endpoints (lease/keepalive) wrap their answer in "result".
            return resp.get("result", resp) if isinstance(resp, dict) else resp
        raise self._unreachable(failures)

    def _error(self, exc: gw_exceptions.Etcd3Exception, i: int, what: str) -> StoreError:
        hp = _hostport(*self.endpoints[i])
        chain = list(_chain(exc))
        if any(isinstance(e, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)) for e in chain):
            return StoreError(f"etcd store {self.url}: no answer from {hp} to {what} within {self.request_timeout:g}s")
        if any(isinstance(e, requests.exceptions.ConnectionError) for e in chain):
            reason = _socket_reason(exc, self.request_timeout)
            return StoreError(f"etcd store {self.url}: connection to {hp} failed during {what}: {reason}")
        msg, code = _server_message(exc)
        return EtcdRequestError(f"etcd store {self.url}: {what} failed: {msg}", msg, code)

    # --- the Store contract --------------------------------------------

    def get(self, key: str) -> KV | None:
        resp = self._call("/kv/range", {"key": _b64(key)}, f"get {key}")
        kvs = resp.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[KV], int]:
        resp = self._call("/kv/range", _range(prefix), f"list {prefix}")
        return [_kv(d) for d in resp.get("kvs") or []], _revision(resp)

    @staticmethod
    def _put_op(key: str, value: str, lease: int) -> dict[str, Any]:
        op: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            op["lease"] = lease
        return {"request_put": op}

    def put(self, key: str, value: str, lease: int = 0) -> int:
        body = self._put_op(key, value, lease)["request_put"]
        return _revision(self._call("/kv/put", body, f"put {key}"))

    def _txn(self, compare: dict[str, Any], key: str, value: str, lease: int, what: str) -> bool:
        body = {"compare": [compare], "success": [self._put_op(key, value, lease)]}
        return bool(self._call("/kv/txn", body, what).get("succeeded", False))

    def create(self, key: str, value: str, lease: int = 0) -> bool:
        compare = {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}
        return self._txn(compare, key, value, lease, f"create {key}")

    def replace(self, key: str, value: str, mod_revision: int, lease: int = 0) -> bool:
        if mod_revision <= 0:  # etcd would treat 0 as "absent" and create the key
            return False
        compare = {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": mod_revision}
        return self._txn(compare, key, value, lease, f"replace {key}")

    def delete(self, key: str) -> bool:
        resp = self._call("/kv/deleterange", {"key": _b64(key)}, f"delete {key}")
        return int(resp.get("deleted", 0)) > 0

    def delete_prefix(self, prefix: str) -> int:
        resp = self._call("/kv/deleterange", _range(prefix), f"delete prefix {prefix}")
        return int(resp.get("deleted", 0))

    def put_many(self, items: Iterable[tuple[str, str]], deletes: Iterable[str] = ()) -> int:
        puts, dels = split_batch(items, deletes, f"etcd store {self.url}")
        if not puts and not dels:
            return self.revision()
        ops = [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in puts.items()]
        ops += [{"request_delete_range": {"key": _b64(k)}} for k in dels]
        try:
            resp = self._call("/kv/txn", {"success": ops}, f"put_many of {len(ops)} operations")
        except EtcdRequestError as e:
            if _server_said(e, "too many operations", "too large") or e.grpc_code == 8:  # 8: RESOURCE_EXHAUSTED
                raise StoreError(
                    f"{e} (bulk applies are one transaction: the etcd cluster needs "
                    f"--max-txn-ops >= {len(ops)} and a --max-request-bytes large enough)"
                ) from None
            raise
        # A transaction that changed nothing (deletes of absent keys) keeps the revision.
        return _revision(resp)

    def revision(self) -> int:
        return _revision(self._call("/kv/range", {"key": _ALL, "limit": 1, "keys_only": True}, "read revision"))

    # --- watch ---------------------------------------------------------

    def _compacted(self, start: int, compact_revision: int) -> Compacted:
        return Compacted(
            f"etcd store {self.url}: history before revision {compact_revision} is compacted, "
            f"cannot watch from {start}; list again"
        )

    def _open_watch(self, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, socket.socket, Any]:
        """Open a watch stream (the gateway's /watch): connection, its socket, the response."""
        self._check_open()
        failures: list[tuple[int, str]] = []
        for i in self._each_endpoint():
            host, port = self.endpoints[i]
            client = self._clients[i]
            try:
                path = client.api_path + "watch"  # may discover the API path: a request of its own
            except gw_exceptions.Etcd3Exception as e:
                if _is_connect_failure(e):
                    failures.append((i, _socket_reason(e, self.connect_timeout)))
                    continue
                raise self._error(e, i, "watch") from None
            conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
            try:
                conn.connect()
            except OSError as e:
                conn.close()
                failures.append((i, _socket_reason(e, self.connect_timeout)))
                continue
            sock = conn.sock
            _keepalive(sock)
            try:
                sock.settimeout(self.request_timeout)
                conn.request("POST", path, body=json.dumps({"create_request": body}),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
            except OSError as e:
                conn.close()
                reason = _socket_reason(e, self.request_timeout)
                raise StoreError(f"etcd store {self.url}: watch via {_hostport(host, port)} failed: {reason}") from None
            if resp.status != 200:
                text = resp.read(4096).decode(errors="replace")
                conn.close()
                msg, _ = _server_message(gw_exceptions.Etcd3Exception(text, resp.reason))
                raise StoreError(f"etcd store {self.url}: watch failed: HTTP {resp.status}: {msg}")
            with self._lock:
                self._current = i
            return conn, sock, resp
        raise self._unreachable(failures)

    def _read_batch(self, sock: socket.socket, resp: Any, start: int, deadline: float) -> list[Event] | None:
        """The next non-empty event batch of an open watch stream; None at deadline (monotonic)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(left)
            try:
                line = resp.readline()
            except TimeoutError:
                return None
            except (OSError, http.client.HTTPException) as e:
                raise StoreError(f"etcd store {self.url}: watch stream broke: {e}") from None
            if not line:
                raise StoreError(f"etcd store {self.url}: watch stream closed by the server")
            if not line.strip():
                continue
            msg = json.loads(line)
            if "error" in msg:
                err = msg["error"]
                text = err.get("message") or err.get("error") if isinstance(err, dict) else err
                raise StoreError(f"etcd store {self.url}: watch failed: {text}")
            result = msg.get("result", {})
            compact_revision = int(result.get("compact_revision", 0))
            if compact_revision:
                raise self._compacted(start, compact_revision)
            if result.get("canceled"):
                reason = result.get("cancel_reason") or "canceled by the server"
                raise StoreError(f"etcd store {self.url}: watch failed: {reason}")
            if result.get("events"):
                return [_event(e) for e in result["events"]]

    def _watch_stream(self, body: dict[str, Any], start: int, deadline: float) -> Iterator[list[Event]]:
        """Event batches from one watch stream until deadline (monotonic); closes it when done."""
        conn, sock, resp = self._open_watch(body)
        try:
            while True:
                batch = self._read_batch(sock, resp, start, deadline)
                if batch is None:
                    return
                yield batch
        finally:
            conn.close()  # the gateway cancels the server-side watcher when the stream closes

    # One watch stream is kept open between watch() calls that go on where the last one
    # stopped (the daemon's loop): reopening costs a revision read and a stream set-up per
    # change, and a change written before the new stream's watcher is registered makes it an
    # "unsynced" watcher, which etcd serves only from its syncWatchersLoop, every 100 ms
    # (mvcc/watchable_store.go): measured, back-to-back changes waited p50 77 ms, p99 250 ms.
    def _park(self, live: _LiveWatch) -> None:
        with self._lock:
            old, self._live = self._live, live
        if old is not None and old.conn is not live.conn:
            old.conn.close()

    def _take_live(self, prefix: str, start: int) -> _LiveWatch | None:
        """The parked stream if it continues exactly where a watch(prefix, start) must begin."""
        with self._lock:
            live, self._live = self._live, None
        if live is None:
            return None
        if (live.prefix, live.position) == (prefix, start):
            return live
        live.conn.close()
        return None

    def _history(self, prefix: str, start: int, current: int) -> tuple[list[Event], int]:
        """Events under prefix from start (<= current) on, and the last revision examined.

        etcd sends a catch-up batch only if there is something to send and never
        says "caught up", so this watches the whole key space, where the current
        revision is known to have an event, and reads until it has arrived.
        """
        if start == current and self._is_compacted(current - 1):
            # Compacted exactly here: etcd has dropped this revision's deletes, and a
            # watch would wait for them forever. Its puts are still readable.
            resp = self._call(
                "/kv/range",
                {**_range(prefix), "revision": current, "min_mod_revision": current, "max_mod_revision": current},
                f"watch {prefix}",
            )
            return [Event("put", kv.key, kv.value, current) for kv in map(_kv, resp.get("kvs") or [])], current
        found: list[Event] = []
        deadline = time.monotonic() + self.request_timeout
        for batch in self._watch_stream({"key": _ALL, "range_end": _ALL, "start_revision": start}, start, deadline):
            found += [e for e in batch if e.key.startswith(prefix)]
            last = batch[-1].revision
            if last >= current:
                return found, last
        raise StoreError(
            f"etcd store {self.url}: watch history from {start} to {current} did not arrive "
            f"within {self.request_timeout:g}s"
        )

    def _is_compacted(self, revision: int) -> bool:
        try:
            self._call("/kv/range", {"key": _ALL, "limit": 1, "keys_only": True, "revision": revision}, "watch")
        except StoreError as e:
            if _server_said(e, "compacted"):
                return True
            raise
        return False

    def watch(self, prefix: str, start_revision: int, timeout: float) -> list[Event]:
        deadline = time.monotonic() + max(timeout, 0.0)
        start = max(start_revision, 1)
        live = self._take_live(prefix, start)
        if live is not None:
            return self._watch_live(live, prefix, start, deadline)
        current = self.revision()
        if start <= current and current > 1:  # revision 1 is the empty store: no events
            found, last = self._history(prefix, start, current)
            if found:
                return found
            start = last + 1
        if time.monotonic() >= deadline:
            return []
        conn, sock, resp = self._open_watch({**_range(prefix), "start_revision": start})
        return self._watch_live(_LiveWatch(conn, sock, resp, prefix, start), prefix, start, deadline)

    def _watch_live(self, live: _LiveWatch, prefix: str, start: int, deadline: float) -> list[Event]:
        """The next events of an open stream; parks it when they are returned, else closes it."""
        ok = False
        try:
            while True:
                batch = self._read_batch(live.sock, live.resp, start, deadline)
                if batch is None:   # timed out: closed below, as a fresh stream would be
                    return []
                live.position = batch[-1].revision + 1
                found = [e for e in batch if e.key.startswith(prefix)]
                if found:
                    ok = True
                    return found
        finally:
            if ok and self._session is not None:
                self._park(live)
            else:
                live.conn.close()

    def compact(self, revision: int) -> None:
        try:
            self._call("/kv/compaction", {"revision": revision, "physical": False}, f"compact to {revision}")
        except StoreError as e:
            if _server_said(e, "compacted"):
                return  # already compacted further: nothing to do, as in sqlite
            raise

    # --- leases --------------------------------------------------------

    def grant(self, ttl: float) -> int:
        if not ttl > 0:
            raise StoreError(f"etcd store {self.url}: lease ttl must be positive, got {ttl!r}")
        seconds = max(1, math.ceil(ttl))  # etcd TTLs are whole seconds
        t0 = time.monotonic()
        resp = self._call("/lease/grant", {"TTL": seconds, "ID": 0}, f"grant a {seconds}s lease")
        if resp.get("error"):
            raise StoreError(f"etcd store {self.url}: grant failed: {resp['error']}")
        lease = int(resp["ID"])
        self._lease_deadlines[lease] = t0 + int(resp.get("TTL", seconds))
        return lease

    def refresh(self, lease: int) -> None:
        t0 = time.monotonic()
        resp = self._call("/lease/keepalive", {"ID": lease}, f"refresh lease {lease}")
        granted = int(resp.get("TTL", 0))
        if granted <= 0:
            self._lease_deadlines.pop(lease, None)
            raise StoreError(f"lease {lease} expired or unknown in etcd store {self.url}")
        self._lease_deadlines[lease] = t0 + granted

    def revoke(self, lease: int) -> None:
        self._lease_deadlines.pop(lease, None)
        try:
            self._call("/lease/revoke", {"ID": lease}, f"revoke lease {lease}")
        except StoreError as e:
            if _server_said(e, "lease not found"):
                return  # expired or unknown: the keys are gone either way
            raise

    def lease_ttl(self, lease: int) -> float | None:
        resp = self._call("/lease/timetolive", {"ID": lease}, f"read lease {lease}")
        now = time.monotonic()
        ttl = int(resp.get("TTL", 0))  # whole seconds left, truncated; -1 if gone
        if ttl < 0:
            self._lease_deadlines.pop(lease, None)
            return None
        local = self._lease_deadlines.get(lease)
        if local is None:
            return ttl + 0.5
        # Our own grant/refresh time is a little early (it is taken before the request), so
        # it never overstates; keep it within the second etcd reported.
        left = min(max(local - now, float(ttl)), ttl + 0.999)
        return left if left > 0 else None

    def close(self) -> None:
        with self._lock:
            live, self._live = self._live, None
        if live is not None:
            live.conn.close()
        session, self._session = self._session, None
        if session is not None:
            session.close()
