"""The CNI protocol, pure (no I/O): environment + network config on stdin -> a Request;
the result and error objects in the shape of the config's cniVersion.

Spec: https://github.com/containernetworking/cni/blob/main/SPEC.md (0.4.0, 1.0.0, 1.1.0)
and the conventions (CNI_ARGS keys, capability args `portMappings`, `ips`, `mac`).
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Mapping

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
COMMANDS_SINCE = {"STATUS": "1.1.0", "GC": "1.1.0", "CHECK": "0.4.0"}

# The spec's well-known error codes (0-99 are reserved to it) ...
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50          # STATUS: the plugin cannot serve ADDs now
# ... and atomnet's own (100+), for what no well-known code names.
CONFLICT = 100        # something asked for is held by another: address, host port, container id, pod name
ADD_FAILED = 101      # the node refused a step (netlink), everything undone
CHECK_FAILED = 102    # CHECK found the container's networking not as ADD left it

_CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_HEX_ID_RE = re.compile(r"^[0-9a-f]{32,}$")
_NAME_BAD = re.compile(r"[^a-z0-9-]+")
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"   # Cilium's label key for the pod's namespace


class CniError(Exception):
    """A CNI error object: `code`, one-line `msg`, optional `details`."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, " ".join(str(msg).split()), details

    def to_dict(self, version: str) -> dict:
        out = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""


@dataclass(frozen=True)
class Request:
    command: str
    cni_version: str
    network: str = ""
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    cni_args: dict = field(default_factory=dict)
    store: str | None = None
    node: str | None = None
    bpffs: str | None = None
    port_mappings: tuple[PortMapping, ...] = ()
    ip: str | None = None
    mac: str | None = None
    labels: dict = field(default_factory=dict)
    prev_result: dict | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None
    config: dict = field(default_factory=dict)


