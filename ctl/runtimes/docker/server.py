"""The plugin's HTTP server: HTTP/1.1 over a unix socket (stdlib), one thread per
connection, every call answered by protocol.dispatch under the driver's lock.

Docker finds the plugin by its socket: /run/docker/plugins/NAME.sock makes a driver
named NAME (dockerd 20.10 looks in that fixed directory, whatever its --exec-root).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import structlog

from ...errors import AtomnetError
from . import protocol

log = structlog.get_logger("atomnet.docker")

DEFAULT_SOCKET = "/run/docker/plugins/atomnet.sock"
MAX_BODY = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # Docker keeps its connection to a plugin open
    server_version = "atomnet-docker-plugin"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, protocol.error(self.path, "request too large"))
            return
        body = self.rfile.read(length) if length else b""
        driver = self.server.driver
        try:
            with driver.locked():
                status, resp = protocol.dispatch(driver, self.path, body)
        except Exception as exc:   # a bug: Docker still gets one line, the log gets the rest
            log.exception("docker_call_failed", method=self.path)
            status, resp = 500, protocol.error(self.path, f"atomnet internal error: {type(exc).__name__}: {exc}")
        log.info("docker_call", method=self.path.lstrip("/"), status=status,
                 request=_compact(body), error=resp.get("Err"))
        self._reply(status, resp)

    def _reply(self, status: int, resp: dict) -> None:
        data = json.dumps(resp).encode()
        self.send_response(status)
        self.send_header("Content-Type", protocol.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self):   # a unix socket peer has no address
        return "unix"

    def log_message(self, fmt, *args):   # http.server's own access log: structlog instead
        pass


def _compact(body: bytes):
    try:
        return json.loads(body) if body else None
    except ValueError:
        return body[:200].decode(errors="replace")


class PluginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, driver):
        self.driver, self.path = driver, Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.path)
        super().__init__(str(self.path), _Handler)
        os.chmod(self.path, 0o660)

    def server_close(self):
        super().server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _remove_stale(path: Path) -> None:
    """A socket left by a plugin that died is replaced; one a live plugin answers on is not."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise AtomnetError(f"{path} exists and is not a usable socket: {exc.strerror}") from None
    finally:
        probe.close()
    raise AtomnetError(f"another plugin is already serving on {path}")


def serve(path: str, driver) -> None:
    """Serves until SIGTERM/SIGINT, then removes its socket."""
    server = PluginServer(path, driver)
    stop = threading.Event()

    def _stop(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    driver.start()
    log.info("docker_plugin_ready", socket=str(path), node=driver.node)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        driver.stop()
        server.server_close()
        log.info("docker_plugin_stopped", socket=str(path))
