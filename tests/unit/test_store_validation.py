"""Store records are untrusted (ctl/state/validate.py): an invalid record never reaches a
map, is logged once with its key and counted, and never stops the rest being programmed."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest

from ctl.dataplane.bpf import types as T
from ctl.dataplane.desired import Overlay, compute
from ctl.node.netplumb import LinkInfo
from ctl.observe.metrics import DataplaneCollector
from ctl.state import cluster, forwards as fwdlib, pods as podstate, services as svclib, validate
from ctl.state.model import (ATOMNET_CONFIG_KEY, FORWARDS_PREFIX, NETWORK_CONFIG_KEY, PODS_PREFIX, SERVICES_PREFIX,
                             SUBNETS_PREFIX, ClusterConfig, NetworkConfig, ValidationError, host_ifname)
from ctl.state.store import open_store

NET = NetworkConfig(network="10.244.0.0/16")
CLUSTER = ClusterConfig()
OVERLAY = Overlay(ifindex=9, vni=1, vtep_mac="02:00:00:00:00:09", subnet="10.244.1.0/24")

GOOD = {
    "lease": (SUBNETS_PREFIX + "10.244.2.0-24",
              {"PublicIP": "192.168.100.2", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "02:aa:00:00:00:02"}}),
    "pod": (PODS_PREFIX + "web1",
            {"name": "web1", "node": "n1", "ip": "10.244.1.2", "netns": "/run/netns/web1",
             "host_ifname": host_ifname("web1"), "mac": "02:00:00:00:00:01", "labels": {"app": "web"},
             "netns_owned": True, "ifname": "eth0"}),
    "service": (SERVICES_PREFIX + "web",
                {"name": "web", "vip": "10.96.0.10", "ports": [{"port": 80, "target_port": 8080, "proto": "tcp",
                                                                "node_port": 30080, "id": 1}],
                 "backends": [], "selector": {"app": "web"}, "affinity": None}),
    "forward": (FORWARDS_PREFIX + "n1-tcp-8080",
                {"id": "n1-tcp-8080", "node": "n1", "host_ip": "192.168.100.1", "host_port": 8080, "proto": "tcp",
                 "pod": "web1", "port": 80, "service_id": 2}),
    "node": ("/atomnet/nodes/n1",
             {"name": "n1", "public_ip": "192.168.100.1", "uplink": "eth0", "mtu": 1500, "subnet": "10.244.1.0/24",
              "vtep_mac": "02:00:00:00:00:09"}),
}
CHECKS = {"lease": lambda k, v: validate.lease(k, v, NET), "pod": lambda k, v: validate.pod(k, v, NET),
          "service": lambda k, v: validate.service(k, v, CLUSTER), "forward": validate.forward, "node": validate.node,
          "network": validate.network_config, "config": validate.cluster_config}
MIRRORS = {"config": (T.U32, T.Config), "endpoints": (T.EndpointKey, T.EndpointInfo),
           "tunnels": (T.TunnelKey, T.TunnelInfo), "backends": (T.BackendKey, None),
           "services": (T.ServiceKey, T.ServiceInfo), "snat_exclude": (T.SnatExcludeKey, T.SnatExcludeValue)}


def desired_from(pods=(), services=(), forwards=(), leases=()):
    links = {p.host_ifname: LinkInfo(10 + i, "02:00:00:00:01:00") for i, p in enumerate(pods)}
    return compute("n1", list(pods), links, list(services), CLUSTER, leases=list(leases), overlay=OVERLAY,
                   forwards=list(forwards), node_ip="192.168.100.1", netdevs=[2])


def assert_map_safe(desired):
    """Every entry encodes into its C struct and decodes back unchanged (nothing truncated),
    and every tunnel is one node subnet of the cluster network."""
    for name, entries in desired.maps.items():
        key_cls, value_cls = MIRRORS[name]
        for key, value in entries.items():
            for cls, frozen in ((key_cls, key), (value_cls, value)):
                if cls is None:
                    continue
                d = dict(frozen)
                back = cls.from_dict(d).to_dict()
                assert {k: back[k] for k in d} == {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
            if name == "tunnels":
                assert dict(key)["prefixlen"] == NET.subnet_len


# ------------------------------------------------------------------ named cases from the issue

@pytest.mark.parametrize("key,doc", [
    (SUBNETS_PREFIX + "0.0.0.0-0", GOOD["lease"][1]),                  # captures every destination
    (SUBNETS_PREFIX + "10.0.0.0-8", GOOD["lease"][1]),                 # outside the cluster network
    (SUBNETS_PREFIX + "10.244.0.0-16", GOOD["lease"][1]),              # the whole cluster network
    (SUBNETS_PREFIX + "10.244.1.0-25", GOOD["lease"][1]),              # inside this node's own subnet
    (SUBNETS_PREFIX + "10.244.2.5-24", GOOD["lease"][1]),              # not a network address
    (SUBNETS_PREFIX + "10.244.2.0-24", {**GOOD["lease"][1], "BackendData": {"VNI": 1, "VtepMAC": "zz:zz"}}),
    (SUBNETS_PREFIX + "10.244.2.0-24", {**GOOD["lease"][1], "BackendData": {"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"}}),
    (SUBNETS_PREFIX + "10.244.2.0-24", {**GOOD["lease"][1], "PublicIP": "0.0.0.0"}),
    (SUBNETS_PREFIX + "10.244.2.0-24", {**GOOD["lease"][1], "PublicIP": "224.0.0.1"}),
    (SUBNETS_PREFIX + "10.244.2.0-24", {**GOOD["lease"][1], "PublicIP": 3232261122}),
])
def test_hostile_leases_are_refused(key, doc):
    with pytest.raises(ValidationError):
        validate.lease(key, json.dumps(doc), NET)


def test_a_lease_on_loopback_is_valid_but_never_a_tunnel():
    """The lease of a node with no uplink: its own to take back after a restart, nobody's route."""
    key, doc = GOOD["lease"]
    lease = validate.lease(key, json.dumps({**doc, "PublicIP": "127.0.0.1"}), NET)
    assert desired_from(leases=[lease]).maps["tunnels"] == {}