def response_version(stdin: str) -> str:
    """The version to answer in, even for a request that fails to parse."""
    try:
        v = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        v = None
    return v if v in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K=V;K2=V2` (IgnoreUnknown=1 included; atomnet ignores keys it does not know)."""
    out = {}
    for item in filter(None, (text or "").split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, f"invalid CNI_ARGS item {item!r}: use KEY=VALUE;KEY=VALUE")
        out[key] = value
    return out


def _require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CniError(INVALID_ENVIRONMENT, f"{name} is not set")
    return value


def _check_ifname(name: str) -> str:
    # The kernel's rules (dev_valid_name): at most 15 bytes, not . or .., no / : or whitespace
    if len(name.encode()) > 15 or name in (".", "..") or re.search(r"[/:\s]", name):
        raise CniError(INVALID_ENVIRONMENT, f"invalid CNI_IFNAME {name!r}: at most 15 characters, no / : or spaces")
    return name


def _one_address(values, what: str) -> str | None:
    if not values:
        return None
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise CniError(INVALID_CONFIG, f"{what} must be a list of addresses")
    v4 = []
    for text in values:
        try:
            v4.append(ipaddress.ip_interface(str(text)).ip)
        except ValueError:
            raise CniError(INVALID_CONFIG, f"invalid address {text!r} in {what}") from None
    if any(a.version != 4 for a in v4) or len(v4) != 1:
        raise CniError(INVALID_CONFIG, f"{what}: atomnet gives one IPv4 address per interface, got {values}")
    return str(v4[0])


def _port_mappings(items) -> tuple[PortMapping, ...]:
    if items in (None, []):
        return ()
    if not isinstance(items, list):
        raise CniError(INVALID_CONFIG, "runtimeConfig.portMappings must be a list")
    out = []
    for m in items:
        try:
            hp, cp = int(m["hostPort"]), int(m["containerPort"])
            proto = str(m.get("protocol") or "tcp").lower()
            host_ip = str(m.get("hostIP") or "")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CniError(INVALID_CONFIG, f"invalid port mapping {m!r}: needs hostPort and containerPort") from None
        if not (1 <= hp <= 65535 and 1 <= cp <= 65535) or proto not in ("tcp", "udp"):
            raise CniError(INVALID_CONFIG, f"invalid port mapping {m!r}: ports 1-65535, protocol tcp or udp")
        if host_ip in ("0.0.0.0",):
            host_ip = ""   # "all addresses" is the node's address here (forwards bind one address)
        if host_ip:
            try:
                if ipaddress.ip_address(host_ip).version != 4:
                    continue   # an IPv6 twin of an IPv4 mapping (podman adds ::): atomnet is IPv4-only
            except ValueError:
                raise CniError(INVALID_CONFIG, f"invalid hostIP {host_ip!r} in port mapping") from None
        pm = PortMapping(hp, cp, proto, host_ip)
        if pm not in out:
            out.append(pm)
    return tuple(out)


def _object_list(items, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[tuple]:
    """A config list of JSON objects (args.cni.labels' {key, value}, GC's {containerID, ifname})
    as tuples of their fields, as strings (a missing optional field: ""); any other shape is
    one INVALID_CONFIG error naming the list and the fields it wants."""
    shape = "{" + ", ".join(required + optional) + "}"
    if not isinstance(items, list):
        raise CniError(INVALID_CONFIG, f"{what} must be a list of {shape}")
    out = []
    for item in items:
        try:
            out.append(tuple(str(item[k]) for k in required) + tuple(str(item.get(k) or "") for k in optional))
        except (KeyError, TypeError, AttributeError):
            raise CniError(INVALID_CONFIG, f"invalid entry {item!r} in {what}: use {shape}") from None
    return out


def _labels(cni_args: dict, conf_args: dict) -> dict[str, str]:
    labels = {}
    if cni_args.get("K8S_POD_NAMESPACE"):
        labels[NAMESPACE_LABEL] = cni_args["K8S_POD_NAMESPACE"]
    # conventions: args.cni.labels [{key, value}]
    labels.update(_object_list((conf_args.get("cni") or {}).get("labels") or [], "args.cni.labels", ("key", "value")))
    return labels


def parse_request(env: Mapping[str, str], stdin: str) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}"
                       if command else "CNI_COMMAND is not set")
    try:
        conf = json.loads(stdin) if stdin.strip() else {}
    except ValueError as exc:
        raise CniError(DECODING_FAILURE, f"network config on stdin is not JSON: {exc}") from None
    if not isinstance(conf, dict):
        raise CniError(DECODING_FAILURE, "network config on stdin must be a JSON object")
    version = conf.get("cniVersion", "")
    if command == "VERSION":
        return Request(command, version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1], config=conf)
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"atomnet supports {', '.join(SUPPORTED_VERSIONS)}")
    since = COMMANDS_SINCE.get(command)
    if since and _version_key(version) < _version_key(since):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion {since} or later, the config says {version}")
    if conf.get("type", "atomnet") != "atomnet":
        raise CniError(INVALID_CONFIG, f"plugin type {conf.get('type')!r} is not atomnet")
    settings = {}
    for key in ("store", "node", "bpffs"):
        value = conf.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise CniError(INVALID_CONFIG, f"{key} must be a non-empty string")
        settings[key] = value
    common = dict(command=command, cni_version=version, network=str(conf.get("name") or ""), config=conf, **settings)
    if command in ("STATUS", "GC"):
        valid = None
        if command == "GC":
            raw = conf.get("cni.dev/valid-attachments")
            if raw is not None:
                valid = tuple(_object_list(raw, "cni.dev/valid-attachments", ("containerID",), ("ifname",)))
        return Request(valid_attachments=valid, **common)
    if not conf.get("name"):
        raise CniError(INVALID_CONFIG, "network config has no name")
    container_id = _require(env, "CNI_CONTAINERID")
    if not _CONTAINER_ID_RE.match(container_id):
        raise CniError(INVALID_ENVIRONMENT, f"invalid CNI_CONTAINERID {container_id!r}: letters, digits, _ . -")
    ifname = _check_ifname(_require(env, "CNI_IFNAME"))
    netns = env.get("CNI_NETNS", "") if command == "DEL" else _require(env, "CNI_NETNS")   # DEL: may be gone
    cni_args = parse_cni_args(env.get("CNI_ARGS", ""))
    runtime = conf.get("runtimeConfig") or {}
    conf_args = conf.get("args") or {}
    if not isinstance(runtime, dict) or not isinstance(conf_args, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig and args must be JSON objects")
    ip = (_one_address(runtime.get("ips"), "runtimeConfig.ips")
          or _one_address((conf_args.get("cni") or {}).get("ips"), "args.cni.ips")
          or _one_address(cni_args.get("IP"), "CNI_ARGS IP"))
    mac = runtime.get("mac") or cni_args.get("MAC") or None
    if mac is not None and not re.fullmatch(r"([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", str(mac)):
        raise CniError(INVALID_CONFIG, f"invalid MAC address {mac!r}")
    return Request(container_id=container_id, netns=netns, ifname=ifname, cni_args=cni_args,
                   port_mappings=_port_mappings(runtime.get("portMappings")), ip=ip,
                   mac=str(mac).lower() if mac else None, labels=_labels(cni_args, conf_args),
                   prev_result=conf.get("prevResult"), **common)


def _sanitize(text: str) -> str:
    return _NAME_BAD.sub("-", text.lower()).strip("-")


def pod_name(req: Request) -> str:
    """The pod's name in atomnet: the Kubernetes name (`NAMESPACE-NAME` outside "default"; podman
    passes the container name as both) when CNI_ARGS carries it, else from the container id
    (a 64-hex runtime id gives its first 12 digits, as `docker ps` shows). A second interface
    of one container gets `-IFNAME`. Always a valid DNS-1123 label (<= 63 characters)."""
    name, ns = req.cni_args.get("K8S_POD_NAME", ""), req.cni_args.get("K8S_POD_NAMESPACE", "")
    if name:
        base = name if ns in ("", "default", name) else f"{ns}-{name}"
    elif _HEX_ID_RE.match(req.container_id):
        base = req.container_id[:12]
    else:
        base = req.container_id
    if req.ifname != "eth0":
        base = f"{base}-{req.ifname}"
    clean = _sanitize(base) or "cni"
    if clean != base.lower() or len(clean) > 63:
        # changed or shortened: a hash of the original keeps distinct inputs distinct
        import hashlib   # here: its OpenSSL binding costs ~2 ms of every plugin start (ADD/DEL go to the daemon)
        digest = hashlib.sha1(f"{base}".encode()).hexdigest()[:8]
        clean = f"{clean[:54].rstrip('-')}-{digest}"
    return clean


def add_result(version: str, *, host_ifname: str, host_mac: str, ifname: str, mac: str, netns: str, ip: str,
               gateway: str, mtu: int | None = None) -> dict:
    """The ADD result: the host-side veth (no sandbox) and the container's interface, its /32
    address with the link-local gateway, and the default route through that gateway."""
    container_if = {"name": ifname, "mac": mac, "sandbox": netns}
    if mtu and _version_key(version) >= (1, 1, 0):
        container_if["mtu"] = mtu
    address = {"address": f"{ip}/32", "gateway": gateway, "interface": 1}
    if version == "0.4.0":
        address = {"version": "4", **address}
    return {"cniVersion": version, "interfaces": [{"name": host_ifname, "mac": host_mac}, container_if],
            "ips": [address], "routes": [{"dst": "0.0.0.0/0", "gw": gateway}], "dns": {}}


def version_result(version: str) -> dict:
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def prev_result_addresses(prev: dict | None) -> set[str]:
    """The addresses a prevResult (CHECK) says the container has, without prefix length."""
    out = set()
    for entry in (prev or {}).get("ips") or []:
        try:
            out.add(str(ipaddress.ip_interface(entry["address"]).ip))
        except (KeyError, TypeError, ValueError):
            raise CniError(DECODING_FAILURE, f"malformed prevResult ips entry {entry!r}") from None
    return out


def gc_selection(pods, valid: tuple[tuple[str, str], ...] | None, runtime: str = "cni") -> list:
    """GC: the pods this runtime made whose (container id, ifname) is not a valid attachment.
    With no list at all nothing is collected (a GC without the key is not "everything is stale")."""
    if valid is None:
        return []
    keep = {(cid, ifname or "") for cid, ifname in valid}
    keep_ids_any_if = {cid for cid, ifname in valid if not ifname}
    return [p for p in pods if p.runtime == runtime and p.container_id
            and (p.container_id, p.ifname) not in keep and p.container_id not in keep_ids_any_if]
