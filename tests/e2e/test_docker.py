"""atomnet as Docker's network: a real dockerd (Debian's docker.io 20.10) per node, its
containers on the "atomnet" network through `atomnet docker-plugin` (libnetwork remote
driver + IPAM driver). Containers are pods: they talk by name and address on one host and
across the overlay, publish ports through atomnet forwards, reach services; bad input is
one clear error from atomnet and leaves nothing; plugin and dockerd restarts keep traffic."""
from __future__ import annotations

import re
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
    empty = node_state(rig, n1)

    web = run_web(h1, "web", "-p", "8080:80", "--label", "app=frontend", "--label", "com.example.Bad_Key!=x")
    ip = h1.container_ip("web")
    pods = {p["name"]: p for p in n1.atomnet_json("pod", "list")}
    assert pods[web]["ip"] == ip and pods[web]["runtime"] == "docker"
    # the plugin learns the container's id, name and labels from dockerd's API after Join
    pod = wait_until(lambda: next((p for p in n1.atomnet_json("pod", "list") if p["name"] == web
                                   and p["container_id"]), None), "the pod learns its container")
    assert pod["container_id"] == h1.inspect("web")["Id"]
    assert pod["labels"] == {"app": "frontend", "docker-name": "web"}

    # by name (Docker's embedded DNS on a user-defined network) and by address
    assert http_get(h1, "web").stdout.strip() == "web"
    assert http_get(h1, ip).stdout.strip() == "web"

    # -p 8080:80: an atomnet forward, reachable from another machine on the uplink's LAN
    fwds = n1.atomnet_json("forward", "list")
    assert [(f["host_port"], f["pod"], f["port"]) for f in fwds] == [(8080, web, 80)]
    ext = rig.add_host("ext")
    assert wait_until(lambda: ext.exec("curl", "-s", "--max-time", "2", f"http://{n1.ip}:8080/", check=False)
                      .stdout.strip() == "web", "-p 8080:80 from outside")

    # -P: atomnet picks the host port
    auto = run_web(h1, "auto", "--expose", "80", "-P")
    port = next(f["host_port"] for f in n1.atomnet_json("forward", "list") if f["pod"] == auto)
    assert wait_until(lambda: ext.exec("curl", "-s", "--max-time", "2", f"http://{n1.ip}:{port}/",
                                       check=False).stdout.strip() == "auto", "-P from outside")
    # -p IP:HOST:CONTAINER and /udp
    more = run_web(h1, "more", "-p", f"{n1.ip}:8082:80", "-p", "5353:53/udp")
    assert sorted((f["proto"], f["host_ip"], f["host_port"], f["port"]) for f in n1.atomnet_json("forward", "list")
                  if f["pod"] == more) == [("tcp", n1.ip, 8082, 80), ("udp", n1.ip, 5353, 53)]
    assert wait_until(lambda: ext.exec("curl", "-s", "--max-time", "2", f"http://{n1.ip}:8082/",
                                       check=False).stdout.strip() == "more", "-p IP:8082:80 from outside")

    # a service selecting containers by their Docker labels
    svc = n1.atomnet_json("service", "add", "websvc", "--port", "80", "--selector", "app=frontend")
    vip = svc["vip"] if isinstance(svc, dict) else svc[0]["vip"]
    assert http_get(h1, vip).stdout.strip() == "web"

    # removal leaves no veth, pod, address or forward
    n1.atomnet("service", "del", "websvc")
    h1.docker("rm", "-f", "web", "auto", "more")
    assert node_state(rig, n1) == empty
    h1.docker("network", "rm", "atomnet")


def node_state(rig, node) -> dict:
    """What a container leaves on its node: pods, forwards, addresses, veths."""
    from ctl.state.model import IPAM_PREFIX
    from ctl.state.store import open_store
    with open_store(rig.store) as store:
        ipam = sorted(kv.key for kv in store.list(IPAM_PREFIX)[0])
    links = sorted(line.split(":")[1].strip().split("@")[0] for line in node.exec("ip", "-o", "link").stdout.splitlines())
    return {"pods": sorted(p["name"] for p in node.atomnet_json("pod", "list")),
            "forwards": sorted(f["id"] for f in node.atomnet_json("forward", "list")), "ipam": ipam, "links": links}


