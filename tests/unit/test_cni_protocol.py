"""CNI protocol (pure): request parsing, result shapes per version, error objects, pod names, GC selection."""
import json

import pytest

from ctl.runtimes.cni import protocol as p
from ctl.state.model import Pod, validate_name

CID = "fce425a0616ae1da1195bc4ad84775377406635f9ea724436625af0e9c056706"


def env(command="ADD", **over):
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": CID, "CNI_NETNS": "/run/netns/netns-1", "CNI_IFNAME": "eth0",
         "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web1"}
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


def conf(version="1.0.0", **extra):
    return json.dumps({"cniVersion": version, "name": "atomnet", "type": "atomnet", "store": "sqlite:///x.db",
                       "node": "n1", "bpffs": "/sys/fs/bpf/t", **extra})


def test_add_request_from_podman_shape():
    runtime = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "::"}]}
    req = p.parse_request(env(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web2;MAC=02:11:22:33:44:55;IP=10.244.1.9"),
                          conf(runtimeConfig=runtime))
    assert (req.command, req.cni_version, req.network, req.ifname) == ("ADD", "1.0.0", "atomnet", "eth0")
    assert (req.store, req.node, req.bpffs) == ("sqlite:///x.db", "n1", "/sys/fs/bpf/t")
    assert req.port_mappings == (p.PortMapping(8080, 80, "tcp", ""),)   # the IPv6 twin is dropped
    assert (req.ip, req.mac) == ("10.244.1.9", "02:11:22:33:44:55")
    assert p.pod_name(req) == "web2"


def test_ips_capability_wins_and_prefix_is_dropped():
    req = p.parse_request(env(), conf(runtimeConfig={"ips": ["10.244.1.7/24"], "mac": "02:AA:bb:cc:dd:ee"}))
    assert (req.ip, req.mac) == ("10.244.1.7", "02:aa:bb:cc:dd:ee")


def test_labels_from_kubernetes_args_and_conventions():
    req = p.parse_request(env(CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart"),
                          conf(args={"cni": {"labels": [{"key": "app", "value": "cart"}]}}))
    assert req.labels == {"io.kubernetes.pod.namespace": "shop", "app": "cart"}
    assert p.pod_name(req) == "shop-cart"


@pytest.mark.parametrize("cid,ifname,args,want", [
    ("default-c1", "eth0", "", "default-c1"),             # ctr: namespace-id
    (CID, "eth0", "", CID[:12]),                           # a runtime's 64-hex id: the short id
    (CID, "net1", "K8S_POD_NAME=web", "web-net1"),         # second interface
    ("x", "eth0", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web", "web"),
])
def test_pod_names(cid, ifname, args, want):
    assert p.pod_name(p.parse_request(env(CNI_CONTAINERID=cid, CNI_IFNAME=ifname, CNI_ARGS=args), conf())) == want


@pytest.mark.parametrize("raw", ["My_Container", "a" * 80, "UPPER.case.dots", "x--__--y"])
def test_derived_names_are_valid_and_distinct(raw):
    req = p.parse_request(env(CNI_CONTAINERID=raw, CNI_ARGS=""), conf())
    name = p.pod_name(req)
    assert validate_name("pod", name) == name
    other = p.pod_name(p.parse_request(env(CNI_CONTAINERID=raw + "z", CNI_ARGS=""), conf()))
    assert other != name


@pytest.mark.parametrize("version", p.SUPPORTED_VERSIONS)
def test_result_shape_per_version(version):
    r = p.add_result(version, host_ifname="an0123456789a", host_mac="aa:aa:aa:aa:aa:aa", ifname="eth0",
                     mac="02:00:00:00:00:01", netns="/run/netns/x", ip="10.244.1.2", gateway="169.254.1.1", mtu=1450)
    assert r["cniVersion"] == version
    assert r["interfaces"][0] == {"name": "an0123456789a", "mac": "aa:aa:aa:aa:aa:aa"}   # host side: no sandbox
    assert r["interfaces"][1]["sandbox"] == "/run/netns/x"
    ip = r["ips"][0]
    assert (ip["address"], ip["gateway"], ip["interface"]) == ("10.244.1.2/32", "169.254.1.1", 1)
    assert ("version" in ip) == (version == "0.4.0")            # 1.0.0 dropped ips[].version
    assert ("mtu" in r["interfaces"][1]) == (version == "1.1.0")  # 1.1.0 added interfaces[].mtu
    assert r["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}] and r["dns"] == {}


def test_version_answers_any_config():
    assert p.parse_request({"CNI_COMMAND": "VERSION"}, '{"cniVersion":"9.9.9"}').cni_version == "1.1.0"
    assert p.version_result("1.0.0") == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize("e,stdin,code", [
    (env(), conf("0.3.1"), p.INCOMPATIBLE_VERSION),
    (env(), conf("2.0.0"), p.INCOMPATIBLE_VERSION),
    (env("STATUS"), conf("1.0.0"), p.INCOMPATIBLE_VERSION),        # STATUS is 1.1.0
    (env("GC"), conf("0.4.0"), p.INCOMPATIBLE_VERSION),
    (env(CNI_NETNS=None), conf(), p.INVALID_ENVIRONMENT),
    (env(CNI_CONTAINERID=None), conf(), p.INVALID_ENVIRONMENT),
    (env(CNI_CONTAINERID="bad id/"), conf(), p.INVALID_ENVIRONMENT),
    (env(CNI_IFNAME="a-very-long-ifname"), conf(), p.INVALID_ENVIRONMENT),
    (env(CNI_COMMAND="FROB"), conf(), p.INVALID_ENVIRONMENT),
    (env(CNI_ARGS="novalue"), conf(), p.INVALID_ENVIRONMENT),
    (env(), "{not json", p.DECODING_FAILURE),
    (env(), "[1]", p.DECODING_FAILURE),
    (env(), conf(type="bridge"), p.INVALID_CONFIG),
    (env(), json.dumps({"cniVersion": "1.0.0", "type": "atomnet"}), p.INVALID_CONFIG),   # no name
    (env(), conf(runtimeConfig={"ips": ["10.0.0.1", "10.0.0.2"]}), p.INVALID_CONFIG),
    (env(), conf(runtimeConfig={"ips": ["fd00::1/64"]}), p.INVALID_CONFIG),
    (env(), conf(runtimeConfig={"ips": ["nonsense"]}), p.INVALID_CONFIG),
    (env(), conf(runtimeConfig={"mac": "zz"}), p.INVALID_CONFIG),
    (env(), conf(runtimeConfig={"portMappings": [{"hostPort": 0, "containerPort": 80}]}), p.INVALID_CONFIG),
    (env(), conf(runtimeConfig={"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}]}),
     p.INVALID_CONFIG),
    (env(), conf(store=""), p.INVALID_CONFIG),
])
def test_bad_input_is_a_cni_error_with_its_code(e, stdin, code):
    with pytest.raises(p.CniError) as info:
        p.parse_request(e, stdin)
    assert info.value.code == code
    assert "\n" not in info.value.msg


def test_del_does_not_need_a_netns():
    assert p.parse_request(env("DEL", CNI_NETNS=None), conf()).netns == ""


def test_error_object_shape():
    err = p.CniError(p.CONFLICT, "host port 8080/tcp\nis taken", "by nginx")
    assert err.to_dict("0.4.0") == {"cniVersion": "0.4.0", "code": 100, "msg": "host port 8080/tcp is taken",
                                    "details": "by nginx"}
    assert "details" not in p.CniError(1, "x").to_dict("1.0.0")
    assert p.response_version("{bad") == "1.1.0" and p.response_version(conf("0.4.0")) == "0.4.0"


def test_prev_result_addresses():
    assert p.prev_result_addresses({"ips": [{"address": "10.244.1.2/32"}]}) == {"10.244.1.2"}
    assert p.prev_result_addresses(None) == set()
    with pytest.raises(p.CniError):
        p.prev_result_addresses({"ips": [{"nope": 1}]})


def _pod(name, cid, runtime="cni", ifname="eth0"):
    return Pod(name=name, node="n1", ip="10.244.1.2", netns="/x", host_ifname="an", mac="m", ifname=ifname,
               container_id=cid, runtime=runtime, netns_owned=False)


def test_gc_selection():
    pods = [_pod("a", "c-a"), _pod("b", "c-b"), _pod("b2", "c-b", ifname="net1"), _pod("d", "c-d", "docker"),
            _pod("m", "", "")]
    req = p.parse_request(env("GC"), conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "c-b", "ifname": "eth0"}]}))
    assert [x.name for x in p.gc_selection(pods, req.valid_attachments)] == ["a", "b2"]   # never docker's or `pod add`'s
    assert p.gc_selection(pods, None) == []            # no list: nothing is stale
    assert p.parse_request(env("GC"), conf("1.1.0")).valid_attachments is None
    assert [x.name for x in p.gc_selection(pods, (("c-b", ""),))] == ["a"]   # ifname omitted: every interface


def test_config_lists_of_objects_share_one_parser_and_one_error_shape():
    """args.cni.labels and cni.dev/valid-attachments: a list of objects, or one INVALID_CONFIG line."""
    req = p.parse_request(env("ADD"), conf("1.0.0", args={"cni": {"labels": [{"key": "app", "value": "web"}]}}))
    assert req.labels == {"app": "web"}
    req = p.parse_request(env("GC"), conf("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "c1"}]}))
    assert req.valid_attachments == (("c1", ""),)
    cases = [("ADD", "1.0.0", {"args": {"cni": {"labels": {"app": "web"}}}},
              "args.cni.labels must be a list of {key, value}"),
             ("ADD", "1.0.0", {"args": {"cni": {"labels": [{"key": "app"}]}}},
              "invalid entry {'key': 'app'} in args.cni.labels: use {key, value}"),
             ("GC", "1.1.0", {"cni.dev/valid-attachments": "c1"},
              "cni.dev/valid-attachments must be a list of {containerID, ifname}"),
             ("GC", "1.1.0", {"cni.dev/valid-attachments": ["c1"]},
              "invalid entry 'c1' in cni.dev/valid-attachments: use {containerID, ifname}")]
    for command, version, extra, msg in cases:
        with pytest.raises(p.CniError) as err:
            p.parse_request(env(command), conf(version, **extra))
        assert (err.value.code, err.value.msg) == (p.INVALID_CONFIG, msg)
