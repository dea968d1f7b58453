"""Cluster DNS without root: the naming facts, the name index (records, NXDOMAIN vs NODATA,
incremental changes) and the real server on loopback (UDP, TCP, truncation, EDNS, bad
input, upstream forwarding with its cache and fast SERVFAIL; the upstream is a second
instance of the same server, authoritative for another domain)."""
from __future__ import annotations

import socket
import struct
import time

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype as T
import pytest

from ctl.dns.records import NameIndex
from ctl.dns.server import STATS_NAME, DnsServer
from ctl.dns.upstream import Upstream, parse_upstream, system_upstreams
from ctl.state import cluster, names, services as svclib
from ctl.state.model import (ClusterConfig, Forward, NetworkConfig, Node, Pod, Service, ServicePort, ValidationError,
                             host_ifname)
from ctl.state.store import open_store

# ------------------------------------------------------------------ naming facts


def test_resolver_config_and_resolv_conf():
    cfg = names.resolver_config("cluster.local", "10.96.0.10")
    assert cfg == {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local", "pod.cluster.local", "cluster.local"],
                   "options": ["ndots:5"]}
    text = names.render_resolv_conf(cfg)
    assert text.splitlines() == [names.RESOLV_CONF_MARK, "nameserver 10.96.0.10",
                                 "search svc.cluster.local pod.cluster.local cluster.local", "options ndots:5"]


def test_dockerd_dns_settings_say_what_pods_are_told():
    cfg = names.resolver_config("cluster.local", "10.96.0.10")
    assert names.docker_daemon_dns(cfg) == {"dns": ["10.96.0.10"],
                                            "dns-search": ["svc.cluster.local", "pod.cluster.local", "cluster.local"],
                                            "dns-opts": ["ndots:5"]}


def test_search_path_expansion_as_a_stub_resolver_does():
    search = names.search_path("cluster.local")
    assert names.candidates("web", search) == ["web.svc.cluster.local", "web.pod.cluster.local", "web.cluster.local",
                                               "web"]
    assert names.candidates("web.svc", search)[0] == "web.svc.svc.cluster.local"
    assert names.candidates("a.b.c.d.e.f", search)[0] == "a.b.c.d.e.f"   # 5 dots or more: as given first
    assert names.candidates("example.org.", search) == ["example.org"]


def test_dns_vip_and_domain_validation(tmp_path):
    assert names.default_dns_vip("10.96.0.0/12") == "10.96.0.10"
    assert names.validate_domain("Cluster.Local.") == "cluster.local"
    for bad in ("", "a..b", "-x.local", "x_y.local", "a" * 64 + ".local", "local.123"):
        with pytest.raises(ValidationError, match="invalid cluster domain"):
            names.validate_domain(bad)
    with pytest.raises(ValidationError, match="too small"):
        names.default_dns_vip("10.96.0.0/29")
    with open_store(f"sqlite://{tmp_path}/s.db") as store:
        with pytest.raises(ValidationError, match="outside the service CIDR"):
            cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12", dns_vip="10.1.0.10")
        assert store.get("/atomnet/config") is None   # nothing half-applied
        _, cfg = cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12", "corp.example", "10.96.0.53")
        assert (cfg.cluster_domain, cfg.dns_vip) == ("corp.example", "10.96.0.53")
        assert store.get("/atomnet/vips/10.96.0.53").value == names.DNS_VIP_OWNER
        cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12", "corp.example")   # same again: no-op
        with pytest.raises(Exception, match="cluster DNS already set"):
            cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12", "other.example")
        # no service can take the DNS VIP
        with pytest.raises(Exception, match="already used"):
            svclib.add_service(store, Service("grab", "10.96.0.53", (ServicePort(53, 53, "udp"),)))
        assert cluster.resolver_config(store)["nameservers"] == ["10.96.0.53"]


def test_a_service_name_that_is_not_a_dns_label_is_refused():
    for bad in ("Web", "web_1", "-web", "a" * 64, "web.svc"):
        with pytest.raises(ValidationError, match="invalid service name"):
            Service(bad, "", (ServicePort(80, 80),))


# ------------------------------------------------------------------ the index

