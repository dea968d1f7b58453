"""A host with no network (no default route, no address but loopback), as Docker runs on:
`pod add` and the daemon work without --uplink, on lo: pods reach each other and a service,
and a published port serves the node itself."""
from __future__ import annotations

from tests.e2e.rig import in_pod, sh
from tests.e2e.servers import nginx, wait_listening
from tests.e2e.test_forwards import http_get, wait_frontend


def test_pods_on_a_host_with_no_network(rig):
    n1 = rig.add_host("n1")
    sh("ip", "-n", n1.netns, "link", "del", "uplink0")   # only lo is left
    assert n1.exec("ip", "-4", "route", "show", "default").stdout.strip() == ""
    n1.atomnet("network", "init", "--cidr", "10.244.0.0/16")
    web = n1.add_pod("web")          # before any daemon: this failed ("cannot find this node's uplink")
    client = n1.add_pod("client")
    shown = n1.atomnet_json("network", "show")
    assert in_pod(web["name"], "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450", shown
    n1.start_daemon()
    for pod in (web, client):
        n1.wait_endpoint(pod["ip"])
    nginx(rig, web["name"])
    wait_listening(web["name"], 8080)
    url = f"http://{web['ip']}:8080/"
    assert in_pod(client["name"], "curl", "-s", "--max-time", "3", url).stdout.strip() == web["name"]
    svc = n1.atomnet_json("service", "add", f"s{rig.uid}", "--port", "80:8080", "--backend", web["name"])
    wait_frontend(n1, svc["vip"], 80)
    assert in_pod(client["name"], "curl", "-s", "--max-time", "3",
                  f"http://{svc['vip']}/").stdout.strip() == web["name"]
    fwd = n1.atomnet_json("forward", "add", f"{web['name']}:8080", "--host-port", "8080")
    assert fwd["host_ip"] == "127.0.0.1"
    wait_frontend(n1, "127.0.0.1", 8080)
    assert http_get(n1, "http://127.0.0.1:8080/").stdout.strip() == web["name"], "the node reaches its published port"
    # A restart keeps the node's subnet (its lease is on loopback: found again, never a tunnel).
    subnet = n1.atomnet_json("network", "show")
    n1.stop_daemon()
    n1.start_daemon()
    assert n1.atomnet_json("network", "show") == subnet
    assert n1.atomnet_json("tunnel", "list") == []
    assert in_pod(client["name"], "curl", "-s", "--max-time", "3", url).stdout.strip() == web["name"]
