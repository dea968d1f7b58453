"""The `atomnet` command. State verbs write the store (the daemon applies them);
inspection verbs read this node's live dataplane.

Errors are one line on stderr and exit status 1 (2 for usage), never a traceback
(ATOMNET_DEBUG=1 shows it).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from . import launch
from .errors import AtomnetError
from .output import emit

from .defaults import DEFAULT_BPFFS, DEFAULT_STORE


class Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors, and filled on first use: `fill(parser)` adds
    its arguments (or a group's verbs) when it parses, or prints its help or usage, so a
    command builds the parsers on its own path only (pod add: 5.5 ms of CPU to build and
    parse instead of 8.5 ms with all ~50 built). Help and errors are the same as built whole
    (tests/unit/test_cli.py)."""

    def __init__(self, *args, fill=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fill = fill

    def filled(self) -> "Parser":
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(Parser, self.filled()).parse_known_args(args, namespace)

    def format_usage(self):
        return super(Parser, self.filled()).format_usage()

    def format_help(self):
        return super(Parser, self.filled()).format_help()

    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Global flags, accepted before or after the verb."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    parser.add_argument("--store", default=d(os.environ.get("ATOMNET_STORE", DEFAULT_STORE)),
                        help="store URL: sqlite:///PATH or etcd://HOST:PORT (env ATOMNET_STORE)")
    parser.add_argument("--node", default=d(os.environ.get("ATOMNET_NODE") or socket.gethostname()),
                        help="this node's name (env ATOMNET_NODE, default hostname)")
    parser.add_argument("--bpffs", default=d(os.environ.get("ATOMNET_BPFFS", DEFAULT_BPFFS)),
                        help="bpffs directory for pinned maps and programs (env ATOMNET_BPFFS)")
    parser.add_argument("-j", "--json", action="store_true", default=d(False), help="JSON output")


def verb(parent, name: str, help_text: str, func, args=None, **defaults) -> None:
    """A verb run by `func(args)`: the global flags (suppressed: given before the verb they
    keep their value), then what `args(parser)` adds."""
    def fill(sub: Parser) -> None:
        _globals(sub, suppress=True)
        sub.set_defaults(func=func, **defaults)
        if args is not None:
            args(sub)
    parent.add_parser(name, help=help_text, fill=fill)


def group(parent, name: str, help_text: str, verbs) -> None:
    """A verb with actions (`atomnet pod add`): `verbs(subparsers)` adds them."""
    parent.add_parser(name, help=help_text, fill=lambda g: verbs(
        g.add_subparsers(dest="action", required=True, parser_class=Parser)))


