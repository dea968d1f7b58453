"""The daemon's map sizes (--bpf-lb-map-max and its per-map flags), end to end: a restart with
larger service-side maps carries every entry over under established connections, and a node
whose maps are smaller than its services programs the oldest ones that fit, says so (log,
metrics, `atomnet map list`) and keeps every other sync working."""
from __future__ import annotations

import json
import time

from tests.e2e.test_faults import ECHO_PORT, Holder, start_echo_service, wait_service
from tests.e2e.test_operations import scrape

LB_MAPS = ("services", "backends", "maglev")


def maps_by_name(node) -> dict:
    return {m["name"]: m for m in node.atomnet_json("map", "list")}


def dump(node, name: str) -> dict:
    return {json.dumps(e["key"], sort_keys=True): e["value"] for e in node.atomnet_json("map", "dump", name)}


def events(node, name: str) -> list[dict]:
    return [json.loads(line) for line in node.log_path.read_text().splitlines() if f'"event": "{name}"' in line]


def wait_until(cond, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not in {timeout}s: {what}")


def test_larger_maps_keep_every_entry_and_every_established_connection(rig, node):
    backends, (client,), svc = start_echo_service(rig, node, clients=1)
    gone = node.atomnet_json("service", "add", f"gone{rig.uid}", "--port", "81", "--backend", backends[0]["name"])
    wait_service(node, gone["name"], 1)
    holder = Holder(rig, client["name"], svc["vip"], 20)
    holder.wait_ready()
    before = maps_by_name(node)
    content = {name: dump(node, name) for name in LB_MAPS}
    flows = {f["src"]: f["nat"] for f in node.atomnet_json("ct", "list")
             if f["dir"] == "forward" and f["dst"] == f"{svc['vip']}:{ECHO_PORT}"}
    assert len(flows) == 20
    node.stop_daemon()
    tables_set = len(events(node, "maglev_table_set"))
    node.atomnet("service", "del", gone["name"])   # while the daemon is down: the resized maps must not keep it
    node.start_daemon("--bpf-lb-map-max", "70000", "--bpf-lb-maglev-map-max", "70001")
    after = maps_by_name(node)
    assert {n: after[n]["max_entries"] for n in LB_MAPS} == {"services": 70000, "backends": 280000, "maglev": 70001}
    for name in LB_MAPS:
        assert after[name]["id"] != before[name]["id"], f"{name}: a new map of the new size"
        assert {e["map"] for e in events(node, "map_migrated")} >= set(LB_MAPS)
    assert after["conntrack"]["id"] == before["conntrack"]["id"], "conntrack is not resized: reused as it is"
    now = {name: dump(node, name) for name in LB_MAPS}
    gone_key = json.dumps({"port": 81, "proto": 6, "vip": gone["vip"]}, sort_keys=True)
    assert gone_key in content["services"] and gone_key not in now["services"], "the deleted service stays gone"
    kept = {k: v for k, v in content["services"].items() if k != gone_key}
    assert now["services"] == kept, "every other frontend, with the same table key (its table adopted)"
    assert set(now["backends"]) == {k for k in content["backends"] if json.loads(k)["port"] != 81}
    for key, counters in now["backends"].items():   # the programs' per-backend counters carried over
        assert counters["packets"] >= content["backends"][key]["packets"] > 0, key
    table_keys = {v["table"] for v in now["services"].values()}
    assert table_keys <= {json.loads(k)["value"] for k in now["maglev"]}, "every frontend's table is in the new map"
    assert len(events(node, "maglev_table_set")) == tables_set, "no table rebuilt: each was adopted"
    held = holder.finish()
    assert held["broken"] == 0, held["errors"]
    after_flows = {f["src"]: f["nat"] for f in node.atomnet_json("ct", "list")
                   if f["dir"] == "forward" and f["dst"] == f"{svc['vip']}:{ECHO_PORT}"}
    assert {k: after_flows.get(k) for k in flows} == flows, "every connection on the backend it had"
    print(f"resize: {held['rounds']} rounds on 20 connections across the restart, {held['broken']} broken")


def test_maps_smaller_than_the_services_program_the_oldest_and_say_what_to_raise(rig):
    node = rig.add_node("n1")
    port = 19642
    node.start_daemon("--metrics", f"127.0.0.1:{port}", "--bpf-lb-service-map-max", "2")
    pods = [node.add_pod(f"b{i}") for i in range(2)]
    for p in pods:
        node.wait_endpoint(p["ip"])
    names = [f"o{i}{rig.uid}" for i in range(3)]
    for name in names:   # three services, two fit: the oldest two (lowest ids)
        node.atomnet("service", "add", name, "--port", "80", "--backend", pods[0]["name"], "--backend",
                     pods[1]["name"])
    overflow = wait_until(lambda: events(node, "map_overflow"), "a map_overflow event")[-1]
    assert {k: overflow[k] for k in ("map", "needed", "capacity", "refused_service_ports", "raise_flag")} == {
        "map": "services", "needed": 3, "capacity": 2, "refused_service_ports": 1,
        "raise_flag": "--bpf-lb-service-map-max"}
    wait_service(node, names[0], 2)
    wait_service(node, names[1], 2)
    assert names[2] not in {r["service"] for r in node.atomnet_json("lb", "list")}
    assert not events(node, "reconcile_failed"), "no sync failed"
    metrics = scrape(node, port)
    assert metrics[("atomnet_map_overflow_entries", (("map", "services"),))] == 1
    assert metrics[("atomnet_map_overflow_refused_service_ports", ())] == 1
    listed = node.atomnet("map", "list")
    assert "map services is too small: the desired state needs 3 entries, 2 fit" in listed.stderr
    assert "raise --bpf-lb-service-map-max" in listed.stderr
    assert maps_by_name(node)["services"]["needed"] == 3 and maps_by_name(node)["backends"]["needed"] is None
    # every other change still syncs: a new pod is programmed at once
    late = node.add_pod("late")
    node.wait_endpoint(late["ip"])
    # room again: the waiting service comes in, the overflow is over
    node.atomnet("service", "del", names[0])
    wait_service(node, names[2], 2)
    wait_until(lambda: events(node, "map_overflow_resolved"), "map_overflow_resolved")
    assert scrape(node, port)[("atomnet_map_overflow_entries", (("map", "services"),))] == 0
    assert maps_by_name(node)["services"]["needed"] is None
    assert "too small" not in node.atomnet("map", "list").stderr
    assert not events(node, "reconcile_failed")


def test_a_bad_map_size_is_one_line_and_starts_nothing(rig):
    node = rig.add_node("n1")
    res = node.atomnet("daemon", "--bpf-lb-service-backend-map-max", "0", check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "atomnet: invalid --bpf-lb-service-backend-map-max 0: a number of entries, 1-16777216"]
    assert not (node.log_path.exists() and "dataplane_ready" in node.log_path.read_text())