def test_good_records_pass_and_are_map_safe():
    records = {kind: CHECKS[kind](key, json.dumps(doc)) for kind, (key, doc) in GOOD.items()}
    d = desired_from([records["pod"]], [records["service"]], [records["forward"]], [records["lease"]])
    assert d.maps["tunnels"] and d.maps["services"] and d.maps["endpoints"]
    assert_map_safe(d)


# ------------------------------------------------------------------ hypothesis: malformed records

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["", "0.0.0.0", "255.255.255.255", "10.244.1.2", "1.2.3.4/0", "ff:ff:ff:ff:ff:ff",
                       "02:00:00:00:00:01", "tcp", "udp", "sctp", "-1", "65536", "eth0", "a" * 16]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6)


@st.composite
def malformed(draw, kind):
    """A valid record with one to three fields replaced, removed or added, or plain garbage text."""
    key, doc = GOOD[kind] if kind in GOOD else (
        NETWORK_CONFIG_KEY, json.loads(NET.to_json())) if kind == "network" else (
        ATOMNET_CONFIG_KEY, json.loads(CLUSTER.to_json()))
    if draw(st.integers(0, 9)) == 0:
        return key, draw(st.text(max_size=40) | json_values.map(json.dumps))
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        target = doc
        path = draw(st.sampled_from(sorted(_paths(doc))))
        for step in path[:-1]:
            target = target[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(target, dict):
            target.pop(path[-1], None)
        elif action == "add" and isinstance(target, dict):
            target[draw(st.text(max_size=8))] = draw(json_values)
        else:
            target[path[-1]] = draw(json_values)
    if kind == "lease" and draw(st.booleans()):
        key = SUBNETS_PREFIX + draw(st.sampled_from(["0.0.0.0-0", "10.244.2.0-23", "10.244.2.0-x", "", "10.244.300.0-24",
                                                     "10.244.2.0-24-1", "10.245.0.0-24"]))
    return key, json.dumps(doc)


def _paths(doc, prefix=()):
    out = set()
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.add(prefix + (k,))
        if isinstance(v, (dict, list)) and v:
            out |= _paths(v, prefix + (k,))
    return out or {prefix + ("x",)}


@pytest.mark.parametrize("kind", sorted(CHECKS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_records_are_refused_or_map_safe(kind, data):
    key, text = data.draw(malformed(kind))
    try:
        record = CHECKS[kind](key, text)
    except ValidationError:
        return   # refused with the one error type the callers catch: fine
    # Accepted: it must then be something every map can hold, next to good records.
    good = {k: CHECKS[k](gk, json.dumps(gd)) for k, (gk, gd) in GOOD.items()}
    if kind == "network":
        assert record.net.prefixlen < record.subnet_len <= 30
        return
    if kind == "config":
        compute("n1", [], {}, [], record, overlay=OVERLAY)
        return
    if kind == "node":
        return
    pods = [good["pod"]] + ([record] if kind == "pod" and record.name != "web1" else [])
    d = desired_from(pods, [record if kind == "service" else good["service"]],
                     [record if kind == "forward" else good["forward"]],
                     [record if kind == "lease" else good["lease"]])
    assert_map_safe(d)


# ------------------------------------------------------------------ through the store, as the daemon reads it

@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/state.db")
    yield s
    s.close()


def test_invalid_records_are_skipped_logged_once_counted_and_the_rest_kept(store, capsys):
    cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12")
    for key, doc in GOOD.values():
        store.put(key, json.dumps(doc))
    bad = {
        SUBNETS_PREFIX + "0.0.0.0-0": ("lease", json.dumps(GOOD["lease"][1])),
        SUBNETS_PREFIX + "10.244.3.0-24": ("lease", json.dumps({**GOOD["lease"][1],
                                                                "BackendData": {"VtepMAC": "not-a-mac"}})),
        PODS_PREFIX + "evil": ("pod", json.dumps({**GOOD["pod"][1], "name": "evil", "mac": 7})),
        PODS_PREFIX + "evil2": ("pod", '{"name": "evil2"}'),
        PODS_PREFIX + "evil3": ("pod", json.dumps({**GOOD["pod"][1], "name": "evil3", "ip": "8.8.8.8"})),
        SERVICES_PREFIX + "evil": ("service", json.dumps({**GOOD["service"][1], "name": "evil", "vip": "8.8.8.8"})),
        FORWARDS_PREFIX + "n1-tcp-1": ("forward", json.dumps({**GOOD["forward"][1], "host_port": 70000})),
    }
    for key, (_, text) in bad.items():
        store.put(key, text)
    before = dict(validate.INVALID.counts)
    for _ in range(3):   # a resync reads everything again: logged and counted once
        leases = [lease for lease, _ in cluster.list_leases(store)]
        pods = podstate.list_pods(store)
        services = svclib.list_services(store)
        forwards = fwdlib.list_forwards(store, "n1")
    assert [lease.subnet for lease in leases] == ["10.244.2.0/24"]
    assert [p.name for p in pods] == ["web1"] and [s.name for s in services] == ["web"]
    assert [f.id for f in forwards] == ["n1-tcp-8080"]
    d = desired_from(pods, services, forwards, leases)
    assert_map_safe(d)
    assert [dict(k)["ip"] for k in d.maps["tunnels"]] == ["10.244.2.0"]
    counted = {k: validate.INVALID.counts[k] - before.get(k, 0) for k in validate.KINDS}
    assert counted == {"network": 0, "config": 0, "lease": 2, "node": 0, "pod": 3, "service": 1, "forward": 1}
    seen = capsys.readouterr()   # stdout by structlog's default, stderr once ctl.logs has configured it
    logged = [line for line in (seen.out + seen.err).splitlines() if "record_invalid" in line]
    assert sorted(k for k in bad if any(k in line for line in logged)) == sorted(bad)
    assert len(logged) == len(bad)

    # The metric the daemon serves.
    registry = CollectorRegistry()
    registry.register(DataplaneCollector(lambda: {}))
    text = generate_latest(registry).decode()
    assert f'atomnet_invalid_records_total{{kind="lease"}} {float(validate.INVALID.counts["lease"])}' in text


def test_invalid_config_keeps_the_last_valid_one(store):
    cluster.init_network(store, "10.244.0.0/16", 24, "10.98.0.0/16")
    assert cluster.load_cluster_config(store).service_cidr == "10.98.0.0/16"
    store.put(ATOMNET_CONFIG_KEY, '{"service_cidr": "0.0.0.0/0/1"}')
    assert cluster.load_cluster_config(store).service_cidr == "10.98.0.0/16"
    store.put(NETWORK_CONFIG_KEY, '{"Network": 5}')
    assert cluster.load_network(store).network == "10.244.0.0/16"
    assert [lease for lease in cluster.list_leases(store)] == []   # nothing broke: leases still checked


def test_a_runtime_pod_before_its_runtime_says_where_it_lives_is_valid():
    """Docker moves the veth into the sandbox itself and names the netns only after Join: its
    pod record has no netns for a while and must still be programmed. A `pod add` pod must name one."""
    doc = dict(GOOD["pod"][1], netns="", runtime="docker", container_id="")
    assert validate.pod(GOOD["pod"][0], json.dumps(doc), NET).runtime == "docker"
    with pytest.raises(ValidationError, match="empty netns"):
        validate.pod(GOOD["pod"][0], json.dumps(dict(doc, runtime="")), NET)


@pytest.mark.parametrize("entry", [True, 1, 167772160, ["10.0.0.0/8"]])
def test_a_cidr_stored_as_anything_but_a_string_is_refused(entry):
    """ipaddress reads an integer (or a bool) as an address: 167772160 would be 10.0.0.0/32,
    true 0.0.0.1/32. A CIDR in the store is text, so anything else is refused."""
    with pytest.raises(ValidationError, match="not a string"):
        validate.cluster_config(ATOMNET_CONFIG_KEY, json.dumps({"no_masquerade_cidrs": [entry]}))


@pytest.mark.parametrize("subnet", [5, True, None, "10.244.1.1/24", "10.244.1.0/33", ["10.244.1.0/24"]])
def test_a_node_whose_subnet_is_not_an_ipv4_network_is_refused(subnet):
    key, doc = GOOD["node"]
    with pytest.raises(ValidationError, match="invalid subnet"):
        validate.node(key, json.dumps({**doc, "subnet": subnet}))