def pod(name, ip, node="n1"):
    return Pod(name=name, node=node, ip=ip, netns=f"/run/netns/{name}", host_ifname=host_ifname(name),
               mac="02:00:00:00:00:01")


def node(name, ip):
    return Node(name=name, public_ip=ip, uplink="eth0", mtu=1500, subnet="10.244.1.0/24", vtep_mac="02:00:00:00:00:02")


def svc(name, vip, *ports, node_port=None):
    return Service(name, vip, tuple(ServicePort(p, p, node_port=node_port) for p in ports or (80,)))


@pytest.fixture
def index():
    ix = NameIndex(service_ttl=30, pod_ttl=5)
    ix.load([("/atomnet/config", ClusterConfig().to_json()),
             ("/coreos.com/network/config", NetworkConfig("10.244.0.0/16").to_json()),
             ("/atomnet/nodes/n1", node("n1", "192.168.100.1").to_json()),
             ("/atomnet/pods/web1", pod("web1", "10.244.1.2").to_json()),
             ("/atomnet/services/web", svc("web", "10.96.0.2", 80, 443).to_json()),
             ("/atomnet/forwards/n1-tcp-8080",
              Forward("n1-tcp-8080", "n1", "192.168.100.1", 8080, "tcp", "web1", 80, 7).to_json())])
    return ix


def ask(ix, name, rdtype):
    a = ix.lookup(dns.name.from_text(name), rdtype)
    if a is None:
        return None
    return (dns.rcode.to_text(a.rcode), [r.to_text() for rr in a.answer for r in [rr]],
            [rr.rdtype for rr in a.authority], [rr.to_text() for rr in a.additional])


def test_names_of_services_pods_nodes_and_forwards(index):
    assert ask(index, "web.svc.cluster.local", T.A)[:2] == ("NOERROR", ["web.svc.cluster.local. 30 IN A 10.96.0.2"])
    assert ask(index, "WeB.SvC.Cluster.Local", T.A)[1] == ["web.svc.cluster.local. 30 IN A 10.96.0.2"]
    rc, ans, _, extra = ask(index, "_443._tcp.web.svc.cluster.local", T.SRV)
    assert ans == ["_443._tcp.web.svc.cluster.local. 30 IN SRV 0 100 443 web.svc.cluster.local."]
    assert extra == ["web.svc.cluster.local. 30 IN A 10.96.0.2"]   # the target's address, no second query
    assert ask(index, "web1.pod.cluster.local", T.A)[1] == ["web1.pod.cluster.local. 5 IN A 10.244.1.2"]
    assert ask(index, "n1.node.cluster.local", T.A)[1] == ["n1.node.cluster.local. 30 IN A 192.168.100.1"]
    rc, ans, _, extra = ask(index, "_80._tcp.web1.forwards.cluster.local", T.SRV)
    assert ans == ["_80._tcp.web1.forwards.cluster.local. 5 IN SRV 0 100 8080 n1.node.cluster.local."]
    assert extra == ["n1.node.cluster.local. 30 IN A 192.168.100.1"]
    assert ask(index, "2.0.96.10.in-addr.arpa", T.PTR)[1] == ["2.0.96.10.in-addr.arpa. 30 IN PTR web.svc.cluster.local."]
    assert ask(index, "2.1.244.10.in-addr.arpa", T.PTR)[1] == ["2.1.244.10.in-addr.arpa. 5 IN PTR web1.pod.cluster.local."]
    assert ask(index, "10.0.96.10.in-addr.arpa", T.PTR)[1] == ["10.0.96.10.in-addr.arpa. 30 IN PTR ns.dns.cluster.local."]


