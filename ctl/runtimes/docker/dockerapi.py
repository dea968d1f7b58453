"""The little of Docker's Engine API the plugin reads: which container an endpoint
belongs to (a network driver is never told its name, labels or id).

Called from a thread of its own after Join, never while Docker waits for our answer:
dockerd is in the middle of connecting the container then.
"""
from __future__ import annotations

import http.client
import json
import socket
import time

import structlog

from ...state.model import ValidationError, parse_labels
from ...state.names import DOCKER_NAME_LABEL

log = structlog.get_logger("atomnet.docker")

NAME_LABEL = DOCKER_NAME_LABEL   # the pod label carrying the container's name


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class DockerAPI:
    def __init__(self, host: str, timeout: float = 10):
        if not host.startswith("unix://"):
            raise ValueError(f"docker host {host!r}: only unix:// sockets are supported")
        self.path, self.timeout = host[len("unix://"):], timeout

    def containers(self) -> list[dict]:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            conn.request("GET", "/containers/json?all=1")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise OSError(f"docker API answered {resp.status}")
            return json.loads(body)
        finally:
            conn.close()


def find_container(containers: list[dict], endpoint_id: str) -> dict | None:
    """The container (as /containers/json lists it) attached through endpoint_id (or an
    id prefix of at least 12 digits, as pod names carry)."""
    for c in containers:
        for net in ((c.get("NetworkSettings") or {}).get("Networks") or {}).values():
            if ((net or {}).get("EndpointID") or "").startswith(endpoint_id):
                return c
    return None


def pod_labels(container: dict) -> dict[str, str]:
    """The container's labels that are valid pod labels (Kubernetes syntax; others are
    skipped), plus its name as NAME_LABEL when that is a valid label value."""
    out = {}
    items = list((container.get("Labels") or {}).items())
    names = container.get("Names") or []
    if names:
        items.append((NAME_LABEL, names[0].lstrip("/")))
    for key, value in items:
        try:
            out.update(parse_labels([f"{key}={value}"]))
        except ValidationError:
            log.info("docker_label_skipped", label=key)
    return out


def wait_for_container(api: DockerAPI, endpoint_id: str, timeout: float = 60, stop=None) -> dict | None:
    """Polls until Docker lists the container of endpoint_id (it does once the connect
    that called Join finished), or the timeout passes (the container went away)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        try:
            found = find_container(api.containers(), endpoint_id)
        except (OSError, ValueError) as exc:
            log.info("docker_api_unavailable", error=str(exc))
            found = None
        if found is not None:
            return found
        time.sleep(0.2)
    return None
