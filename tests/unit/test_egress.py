"""Masquerade, pure parts and the CLI's bad input: the stored settings, the port range
chosen outside the node's ephemeral and NodePort ranges, and what the daemon programs
(config flags, the snat_exclude LPM, to_netdev on the uplink)."""
import json
import re
from pathlib import Path

import pytest

from ctl.dataplane.bpf import types
from ctl.dataplane.bpf.types import CFG_F_MASQUERADE, SnatExcludeKind
from ctl.dataplane.desired import compute
from ctl.node.netplumb import LinkInfo
from ctl.node.snatports import masquerade_port_range
from ctl.state.model import ClusterConfig, Lease, ValidationError
from tests.unit.test_cli import atomnet, one_line


def test_cluster_config_round_trip_and_defaults():
    c = ClusterConfig(masquerade=False, no_masquerade_cidrs=["192.168.0.0/16"])
    assert ClusterConfig.from_json(c.to_json()) == c
    old = ClusterConfig.from_json(json.dumps({"service_cidr": "10.96.0.0/12", "node_port_range": "30000-32767"}))
    assert old.masquerade is True and old.no_masquerade_cidrs == (), "a config stored before masquerade existed"
    with pytest.raises(ValidationError):
        ClusterConfig(no_masquerade_cidrs=["10.0.0.1/8"])


@pytest.mark.parametrize("ephemeral,node_ports,want", [
    ((32768, 60999), (30000, 32767), (61000, 65535)),     # Linux default: above the ephemeral range
    ((32768, 65535), (30000, 32767), (1024, 29999)),      # nothing above: the largest stretch below
    ((1024, 64000), (30000, 32767), (64001, 65535)),
    ((1024, 65535), (30000, 32767), None),                # no room: masquerade stays off
])
def test_port_range_avoids_ephemeral_and_node_ports(ephemeral, node_ports, want):
    assert masquerade_port_range(ephemeral, node_ports) == want


def _desired(cluster, **kw):
    links = {"uplink0": LinkInfo(ifindex=2, mac="02:00:00:00:99:01")}
    leases = [Lease("10.244.2.0/24", "192.168.100.2", 1, "02:aa:00:00:00:02")]
    args = dict(node_ip="192.168.100.1", uplink=2, cluster_cidr="10.244.0.0/16", snat_ports=(61000, 65535),
                leases=leases)
    args.update(kw)
    return compute("n1", [], links, [], cluster, **args)


def test_desired_programs_masquerade_and_exclusions():
    d = _desired(ClusterConfig(no_masquerade_cidrs=["172.16.0.0/12"]))
    cfg = dict(next(iter(d.maps["config"].values())))
    assert cfg["flags"] & CFG_F_MASQUERADE
    assert (cfg["masq_ip"], cfg["snat_port_min"], cfg["snat_port_max"]) == ("192.168.100.1", 61000, 65535)
    excl = {(dict(k)["ip"], dict(k)["prefixlen"]): dict(v)["kind"] for k, v in d.maps["snat_exclude"].items()}
    assert excl == {("10.244.0.0", 16): SnatExcludeKind.EXCL_CLUSTER, ("10.96.0.0", 12): SnatExcludeKind.EXCL_SERVICES,
                    ("192.168.100.1", 32): SnatExcludeKind.EXCL_NODE, ("192.168.100.2", 32): SnatExcludeKind.EXCL_NODE,
                    ("172.16.0.0", 12): SnatExcludeKind.EXCL_USER}
    assert d.egress[2] == "to_netdev"


@pytest.mark.parametrize("masquerade,kw", [(False, {}), (True, dict(snat_ports=None)), (True, dict(uplink=None))],
                         ids=["off", "no-port-range", "no-uplink"])
def test_masquerade_off_or_unprogrammable_clears_the_flag(masquerade, kw):
    d = _desired(ClusterConfig(masquerade=masquerade), **kw)
    cfg = dict(next(iter(d.maps["config"].values())))
    assert not cfg["flags"] & CFG_F_MASQUERADE and cfg["masq_ip"] == "0.0.0.0"
    assert not d.maps["snat_exclude"]


@pytest.mark.parametrize("cidr,message", [
    ("192.168.0.0/33", "invalid no-masquerade CIDR"),
    ("not-a-cidr", "invalid no-masquerade CIDR"),
    ("192.168.1.1/16", "invalid no-masquerade CIDR"),          # host bits set
    ("10.0.0.0/8", "overlaps the cluster network"),
    ("10.244.3.0/24", "overlaps the cluster network"),
])
def test_bad_no_masquerade_cidr_one_line_exit_1_nothing_stored(tmp_path, cidr, message):
    store = f"sqlite://{tmp_path}/s.db"
    res = atomnet("network", "init", "--cidr", "10.244.0.0/16", "--no-masquerade-cidr", "192.168.0.0/16",
                  "--no-masquerade-cidr", cidr, store=store)
    assert res.returncode == 1 and message in one_line(res)
    shown = atomnet("network", "show", store=store)
    assert shown.returncode == 1 and "no network configured" in one_line(shown), "nothing stored"


def test_masquerade_settings_stored_and_changed_by_a_later_init(tmp_path):
    store = f"sqlite://{tmp_path}/s.db"
    first = json.loads(atomnet("-j", "network", "init", "--cidr", "10.244.0.0/16", store=store).stdout)
    assert first["masquerade"] is True and first["no_masquerade_cidrs"] == []
    again = json.loads(atomnet("-j", "network", "init", "--cidr", "10.244.0.0/16", "--masquerade", "off",
                               "--no-masquerade-cidr", "192.168.0.0/16", store=store).stdout)
    assert again["masquerade"] is False and again["no_masquerade_cidrs"] == ["192.168.0.0/16"]
    shown = json.loads(atomnet("-j", "network", "show", store=store).stdout)
    assert (shown["masquerade"], shown["no_masquerade_cidrs"]) == (False, ["192.168.0.0/16"])
    res = atomnet("network", "init", "--cidr", "10.244.0.0/16", "--no-masquerade-cidr", "10.244.0.0/17", store=store)
    assert res.returncode == 1
    shown = json.loads(atomnet("-j", "network", "show", store=store).stdout)
    assert shown["no_masquerade_cidrs"] == ["192.168.0.0/16"], "a refused init changes nothing"
    res = atomnet("network", "init", "--cidr", "10.244.0.0/16", "--masquerade", "maybe", store=store)
    assert res.returncode == 2


def test_conntrack_flag_bits_mirror_types_h():
    """The CT_F_* bits exist once in C (types.h) and once in Python (types.py, which ct list
    names them by): the two must agree."""
    header = (Path(__file__).resolve().parents[2] / "bpf" / "include" / "types.h").read_text()
    in_c = {name: int(value) for name, value in re.findall(r"^#define (CT_F_\w+) (\d+)", header, re.M)}
    assert len(in_c) >= 8 and in_c == {name: getattr(types, name) for name in in_c}