def build_parser() -> Parser:
    """Every verb's parser, each bound to its handler with set_defaults(func=...), built when used."""
    p = Parser(prog="atomnet", description="eBPF container networking: pods, overlay, services, forwards")
    _globals(p, suppress=False)
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=Parser)

    def network_init(a):
        a.add_argument("--cidr", required=True)
        a.add_argument("--subnet-len", type=int, default=24)
        a.add_argument("--service-cidr", default="10.96.0.0/12")
        a.add_argument("--cluster-domain", default="cluster.local", help="the cluster DNS domain")
        a.add_argument("--dns-vip", help="the cluster DNS address (default: the service CIDR's 10th address)")
        a.add_argument("--masquerade", choices=["on", "off"], default=None,
                       help="SNAT pod traffic leaving the cluster to the node's address (default on; "
                            "given again later, changes it live)")
        a.add_argument("--no-masquerade-cidr", action="append", default=None, metavar="CIDR",
                       help="destinations pods reach with their own address (repeatable; replaces the stored list)")

    def network(g):
        verb(g, "init", "write the cluster network config (flannel format)", _network_init, network_init)
        verb(g, "show", "show the network config and this node's subnet", _network_show)
    group(verbs, "network", "cluster network", network)

    def daemon(a):
        a.add_argument("--uplink", help="the node's uplink interface")
        a.add_argument("--public-ip", help="this node's address on the underlay")
        a.add_argument("--metrics", help="serve Prometheus metrics on [HOST]:PORT, unauthenticated; no HOST means "
                       "127.0.0.1 (give 0.0.0.0 or an address to expose it)")
        a.add_argument("--log-format", choices=["json", "console"], default="json")
        a.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
        a.add_argument("--debug-events", action="store_true",
                       help="programs also report every translation decision to `atomnet monitor`")
        a.add_argument("--lease-ttl", type=float, default=None, metavar="SECONDS",
                       help="subnet lease TTL (flannel: 86400)")
        a.add_argument("--lease-renew-margin", type=float, default=None, metavar="SECONDS",
                       help="renew this long before expiry (flannel: 3600; at most half the TTL)")
        a.add_argument("--upstream", action="append", default=[], metavar="IP[:PORT]",
                       help="resolver for names outside the cluster (repeatable; default: /etc/resolv.conf's)")
        a.add_argument("--dns-ttl", type=int, default=30, metavar="SECONDS", help="TTL of service and node names")
        a.add_argument("--dns-pod-ttl", type=int, default=5, metavar="SECONDS", help="TTL of pod and forward names")
        # Cilium's agent flags (ctl/dataplane/mapsizes.py); each also from ATOMNET_BPF_LB_..._MAX
        a.add_argument("--bpf-lb-map-max", metavar="N", default=None,
                       help="entries of the services and Maglev maps, 4 x N of the backends map (env "
                            "ATOMNET_BPF_LB_MAP_MAX; default: the compiled 65536 / 262144)")
        a.add_argument("--bpf-lb-service-map-max", metavar="N", default=None,
                       help="entries of the services map (frontends; overrides --bpf-lb-map-max)")
        a.add_argument("--bpf-lb-service-backend-map-max", metavar="N", default=None,
                       help="entries of the backends map (one per service port and backend)")
        a.add_argument("--bpf-lb-maglev-map-max", metavar="N", default=None,
                       help="entries of the Maglev map (one per distinct backend set)")
    verb(verbs, "daemon", "run the node's controller (root)", _daemon, daemon)

    def dns_query(a):
        a.add_argument("name")
        a.add_argument("type", nargs="?", default="A")
        a.add_argument("--tcp", action="store_true", help="query over TCP")

    def dns(g):
        verb(g, "list", "every name this node's DNS answers from the cluster state", _dns_list)
        verb(g, "query", "ask this node's DNS server (UDP, TCP on truncation)", _dns_query, dns_query)
    group(verbs, "dns", "cluster DNS", dns)

    def docker_plugin(a):
        a.add_argument("--socket", default=os.environ.get("ATOMNET_DOCKER_SOCKET", "/run/docker/plugins/atomnet.sock"),
                       help="unix socket Docker finds the plugin by (env ATOMNET_DOCKER_SOCKET)")
        a.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST", "unix:///run/docker.sock"),
                       help="dockerd's API, to learn each endpoint's container name and labels (env DOCKER_HOST)")
        a.add_argument("--log-format", choices=["json", "console"], default="json")
        a.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    verb(verbs, "docker-plugin", "serve Docker's remote network + IPAM driver \"atomnet\" (root)", _docker_plugin,
         docker_plugin)

    def pod_add(a):
        a.add_argument("name")
        a.add_argument("--label", action="append", default=[], metavar="K=V")
        a.add_argument("--netns", help="use this existing namespace (path or name under /run/netns)")

    def pod(g):
        verb(g, "add", "create a pod: namespace, veth, address", _pod_add, pod_add, light=True)
        verb(g, "del", "delete a pod (idempotent)", _pod_del, lambda a: a.add_argument("name"), light=True)
        verb(g, "list", "list pods", _pod_list)
    group(verbs, "pod", "pods", pod)

    def service_add(a):
        a.add_argument("name")
        a.add_argument("--port", action="append", required=True, metavar="PORT[:TARGET][/tcp|udp]")
        a.add_argument("--vip", help="a free address in the service CIDR (default: allocated)")
        a.add_argument("--backend", action="append", default=[], metavar="POD[:PORT]")
        a.add_argument("--selector", action="append", default=[], metavar="K=V")
        a.add_argument("--affinity", metavar="client-ip[:SECONDS]")
        a.add_argument("--node-port", metavar="auto|N", help="also publish on every node's address (NodePort)")

    def service(g):
        verb(g, "add", "create a service: a stable VIP load-balanced to pods", _service_add, service_add)
        verb(g, "del", "delete a service (idempotent)", _service_del, lambda a: a.add_argument("name"))
        verb(g, "list", "list services", _service_list)
        verb(g, "show", "one service with its resolved backends", _service_show, lambda a: a.add_argument("name"))
    group(verbs, "service", "services", service)

    def forward_add(a):
        a.add_argument("target", metavar="POD:PORT")
        a.add_argument("--host-port", default="auto", metavar="N|auto")
        a.add_argument("--host-ip", help="an address of this node (default: its public IP)")
        a.add_argument("--proto", default="tcp", help="tcp or udp")

    def forward(g):
        verb(g, "add", "publish a pod port on this node (like docker run -p)", _forward_add, forward_add)
        verb(g, "del", "remove a forward (idempotent)", _forward_del, lambda a: a.add_argument("id"))
        verb(g, "list", "list forwards", _forward_list)
    group(verbs, "forward", "port forwarding", forward)

    def cni_install(a):
        a.add_argument("--bin-dir", default="/opt/cni/bin", help="the runtime's CNI plugin dir")
        a.add_argument("--conf-dir", default="/etc/cni/net.d", help="the runtime's CNI config dir")
    group(verbs, "cni", "CNI plugin", lambda g: verb(
        g, "install", "install the CNI plugin and the \"atomnet\" conflist for this node", _cni_install, cni_install))

    def apply(a):
        a.add_argument("-f", "--file", required=True, help="FILE, or - for standard input")
        a.add_argument("--prune", action="store_true", help="delete services the file no longer lists")
    verb(verbs, "apply", "declarative bulk: a JSON/YAML list of {kind: service, ...}", _apply, apply)

    group(verbs, "prog", "BPF programs", lambda g: verb(g, "show", "programs pinned by atomnet on this node", _prog_show))
    group(verbs, "net", "attachments", lambda g: verb(g, "show", "tc BPF attachments on this node's links", _net_show))

    def maps(g):
        verb(g, "list", "maps pinned by atomnet", _map_list)
        verb(g, "dump", "decoded entries of a map", _map_dump, lambda a: a.add_argument("name"))
    group(verbs, "map", "BPF maps", maps)
    group(verbs, "endpoint", "endpoints",
          lambda g: verb(g, "list", "pods programmed in this node's dataplane", _endpoint_list))
    verb(verbs, "stats", "dataplane counters: deliveries and drops by reason, per-service traffic", _stats)
    group(verbs, "lb", "load balancer",
          lambda g: verb(g, "list", "service frontends -> backends, with per-backend counters", _lb_list))

    def explain(a):
        a.add_argument("--from", dest="from_pod", required=True, metavar="POD")
        a.add_argument("--to", required=True, metavar="IP:PORT[/tcp|udp]")
        a.add_argument("--sport", type=int, help="source port of the synthetic packet (default: random)")
    verb(verbs, "explain", "run the real program on a synthetic packet from a pod (changes nothing)", _explain, explain)

    def monitor(a):
        a.add_argument("--count", type=int, help="stop after N events")
        a.add_argument("--duration", type=float, help="stop after SECONDS")
    verb(verbs, "monitor", "live dataplane events: drops with their reason, translations (debug)", _monitor, monitor)
    group(verbs, "tunnel", "overlay",
          lambda g: verb(g, "list", "remote subnets reached through the VXLAN overlay", _tunnel_list))
    group(verbs, "ct", "conntrack", lambda g: verb(
        g, "list", "translated flows: tuple, translation, age, flags", _ct_list,
        lambda a: a.add_argument("--nat", action="store_true", help="masqueraded flows only: pod tuple -> node IP:port")))
    return p


