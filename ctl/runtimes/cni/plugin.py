"""The `atomnet-cni` executable: the CNI plugin of type "atomnet" (installed as `atomnet` in
the runtime's CNI bin dir by `atomnet cni install`).

ADD records the pod like `atomnet pod add` does (ctl/node/pods.add_pod: address, veth into
CNI_NETNS, store record) plus its portMappings as forwards owned by the pod. Every step that
fails undoes the earlier ones, so a failed ADD leaves no veth, record, address or forward.

The executable's entry is ctl/runtimes/cni/entry.py: ADD and DEL go to this node's running
daemon (ctl/runtimes/nodeapi.py), which runs `run` below against its open store and programs
the endpoint at once; this module is imported, and `run` called in-process, only when no
daemon answers (and for CHECK, STATUS, GC, VERSION).

stdout carries only the result or the error object; logs go to stderr.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import structlog

from ...errors import AtomnetError
from ...node import forwards as fwdlib, netplumb, pods as podlib, readiness
from ...state import cluster, forwards as fwdstate
from ...state.model import POD_GATEWAY, ValidationError, pod_addresses
from ...state.pods import list_pods
from ...state.store import StoreError, open_store
from . import protocol as p
from .entry import settings

log = structlog.get_logger("atomnet.cni")

RUNTIME = "cni"


@contextmanager
def failing_as(code: int, prefix: str = ""):
    """AtomnetErrors of a step become the CNI error object with `code`; store trouble is
    transient (try again later)."""
    try:
        yield
    except p.CniError:
        raise
    except StoreError as exc:
        raise p.CniError(p.TRY_AGAIN_LATER, f"{prefix}{exc}") from None
    except AtomnetError as exc:
        raise p.CniError(code, f"{prefix}{exc}") from None


def pods_of(store, node: str, container_id: str, ifname: str | None = None):
    return [pod for pod in list_pods(store, node) if pod.runtime == RUNTIME and pod.container_id == container_id
            and (ifname is None or pod.ifname == ifname)]


def remove_pod(store, node: str, pod) -> None:
    """The pod's own forwards first, then the pod (links, address, record): what DEL and GC do."""
    for fwd in fwdstate.list_forwards(store, node):
        if fwd.owner == pod.name:
            fwdstate.delete_forward(store, fwd.id)
    podlib.delete_pod(store, node, pod.name)


@contextmanager
def opened(req: p.Request, store, code: int):
    """The daemon's store when it runs the command (given), else the request's, opened here."""
    if store is not None:
        yield store
        return
    with failing_as(code, "store: "):
        store = open_store(settings(req)[0])
    with store:
        yield store


def cmd_add(req: p.Request, store=None, node_name: str | None = None) -> dict:
    node_name = node_name or settings(req)[1]
    name = p.pod_name(req)
    with opened(req, store, p.INVALID_CONFIG) as store:
        with failing_as(p.TRY_AGAIN_LATER):   # e.g. no network configured yet, or no subnet yet
            node = podlib.local_node(store, node_name)
        existing = pods_of(store, node_name, req.container_id, req.ifname)
        if existing:
            raise p.CniError(p.CONFLICT, f"container {req.container_id} already has interface {req.ifname} "
                             f"(pod {existing[0].name}): DEL it first")
        if req.ip is not None:
            import ipaddress
            if ipaddress.IPv4Address(req.ip) not in pod_addresses(ipaddress.IPv4Network(node.subnet)):
                raise p.CniError(p.INVALID_CONFIG, f"requested address {req.ip} is not a pod address of node "
                                 f"{node_name}'s subnet {node.subnet}")
        if not os.path.exists(req.netns):
            raise p.CniError(p.INVALID_ENVIRONMENT, f"CNI_NETNS {req.netns} does not exist")
        with failing_as(p.CONFLICT):
            try:
                pod = podlib.add_pod(store, node_name, name, req.labels, req.netns, ifname=req.ifname, ip=req.ip,
                                     mac=req.mac, container_id=req.container_id, runtime=RUNTIME)
            except ValidationError as exc:
                raise p.CniError(p.INVALID_CONFIG, str(exc)) from None
        try:
            with failing_as(p.CONFLICT):
                for m in req.port_mappings:
                    fwdlib.add_forward(store, node_name, f"{pod.name}:{m.container_port}", str(m.host_port),
                                       m.host_ip or None, m.protocol, owner=pod.name)
        except BaseException:
            remove_pod(store, node_name, pod)   # nothing half-made: the pod and any forward already added
            raise
        host_mac = netplumb.link_table()[pod.host_ifname].mac
    log.info("cni_add", pod=pod.name, container_id=req.container_id, ip=pod.ip, ports=len(req.port_mappings))
    return p.add_result(req.cni_version, host_ifname=pod.host_ifname, host_mac=host_mac, ifname=pod.ifname,
                        mac=pod.mac, netns=req.netns, ip=pod.ip, gateway=POD_GATEWAY, mtu=node.pod_mtu)