def one_error_line(res: subprocess.CompletedProcess, expected: str) -> str:
    assert res.returncode != 0, res.stdout
    err = res.stderr.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_error_and_leaves_nothing(rig, docker_hosts):
    h1 = docker_hosts("n1")
    n1 = h1.node
    res = h1.docker("network", "create", "-d", "atomnet", "--ipam-driver", "atomnet", "--subnet", "10.99.0.0/16",
                    "outside", check=False)
    one_error_line(res, "subnet 10.99.0.0/16 is not atomnet's cluster network 10.244.0.0/16")
    res = h1.docker("network", "create", "-d", "atomnet", "other-ipam", check=False)
    one_error_line(res, "--ipam-driver atomnet")
    h1.docker("network", "create", "-d", "atomnet", "--ipam-driver", "atomnet", "atomnet")
    res = h1.docker("network", "create", "-d", "atomnet", "--ipam-driver", "atomnet", "--subnet", "10.245.0.0/16",
                    "second", check=False)
    one_error_line(res, "is not atomnet's cluster network 10.244.0.0/16")
    names = h1.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert "atomnet" in names and not {"outside", "other-ipam", "second"} & set(names)

    run_web(h1, "web", "-p", "8080:80")
    before = node_state(rig, n1)
    # -p on a host port atomnet already forwards
    res = h1.docker("run", "-d", "--name", "dup", "--network", "atomnet", "-p", "8080:80", IMAGE, "sleep", "60",
                    check=False)
    one_error_line(res, "host port 8080/tcp is already forwarded on node n1")
    assert node_state(rig, n1) == before
    # -p on a host port a process of the node has bound
    listener = rig.spawn(subprocess.Popen(n1.nsenter + ["socat", "TCP-LISTEN:9090,reuseaddr,fork", "SYSTEM:true"]))
    wait_until(lambda: ":9090 " in n1.exec("ss", "-Htln").stdout, "socat listening")
    res = h1.docker("run", "-d", "--name", "bound", "--network", "atomnet", "-p", "8081:80", "-p", "9090:80",
                    IMAGE, "sleep", "60", check=False)
    one_error_line(res, "host port 9090/tcp is already bound on this node by socat")
    assert node_state(rig, n1) == before, "the 8081 forward made before the refusal is gone too"
    listener.kill()


def test_two_docker_hosts_across_the_overlay(rig, docker_hosts):
    h1, h2 = docker_hosts("n1"), docker_hosts("n2")
    for h in (h1, h2):
        h.docker("network", "create", "-d", "atomnet", "--ipam-driver", "atomnet", "atomnet")
    run_web(h1, "web")
    run_web(h2, "web2")
    ip1, ip2 = h1.container_ip("web"), h2.container_ip("web2")
    subnets = {n.name: n.atomnet_json("network", "show")[0]["subnet"] if isinstance(
        n.atomnet_json("network", "show"), list) else n.atomnet_json("network", "show")["subnet"] for n in (h1.node, h2.node)}
    import ipaddress
    assert ipaddress.ip_address(ip1) in ipaddress.ip_network(subnets["n1"])
    assert ipaddress.ip_address(ip2) in ipaddress.ip_network(subnets["n2"]), "each host allocates from its own lease"
    h2.node.wait_endpoint(ip2)
    assert http_get(h2, ip1).stdout.strip() == "web", "n2's container reaches n1's through the overlay"
    assert http_get(h1, ip2).stdout.strip() == "web2"
    # a service on n2 whose backend is n1's container
    svc = h2.node.atomnet_json("service", "add", "cross", "--port", "80", "--backend", h1.endpoint_pod("web"))
    vip = svc["vip"] if isinstance(svc, dict) else svc[0]["vip"]
    assert http_get(h2, vip).stdout.strip() == "web"
    h2.node.atomnet("service", "del", "cross")

    # by Docker name across hosts: dockerd --dns <DNS VIP> --dns-search ... --dns-opt ndots:5
    # (DockerHost.dns_flags); Docker's embedded DNS forwards web2.pod.cluster.local, from inside
    # the container, to the cluster DNS, which answers the alias of n2's container
    wait_docker_name(h2, "web2")
    assert http_get(h1, "web2").stdout.strip() == "web2", "n1's container finds n2's by its Docker name"
    assert http_get(h2, "web").stdout.strip() == "web"

    # the externally visible address of a -P port: SRV under forwards.<domain> by Docker name,
    # asked from inside a container with busybox's nslookup, then reached from the uplink's LAN
    pub = run_web(h2, "pub", "--expose", "80", "-P")
    wait_docker_name(h2, "pub")
    fwd = next(f for f in h2.node.atomnet_json("forward", "list") if f["pod"] == pub)
    out = h1.docker("run", "--rm", "--network", "atomnet", IMAGE, "sh", "-c",
                    "nslookup -type=SRV _80._tcp.pub.forwards.cluster.local && nslookup n2.node.cluster.local").stdout
    srv = re.search(r"_80\._tcp\.pub\.forwards\.cluster\.local\s+service = 0 100 (\d+) (\S+)", out)
    assert srv and srv.group(2).rstrip(".") == "n2.node.cluster.local", out
    node_ip = out.rsplit("Name:", 1)[-1].split("Address:")[1].split()[0]
    assert (node_ip, int(srv.group(1))) == (h2.node.ip, fwd["host_port"]), out
    ext = rig.add_host("ext")
    assert wait_until(lambda: ext.exec("curl", "-s", "--max-time", "2", f"http://{node_ip}:{srv.group(1)}/",
                                       check=False).stdout.strip() == "pub", "the advertised address from outside")

    # a removed container stops resolving (NXDOMAIN from the cluster DNS, asked from n1)
    def lookup_web2() -> str:
        res = h1.docker("run", "--rm", "--network", "atomnet", IMAGE, "nslookup", "web2.pod.cluster.local.",
                        check=False)
        return res.stdout + res.stderr
    assert f"Address: {ip2}" in lookup_web2()
    h2.docker("rm", "-f", "web2")
    wait_until(lambda: (lambda out: "NXDOMAIN" in out and ip2 not in out)(lookup_web2()), "web2 gone from the DNS",
               timeout=30)