def test_soa_ns_and_nxdomain_versus_nodata(index):
    rc, ans, _, extra = ask(index, "cluster.local", T.SOA)
    assert rc == "NOERROR" and ans[0].split()[3:6] == ["SOA", "ns.dns.cluster.local.", "hostmaster.cluster.local."]
    rc, ans, _, extra = ask(index, "cluster.local", T.NS)
    assert ans == ["cluster.local. 30 IN NS ns.dns.cluster.local."] and extra == ["ns.dns.cluster.local. 30 IN A 10.96.0.10"]
    assert ask(index, "web.svc.cluster.local", T.AAAA) == ("NOERROR", [], [T.SOA], [])   # NODATA: IPv4 only
    assert ask(index, "svc.cluster.local", T.A) == ("NOERROR", [], [T.SOA], [])          # empty non-terminal
    assert ask(index, "_tcp.web.svc.cluster.local", T.SRV) == ("NOERROR", [], [T.SOA], [])
    assert ask(index, "nope.svc.cluster.local", T.A) == ("NXDOMAIN", [], [T.SOA], [])
    assert ask(index, "_81._tcp.web.svc.cluster.local", T.SRV) == ("NXDOMAIN", [], [T.SOA], [])
    assert ask(index, "9.9.96.10.in-addr.arpa", T.PTR) == ("NXDOMAIN", [], [T.SOA], [])   # ours, no record
    rc, ans, _, _ = ask(index, "web.svc.cluster.local", T.ANY)
    assert ans == ["web.svc.cluster.local. 30 IN A 10.96.0.2"]
    # not ours: forwarded
    assert ask(index, "example.org", T.A) is None
    assert ask(index, "8.8.8.8.in-addr.arpa", T.PTR) is None
    assert ask(index, "1.0.0.10.in-addr.arpa", T.PTR) is None   # 10.0.0.1: same /8, outside our networks


def test_changes_apply_incrementally_and_serial_moves(index):
    soa = lambda: index.lookup(dns.name.from_text("cluster.local"), T.SOA).answer[0][0].serial
    before, gen = soa(), index.generation
    assert index.apply("/atomnet/services/db", svc("db", "10.96.0.3", 5432).to_json())
    assert ask(index, "db.svc.cluster.local", T.A)[1] == ["db.svc.cluster.local. 30 IN A 10.96.0.3"]
    assert soa() > before and index.generation > gen
    assert not index.apply("/atomnet/ipam/10.244.1.9", "x")   # not a prefix it reads
    assert index.apply("/atomnet/services/db", None)
    assert ask(index, "db.svc.cluster.local", T.A)[0] == "NXDOMAIN"
    # a pod renumbered: old PTR gone, new one there
    index.apply("/atomnet/pods/web1", pod("web1", "10.244.1.9").to_json())
    assert ask(index, "2.1.244.10.in-addr.arpa", T.PTR)[0] == "NXDOMAIN"
    assert ask(index, "9.1.244.10.in-addr.arpa", T.PTR)[1] == ["9.1.244.10.in-addr.arpa. 5 IN PTR web1.pod.cluster.local."]
    # the node moves: the forward's SRV target follows (its own host IP now differs from the node's)
    index.apply("/atomnet/nodes/n1", node("n1", "192.168.100.9").to_json())
    rc, ans, _, extra = ask(index, "_80._tcp.web1.forwards.cluster.local", T.SRV)
    assert ans == ["_80._tcp.web1.forwards.cluster.local. 5 IN SRV 0 100 8080 192-168-100-1.n1.node.cluster.local."]
    assert extra == ["192-168-100-1.n1.node.cluster.local. 5 IN A 192.168.100.1"]
    # nothing leaks: deleting everything leaves only the static records
    for key in ["/atomnet/pods/web1", "/atomnet/services/web", "/atomnet/forwards/n1-tcp-8080", "/atomnet/nodes/n1"]:
        index.apply(key, None)
    assert {r["name"] for r in index.rows()} == {"cluster.local.", "ns.dns.cluster.local.", "10.0.96.10.in-addr.arpa.",
                                                 "10.in-addr.arpa.", "244.10.in-addr.arpa."}
    assert ask(index, "svc.cluster.local", T.A)[0] == "NXDOMAIN"   # no longer an empty non-terminal