def _store(args):
    from .state.store import open_store
    return open_store(args.store)


def _loader(args):
    from .dataplane.bpf.loader import Loader
    return Loader(args.bpffs)


def _pod_row(pod) -> dict:
    d = dict(pod) if isinstance(pod, dict) else pod.to_dict()   # a dict: as the node API answered
    d.pop("netns_owned")
    return d


POD_COLUMNS = ["name", "node", "ip", "netns", "ifname", "host_ifname", "mac", "labels", "runtime", "container_id"]



def _network_init(args) -> None:
    from .state.cluster import init_network
    with _store(args) as store:
        cfg, cluster = init_network(store, args.cidr, args.subnet_len, args.service_cidr,
                                    cluster_domain=args.cluster_domain, dns_vip=args.dns_vip,
                                    masquerade=None if args.masquerade is None else args.masquerade == "on",
                                    no_masquerade_cidrs=args.no_masquerade_cidr)
    emit({"network": cfg.network, "subnet_len": cfg.subnet_len, "vni": cfg.vni, "port": cfg.port,
          "service_cidr": cluster.service_cidr, "cluster_domain": cluster.cluster_domain,
          "dns_vip": cluster.dns_vip, "masquerade": cluster.masquerade,
          "no_masquerade_cidrs": list(cluster.no_masquerade_cidrs)}, args.json)


