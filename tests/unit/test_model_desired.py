"""Pure logic: validation, names, the desired-state function and the map diff."""
import pytest

from ctl.dataplane.desired import compute, freeze
from ctl.node.netplumb import LinkInfo
from ctl.state.model import (NetworkConfig, Pod, ValidationError, host_ifname, parse_labels, validate_name,
                       vtep_mac)


def pod(name, node="n1", ip="10.244.1.2", labels=None):
    return Pod(name=name, node=node, ip=ip, netns=f"/run/netns/{name}", host_ifname=host_ifname(name),
               mac="02:00:00:00:00:01", labels=labels or {})


@pytest.mark.parametrize("bad", ["", "A", "a_b", "-a", "a-", "a" * 64, "a.b"])
def test_invalid_names(bad):
    with pytest.raises(ValidationError):
        validate_name("pod", bad)


def test_valid_names_and_labels():
    assert validate_name("pod", "web-1") == "web-1"
    assert parse_labels(["app=web", "tier=front-end", "k8s.io/x=y"]) == {"app": "web", "tier": "front-end", "k8s.io/x": "y"}
    for bad in (["app"], ["=x"], ["a=b c"]):
        with pytest.raises(ValidationError):
            parse_labels(bad)


def test_host_ifname_fits_ifnamsiz_and_is_stable():
    assert len(host_ifname("x" * 63)) <= 15
    assert host_ifname("web") == host_ifname("web") != host_ifname("web2")


def test_vtep_mac_is_locally_administered_unicast():
    first = int(vtep_mac("n1").split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


def test_network_config_defaults_and_validation():
    cfg = NetworkConfig.from_json('{"Network": "10.244.0.0/16"}')
    assert (cfg.subnet_len, cfg.vni, cfg.port) == (24, 1, 8472)
    assert str(cfg.subnets()[0]) == "10.244.1.0/24" and str(cfg.subnets()[-1]) == "10.244.255.0/24"
    for bad in ('{"Network": "10.244.0.0/33"}', '{"Network": "10.244.0.1/16"}', "not json",
                '{"Network": "10.244.0.0/16", "SubnetLen": 8}'):
        with pytest.raises(ValidationError):
            NetworkConfig.from_json(bad)


def test_desired_endpoints_only_for_this_node_and_existing_links():
    a, b, other = pod("a", ip="10.244.1.2"), pod("b", ip="10.244.1.3"), pod("c", node="n2", ip="10.244.2.2")
    links = {a.host_ifname: LinkInfo(7, "02:aa:00:00:00:07")}
    d = compute("n1", [a, b, other], links)
    assert d.maps["endpoints"] == {
        freeze({"ip": "10.244.1.2"}): freeze({"ifindex": 7, "mac": a.mac, "node_mac": "02:aa:00:00:00:07"})}
    assert d.ingress == {7: "from_pod"}
    assert d.missing_links == ["b"]


