"""A real, throwaway single-member etcd server for tests.

    with EtcdServer() as etcd:                  # 127.0.0.1, free client and peer ports
        store = open_store(etcd.url)            # "etcd://127.0.0.1:PORT"

    # e2e: inside a network namespace, listening on the underlay address
    etcd = EtcdServer("10.99.0.1", prefix=["nsenter", "--net=/run/netns/X"]).start()
    ...
    etcd.stop()

Each server gets its own temporary directory (data dir and log) that stop()
removes, and is stopped by its PID (SIGTERM, then SIGKILL), never by name.
It also gets PR_SET_PDEATHSIG, so a test run that dies without tearing down
does not leave an etcd behind.

With a ``prefix`` (a command run in front of etcd, such as nsenter), the port
probe and the health check run through the same prefix, so they look at the
namespace etcd listens in. The prefix must exec its command (nsenter and
``ip netns exec`` do), so that the PID we hold is etcd's own.

The flags make the server fit atomnet's store contract and fast tests:
- --max-txn-ops / --max-request-bytes large: put_many is one transaction of
  up to tens of thousands of operations (the defaults are 128 and 1.5 MiB);
- heartbeat 10 ms / election 100 ms: etcd's minimum lease TTL is
  1.5 election timeouts rounded up to a second (2 s with the defaults),
  so these make 1 s leases real.

This file only uses the standard library: it is also run as a script (through
the prefix) to probe ports and wait for health inside a namespace.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence

ETCD = "etcd"
MAX_TXN_OPS = 100_000
MAX_REQUEST_BYTES = 64 * 1024 * 1024
START_TIMEOUT = 20.0  # seconds to wait for /health


class EtcdServerError(RuntimeError):
    """The test etcd could not be started; the message ends with its log tail."""


def etcd_available(etcd: str = ETCD) -> str | None:
    """None if the etcd binary is on PATH, else the reason (for pytest.skip)."""
    if shutil.which(etcd) is None:
        return f"{etcd} not found on PATH: apt-get install etcd-server"
    return None


# --- helpers that also run as a script inside a namespace ---------------------


def _free_ports(host: str, count: int) -> list[int]:
    """count distinct ports that are free on host right now (bind to port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _health(client_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(client_url + "/health", timeout=timeout) as resp:
            return json.load(resp).get("health") == "true"
    except (OSError, ValueError):
        return False


def _wait_healthy(client_url: str, deadline: float, alive=lambda: True) -> bool:
    while time.monotonic() < deadline:
        if not alive():
            return False
        if _health(client_url):
            return True
        time.sleep(0.05)
    return False


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _set_pdeathsig() -> None:
    """In the child before exec: get SIGKILL if the test process dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; stop() is the normal path
        pass


class EtcdServer:
    """One etcd member: start(), then url / client_url; stop() (or use it as a context manager).

    host: the address to listen on (client and peer), 127.0.0.1 by default.
    client_port, peer_port: fixed ports, or None to pick free ones on host.
    prefix: command prefix for etcd (and for the port probe and health check),
        e.g. ["nsenter", "--net=/run/netns/X"]; () runs in this namespace.
    data_parent: where the temporary directory goes (default: the system temp dir).
    extra_args: more etcd flags, appended last (so they override ours).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        prefix: Sequence[str] = (),
        data_parent: str | None = None,
        extra_args: Sequence[str] = (),
        etcd: str = ETCD,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.prefix = list(prefix)
        self.data_parent = data_parent
        self.extra_args = list(extra_args)
        self.etcd = etcd
        self.start_timeout = start_timeout
        self.name = f"atomnet-test-{uuid.uuid4().hex[:8]}"
        self.tmpdir: str | None = None
        self.proc: subprocess.Popen | None = None

    # --- addresses -------------------------------------------------------

    @property
    def client_url(self) -> str:
        """http://HOST:PORT, for etcdctl --endpoints or raw gateway calls."""
        return f"http://{_host_in_url(self.host)}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{_host_in_url(self.host)}:{self.peer_port}"

    @property
    def url(self) -> str:
        """The atomnet store URL: etcd://HOST:PORT."""
        return f"etcd://{_host_in_url(self.host)}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> str | None:
        return os.path.join(self.tmpdir, "etcd.log") if self.tmpdir else None

    def __repr__(self) -> str:
        return f"EtcdServer({self.url!r}, pid={self.pid})"

    # --- lifecycle -------------------------------------------------------

    def _run_helper(self, *args: str) -> str:
        """Run this file as a script through the prefix; its stdout."""
        cmd = [*self.prefix, sys.executable, os.path.abspath(__file__), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=self.start_timeout + 10)
        if res.returncode != 0:
            raise EtcdServerError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout.strip()

    def _pick_ports(self) -> None:
        need = [self.client_port is None, self.peer_port is None].count(True)
        if not need:
            return
        if self.prefix:
            ports = [int(p) for p in self._run_helper("free-ports", self.host, str(need)).split()]
        else:
            ports = _free_ports(self.host, need)
        if self.client_port is None:
            self.client_port = ports.pop(0)
        if self.peer_port is None:
            self.peer_port = ports.pop(0)

    def command(self) -> list[str]:
        assert self.tmpdir is not None
        return [
            *self.prefix, self.etcd,
            "--name", self.name,
            "--data-dir", os.path.join(self.tmpdir, "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.name,
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--max-txn-ops", str(MAX_TXN_OPS),
            "--max-request-bytes", str(MAX_REQUEST_BYTES),
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self.extra_args,
        ]

    def start(self) -> EtcdServer:
        """Start etcd and wait until /health says true; EtcdServerError (with the log tail) if not.

        Free ports are picked by binding to port 0 and closing, so another
        process can grab one before etcd binds it: then this retries with new
        ports (only the ports it picked itself).
        """
        if self.proc is not None:
            raise EtcdServerError(f"{self!r} is already started")
        fixed = self.client_port is not None and self.peer_port is not None
        for attempt in range(1 if fixed else 3):
            try:
                self._start_once()
                return self
            except EtcdServerError as e:
                in_use = "address already in use" in str(e)
                if fixed or not in_use or attempt == 2:
                    raise
                self.client_port = self.peer_port = None
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self._pick_ports()
        self.tmpdir = tempfile.mkdtemp(prefix="atomnet-etcd-", dir=self.data_parent)
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=_set_pdeathsig,
                )
            ok = self._wait_healthy()
            if not ok:
                state = "exited" if self.proc.poll() is not None else "not healthy in time"
                raise EtcdServerError(f"etcd at {self.client_url} {state}:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> bool:
        alive = lambda: self.proc is not None and self.proc.poll() is None  # noqa: E731
        deadline = time.monotonic() + self.start_timeout
        if not self.prefix:
            return _wait_healthy(self.client_url, deadline, alive)
        # Inside the namespace: poll from a helper there, and stop early if etcd dies.
        helper = subprocess.Popen(
            [*self.prefix, sys.executable, os.path.abspath(__file__), "wait-healthy", self.client_url,
             str(self.start_timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            while helper.poll() is None and alive():
                time.sleep(0.05)
            return alive() and helper.poll() is not None and helper.stdout.read().strip() == "healthy"
        finally:
            if helper.poll() is None:
                helper.kill()
            helper.wait()
            helper.stdout.close()

    def halt(self) -> None:
        """Stops etcd by its PID like stop(), but keeps its data directory and ports: resume()
        brings the same member back with everything it stored (a fault test's outage)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def resume(self) -> None:
        """Starts the halted member again on the same data and ports; waits for /health."""
        if self.proc is not None or self.tmpdir is None:
            raise EtcdServerError(f"{self!r} is not halted")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_set_pdeathsig)
        if not self._wait_healthy():
            raise EtcdServerError(f"etcd at {self.client_url} did not come back:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (OSError, TypeError):
            return "(no log)"

    def stop(self) -> None:
        """Stop etcd by its PID (SIGTERM, SIGKILL after 5 s) and remove the temporary directory."""
        self.halt()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> EtcdServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- test conveniences -----------------------------------------------

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.client_url}/v3/{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read().splitlines()[0])

    def wipe(self) -> None:
        """Delete every key (one revision) and revoke every lease: an empty store for the next test.

        Revisions keep growing (etcd never resets them); the contract tests only
        compare revisions relative to each other. Needs the client URL to be
        reachable from this process (not inside another namespace).
        """
        everything = base64.b64encode(b"\0").decode()
        self._post("kv/deleterange", {"key": everything, "range_end": everything})
        for lease in self._post("lease/leases", {}).get("leases", []):
            try:
                self._post("lease/revoke", {"ID": int(lease["ID"])})
            except urllib.error.HTTPError as e:
                if e.code != 404:  # expired meanwhile: fine
                    raise


def _main(argv: list[str]) -> int:
    """Script mode, run through a prefix: free-ports HOST N | wait-healthy URL TIMEOUT."""
    if argv[:1] == ["free-ports"] and len(argv) == 3:
        print(" ".join(map(str, _free_ports(argv[1], int(argv[2])))))
        return 0
    if argv[:1] == ["wait-healthy"] and len(argv) == 3:
        ok = _wait_healthy(argv[1], time.monotonic() + float(argv[2]))
        print("healthy" if ok else "unhealthy")
        return 0
    print("usage: etcd_server.py free-ports HOST N | wait-healthy URL TIMEOUT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