def _network_show(args) -> None:
    from .state.cluster import dns_vip_of, load_cluster_config, load_network, load_node
    with _store(args) as store:
        cfg, cluster, node = load_network(store), load_cluster_config(store), load_node(store, args.node)
    emit({"network": cfg.network, "subnet_len": cfg.subnet_len, "vni": cfg.vni, "port": cfg.port,
          "service_cidr": cluster.service_cidr, "masquerade": cluster.masquerade,
          "no_masquerade_cidrs": list(cluster.no_masquerade_cidrs), "node": args.node,
          "subnet": node.subnet if node else None, "cluster_domain": cluster.cluster_domain,
          "dns_vip": dns_vip_of(cluster)}, args.json)


def _node_api(args, op: str, api_args: dict):
    """`pod add/del`: the node's running daemon does it (ctl/runtimes/nodeapi.py; no pyroute2 or
    store client to import here, and the endpoint is programmed at once); with no daemon, this
    process does it through the same function (nodeapi_server.perform)."""
    from .runtimes import nodeapi
    try:
        return nodeapi.call(nodeapi.socket_path(args.node, args.bpffs), op, args.store, args.node, api_args)
    except nodeapi.Unavailable:
        pass
    launch.full_environment()   # the in-process work imports pyroute2 and the store clients
    _configure_logs()
    from .runtimes.nodeapi_server import perform
    with _store(args) as store:
        return perform(store, args.node, op, api_args)


def _pod_add(args) -> None:
    pod = _node_api(args, "pod.add", {"name": args.name, "labels": args.label, "netns": args.netns})
    emit(_pod_row(pod), args.json, POD_COLUMNS)


def _pod_del(args) -> None:
    gone = _node_api(args, "pod.del", {"name": args.name})
    if args.json:
        emit([_pod_row(gone)] if gone else [], True)
    else:
        print(f"pod {args.name} deleted" if gone else f"pod {args.name} not found (nothing to do)")


def _pod_list(args) -> None:
    from .state.pods import list_pods
    with _store(args) as store:
        emit([_pod_row(p) for p in list_pods(store)], args.json, POD_COLUMNS, "no pods")


def _prog_show(args) -> None:
    from .observe.inspect import prog_show
    emit(prog_show(_loader(args)), args.json,
         ["id", "name", "type", "tag", "loaded_at", "map_ids", "run_cnt", "pinned"], "no programs")


def _net_show(args) -> None:
    from .observe.inspect import net_show
    emit(net_show(), args.json, ["ifname", "ifindex", "direction", "prog_id", "name", "prio", "handle",
                                 "direct_action"], "no tc BPF attachments")


def _map_list(args) -> None:
    from .observe.inspect import map_list, overflow_hints
    loader = _loader(args)
    emit(map_list(loader), args.json,
         ["id", "name", "type", "key_size", "value_size", "max_entries", "entries", "needed", "pinned"])
    for hint in overflow_hints(loader):   # the maps the daemon could not fit its state into
        sys.stderr.write(f"atomnet: warning: {hint}\n")


def _map_dump(args) -> None:
    from .observe.inspect import map_dump
    emit(map_dump(_loader(args), args.name), args.json, ["key", "value"], "(empty)")


def _endpoint_list(args) -> None:
    from .observe.inspect import endpoint_list
    from .state.pods import list_pods
    try:
        with _store(args) as store:
            names = {p.ip: p.name for p in list_pods(store, args.node)}
    except AtomnetError:
        names = {}  # the dataplane is readable even when the store is not
    emit(endpoint_list(_loader(args), names), args.json, empty="no endpoints")


def _lb_list(args) -> None:
    from .observe.inspect import lb_list
    rows = lb_list(_loader(args), _service_port_names(args))
    if not args.json:
        rows = [{**r, "backends": [f"{b['ip']}:{b['port']}({b['packets']}p)" for b in r["backends"]]} for r in rows]
    emit(rows, args.json, ["service", "frontend", "backends", "table_size", "affinity_timeout", "packets", "bytes"],
         "no services")


