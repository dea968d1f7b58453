"""libnetwork's remote network driver and IPAM driver protocols, request by request, with
the JSON exactly as dockerd 20.10 sent it to the plugin in tests/e2e/test_docker.py (copied
from the plugin's call log). Pure: a recording driver stands behind dispatch."""
from __future__ import annotations

import json

import pytest

from ctl.errors import AtomnetError
from ctl.runtimes.docker import protocol
from ctl.runtimes.docker.protocol import PortBinding, dispatch

NET = "cada633fc68a7cbe50cc15d0814b877059b13342d67c58342ac21d070addfba9"
EP = "d94e40793a571eb2e5e10e643c4b91bdfb4efb4380848058ac8217c0be7eef33"
PORTS = {"com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}],
         "com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080,
                                         "HostPortEnd": 8080}]}


class Recorder:
    """Records what the protocol asked the driver for; answers like the real driver."""

    def __init__(self, fail: str | None = None):
        self.calls, self.fail = [], fail

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            if self.fail:
                raise AtomnetError(self.fail)
            return {"request_pool": "10.244.0.0/16", "request_address": "10.244.7.2",
                    "create_endpoint": "02:42:0a:f4:07:02", "endpoint_info": {"pod": "docker-d94e40793a57"},
                    "join": "ad3f1df0b4fc7"}.get(name)
        return call


def call(path, body, driver=None):
    driver = driver or Recorder()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, resp = dispatch(driver, path, raw)
    return status, resp, driver.calls


def test_activate_and_capabilities_without_body():
    # Docker sends no body at all for these (the log shows request null)
    assert dispatch(Recorder(), "/Plugin.Activate", b"") == (200, {"Implements": ["NetworkDriver", "IpamDriver"]})
    assert dispatch(Recorder(), "/NetworkDriver.GetCapabilities", b"null")[1] == {
        "Scope": "local", "ConnectivityScope": "global"}
    assert dispatch(Recorder(), "/IpamDriver.GetCapabilities", b"")[1] == {
        "RequiresMACAddress": False, "RequiresRequestReplay": False}
    assert dispatch(Recorder(), "/IpamDriver.GetDefaultAddressSpaces", b"")[1] == {
        "LocalDefaultAddressSpace": "atomnet-local", "GlobalDefaultAddressSpace": "atomnet-global"}


def test_request_pool_without_subnet_shows_any_pool():
    status, resp, calls = call("/IpamDriver.RequestPool", {"AddressSpace": "atomnet-local", "Pool": "",
                                                          "SubPool": "", "Options": {}, "V6": False})
    assert status == 200 and resp == {"PoolID": "atomnet:10.244.0.0/16", "Pool": "0.0.0.0/0", "Data": {}}
    assert calls == [("request_pool", ("",))]


def test_request_pool_with_subnet_and_refusals():
    _, resp, calls = call("/IpamDriver.RequestPool", {"AddressSpace": "atomnet-local", "Pool": "10.244.0.0/16",
                                                     "SubPool": "", "Options": {}, "V6": False})
    assert resp["Pool"] == "10.244.0.0/16" and calls == [("request_pool", ("10.244.0.0/16",))]
    resp = call("/IpamDriver.RequestPool", {"Pool": "", "V6": True})[1]
    assert resp["Error"] == resp["Err"] and resp["Error"].startswith("atomnet is IPv4-only")  # IPAM reads "Error"
    assert "--ip-range" in call("/IpamDriver.RequestPool", {"Pool": "10.244.0.0/16", "SubPool": "10.244.1.0/24"})[1]["Err"]


def test_release_pool():
    assert call("/IpamDriver.ReleasePool", {"PoolID": "atomnet:10.244.0.0/16"})[:2] == (200, {})
    assert call("/IpamDriver.ReleasePool", {"PoolID": "other:1"})[1]["Err"].startswith("unknown pool")