def test_fast_path_changes_list_single_a_records_once(index):
    """What the BPF name map is fed (ctl/dns/fastpath.py): every A name after a load, then
    only the names a change touched (names with exactly one address)."""
    from ctl.dataplane.bpf.types import DnsNameKey, dns_name_text, dns_name_wire
    full, changes = index.take_a_changes()
    assert full and changes["web.svc.cluster.local."] == ("10.96.0.2", 30)
    assert changes["web1.pod.cluster.local."] == ("10.244.1.2", 5)
    assert changes["n1.node.cluster.local."] == ("192.168.100.1", 30)
    assert all(v is not None for v in changes.values())
    assert index.take_a_changes() == (False, {})
    index.apply("/atomnet/services/db", svc("db", "10.96.0.3", 5432).to_json())
    index.apply("/atomnet/services/web", None)
    assert index.take_a_changes() == (False, {"db.svc.cluster.local.": ("10.96.0.3", 30),
                                              "web.svc.cluster.local.": None})
    # two forwards of pod web1 on host IPs other than the node's: one A each (not fast-pathed if two)
    index.apply("/atomnet/forwards/f1", Forward("f1", "n1", "192.168.100.7", 81, "tcp", "web1", 81, 8).to_json())
    assert index.take_a_changes()[1] == {"192-168-100-7.n1.node.cluster.local.": ("192.168.100.7", 5)}
    index.a_changes_lost()
    assert index.take_a_changes()[0]
    # the key: wire format, lower case, the root byte included; too long for the key: refused
    assert dns_name_wire("Web.SVC.cluster.local.") == b"\x03web\x03svc\x07cluster\x05local\x00"
    key = DnsNameKey.from_dict({"name": "web.svc.cluster.local"})
    assert bytes(key).rstrip(b"\0") + b"\0" == dns_name_wire("web.svc.cluster.local")
    assert key.to_dict() == {"name": "web.svc.cluster.local."} and dns_name_text(b"\0") == "."
    with pytest.raises(ValueError, match="key holds 128"):
        dns_name_wire(".".join(["a" * 63, "b" * 63]))


def test_node_ports_are_srv_records_per_node(index):
    index.apply("/atomnet/services/np", svc("np", "10.96.0.4", 80, node_port=30080).to_json())
    index.apply("/atomnet/nodes/n2", node("n2", "192.168.100.2").to_json())
    rc, ans, _, extra = ask(index, "_80._tcp.np.forwards.cluster.local", T.SRV)
    assert sorted(r.split()[-1] for r in ans[0].splitlines()) == ["n1.node.cluster.local.", "n2.node.cluster.local."]
    assert all(" 30080 " in r for r in ans[0].splitlines()) and len(extra) == 2


def docker_pod(name, ip, docker_name, node="n1", runtime="docker"):
    return Pod(name=name, node=node, ip=ip, netns="", host_ifname=host_ifname(name), mac="02:00:00:00:00:03",
               labels={"docker-name": docker_name} if docker_name else {}, netns_owned=False, runtime=runtime)