def _explain(args) -> None:
    from .observe.explain import explain
    from .state.pods import get_pod
    with _store(args) as store:
        pod = get_pod(store, args.from_pod)
    if pod is None:
        raise AtomnetError(f"pod {args.from_pod} not found")
    result = explain(_loader(args), pod, args.to, args.sport)
    if args.json:
        emit(result, True)
    else:
        _print_explain(result)


def _monitor(args) -> None:
    from .node import netplumb
    from .observe.monitor import run_monitor
    ifnames = {info.ifindex: name for name, info in netplumb.link_table().items()}
    if not args.json:
        print("monitoring dataplane events (Ctrl-C stops; translations appear when the daemon runs with "
              "--debug-events)", file=sys.stderr)
    run_monitor(_loader(args), args.json, sys.stdout, sys.stderr, args.count, args.duration, ifnames)


def _tunnel_list(args) -> None:
    from .state.cluster import list_leases
    from .observe.inspect import tunnel_list
    expiry = {}
    try:
        with _store(args) as store:
            expiry = {lease.subnet: store.lease_ttl(lease_id) if lease_id else None
                      for lease, lease_id in list_leases(store)}
    except AtomnetError:
        pass  # the dataplane is readable even when the store is not
    emit(tunnel_list(_loader(args), expiry), args.json, empty="no remote nodes")


def _ct_list(args) -> None:
    from .observe.inspect import ct_list, snat_list
    if args.nat:
        emit(snat_list(_loader(args)), args.json, ["proto", "src", "dst", "nat", "age_s", "idle_s", "packets",
                                                   "reply_packets", "flags"], "no masqueraded flows")
        return
    emit(ct_list(_loader(args)), args.json, ["dir", "proto", "src", "dst", "nat", "age_s", "idle_s",
                                             "packets", "flags"], "no flows")


def _stats(args) -> None:
    from .observe.inspect import counters, lb_list
    loader = _loader(args)
    rows = counters(loader)
    rows += [{"counter": f"service:{r['service']}:{r['port']}/{r['proto']}", "packets": r["packets"],
              "bytes": r["bytes"]} for r in lb_list(loader, _service_port_names(args))]
    rows += _dns_stats(args)
    emit(rows, args.json)


def _dns_stats(args) -> list[dict]:
    """The DNS server's counters (queries, answers, malformed input): rows `dns:NAME`."""
    from .dns.client import server_stats
    from .state.cluster import dns_vip_of, load_cluster_config
    try:
        with _store(args) as store:
            vip = dns_vip_of(load_cluster_config(store))
    except AtomnetError:
        return []
    return [{"counter": f"dns:{k}", "packets": v, "bytes": None} for k, v in sorted((server_stats(vip) or {}).items())]


def _print_explain(r: dict) -> None:
    print(f"packet:   {r['packet']} from pod {r['from']}")
    print(f"verdict:  {r['verdict']}" + (f" ({r['reason']})" if r.get("reason") else ""))
    for key in ("backend", "delivered_to", "reply"):
        if r.get(key):
            print(f"{key.replace('_', ' ')}:".ljust(10) + str(r[key]))
    if r.get("tunnel"):
        t = r["tunnel"]
        print(f"tunnel:   {t['subnet']} via node {t['node_ip']} (VtepMAC {t['vtep_mac']})")
    for w in r["rewrites"]:
        print(f"rewrite:  {w['field']} {w['from']} -> {w['to']}")
    print("counters: " + (", ".join(f"{k}={v}" for k, v in r["counters"].items()) or "-"))
    print(f"program:  from_pod tag {r['program_tag']}"
          + ("" if r["same_as_attached"] is None else " (the attached one)" if r["same_as_attached"]
             else " (differs from the attached one: run the daemon of this version)"))


def _service_port_names(args) -> dict[int, str]:
    """service-port id -> service name (or forward:ID), for inspection output (the dataplane only knows ids)."""
    from .state.forwards import list_forwards
    from .state.services import list_services
    try:
        with _store(args) as store:
            names = {p.id: s.name for s in list_services(store) for p in s.ports}
            names.update({f.service_id: f"forward:{f.id}" for f in list_forwards(store)})
            return names
    except AtomnetError:
        return {}  # the dataplane is readable even when the store is not


SERVICE_COLUMNS = ["name", "vip", "ports", "backends", "selector", "affinity"]


def _service_row(shown: dict) -> dict:
    """Table cells: ports as 80->8080/tcp, backends as pod=ip:port."""
    row = dict(shown)
    row["ports"] = [f"{p['port']}->{p['target_port']}/{p['proto']}" for p in shown["ports"]]
    row["backends"] = [f"{b['pod']}={b['ip']}:{b['port']}" for b in shown["backends"]]
    return row


