"""libnetwork's plugin protocols, pure: JSON request in, JSON response out.

Docker POSTs one JSON object per call to /Plugin.Activate, /NetworkDriver.<Method> and
/IpamDriver.<Method> (libnetwork docs/remote.md and docs/ipam.md). A request that cannot
be decoded gets HTTP 400; one that decodes but fails gets HTTP 200 with {"Err": "..."}
({"Error": ...} too for IPAM: see error()), which Docker shows as "remote: ..." (the
docs' rule). The driver behind `dispatch` does
the I/O; this module only parses what Docker sends and shapes what it expects back.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Callable

from ...errors import AtomnetError
from ...state.model import POD_GATEWAY

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
IMPLEMENTS = ["NetworkDriver", "IpamDriver"]

# Option keys libnetwork puts in CreateEndpoint / ProgramExternalConnectivity Options.
PORTMAP = "com.docker.network.portmap"
EXPOSED_PORTS = "com.docker.network.endpoint.exposedports"
GENERIC = "com.docker.network.generic"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
REQUEST_ADDRESS_TYPE = "RequestAddressType"
GATEWAY_REQUEST = "com.docker.network.gateway"

ADDRESS_SPACE_LOCAL, ADDRESS_SPACE_GLOBAL = "atomnet-local", "atomnet-global"
POOL_ID_PREFIX = "atomnet:"
ANY_POOL = "0.0.0.0/0"
IFNAME_PREFIX = "eth"           # Docker renames the moved veth end to eth0, eth1, ...
ROUTE_CONNECTED = 1             # libnetwork types.CONNECTED: on-link, no next hop
IP_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}


class BadRequest(Exception):
    """The request does not decode as the method's JSON: HTTP 400."""


@dataclass(frozen=True)
class PortBinding:
    """One entry of com.docker.network.portmap (libnetwork types.PortBinding)."""
    proto: str
    port: int              # container port
    host_ip: str | None    # None: the node's public IP
    host_port: int | None  # None: atomnet picks (-P, or -p with no host port)


def parse_portmap(options: dict) -> list[PortBinding]:
    """Docker expands a -p host port range itself, one entry per port (HostPortEnd == HostPort
    then); a range left to the driver is refused rather than silently narrowed."""
    out = []
    for entry in options.get(PORTMAP) or []:
        if not isinstance(entry, dict):
            raise BadRequest(f"{PORTMAP}: entry {entry!r} is not an object")
        proto = IP_PROTOCOLS.get(entry.get("Proto"))
        if proto not in ("tcp", "udp"):
            raise AtomnetError(f"published port {entry.get('Port')}: atomnet forwards tcp and udp only")
        port, host_port = _int(entry, "Port"), _int(entry, "HostPort", 0)
        end = _int(entry, "HostPortEnd", 0)
        if end and end != host_port:
            raise AtomnetError(f"host port range {host_port}-{end}: atomnet publishes one host port per container port")
        host_ip = entry.get("HostIP") or None
        if host_ip in ("0.0.0.0", "::"):
            host_ip = None
        out.append(PortBinding(proto, port, host_ip, host_port or None))
    return out