def cmd_del(req: p.Request, store=None, node_name: str | None = None) -> None:
    """Idempotent: an unknown container, a second DEL and a vanished netns all succeed."""
    node_name = node_name or settings(req)[1]
    with opened(req, store, p.TRY_AGAIN_LATER) as store, failing_as(p.TRY_AGAIN_LATER):
        for pod in pods_of(store, node_name, req.container_id, req.ifname):
            remove_pod(store, node_name, pod)
            log.info("cni_del", pod=pod.name, container_id=req.container_id)


def cmd_check(req: p.Request) -> None:
    from ...dataplane.bpf.loader import Loader
    from ...observe.inspect import endpoint_list
    store_url, node_name, bpffs = settings(req)
    with failing_as(p.TRY_AGAIN_LATER, "store: "):
        store = open_store(store_url)
    with store:
        found = pods_of(store, node_name, req.container_id, req.ifname)
    if not found:
        raise p.CniError(p.UNKNOWN_CONTAINER, f"container {req.container_id} has no atomnet interface {req.ifname} "
                         f"on node {node_name}")
    pod = found[0]
    problems = netplumb.pod_link_problems(netplumb.netns_path(req.netns), pod.host_ifname, pod.ifname, pod.ip)
    expected = p.prev_result_addresses(req.prev_result)
    if expected and expected != {pod.ip}:
        problems.append(f"prevResult says {', '.join(sorted(expected))}, atomnet gave {pod.ip}")
    try:
        endpoints = {e["ip"] for e in endpoint_list(Loader(bpffs), {})}
        if pod.ip not in endpoints:
            problems.append(f"the dataplane has no endpoint for {pod.ip} (is `atomnet daemon` running?)")
    except AtomnetError as exc:
        problems.append(f"dataplane not readable: {exc}")
    if problems:
        raise p.CniError(p.CHECK_FAILED, f"pod {pod.name}: " + "; ".join(problems))


def cmd_status(req: p.Request) -> None:
    """Ready = this node's daemon is running and has attached its programs (ctl/node/readiness),
    and the store answers with this node's subnet."""
    store_url, node_name, bpffs = settings(req)
    reason = readiness.not_ready_reason(bpffs)
    if reason:
        raise p.CniError(p.PLUGIN_NOT_AVAILABLE, reason)
    with failing_as(p.PLUGIN_NOT_AVAILABLE, "store: "):
        with open_store(store_url) as store:
            if cluster.load_node(store, node_name) is None:
                raise p.CniError(p.PLUGIN_NOT_AVAILABLE, f"node {node_name} has no subnet yet")


def cmd_gc(req: p.Request) -> None:
    store_url, node_name, _ = settings(req)
    with failing_as(p.TRY_AGAIN_LATER, "store: "):
        store = open_store(store_url)
    with store, failing_as(p.TRY_AGAIN_LATER):
        for pod in p.gc_selection(list_pods(store, node_name), req.valid_attachments, RUNTIME):
            remove_pod(store, node_name, pod)
            log.info("cni_gc", pod=pod.name, container_id=pod.container_id)


def cmd_version(req: p.Request) -> dict:
    return p.version_result(req.cni_version)


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc,
            "VERSION": cmd_version}
WITH_STORE = ("ADD", "DEL")   # the commands the daemon runs for the plugin (with its store and node)


def run(env, stdin: str, store=None, node: str | None = None) -> tuple[dict | None, int]:
    """One invocation: (what to print on stdout, exit status). `store`/`node`: the daemon's,
    when it runs an ADD or DEL for the plugin (ctl/runtimes/nodeapi_server.py)."""
    try:
        req = p.parse_request(env, stdin)
        if store is not None:
            if req.command not in WITH_STORE:
                raise p.CniError(p.INVALID_ENVIRONMENT, f"{req.command} is not run by the daemon")
            return HANDLERS[req.command](req, store, node), 0
        return HANDLERS[req.command](req), 0
    except p.CniError as exc:
        log.warning("cni_failed", command=env.get("CNI_COMMAND"), container_id=env.get("CNI_CONTAINERID"),
                    code=exc.code, msg=exc.msg)
        return exc.to_dict(p.response_version(stdin)), 1
    except OSError as exc:
        return p.CniError(p.IO_FAILURE, f"{type(exc).__name__}: {exc}").to_dict(p.response_version(stdin)), 1
    except Exception as exc:  # a bug: still an error object, never a traceback on stdout
        if os.environ.get("ATOMNET_DEBUG"):
            raise
        return p.CniError(p.ADD_FAILED, f"internal error: {type(exc).__name__}: {exc}").to_dict(
            p.response_version(stdin)), 1


if __name__ == "__main__":   # shims written before entry.py existed exec this module
    import sys
    from .entry import main
    sys.exit(main())