def _service_add(args) -> None:
    from .state import services as svclib
    from .state.model import BackendRef, Service, ServicePort, parse_affinity, parse_labels
    with _store(args) as store:
        svc = Service(name=args.name, vip=args.vip or "", ports=tuple(ServicePort.parse(p) for p in args.port),
                      backends=tuple(BackendRef.parse(b) for b in args.backend),
                      selector=parse_labels(args.selector), affinity_timeout=parse_affinity(args.affinity))
        shown = svclib.show(svclib.add_service(store, svc, args.node_port), svclib.pods_by_name(store))
    emit(shown if args.json else _service_row(shown), args.json, SERVICE_COLUMNS)


def _service_del(args) -> None:
    from .state import services as svclib
    with _store(args) as store:
        gone = svclib.delete_service(store, args.name)
    if args.json:
        emit([svclib.show(gone, {})] if gone else [], True)
    else:
        print(f"service {args.name} deleted" if gone else f"service {args.name} not found (nothing to do)")


def _service_list(args) -> None:
    from .state import services as svclib
    with _store(args) as store:
        pods = svclib.pods_by_name(store)
        shown = [svclib.show(s, pods) for s in svclib.list_services(store)]
    emit(shown if args.json else [_service_row(s) for s in shown], args.json, SERVICE_COLUMNS, "no services")


def _service_show(args) -> None:
    from .state import services as svclib
    with _store(args) as store:
        svc = svclib.get_service(store, args.name)
        if svc is None:
            raise AtomnetError(f"service {args.name} not found")
        shown = svclib.show(svc, svclib.pods_by_name(store))
    emit(shown if args.json else _service_row(shown), args.json, SERVICE_COLUMNS)


def _apply(args) -> None:
    from .state import services as svclib
    text = sys.stdin.read() if args.file == "-" else _read_file(args.file)
    docs = svclib.parse_documents(text)
    for i, d in enumerate(docs):
        if d.get("kind") not in ("service", "forward"):
            raise AtomnetError(f"object {i + 1}: unsupported kind {d.get('kind')!r} (supported: service, "
                               "forward)")
    services = [d for d in docs if d["kind"] == "service"]
    forwards = [d for d in docs if d["kind"] == "forward"]
    with _store(args) as store:
        # Everything is validated before anything is written. --prune applies to the kinds
        # the file lists. Forwards are checked against this node's kernel: this node's only.
        node_ports = {(str(p.get("proto", "tcp")).lower(), p["node_port"]) for d in services
                      for p in d.get("ports") or () if isinstance(p, dict) and p.get("node_port")}
        plan = None
        if forwards:   # imported only then: it brings pyroute2 (~0.15 s of a services-only apply)
            from .node import forwards as fwdlib
            plan = fwdlib.plan_apply(store, args.node, forwards, prune=args.prune, node_ports=node_ports)
        result = svclib.apply(store, services, prune=args.prune) if services else {}
        if plan:
            result["forwards"] = fwdlib.apply_plan(store, plan)
    emit(result, args.json)


FORWARD_COLUMNS = ["id", "host_ip", "host_port", "proto", "pod", "port", "packets", "bytes"]


def _forward_row(fwd, counters: dict[int, tuple[int, int]] | None = None) -> dict:
    d = fwd.to_dict()
    d.pop("service_id")
    d.pop("node")
    packets, nbytes = (counters or {}).get(fwd.service_id, (None, None))
    return {**d, "node": fwd.node, "packets": packets, "bytes": nbytes}


def _forward_add(args) -> None:
    from .node import forwards as fwdlib
    with _store(args) as store:
        fwd = fwdlib.add_forward(store, args.node, args.target, args.host_port, args.host_ip, args.proto)
    if args.json:
        emit(_forward_row(fwd), True)
    else:
        print(fwd.host_port)   # like `docker port`: the port it chose is what scripts need


def _forward_del(args) -> None:
    from .state.forwards import delete_forward
    with _store(args) as store:
        gone = delete_forward(store, args.id)
    if args.json:
        emit([_forward_row(gone)] if gone else [], True)
    else:
        print(f"forward {args.id} deleted" if gone else f"forward {args.id} not found (nothing to do)")