def test_docker_names_are_pod_aliases_and_a_pods_own_name_wins(index):
    def a(name):
        got = ask(index, name, T.A)
        return sorted(r.split()[-1] for rr in got[1] for r in rr.splitlines()) if got[0] == "NOERROR" else got[0]

    def srv(name):
        got = ask(index, name, T.SRV)
        return [r.split(" ", 4)[-1] for rr in got[1] for r in rr.splitlines()] if got[0] == "NOERROR" else got[0]

    def same_as_a_full_load():
        fresh = NameIndex(service_ttl=30, pod_ttl=5)
        fresh.load(list(index._raw.items()))
        assert strip_soa(fresh.rows()) == strip_soa(index.rows())

    # the container as Join records it (no name yet), then with the name the plugin learnt from dockerd
    key, fwd_key = "/atomnet/pods/docker-0123456789ab", "/atomnet/forwards/n1-tcp-32768"
    index.apply(key, docker_pod("docker-0123456789ab", "10.244.1.5", "").to_json())
    index.apply(fwd_key, Forward("n1-tcp-32768", "n1", "192.168.100.1", 32768, "tcp", "docker-0123456789ab", 80,
                                 8).to_json())
    assert a("web2.pod.cluster.local") == "NXDOMAIN"
    index.apply(key, docker_pod("docker-0123456789ab", "10.244.1.5", "Web2").to_json())
    assert a("web2.pod.cluster.local") == ["10.244.1.5"]
    assert a("docker-0123456789ab.pod.cluster.local") == ["10.244.1.5"]
    assert srv("_80._tcp.web2.forwards.cluster.local") == ["0 100 32768 n1.node.cluster.local."]
    assert srv("_80._tcp.docker-0123456789ab.forwards.cluster.local") == ["0 100 32768 n1.node.cluster.local."]
    assert ask(index, "5.1.244.10.in-addr.arpa", T.PTR)[1] == [
        "5.1.244.10.in-addr.arpa. 5 IN PTR docker-0123456789ab.pod.cluster.local."]   # one PTR: the pod's name
    same_as_a_full_load()

    # the same Docker name on another host: both containers answer, as a headless service
    other = "/atomnet/pods/docker-ba9876543210"
    index.apply(other, docker_pod("docker-ba9876543210", "10.244.2.7", "web2", node="n2").to_json())
    assert a("web2.pod.cluster.local") == ["10.244.1.5", "10.244.2.7"]
    same_as_a_full_load()

    # a pod named like the container: the pod's own name wins, the aliases (A and SRV) step back
    index.apply("/atomnet/pods/web2", pod("web2", "10.244.1.9").to_json())
    assert a("web2.pod.cluster.local") == ["10.244.1.9"]
    assert srv("_80._tcp.web2.forwards.cluster.local") == "NXDOMAIN"
    assert srv("_80._tcp.docker-0123456789ab.forwards.cluster.local") == ["0 100 32768 n1.node.cluster.local."]
    same_as_a_full_load()
    index.apply("/atomnet/pods/web2", None)
    assert a("web2.pod.cluster.local") == ["10.244.1.5", "10.244.2.7"]
    assert srv("_80._tcp.web2.forwards.cluster.local") == ["0 100 32768 n1.node.cluster.local."]

    # a container removed: its alias and SRV go, the other host's container stays
    index.apply(fwd_key, None)
    index.apply(key, None)
    assert a("web2.pod.cluster.local") == ["10.244.2.7"]
    assert srv("_80._tcp.web2.forwards.cluster.local") == "NXDOMAIN"
    index.apply(other, None)
    assert a("web2.pod.cluster.local") == "NXDOMAIN"
    same_as_a_full_load()

    # no alias: a pod of another runtime with the label, a Docker name that is not one DNS label
    index.apply("/atomnet/pods/p1", docker_pod("p1", "10.244.1.11", "fake", runtime="").to_json())
    index.apply("/atomnet/pods/docker-aaaaaaaaaaaa", docker_pod("docker-aaaaaaaaaaaa", "10.244.1.12",
                                                                "my_web").to_json())
    assert a("fake.pod.cluster.local") == "NXDOMAIN" and a("my_web.pod.cluster.local") == "NXDOMAIN"
    assert set(index._depends) == {"web1"}   # only the forward of web1 still depends on a pod


def strip_soa(rows):
    return [r for r in rows if r["type"] != "SOA"]


def test_config_change_renames_everything_and_malformed_objects_are_skipped(index):
    index.apply("/atomnet/pods/bad", "{not json")
    index.apply("/atomnet/services/bad2", '{"name": "bad2", "vip": "not-an-ip", "ports": [{"port": 80}]}')
    assert ask(index, "bad2.svc.cluster.local", T.A)[0] == "NXDOMAIN"
    index.apply("/atomnet/config", ClusterConfig(cluster_domain="corp.example", dns_vip="10.96.0.53").to_json())
    assert ask(index, "web.svc.cluster.local", T.A) is None
    assert ask(index, "web.svc.corp.example", T.A)[1] == ["web.svc.corp.example. 30 IN A 10.96.0.2"]
    assert index.dns_vip == "10.96.0.53"


# ------------------------------------------------------------------ the server on loopback

