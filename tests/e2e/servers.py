"""Real servers inside pods: nginx (one worker, answering with the pod's name) and socat."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.e2e.rig import Rig, in_pod, spawn_in_pod


def wait_listening(where, port: int, udp: bool = False, timeout: float = 5) -> None:
    """Until something listens on port: `where` is a pod's name, or a Node (its namespace)."""
    ss = ["ss", "-lnu" if udp else "-lnt"]
    look = (lambda: in_pod(where, *ss).stdout) if isinstance(where, str) else (lambda: where.exec(*ss).stdout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f":{port} " in look():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} in {where if isinstance(where, str) else where.name}")


def wait_established(pod: str, peer: str, port: int, timeout: float = 10) -> None:
    """Until pod has an established TCP connection to peer:port (a stream really started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = in_pod(pod, "ss", "-tnH", "state", "established").stdout
        if any(f"{peer}:{port}" in line.split() for line in out.splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{pod} never connected to {peer}:{port}")


def nginx(rig: Rig, pod: str, port: int = 8080, *, body: str | None = None, access_log: bool = False,
          connections: int = 1024, reuseport: bool = True, name: str | None = None,
          cpu: int | None = None) -> Path | None:
    """nginx in a pod (one worker): answers every request with body (default: the pod's name;
    nginx variables allowed). access_log=True logs each peer ("$remote_addr $remote_port")
    and returns the log's path. cpu pins it (the benchmark pins servers and clients alike)."""
    d = rig.tmp / f"nginx-{name or pod}"
    d.mkdir()
    conf = d / "nginx.conf"
    log = f"log_format peer '$remote_addr $remote_port';\n    access_log {d}/access.log peer;" if access_log \
        else "access_log off;"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {max(1024, connections)};
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections {connections}; }}
http {{
    {log}
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {port}{" reuseport" if reuseport else ""} backlog=4096;
        location / {{ return 200 "{body if body is not None else pod}\\n"; }}
    }}
}}
""")
    proc = rig.spawn(spawn_in_pod(pod, "nginx", "-c", str(conf), "-p", str(d)))
    if cpu is not None:   # one process (master_process off): `ip netns exec` execs it, so this PID is nginx
        os.sched_setaffinity(proc.pid, {cpu})
    wait_listening(pod, port)
    return d / "access.log" if access_log else None


def udp_echo(rig: Rig, pod: str, port: int) -> subprocess.Popen:
    """Answers each datagram with the pod's name."""
    proc = rig.spawn(spawn_in_pod(pod, "socat", f"UDP-RECVFROM:{port},fork", f"SYSTEM:echo {pod}"))
    wait_listening(pod, port, udp=True)
    return proc


def http_load(pod: str, host: str, port: int, seconds: float, max_requests: int = 100000,
              stop_file: Path | None = None, min_requests: int = 0, timeout: float = 2.0) -> subprocess.Popen:
    """seconds/max_requests bound the run; with stop_file it ends once that file exists and
    at least min_requests were made; timeout is each request's."""
    script = Path(__file__).with_name("http_load.py")
    until = [str(stop_file or ""), str(min_requests), str(timeout)]
    return spawn_in_pod(pod, "/usr/bin/python3", str(script), host, str(port), str(seconds), str(max_requests), *until)


def tcp_echo(rig: Rig, pod: str, port: int) -> subprocess.Popen:
    """Echoes every byte back on each connection (one socat child per connection)."""
    proc = rig.spawn(spawn_in_pod(pod, "socat", f"TCP-LISTEN:{port},fork,reuseaddr,backlog=256", "EXEC:cat"))
    wait_listening(pod, port)
    return proc