def _forward_list(args) -> None:
    from .state.forwards import list_forwards
    counters = {}
    try:
        from .observe.inspect import lb_list
        counters = {r["id"]: (r["packets"], r["bytes"]) for r in lb_list(_loader(args), {})}
    except AtomnetError:
        pass  # no dataplane on this node: list what is stored
    with _store(args) as store:
        forwards = list_forwards(store)
    emit([_forward_row(f, counters) for f in forwards], args.json, FORWARD_COLUMNS + ["node"], "no forwards")


def _dns_list(args) -> None:
    from .dns.client import list_records
    with _store(args) as store:
        emit(list_records(store), args.json, ["name", "type", "ttl", "data"], "no names")


def _dns_query(args) -> None:
    from .dns.client import query
    from .state.cluster import dns_vip_of, load_cluster_config
    with _store(args) as store:
        vip = dns_vip_of(load_cluster_config(store))
    result = query(vip, args.name, args.type, args.tcp)
    if args.json:
        emit(result, True)
    else:
        print(f"{result['rcode']} from {result['server']} over {result['transport']}"
              + (" (authoritative)" if result["authoritative"] else ""))
        for section in ("answer", "authority", "additional"):
            for r in result[section]:
                print(f"{section:<11}{r['name']} {r['ttl']} {r['type']} {r['data']}")


def _read_file(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError as exc:
        raise AtomnetError(f"cannot read {path}: {exc.strerror}") from None


def _cni_install(args) -> None:
    from .runtimes.cni.install import install
    emit(install(args.bin_dir, args.conf_dir, args.store, args.node, args.bpffs), args.json)


def _daemon(args) -> None:
    from . import logs
    from .daemon import Daemon
    from .dns.service import DnsService
    logs.configure(args.log_format, args.log_level)
    if os.geteuid() != 0:
        raise AtomnetError("atomnet daemon must run as root (it loads BPF programs and changes links)")
    for what, ttl in (("--dns-ttl", args.dns_ttl), ("--dns-pod-ttl", args.dns_pod_ttl)):
        if not 0 <= ttl <= 86400:
            raise AtomnetError(f"invalid {what} {ttl}: seconds, 0-86400")
    from .dataplane.mapsizes import LB_MAP_MAX, PER_MAP, lb_map_sizes
    sizes = lb_map_sizes({flag: getattr(args, flag.removeprefix("--").replace("-", "_"))
                          for flag in (LB_MAP_MAX, *PER_MAP)})   # a bad size fails here, before anything
    dns = DnsService(args.upstream, args.dns_ttl, args.dns_pod_ttl)   # a bad --upstream fails here
    kwargs = {k: v for k, v in (("lease_ttl", args.lease_ttl), ("renew_margin", args.lease_renew_margin)) if v}
    Daemon(args.store, args.node, args.bpffs, args.uplink, args.public_ip, metrics=args.metrics,
           debug_events=args.debug_events, dns=dns, map_sizes=sizes, **kwargs).run()


def _docker_plugin(args) -> None:
    from . import logs
    from .runtimes.docker.dockerapi import DockerAPI
    from .runtimes.docker.driver import Driver
    from .runtimes.docker.server import serve
    logs.configure(args.log_format, args.log_level)
    if os.geteuid() != 0:
        raise AtomnetError("atomnet docker-plugin must run as root (it creates the containers' links)")
    try:
        docker = DockerAPI(args.docker_host)
    except ValueError as exc:
        raise AtomnetError(str(exc)) from None
    with _store(args) as store:
        serve(args.socket, Driver(store, args.node, docker))


def _configure_logs() -> None:
    from . import logs
    logs.configure("console", os.environ.get("ATOMNET_LOG_LEVEL", "warning"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `light` verbs (pod add/del) start on the standard library alone and complete the
    # environment (site, logging: structlog) only when they do the work here; the others need
    # both, the daemon and the Docker plugin configure their own logging.
    if not getattr(args, "light", False):
        launch.full_environment()
        if args.verb not in ("daemon", "docker-plugin"):
            _configure_logs()
    try:
        args.func(args)
        return 0
    except AtomnetError as exc:
        msg = str(exc).strip()
        sys.stderr.write(f"atomnet: {msg}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line, with the way to see more
        if os.environ.get("ATOMNET_DEBUG"):
            raise
        sys.stderr.write(f"atomnet: internal error: {type(exc).__name__}: {exc} (ATOMNET_DEBUG=1 shows the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