def _int(obj: dict, key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{key} must be an integer, not {value!r}")
    return value


def portmap_value(bindings: list[tuple[PortBinding, str, int]], container_ip: str) -> list[dict]:
    """Published ports as libnetwork's PortBinding JSON (what EndpointOperInfo reports)."""
    proto_num = {v: k for k, v in IP_PROTOCOLS.items()}
    return [{"Proto": proto_num[b.proto], "IP": container_ip, "Port": b.port, "HostIP": host_ip,
             "HostPort": host_port, "HostPortEnd": host_port} for b, host_ip, host_port in bindings]


def strip_prefix(cidr: str, what: str) -> str:
    """'10.244.1.2/32' -> '10.244.1.2' (libnetwork sends addresses in CIDR form)."""
    try:
        return str(ipaddress.IPv4Interface(cidr).ip)
    except ValueError:
        raise BadRequest(f"{what} {cidr!r} is not an IPv4 address") from None


def join_response(src_name: str) -> dict:
    """The pod end goes into the sandbox as eth<N>; its gateway is atomnet's link-local
    POD_GATEWAY, reached on-link (the static route comes first, so the default route via
    it can be added on a /32 address)."""
    return {"InterfaceName": {"SrcName": src_name, "DstPrefix": IFNAME_PREFIX},
            "Gateway": POD_GATEWAY, "GatewayIPv6": "",
            "StaticRoutes": [{"Destination": f"{POD_GATEWAY}/32", "RouteType": ROUTE_CONNECTED, "NextHop": ""}],
            "DisableGatewayService": False}


def pool_id(cidr: str) -> str:
    return POOL_ID_PREFIX + cidr


def pool_from_id(pid: str) -> str:
    if not isinstance(pid, str) or not pid.startswith(POOL_ID_PREFIX):
        raise AtomnetError(f"unknown pool {pid!r}: not an atomnet pool")
    return pid[len(POOL_ID_PREFIX):]


def _str(obj: dict, key: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise BadRequest(f"{key} must be a non-empty string")
    return value


def _dict(obj: dict, key: str) -> dict:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be an object")
    return value


# ------------------------------------------------------------------ dispatch
# Each handler takes (driver, request) and returns the response body. The driver is
# ctl/runtimes/docker/driver.py's Driver (or a fake in unit tests); names say what it does.

def _activate(d, req):
    return {"Implements": IMPLEMENTS}


def _net_caps(d, req):
    # local: each Docker host keeps its own copy of the network (no swarm/KV store needed);
    # global connectivity: containers on different hosts reach each other (the overlay).
    return {"Scope": "local", "ConnectivityScope": "global"}


def _create_network(d, req):
    opts = _dict(req, "Options")
    if opts.get(ENABLE_IPV6):
        raise AtomnetError("atomnet is IPv4-only: create the network without --ipv6")
    if req.get("IPv6Data"):
        raise AtomnetError("atomnet is IPv4-only: no IPv6 subnet")
    pools = [p.get("Pool") for p in req.get("IPv4Data") or [] if isinstance(p, dict)]
    d.create_network(_str(req, "NetworkID"), pools, _dict(opts, GENERIC))
    return {}


def _delete_network(d, req):
    d.delete_network(_str(req, "NetworkID"))
    return {}


def _create_endpoint(d, req):
    iface = _dict(req, "Interface")
    if iface.get("AddressIPv6"):
        raise AtomnetError("atomnet is IPv4-only: no IPv6 address")
    address = _str(iface, "Address", required=False)
    if not address:
        raise AtomnetError("no IPv4 address for the endpoint: use --ipam-driver atomnet")
    mac = _str(iface, "MacAddress", required=False) or None
    got_mac = d.create_endpoint(_str(req, "NetworkID"), _str(req, "EndpointID"), strip_prefix(address, "Address"),
                                mac, _dict(req, "Options"))
    # The docs: answer only what Docker did not supply; a MAC it chose must not come back.
    return {"Interface": {} if mac else {"MacAddress": got_mac}}


def _endpoint_info(d, req):
    return {"Value": d.endpoint_info(_str(req, "NetworkID"), _str(req, "EndpointID"))}


def _delete_endpoint(d, req):
    d.delete_endpoint(_str(req, "NetworkID"), _str(req, "EndpointID"))
    return {}


def _join(d, req):
    src = d.join(_str(req, "NetworkID"), _str(req, "EndpointID"), _str(req, "SandboxKey", required=False),
                 _dict(req, "Options"))
    return join_response(src)


def _leave(d, req):
    d.leave(_str(req, "NetworkID"), _str(req, "EndpointID"))
    return {}


def _program_external(d, req):
    d.program_external(_str(req, "NetworkID"), _str(req, "EndpointID"), parse_portmap(_dict(req, "Options")))
    return {}


def _revoke_external(d, req):
    d.revoke_external(_str(req, "NetworkID"), _str(req, "EndpointID"))
    return {}


def _nothing(d, req):
    """DiscoverNew/DiscoverDelete (node and datastore discovery): atomnet learns nodes
    from its own store, so there is nothing to do; AllocateNetwork/FreeNetwork are swarm's."""
    return {}


def _ipam_caps(d, req):
    # No replay: every address lives in atomnet's store, so a restarted dockerd need not
    # re-request the ones its containers hold.
    return {"RequiresMACAddress": False, "RequiresRequestReplay": False}


def _address_spaces(d, req):
    return {"LocalDefaultAddressSpace": ADDRESS_SPACE_LOCAL, "GlobalDefaultAddressSpace": ADDRESS_SPACE_GLOBAL}


def _request_pool(d, req):
    if req.get("V6"):
        raise AtomnetError("atomnet is IPv4-only: no IPv6 pool")
    if req.get("SubPool"):
        raise AtomnetError("--ip-range is not supported: each node allocates from its own subnet of the cluster network")
    asked = _str(req, "Pool", required=False)
    pool = d.request_pool(asked)
    # Without --subnet, libnetwork checks the pool against the host's routes and, finding
    # the cluster network routed (our overlay route), releases it and asks again, forever
    # (it never says why). It skips that check for 0.0.0.0/0, so that is the pool it
    # sees (Calico's IPAM does the same); addresses still come from the cluster network.
    return {"PoolID": pool_id(pool), "Pool": pool if asked else ANY_POOL, "Data": {}}


def _release_pool(d, req):
    pool_from_id(_str(req, "PoolID"))
    return {}


def _request_address(d, req):
    pool = pool_from_id(_str(req, "PoolID"))
    opts = _dict(req, "Options")
    want = _str(req, "Address", required=False) or None
    if opts.get(REQUEST_ADDRESS_TYPE) == GATEWAY_REQUEST:
        if want and want != POD_GATEWAY:
            raise AtomnetError(f"--gateway {want}: atomnet's pods always use the link-local gateway {POD_GATEWAY}")
        return {"Address": f"{POD_GATEWAY}/32", "Data": {}}
    if want:
        want = strip_prefix(want, "Address")
    # /32: the container routes everything through its gateway, as atomnet's other pods do.
    return {"Address": f"{d.request_address(pool, want)}/32", "Data": {}}


def _release_address(d, req):
    pool_from_id(_str(req, "PoolID"))
    address = _str(req, "Address")
    if address != POD_GATEWAY:
        d.release_address(strip_prefix(address, "Address"))
    return {}


ROUTES: dict[str, Callable[[Any, dict], dict]] = {
    "/Plugin.Activate": _activate,
    "/NetworkDriver.GetCapabilities": _net_caps,
    "/NetworkDriver.CreateNetwork": _create_network,
    "/NetworkDriver.DeleteNetwork": _delete_network,
    "/NetworkDriver.CreateEndpoint": _create_endpoint,
    "/NetworkDriver.EndpointOperInfo": _endpoint_info,
    "/NetworkDriver.DeleteEndpoint": _delete_endpoint,
    "/NetworkDriver.Join": _join,
    "/NetworkDriver.Leave": _leave,
    "/NetworkDriver.ProgramExternalConnectivity": _program_external,
    "/NetworkDriver.RevokeExternalConnectivity": _revoke_external,
    "/NetworkDriver.DiscoverNew": _nothing,
    "/NetworkDriver.DiscoverDelete": _nothing,
    "/NetworkDriver.AllocateNetwork": _nothing,
    "/NetworkDriver.FreeNetwork": _nothing,
    "/IpamDriver.GetCapabilities": _ipam_caps,
    "/IpamDriver.GetDefaultAddressSpaces": _address_spaces,
    "/IpamDriver.RequestPool": _request_pool,
    "/IpamDriver.ReleasePool": _release_pool,
    "/IpamDriver.RequestAddress": _request_address,
    "/IpamDriver.ReleaseAddress": _release_address,
}


def error(path: str, message: str) -> dict:
    """The network driver API reads {"Err"}, the IPAM API reads {"Error"} (libnetwork's
    ipams/remote/api Response; an IPAM answer with only "Err" is taken as success, and
    Docker then fails on the empty pool: "invalid CIDR address:"). Docker's plugin client
    reads "Err" from any non-200 answer. So IPAM errors carry both."""
    if path.startswith("/IpamDriver."):
        return {"Err": message, "Error": message}
    return {"Err": message}


def dispatch(driver, path: str, body: bytes) -> tuple[int, dict]:
    """(HTTP status, response body) for one call. Never raises for a bad request."""
    handler = ROUTES.get(path)
    if handler is None:
        return 404, error(path, f"unknown method {path}")
    try:
        req = json.loads(body) if body and body.strip() else None
    except ValueError as exc:  # json.JSONDecodeError
        return 400, error(path, f"{path.lstrip('/')}: bad request: not JSON ({exc})")
    if req is None:
        req = {}   # Docker sends no body, or "null", for calls without arguments
    try:
        if not isinstance(req, dict):
            raise BadRequest("request body must be a JSON object")
        return 200, handler(driver, req)
    except BadRequest as exc:
        return 400, error(path, f"{path.lstrip('/')}: bad request: {exc}")
    except AtomnetError as exc:
        return 200, error(path, str(exc))