def test_gateway_request_is_the_link_local_gateway():
    status, resp, calls = call("/IpamDriver.RequestAddress", {
        "PoolID": "atomnet:10.244.0.0/16", "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert (status, resp, calls) == (200, {"Address": "169.254.1.1/32", "Data": {}}, [])
    _, resp, _ = call("/IpamDriver.RequestAddress", {"PoolID": "atomnet:10.244.0.0/16", "Address": "10.244.0.1",
                                                     "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert "--gateway 10.244.0.1" in resp["Err"]


def test_request_address_is_a_slash_32():
    # Options is null for a container's address (not {}): seen from dockerd 20.10
    _, resp, calls = call("/IpamDriver.RequestAddress", {"PoolID": "atomnet:10.244.0.0/16", "Address": "",
                                                        "Options": None})
    assert resp == {"Address": "10.244.7.2/32", "Data": {}}
    assert calls == [("request_address", ("10.244.0.0/16", None))]
    _, _, calls = call("/IpamDriver.RequestAddress", {"PoolID": "atomnet:10.244.0.0/16", "Address": "10.244.7.9"})
    assert calls == [("request_address", ("10.244.0.0/16", "10.244.7.9"))]


def test_release_address_without_prefix():
    # ReleaseAddress carries the bare address, RequestAddress answered it in CIDR form
    _, resp, calls = call("/IpamDriver.ReleaseAddress", {"PoolID": "atomnet:10.244.0.0/16", "Address": "10.244.212.3"})
    assert resp == {} and calls == [("release_address", ("10.244.212.3",))]
    assert call("/IpamDriver.ReleaseAddress", {"PoolID": "atomnet:10.244.0.0/16", "Address": "169.254.1.1"})[2] == []


def test_create_network():
    body = {"NetworkID": NET, "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": "atomnet-local", "Gateway": "169.254.1.1/32", "Pool": "0.0.0.0/0"}],
            "IPv6Data": []}
    status, resp, calls = call("/NetworkDriver.CreateNetwork", body)
    assert (status, resp) == (200, {}) and calls == [("create_network", (NET, ["0.0.0.0/0"], {}))]
    ipv6 = dict(body, Options={"com.docker.network.enable_ipv6": True})
    assert call("/NetworkDriver.CreateNetwork", ipv6)[1]["Err"].startswith("atomnet is IPv4-only")


def test_delete_network():
    assert call("/NetworkDriver.DeleteNetwork", {"NetworkID": NET})[1:] == ({}, [("delete_network", (NET,))])


def test_create_endpoint_answers_only_the_mac():
    body = {"NetworkID": NET, "EndpointID": EP, "Options": PORTS,
            "Interface": {"Address": "10.244.212.2/32", "AddressIPv6": "", "MacAddress": ""}}
    status, resp, calls = call("/NetworkDriver.CreateEndpoint", body)
    assert (status, resp) == (200, {"Interface": {"MacAddress": "02:42:0a:f4:07:02"}})
    assert calls == [("create_endpoint", (NET, EP, "10.244.212.2", None, PORTS))]
    # a MAC Docker chose (--mac-address) is used, and not answered back (the docs' rule)
    body["Interface"]["MacAddress"] = "02:00:00:00:00:01"
    status, resp, calls = call("/NetworkDriver.CreateEndpoint", body)
    assert resp == {"Interface": {}} and calls[0][1][3] == "02:00:00:00:00:01"


def test_create_endpoint_refusals():
    no_addr = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "", "MacAddress": ""}}
    assert "--ipam-driver atomnet" in call("/NetworkDriver.CreateEndpoint", no_addr)[1]["Err"]
    v6 = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "10.244.1.2/32", "AddressIPv6": "fd00::2/64"}}
    assert "IPv4-only" in call("/NetworkDriver.CreateEndpoint", v6)[1]["Err"]


def test_endpoint_oper_info():
    status, resp, calls = call("/NetworkDriver.EndpointOperInfo", {"NetworkID": NET, "EndpointID": EP})
    assert resp == {"Value": {"pod": "docker-d94e40793a57"}} and calls == [("endpoint_info", (NET, EP))]


def test_delete_endpoint():
    assert call("/NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})[1:] == (
        {}, [("delete_endpoint", (NET, EP))])


def test_join_hands_over_the_veth_with_gateway_and_route():
    body = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/7e8af0f87063", "Options": PORTS}
    status, resp, calls = call("/NetworkDriver.Join", body)
    assert resp == {"InterfaceName": {"SrcName": "ad3f1df0b4fc7", "DstPrefix": "eth"}, "Gateway": "169.254.1.1",
                    "GatewayIPv6": "", "StaticRoutes": [{"Destination": "169.254.1.1/32", "RouteType": 1,
                                                         "NextHop": ""}], "DisableGatewayService": False}
    assert calls == [("join", (NET, EP, "/var/run/docker/netns/7e8af0f87063", PORTS))]


