"""Operations claims of README "Operating it" that had no test: SIGHUP reloads the network
config and re-attaches everything; monitor counts the events a full perf ring lost."""
from __future__ import annotations

import json
import signal
import subprocess
import time

from ctl.state.model import NETWORK_CONFIG_KEY
from ctl.state.store import open_store
from tests.e2e.rig import ATOMNET, in_pod


def overlay_port(node, vni: int) -> int | None:
    res = node.exec("ip", "-d", "-j", "link", "show", f"atomnet.{vni}", check=False)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout)[0]["linkinfo"]["info_data"]["port"]


def ours(node, ifname: str) -> bool:
    return "atomnet:" in node.exec("tc", "filter", "show", "dev", ifname, "ingress").stdout


def test_sighup_rereads_the_network_config_and_reattaches(rig, node):
    a = node.add_pod("a")
    node.wait_endpoint(a["ip"])
    veth = next(e["host_ifname"] for e in node.atomnet_json("endpoint", "list") if e["ip"] == a["ip"])
    store = open_store(rig.store)
    try:
        config = json.loads(store.get(NETWORK_CONFIG_KEY).value)
        vni, port = config["Backend"].get("VNI", 1), config["Backend"].get("Port", 8472)
        assert overlay_port(node, vni) == port
        # Two things a reload must fix: the VXLAN port changed in the store (only read at
        # start and on SIGHUP), and someone removed our filter from a pod's veth.
        config["Backend"]["Port"] = port + 1
        store.put(NETWORK_CONFIG_KEY, json.dumps(config))
    finally:
        store.close()
    node.exec("tc", "filter", "del", "dev", veth, "ingress", "pref", "1")
    assert not ours(node, veth)
    reloaded = node.log_count("reloaded")
    node.daemon.send_signal(signal.SIGHUP)
    node.wait_log("reloaded", occurrences=reloaded + 1)
    assert overlay_port(node, vni) == port + 1, "the overlay follows the stored VXLAN port"
    assert ours(node, veth), "from_pod re-attached"
    assert ours(node, f"atomnet.{vni}"), "from_overlay attached on the recreated overlay device"
    assert node.daemon.poll() is None
