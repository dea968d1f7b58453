"""A host port and a NodePort on the same (node IP, port, protocol): the CLI refuses the
second with one line, and a conflicting record written behind its back is never programmed
over the first (the older frontend keeps the port)."""
from __future__ import annotations

import json

from ctl.state.model import FORWARDS_PREFIX, Forward
from ctl.state.store import open_store
from tests.e2e.servers import nginx
from tests.e2e.test_forwards import http_get, wait_frontend


def test_host_port_and_node_port_never_share_a_port(rig):
    n1 = rig.add_node("n1")
    n1.start_daemon()
    ext = rig.add_host("ext")
    web, api = n1.add_pod("web"), n1.add_pod("api")
    for pod in (web, api):
        n1.wait_endpoint(pod["ip"])
        nginx(rig, pod["name"])
    svc = n1.atomnet_json("service", "add", f"np{rig.uid}", "--port", "80:8080", "--backend", web["name"],
                          "--node-port", "auto")
    node_port = svc["ports"][0]["node_port"]
    res = n1.atomnet("forward", "add", f"{api['name']}:8080", "--host-port", node_port, check=False)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert f"is the NodePort of service np{rig.uid}" in res.stderr
    assert n1.atomnet_json("forward", "list") == []

    n1.atomnet("forward", "add", f"{api['name']}:8080", "--host-port", "30999")
    res = n1.atomnet("service", "add", f"np2{rig.uid}", "--port", "81:8080", "--backend", api["name"],
                     "--node-port", "30999", check=False)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "node port 30999/tcp is a host port already" in res.stderr
    assert [s["name"] for s in n1.atomnet_json("service", "list")] == [f"np{rig.uid}"]
    doc = [{"kind": "forward", "pod": api["name"], "port": 8080, "host_port": 31998},
           {"kind": "service", "name": f"ap{rig.uid}", "ports": [{"port": 82, "target_port": 8080, "node_port": 31998}],
            "backends": [{"pod": api["name"]}]}]
    (rig.tmp / "both.json").write_text(json.dumps(doc))
    res = n1.atomnet("apply", "-f", rig.tmp / "both.json", check=False)
    assert res.returncode == 1 and "is a NodePort in the same file" in res.stderr, res.stderr

    # Behind the CLI's back: a forward record on the NodePort. The NodePort (older) keeps it.
    store = open_store(rig.store)
    try:
        fid = f"n1-tcp-{node_port}"
        store.put(FORWARDS_PREFIX + fid, Forward(fid, "n1", n1.ip, node_port, "tcp", api["name"], 8080,
                                                 service_id=10_000).to_json())
    finally:
        store.close()
    wait_frontend(n1, n1.ip, 30999)
    n1.wait_log("frontend_conflict")
    for _ in range(5):
        assert http_get(ext, f"http://{n1.ip}:{node_port}/").stdout.strip() == web["name"]
    rows = [r for r in n1.atomnet_json("lb", "list") if r["vip"] == n1.ip and r["port"] == node_port]
    assert len(rows) == 1 and rows[0]["service"] == f"np{rig.uid}", rows