def wait_docker_name(host: DockerHost, name: str) -> None:
    """Until the plugin learnt the container's name from dockerd (it asks after Join)."""
    pod = host.endpoint_pod(name)
    wait_until(lambda: any(p["name"] == pod and p["labels"].get("docker-name") == name
                           for p in host.node.atomnet_json("pod", "list")), f"pod {pod} named {name}")


def test_plugin_and_dockerd_restarts_keep_containers_connected(rig, docker_hosts):
    h1 = docker_hosts("n1")
    h1.docker("network", "create", "-d", "atomnet", "--ipam-driver", "atomnet", "atomnet")
    run_web(h1, "web")
    ip = h1.container_ip("web")
    h1.docker("run", "-d", "--name", "client", "--network", "atomnet", IMAGE, "sleep", "3600")

    def from_client() -> str:
        return h1.docker("exec", "client", "sh", "-c",
                         f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80 | tail -n 1", check=False).stdout.strip()

    assert wait_until(lambda: from_client() == "web", "client -> web")
    h1.stop_plugin()
    assert from_client() == "web", "traffic does not need the plugin"
    # Docker needs the plugin while it is down: it retries, and the restarted plugin answers
    late = subprocess.Popen(["/usr/bin/docker", "-H", f"unix://{h1.sock}", "run", "-d", "--name", "late",
                             "--network", "atomnet", IMAGE, "sh", "-c", WEB.format(name="late")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rig.spawn(late)
    retries = h1.dockerd_log.read_text().count("Unable to connect to plugin")
    wait_until(lambda: h1.dockerd_log.read_text().count("Unable to connect to plugin") > retries,
               "dockerd retrying the stopped plugin", timeout=30)
    h1.start_plugin()
    out, err = late.communicate(timeout=90)
    assert late.returncode == 0, err
    assert http_get(h1, "late").stdout.strip() == "late"

    # dockerd restart (--live-restore): containers keep running and connected
    h1.stop_dockerd()
    assert wait_until(lambda: h1.node.exec("curl", "-s", "--max-time", "2", f"http://{ip}/", check=False)
                      .stdout.strip() == "web", "node -> web while dockerd is down")
    h1.start_dockerd()
    assert h1.inspect("web")["State"]["Running"], "live-restore kept the container"
    assert http_get(h1, "web").stdout.strip() == "web", "a new container reaches it, by name too"
    run_web(h1, "after")
    assert http_get(h1, "after").stdout.strip() == "after"
    h1.docker("rm", "-f", "web", "late", "after", "client")
    assert [p for p in h1.node.atomnet_json("pod", "list") if p["runtime"] == "docker"] == []
