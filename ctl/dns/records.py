"""The cluster's names: a small in-memory index from store objects to DNS records, pure
(no I/O). It consumes store changes (key, value-or-None) for the prefixes it needs and is
queried by the server; each change touches only the records of that object (and, for a
node, the published ports that point at it), so a new service resolves as soon as its
event is applied.

What resolves, for cluster domain D (default cluster.local):
    SVC.svc.D                      A     the service VIP (TTL: service TTL)
    _PORT._PROTO.SVC.svc.D         SRV   0 100 PORT SVC.svc.D, one per service port
    POD.pod.D                      A     the pod's address (TTL: pod TTL, short)
    NODE.node.D                    A     the node's public IP
    _PORT._PROTO.POD.forwards.D    SRV   0 100 HOSTPORT NODE.node.D: a forward of the pod's PORT
                                         (a host IP other than the node's: A-B-C-D.NODE.node.D)
    _PORT._PROTO.SVC.forwards.D    SRV   0 100 NODEPORT NODE.node.D, one per node (NodePort)
    ns.dns.D                       A     the DNS VIP; D has SOA and NS (ns.dns.D)
    DOCKERNAME.pod.D               A     a Docker container's address by its Docker name (see below)
    _PORT._PROTO.DOCKERNAME.forwards.D  SRV  its published ports, as under its pod name
    reverse names (in-addr.arpa)   PTR   VIP -> SVC.svc.D, pod address -> POD.pod.D, DNS VIP -> ns.dns.D
A name that exists (or has names below it) without the asked type is NODATA; anything
else under D, or an address of the service CIDR or cluster network without a record, is
NXDOMAIN; both carry the zone's SOA in the authority section. Names outside those zones
are not ours (lookup returns None: the server forwards them upstream).

Docker names. A Docker container is a pod named docker-<endpoint id> (runtime docker) whose
label docker-name is the container's name; that name is an alias of the pod, in the same
zones. Collisions are settled by one rule: a pod's own name always wins. An alias that is
the name of any pod is not answered (the pod is); an alias that is not one DNS label is not
answered either. Containers of the same Docker name on several hosts are all answered (one
A record each, as a headless service), their forwards' SRV records likewise. So these
records depend on other objects: a pod's records on whether a pod of its alias exists, a
forward's on its pod's labels and on that; `_depends` maps a pod name to the keys to
refresh when that pod changes.
"""
from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog

from ..state.cluster import dns_vip_of
from ..state.names import DOCKER_NAME_LABEL, DOCKER_RUNTIME
from ..state.model import (ATOMNET_CONFIG_KEY, FORWARDS_PREFIX, NETWORK_CONFIG_KEY, NODES_PREFIX, PODS_PREFIX,
                           SERVICES_PREFIX, ClusterConfig, Forward, NetworkConfig, Node, Pod, Service)

log = structlog.get_logger("atomnet.dns")

# The store keys the index reads: everything else in a watch is ignored.
PREFIXES = (ATOMNET_CONFIG_KEY, NETWORK_CONFIG_KEY, PODS_PREFIX, SERVICES_PREFIX, FORWARDS_PREFIX, NODES_PREFIX)
DEFAULT_SERVICE_TTL = 30
DEFAULT_POD_TTL = 5     # pods come and go: short, as CoreDNS' `pods` answers
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 7200, 1800, 86400

A, PTR, SRV, SOA, NS, ANY = (dns.rdatatype.A, dns.rdatatype.PTR, dns.rdatatype.SRV, dns.rdatatype.SOA,
                             dns.rdatatype.NS, dns.rdatatype.ANY)
IN = dns.rdataclass.IN
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass
class Answer:
    rcode: int
    answer: list = field(default_factory=list)
    authority: list = field(default_factory=list)
    additional: list = field(default_factory=list)