@pytest.fixture
def upstream_server():
    """A second instance, authoritative for example.org, as the first one's upstream."""
    ix = NameIndex()
    ix.load([("/atomnet/config", ClusterConfig(cluster_domain="example.org").to_json()),
             ("/atomnet/services/www", svc("www", "10.96.0.7").to_json())])
    server = DnsServer(ix, Upstream([]), "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(index, upstream_server):
    s = DnsServer(index, Upstream([("127.0.0.1", upstream_server.port)]), "127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


def udp(server, msg, timeout=3):
    return dns.query.udp(msg, "127.0.0.1", port=server.port, timeout=timeout)


def raw_udp(server, wire: bytes, timeout=0.5) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(wire, ("127.0.0.1", server.port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


def test_udp_and_tcp_answers(server):
    q = dns.message.make_query("web.svc.cluster.local", "A")
    r = udp(server, q)
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA and r.answer[0][0].address == "10.96.0.2"
    r = dns.query.tcp(dns.message.make_query("nope.svc.cluster.local", "A"), "127.0.0.1", port=server.port, timeout=3)
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == T.SOA
    # several queries on one TCP connection
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as conn:
        for name in ("web.svc.cluster.local", "web1.pod.cluster.local"):
            dns.query.send_tcp(conn, dns.message.make_query(name, "A"))
            r, _ = dns.query.receive_tcp(conn, expiration=time.time() + 3)
            assert r.answer


def test_truncation_and_edns_sizes(server, index):
    for i in range(40):   # a NodePort service on 41 nodes: 41 SRV records and their glue
        index.apply(f"/atomnet/nodes/node{i}", node(f"node{i}", f"192.168.100.{i + 10}").to_json())
    index.apply("/atomnet/services/big", svc("big", "10.96.0.5", 80, node_port=30001).to_json())
    name = "_80._tcp.big.forwards.cluster.local"
    r = udp(server, dns.message.make_query(name, "SRV"))   # no EDNS: 512 bytes at most
    assert r.flags & dns.flags.TC and not r.answer
    r = udp(server, dns.message.make_query(name, "SRV", use_edns=0, payload=4096))   # capped to 1232
    assert r.flags & dns.flags.TC and r.edns == 0 and r.payload == 1232
    r = dns.query.tcp(dns.message.make_query(name, "SRV"), "127.0.0.1", port=server.port, timeout=3)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 41 and len(r.additional) == 41   # n1 too
    small = udp(server, dns.message.make_query("web.svc.cluster.local", "A", use_edns=0, payload=1232))
    assert small.edns == 0 and small.answer
    bad_version = udp(server, dns.message.make_query("web.svc.cluster.local", "A", use_edns=1))
    assert bad_version.rcode() == dns.rcode.BADVERS


def header(ident=0x4242, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def qname(*labels: bytes) -> bytes:
    return b"".join(bytes([len(lbl)]) + lbl for lbl in labels) + b"\0"


def test_malformed_queries_get_formerr_or_are_dropped_and_counted(server):
    A_IN = struct.pack("!HH", 1, 1)
    formerr = {
        "label > 63": header() + qname(b"a" * 64, b"local") + A_IN,
        "name > 255": header() + qname(*[b"a" * 63] * 5) + A_IN,
        "pointer loop": header() + b"\xc0\x0c" + A_IN,
        "pointer forward": header() + b"\xc0\x20" + A_IN,
        "question cut short": header() + qname(b"web") + b"\x00",
        "two questions": header(qd=2) + qname(b"a", b"cluster", b"local") + A_IN + qname(b"b", b"cluster", b"local") + A_IN,
        "no question": header(qd=0),
        "counts beyond the data": header(an=5) + qname(b"x", b"cluster", b"local") + A_IN,
    }
    for what, wire in formerr.items():
        reply = raw_udp(server, wire)
        assert reply is not None, what
        r = dns.message.from_wire(reply, question_only=True) if what != "two questions" else dns.message.from_wire(reply)
        assert r.id == 0x4242 and r.rcode() == dns.rcode.FORMERR and r.flags & dns.flags.QR, what
    for what, wire in {"truncated header": b"\x42\x42\x01", "empty": b"",
                       "a response": header(flags=0x8100) + qname(b"x") + A_IN}.items():
        assert raw_udp(server, wire, timeout=0.3) is None, what
    # still serving, and it counted all of it
    assert udp(server, dns.message.make_query("web.svc.cluster.local", "A")).answer
    stats = server.stats.snapshot()
    assert stats["malformed_formerr"] == len(formerr) and stats["malformed_dropped"] == 3
    # the counters over DNS (CHAOS TXT), as `atomnet stats` reads them: only from the node itself
    r = udp(server, dns.message.make_query(STATS_NAME, "TXT", rdclass=dns.rdataclass.CH))
    texts = {s.decode() for rd in r.answer[0] for s in rd.strings}
    assert f"malformed_formerr={len(formerr)}" in texts
    # a TCP stream of garbage is closed, not hung on
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as conn:
        conn.sendall(struct.pack("!H", 3) + b"\x42\x42\x01")
        assert conn.recv(100) == b""


def test_opcode_and_class_refusals(server):
    q = dns.message.make_query("web.svc.cluster.local", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    assert udp(server, q).rcode() == dns.rcode.NOTIMP
    assert udp(server, dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)).rcode() == \
        dns.rcode.REFUSED


def test_upstream_forwarding_cache_and_fast_servfail(server, upstream_server):
    q = dns.message.make_query("www.svc.example.org", "A")
    r = udp(server, q)
    assert r.answer[0][0].address == "10.96.0.7" and r.flags & dns.flags.RA
    upstream_server.stop()   # gone: the cache answers what it has ...
    r = udp(server, dns.message.make_query("www.svc.example.org", "A"))
    assert r.answer[0][0].address == "10.96.0.7" and r.answer[0].ttl <= 30
    started = time.monotonic()   # ... and anything else is SERVFAIL (port unreachable: at once)
    assert udp(server, dns.message.make_query("other.example.org", "A")).rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 1.5
    assert server.stats.snapshot()["upstream_servfail"] == 1 and server.upstream.hits == 1


def test_a_silent_upstream_costs_one_timeout_then_fails_at_once(index):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:   # bound, never answers
        silent.bind(("127.0.0.1", 0))
        s = DnsServer(index, Upstream([("127.0.0.1", silent.getsockname()[1])]), "127.0.0.1", 0)
        s.start()
        try:
            started = time.monotonic()
            assert udp(s, dns.message.make_query("a.example.org", "A")).rcode() == dns.rcode.SERVFAIL
            first = time.monotonic() - started
            started = time.monotonic()
            assert udp(s, dns.message.make_query("b.example.org", "A")).rcode() == dns.rcode.SERVFAIL
            assert first < 2.5 and time.monotonic() - started < first   # marked down: no second timeout
            # cluster names never wait for the upstream
            assert udp(s, dns.message.make_query("web.svc.cluster.local", "A")).answer
        finally:
            s.stop()


def test_upstream_arguments(tmp_path):
    assert parse_upstream("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_upstream("192.0.2.1:5353") == ("192.0.2.1", 5353)
    for bad in ("example.org", "192.0.2.1:0", "192.0.2.1:x", "::1", ""):
        with pytest.raises(ValidationError, match="invalid upstream"):
            parse_upstream(bad)
    conf = tmp_path / "resolv.conf"
    conf.write_text("search x\nnameserver 192.0.2.53\nnameserver 10.96.0.10\nnameserver fe80::1\n")
    assert system_upstreams(str(conf), exclude={"10.96.0.10"}) == [("192.0.2.53", 53)]


def test_pod_resolv_conf_is_written_and_removed_and_foreign_files_are_left_alone(tmp_path, monkeypatch):
    from pathlib import Path

    from ctl.node import resolvconf
    monkeypatch.setattr(resolvconf, "ETC_NETNS", tmp_path)
    cfg = names.resolver_config("cluster.local", "10.96.0.10")
    path = resolvconf.write(Path("/run/netns/web1"), cfg)
    assert path == tmp_path / "web1" / "resolv.conf" and path.read_text() == names.render_resolv_conf(cfg)
    resolvconf.remove(Path("/run/netns/web1"))
    assert not (tmp_path / "web1").exists()
    assert resolvconf.write(Path("/var/run/other/ns"), cfg) is None   # not a named namespace: no /etc/netns entry
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "resolv.conf").write_text("nameserver 192.0.2.1\n")   # somebody else's
    assert resolvconf.write(Path("/run/netns/mine"), cfg) is None
    resolvconf.remove(Path("/run/netns/mine"))
    assert (tmp_path / "mine" / "resolv.conf").read_text() == "nameserver 192.0.2.1\n"
