"""atomnet as Docker's network: a real dockerd (Debian's docker.io 20.10) per node, its
containers on the "atomnet" network through `atomnet docker-plugin` (libnetwork remote
driver + IPAM driver). Containers are pods: they talk by name and address on one host and
across the overlay, publish ports through atomnet forwards, reach services; bad input is
one clear error from atomnet and leaves nothing; plugin and dockerd restarts keep traffic."""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.e2e.dockerhost import IMAGE, DockerHost, busybox_rootfs, docker_available

pytestmark = pytest.mark.skipif(docker_available() is not None, reason=docker_available() or "")

WEB = "mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 80 -h /www"


def wait_until(cond, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_web(host: DockerHost, name: str, *extra) -> str:
    host.docker("run", "-d", "--name", name, "--network", "atomnet", *extra, IMAGE, "sh", "-c",
                WEB.format(name=name))
    pod = host.endpoint_pod(name)
    host.node.wait_endpoint(host.container_ip(name))
    return pod


def http_get(host: DockerHost, name_or_ip: str, port: int = 80, check=True) -> subprocess.CompletedProcess:
    """GET / from a throwaway client container on the atomnet network, printing the body
    (retries cover the server's start). Debian's static busybox `wget` crashes in glibc
    (any URL, numeric too), so the request goes through `nc`; a name is resolved with
    busybox's own DNS client (nslookup, through Docker's embedded DNS like any lookup in
    the container)."""
    addr = "$(nslookup {0} 2>/dev/null | awk '/^Address: /{{print $2}}' | tail -1)".format(name_or_ip)
    if all(part.isdigit() for part in name_or_ip.split(".")):
        addr = name_or_ip
    script = (f"for i in $(seq 50); do a={addr}; if [ -n \"$a\" ]; then "
              f"out=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $a {port} | tail -n 1); "
              f"[ -n \"$out\" ] && echo \"$out\" && exit 0; fi; sleep 0.2; done; exit 1")
    return host.docker("run", "--rm", "--network", "atomnet", IMAGE, "sh", "-c", script, check=check, timeout=90)


@pytest.fixture
def docker_hosts(rig):
    made = []

    def make(name: str, daemon: bool = True) -> DockerHost:
        node = rig.add_node(name)
        if daemon:
            node.start_daemon()
        host = DockerHost(node, rig.tmp)
        made.append(host)
        host.start_plugin()
        host.start_dockerd()
        host.import_image(busybox_rootfs(rig.tmp))
        return host

    try:
        yield make
    finally:
        for host in reversed(made):
            host.teardown()


def test_one_host_names_ports_services_and_cleanup(rig, docker_hosts):
    h1 = docker_hosts("n1")
    n1 = h1.node
    h1.docker("network", "create", "-d", "atomnet", "--ipam-driver", "atomnet", "atomnet")
    assert '"Driver": "atomnet"' in h1.docker("network", "inspect", "atomnet").stdout

    web = run_web(h1, "web", "-p", "8080:80")
    ip = h1.container_ip("web")
    pods = {p["name"]: p for p in n1.atomnet_json("pod", "list")}
    assert pods[web]["ip"] == ip and pods[web]["runtime"] == "docker"

    # by name (Docker's embedded DNS on a user-defined network) and by address
    assert http_get(h1, "web").stdout.strip() == "web"
    assert http_get(h1, ip).stdout.strip() == "web"

    # -p 8080:80: an atomnet forward, reachable from another machine on the uplink's LAN
    fwds = n1.atomnet_json("forward", "list")
    assert [(f["host_port"], f["pod"], f["port"]) for f in fwds] == [(8080, web, 80)]
    ext = rig.add_host("ext")
    got = wait_until(lambda: ext.exec("curl", "-s", "--max-time", "2", f"http://{n1.ip}:8080/", check=False)
                     .stdout.strip() == "web", "-p 8080:80 from outside")
    assert got

    # -P: atomnet picks the host port
    auto = run_web(h1, "auto", "--expose", "80", "-P")
    port = next(f["host_port"] for f in n1.atomnet_json("forward", "list") if f["pod"] == auto)
    assert wait_until(lambda: ext.exec("curl", "-s", "--max-time", "2", f"http://{n1.ip}:{port}/",
                                       check=False).stdout.strip() == "auto", "-P from outside")

    # a service whose backend is a container
    svc = n1.atomnet_json("service", "add", "websvc", "--port", "80", "--backend", web)
    vip = svc["vip"] if isinstance(svc, dict) else svc[0]["vip"]
    assert http_get(h1, vip).stdout.strip() == "web"

    # removal leaves no veth, pod, address or forward
    host_if = pods[web]["host_ifname"]
    h1.docker("rm", "-f", "web", "auto")
    assert not [p for p in n1.atomnet_json("pod", "list") if p["runtime"] == "docker"]
    assert n1.atomnet_json("forward", "list") == []
    links = n1.exec("ip", "-o", "link").stdout
    assert host_if not in links and " ad" not in links
    n1.atomnet("service", "del", "websvc")
    h1.docker("network", "rm", "atomnet")
    from ctl.state.model import IPAM_PREFIX
    from ctl.state.store import open_store
    with open_store(rig.store) as store:
        assert store.list(IPAM_PREFIX)[0] == [], "every address released"