def reverse_zone(net: ipaddress.IPv4Network) -> str:
    """The in-addr.arpa zone covering a network, rounded out to whole octets (10.96.0.0/12 -> 10.in-addr.arpa.)."""
    octets = max(1, net.prefixlen // 8)
    parts = str(net.network_address).split(".")[:octets]
    return ".".join(reversed(parts)) + ".in-addr.arpa."


def reverse_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa."


def _ip_of_reverse(name: str) -> ipaddress.IPv4Address | None:
    labels = name.split(".")
    if len(labels) != 7 or labels[4:] != ["in-addr", "arpa", ""]:
        return None
    try:
        return ipaddress.IPv4Address(".".join(reversed(labels[:4])))
    except ValueError:
        return None


def _under(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def _check_name(name: str) -> None:
    labels = name.split(".")[:-1]
    if len(name) > 254 or not all(0 < len(lbl) <= 63 for lbl in labels):
        raise ValueError(f"not a DNS name: {name!r}")


class NameIndex:
    """Thread-safe: the daemon's loop applies changes, server threads look up.

    Records are kept as text (owner names lowercase and absolute, with the final dot):
    dnspython objects are costly to make and hash, so an RRset is built only when it is
    first asked for, and kept until one of its records changes."""

    def __init__(self, service_ttl: int = DEFAULT_SERVICE_TTL, pod_ttl: int = DEFAULT_POD_TTL):
        self.service_ttl, self.pod_ttl = service_ttl, pod_ttl
        self._lock = threading.Lock()
        self._raw: dict[str, str] = {}                  # store key -> value, for the prefixes above
        self._owned: dict[str, list[tuple]] = {}        # store key -> the records it contributed
        self._depends: dict[str, set[str]] = {}         # pod name -> keys whose records depend on that pod
        self._dep_of: dict[str, set[str]] = {}          # key -> the pod names it depends on
        self._data: dict[str, dict[int, Counter]] = {}  # name -> type -> rdata text -> refcount
        self._ttl: dict[tuple, int] = {}                # (name, type) -> ttl
        self._rrsets: dict[tuple, dns.rrset.RRset] = {}  # (name, type) -> built rrset (cache)
        self._below: Counter = Counter()                # name -> names with records at or below it
        self.generation = 0                             # bumped on every change (the server's answer cache key)
        self._a_dirty: set[str] = set()                 # names whose A records changed since take_a_changes
        self._a_all = True                              # everything changed (a rebuild): take_a_changes lists all
        self._serial = int(time.time())
        self._set_config(ClusterConfig(), None)

    # ------------------------------------------------------------------ feeding

    @staticmethod
    def wants(key: str) -> bool:
        return key in (ATOMNET_CONFIG_KEY, NETWORK_CONFIG_KEY) or key.startswith(PREFIXES[2:])

    def load(self, items) -> None:
        """Replaces everything with these (key, value) pairs (a full list of the prefixes)."""
        raw = {k: v for k, v in items if self.wants(k)}
        with self._lock:
            self._raw = raw
            self._rebuild()

    def apply(self, key: str, value: str | None) -> bool:
        """One store change; returns whether the index cared."""
        return self.apply_many([(key, value, None)]) > 0

    def apply_many(self, items) -> int:
        """Store changes (key, value or None, decoded), in order, under one lock and one
        generation bump (a 10 000-service apply is one batch); decoded is the object the value
        decodes to when the caller has it already (the daemon's validated Service), else None
        (decoded here). Returns how many changes the index cared about."""
        changed = 0
        with self._lock:
            for key, value, decoded in items:
                if not self.wants(key):
                    continue
                if value is None:
                    if self._raw.pop(key, None) is None:
                        continue
                else:
                    if self._raw.get(key) == value:
                        continue
                    self._raw[key] = value
                changed += 1
                if key in (ATOMNET_CONFIG_KEY, NETWORK_CONFIG_KEY):
                    self._rebuild()    # the domain or the zones changed: every name does
                    continue
                self._refresh(key, decoded)
                if key.startswith(PODS_PREFIX):    # Docker aliases: see the module's docstring
                    for other in sorted(self._depends.get(key[len(PODS_PREFIX):], ())):
                        if other != key:
                            self._refresh(other)
                if key.startswith(NODES_PREFIX):   # published ports point at node names
                    for other in [k for k in self._raw if self._points_at_nodes(k)]:
                        self._refresh(other)
            if changed:
                self._changed()
        return changed

    def apply_events(self, events) -> int:
        return self.apply_many((e.key, e.value, None) for e in events)

    # ------------------------------------------------------------------ queries

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def dns_vip(self) -> str:
        return self._dns_vip

    def zone_of(self, name: str) -> str | None:
        """The zone of ours that a (lowercase, absolute) name falls in, or None (not ours: forward it)."""
        if _under(name, self._domain):
            return self._domain
        if not name.endswith(".in-addr.arpa."):
            return None
        ip = _ip_of_reverse(name)
        if ip is None and name.count(".") >= 7:
            return None   # not an IPv4 reverse name: leave it to the upstream
        best = None   # the most specific of our reverse zones (10.in-addr.arpa vs 244.10.in-addr.arpa)
        for zone, nets in self._rzones.items():
            if _under(name, zone) and (ip is None or any(ip in n for n in nets)):
                if best is None or len(zone) > len(best):
                    best = zone
        return best   # None: an address outside our networks (even under the same /8)

    def lookup(self, qname: dns.name.Name, rdtype: int) -> Answer | None:
        name = qname.to_text().lower()
        with self._lock:
            zone = self.zone_of(name)
            if zone is None:
                return None
            types = self._data.get(name)
            if types:
                wanted = list(types) if rdtype == ANY else [rdtype] if rdtype in types else []
                if wanted:
                    answer = [self._rrset(name, t) for t in wanted]
                    return Answer(dns.rcode.NOERROR, answer, [], self._glue(name, wanted))
            soa = self._rrset(zone, SOA)
            if types or self._below.get(name):
                return Answer(dns.rcode.NOERROR, [], [soa])      # NODATA
            return Answer(dns.rcode.NXDOMAIN, [], [soa])

    def take_a_changes(self) -> tuple[bool, dict[str, tuple[str, int] | None]]:
        """What the BPF fast path's name map must learn (ctl/dns/fastpath.py): (full, changes),
        name -> (address, ttl) or None (remove). Only names with exactly one A record are
        fast-pathed (the server answers the rest). full: a rebuild happened; changes then
        lists every such name and the map drops whatever it has beyond them."""
        with self._lock:
            full, names = self._a_all, (list(self._data) if self._a_all else list(self._a_dirty))
            self._a_all, self._a_dirty = False, set()
            out = {}
            for name in names:
                texts = self._data.get(name, {}).get(A)
                if texts and len(texts) == 1:
                    out[name] = (next(iter(texts)), self._ttl[(name, A)])
                elif not full:
                    out[name] = None
            return full, out

    def a_changes_lost(self) -> None:
        """The last take_a_changes could not be applied: the next one lists everything."""
        with self._lock:
            self._a_all = True

    def rows(self) -> list[dict]:
        """Every record, for `atomnet dns list`."""
        with self._lock:
            out = [{"name": name, "type": dns.rdatatype.to_text(rdtype), "ttl": self._ttl[(name, rdtype)],
                    "data": self._soa_text(text) if rdtype == SOA else text}
                   for name, types in self._data.items() for rdtype, texts in types.items() for text in texts]
        return sorted(out, key=lambda r: (r["name"].split(".")[::-1], r["type"], r["data"]))

    # ------------------------------------------------------------------ internals

    def _changed(self) -> None:
        self.generation += 1
        self._serial = max(self._serial + 1, int(time.time()))
        for zone in [self._domain, *self._rzones]:
            self._rrsets.pop((zone, SOA), None)   # the serial moved

    def _set_config(self, cfg: ClusterConfig, net: NetworkConfig | None) -> None:
        self._cfg = cfg
        self._domain = cfg.cluster_domain.lower().rstrip(".") + "."
        self._dns_vip = dns_vip_of(cfg)
        service_net = ipaddress.IPv4Network(cfg.service_cidr)
        self._rzones: dict[str, list] = {}
        for n in [service_net] + ([net.net] if net else []):
            self._rzones.setdefault(reverse_zone(n), []).append(n)

    def _rebuild(self) -> None:
        cfg, net = ClusterConfig(), None
        try:
            if ATOMNET_CONFIG_KEY in self._raw:
                cfg = ClusterConfig.from_json(self._raw[ATOMNET_CONFIG_KEY])
            if NETWORK_CONFIG_KEY in self._raw:
                net = NetworkConfig.from_json(self._raw[NETWORK_CONFIG_KEY])
        except Exception as exc:   # a malformed config must not take the names down
            log.warning("dns_config_malformed", error=str(exc))
        self._depends, self._dep_of = {}, {}
        self._set_config(cfg, net)
        self._owned, self._data, self._ttl, self._rrsets, self._below = {}, {}, {}, {}, Counter()
        self._a_all, self._a_dirty = True, set()
        self._add_static()
        for key in sorted(self._raw, key=lambda k: not k.startswith(NODES_PREFIX)):   # nodes first
            self._refresh(key)
        self._changed()

    def _name(self, *labels: str) -> str:
        return ".".join(labels).lower() + "." + self._domain

    def _soa_text(self, text: str) -> str:
        return text.replace(" SERIAL ", f" {self._serial % 2**32} ")

    def _add_static(self) -> None:
        d = self._domain
        ns = self._name("ns", "dns")
        recs = [(ns, A, self._dns_vip, self.service_ttl), (d, NS, ns, self.service_ttl),
                (reverse_name(self._dns_vip), PTR, ns, self.service_ttl)]
        for zone in [d, *self._rzones]:
            recs.append((zone, SOA, f"{ns} hostmaster.{d} SERIAL {SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} "
                                    f"{self.pod_ttl}", self.pod_ttl))
        self._owned[""] = []
        self._add("", recs)

    def _refresh(self, key: str, decoded=None) -> None:
        self._remove(key)
        self._forget(key)
        value = self._raw.get(key)
        if value is None:
            return
        self._owned[key] = []
        try:
            self._add(key, self._records_of(key, value, decoded))
        except Exception as exc:   # one malformed object: none of its records, keep the rest
            log.warning("dns_object_malformed", key=key, error=f"{type(exc).__name__}: {exc}")
            self._remove(key)

    def _need(self, key: str, pod_name: str) -> None:
        self._depends.setdefault(pod_name, set()).add(key)
        self._dep_of.setdefault(key, set()).add(pod_name)

    def _forget(self, key: str) -> None:
        for name in self._dep_of.pop(key, ()):
            keys = self._depends.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._depends[name]

    def _docker_alias(self, key: str, pod_name: str, pod: Pod | None = None) -> str | None:
        """The Docker name pod_name is also answered by (for the records of `key`: the pod's
        own, given parsed, or a forward's), or None."""
        if pod is None:
            self._need(key, pod_name)
            try:
                pod = Pod.from_json(self._raw[PODS_PREFIX + pod_name])
            except Exception:   # no such pod (a forward outliving it) or a malformed one: no alias
                return None
        alias = str((pod.labels or {}).get(DOCKER_NAME_LABEL, "")).lower()
        if pod.runtime != DOCKER_RUNTIME or not _LABEL.match(alias) or alias == pod.name.lower():
            return None
        self._need(key, alias)
        return None if PODS_PREFIX + alias in self._raw else alias   # a pod's own name wins

    def _records_of(self, key: str, value: str, decoded=None) -> list[tuple]:
        """decoded: the object value decodes to, when the caller has it (only a Service is taken)."""
        st, pt = self.service_ttl, self.pod_ttl
        if key.startswith(PODS_PREFIX):
            pod = Pod.from_json(value)
            name = self._name(pod.name, "pod")
            recs = [(name, A, pod.ip, pt), (reverse_name(pod.ip), PTR, name, pt)]
            alias = self._docker_alias(key, pod.name, pod)
            if alias:
                recs.append((self._name(alias, "pod"), A, pod.ip, pt))
            return recs
        if key.startswith(NODES_PREFIX):
            node = Node.from_json(value)
            if not _LABEL.match(node.name):
                return []   # a host name that is not one DNS label: no node record
            return [(self._name(node.name, "node"), A, node.public_ip, st)]
        if key.startswith(SERVICES_PREFIX):
            svc = decoded if isinstance(decoded, Service) else Service.from_json(value)
            name = self._name(svc.name, "svc")
            recs = [(name, A, svc.vip, st), (reverse_name(svc.vip), PTR, name, st)]
            for p in svc.ports:
                recs.append((self._name(f"_{p.port}", f"_{p.proto}", svc.name, "svc"), SRV,
                             f"0 100 {p.port} {name}", st))
                if p.node_port:
                    for node in self._nodes():
                        recs.append((self._name(f"_{p.port}", f"_{p.proto}", svc.name, "forwards"), SRV,
                                     f"0 100 {p.node_port} {self._name(node.name, 'node')}", st))
            return recs
        if key.startswith(FORWARDS_PREFIX):
            fwd = Forward.from_json(value)
            if not _LABEL.match(fwd.node):
                return []
            node = next((n for n in self._nodes() if n.name == fwd.node), None)
            target = self._name(fwd.node, "node")
            recs = []
            if node is None or node.public_ip != fwd.host_ip:
                target = self._name(fwd.host_ip.replace(".", "-"), fwd.node, "node")
                recs.append((target, A, fwd.host_ip, pt))
            for name in filter(None, (fwd.pod, self._docker_alias(key, fwd.pod))):
                recs.append((self._name(f"_{fwd.port}", f"_{fwd.proto}", name, "forwards"), SRV,
                             f"0 100 {fwd.host_port} {target}", pt))
            return recs
        return []

    def _points_at_nodes(self, key: str) -> bool:
        if key.startswith(FORWARDS_PREFIX):
            return True
        if key.startswith(SERVICES_PREFIX):
            try:
                return any(p.node_port for p in Service.from_json(self._raw[key]).ports)
            except Exception:
                return False
        return False

    def _nodes(self) -> list[Node]:
        out = []
        for k, v in self._raw.items():
            if k.startswith(NODES_PREFIX):
                try:
                    out.append(Node.from_json(v))
                except Exception:
                    pass
        return sorted(out, key=lambda n: n.name)

    def _add(self, key: str, recs: list[tuple]) -> None:
        for name, rdtype, text, ttl in recs:
            _check_name(name)
            if rdtype == A:
                ipaddress.IPv4Address(text)   # checked now: a bad one must fail here, not at query time
            types = self._data.get(name)
            if types is None:
                types = self._data[name] = {}
                for anc in self._ancestors(name):
                    self._below[anc] += 1
            types.setdefault(rdtype, Counter())[text] += 1
            self._ttl[(name, rdtype)] = ttl
            if rdtype == A:
                self._a_dirty.add(name)
            self._rrsets.pop((name, rdtype), None)
            self._owned[key].append((name, rdtype, text))

    def _remove(self, key: str) -> None:
        for name, rdtype, text in self._owned.pop(key, ()):
            types = self._data[name]
            counts = types[rdtype]
            counts[text] -= 1
            if rdtype == A:
                self._a_dirty.add(name)
            if counts[text] <= 0:
                del counts[text]
            if not counts:
                del types[rdtype]
                self._ttl.pop((name, rdtype), None)
            self._rrsets.pop((name, rdtype), None)
            if not types:
                del self._data[name]
                for anc in self._ancestors(name):
                    self._below[anc] -= 1
                    if self._below[anc] <= 0:
                        del self._below[anc]

    @staticmethod
    def _ancestors(name: str):
        """The name and its parents, up to (without) the root: a.b.c. -> a.b.c., b.c., c."""
        while name and name != ".":
            yield name
            name = name.partition(".")[2]

    def _rrset(self, name: str, rdtype: int) -> dns.rrset.RRset:
        rrset = self._rrsets.get((name, rdtype))
        if rrset is None:
            texts = sorted(self._data[name][rdtype])
            if rdtype == SOA:
                texts = [self._soa_text(t) for t in texts]
            rrset = dns.rrset.from_text_list(name, self._ttl[(name, rdtype)], IN, rdtype, texts)
            self._rrsets[(name, rdtype)] = rrset
        return rrset

    def _glue(self, name: str, types: list[int]) -> list:
        """A records of the SRV/NS targets we know, so a client needs no second query."""
        out, seen = [], set()
        for rdtype in types:
            if rdtype not in (SRV, NS):
                continue
            for text in sorted(self._data[name][rdtype]):
                target = text.split()[-1]
                if target not in seen and A in self._data.get(target, {}):
                    seen.add(target)
                    out.append(self._rrset(target, A))
        return out