def test_leave():
    assert call("/NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})[1:] == ({}, [("leave", (NET, EP))])


def test_program_external_connectivity_parses_the_portmap():
    body = {"NetworkID": NET, "EndpointID": EP, "Options": PORTS}
    _, resp, calls = call("/NetworkDriver.ProgramExternalConnectivity", body)
    assert resp == {} and calls == [("program_external", (NET, EP, [PortBinding("tcp", 80, None, 8080)]))]
    # no ports: Docker still calls, with empty lists
    body = {"NetworkID": NET, "EndpointID": EP, "Options": {"com.docker.network.endpoint.exposedports": [],
                                                            "com.docker.network.portmap": []}}
    assert call("/NetworkDriver.ProgramExternalConnectivity", body)[2] == [("program_external", (NET, EP, []))]


def test_revoke_and_discovery():
    assert call("/NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP})[2] == [
        ("revoke_external", (NET, EP))]
    for method in ("DiscoverNew", "DiscoverDelete"):
        assert call(f"/NetworkDriver.{method}", {"DiscoveryType": 1, "DiscoveryData": {"Address": "192.168.100.2"}})[:2] == (200, {})


@pytest.mark.parametrize("entry,binding", [
    ({"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
     PortBinding("tcp", 80, None, 8080)),                           # -p 8080:80
    ({"Proto": 6, "IP": "", "Port": 80, "HostIP": "192.168.100.1", "HostPort": 8081, "HostPortEnd": 8081},
     PortBinding("tcp", 80, "192.168.100.1", 8081)),                # -p IP:8081:80
    ({"Proto": 17, "IP": "", "Port": 53, "HostIP": "", "HostPort": 5353, "HostPortEnd": 5353},
     PortBinding("udp", 53, None, 5353)),                           # -p 5353:53/udp
    ({"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 0, "HostPortEnd": 0},
     PortBinding("tcp", 80, None, None)),                           # -P: atomnet picks
    ({"Proto": 6, "IP": "", "Port": 80, "HostIP": "0.0.0.0", "HostPort": 9000, "HostPortEnd": 9000},
     PortBinding("tcp", 80, None, 9000)),                           # -p 0.0.0.0:9000:80
])
def test_portmap_entries(entry, binding):
    assert protocol.parse_portmap({"com.docker.network.portmap": [entry]}) == [binding]


def test_portmap_refusals():
    with pytest.raises(AtomnetError, match="tcp and udp only"):
        protocol.parse_portmap({"com.docker.network.portmap": [{"Proto": 132, "Port": 80, "HostPort": 1}]})
    with pytest.raises(AtomnetError, match="one host port per container port"):
        protocol.parse_portmap({"com.docker.network.portmap": [{"Proto": 6, "Port": 80, "HostPort": 8000,
                                                                 "HostPortEnd": 8010}]})


def test_errors_are_err_objects():
    status, resp, _ = call("/NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP}, Recorder(fail="no such endpoint"))
    assert (status, resp) == (200, {"Err": "no such endpoint"})
    status, resp = dispatch(Recorder(), "/NetworkDriver.Join", b"{not json")
    assert status == 400 and resp["Err"].startswith("NetworkDriver.Join: bad request: not JSON")
    status, resp = dispatch(Recorder(), "/NetworkDriver.Join", b"[1]")
    assert status == 400 and "JSON object" in resp["Err"]
    status, resp = dispatch(Recorder(), "/NetworkDriver.Join", b'{"NetworkID": 5}')
    assert status == 400 and "NetworkID" in resp["Err"]
    status, resp = dispatch(Recorder(), "/NetworkDriver.Nope", b"{}")
    assert status == 404 and "unknown method" in resp["Err"]
    status, resp, _ = call("/NetworkDriver.ProgramExternalConnectivity",
                           {"NetworkID": NET, "EndpointID": EP, "Options": {"com.docker.network.portmap": [
                               {"Proto": 6, "Port": "80"}]}})
    assert status == 400 and "Port must be an integer" in resp["Err"]
