"""Real servers inside pods: nginx (one worker, answering with the pod's name) and socat."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.e2e.rig import Rig, in_pod, spawn_in_pod


def wait_listening(pod: str, port: int, udp: bool = False, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f":{port} " in in_pod(pod, "ss", "-lnu" if udp else "-lnt").stdout:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} in {pod}")


def nginx(rig: Rig, pod: str, port: int = 8080) -> subprocess.Popen:
    d = rig.tmp / f"nginx-{pod}"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {port} reuseport backlog=4096;
        location / {{ return 200 "{pod}\\n"; }}
    }}
}}
""")
    proc = rig.spawn(spawn_in_pod(pod, "nginx", "-c", str(conf), "-p", str(d)))
    wait_listening(pod, port)
    return proc


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
