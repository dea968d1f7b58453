"""The DNS fast path in from_pod (bpf/include/dns.h), golden packets through BPF_PROG_TEST_RUN.

The map is filled the product's way (NameIndex -> FastPath.sync), and every answer the
program gives is compared byte for byte with what the node's server (DnsServer.handle, the
same code the daemon runs) says to the same query: the fast path may only ever say what
the server would. Every other shape must leave the program untouched and reach the stack
(verdict TC_ACT_OK, identical bytes), counted as passed."""
from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctl.dataplane.bpf.types import CounterId
from ctl.dns.fastpath import FastPath
from ctl.dns.records import NameIndex
from ctl.dns.server import DnsServer
from ctl.dns.upstream import Upstream
from ctl.state.model import ClusterConfig, NetworkConfig
from tests.prog.conftest import TC_ACT_OK, TC_ACT_REDIRECT
from tests.prog.test_from_pod import POD_A, add_endpoint
from tests.unit.test_dns import node, pod, svc

VIP = "10.96.0.10"
SPORT = 40000
LONG_POD = "p" * 63   # web.. names up to 128 wire bytes are in the map; this one's is 83


@pytest.fixture
def dns_h(harness):
    add_endpoint(harness, POD_A)
    index = NameIndex(service_ttl=30, pod_ttl=5)
    index.load([("/atomnet/config", ClusterConfig().to_json()),
                ("/coreos.com/network/config", NetworkConfig("10.244.0.0/16").to_json()),
                ("/atomnet/nodes/n1", node("n1", "192.168.100.1").to_json()),
                ("/atomnet/pods/web1", pod("web1", "10.244.1.2").to_json()),
                ("/atomnet/pods/" + LONG_POD, pod(LONG_POD, "10.244.1.77").to_json()),
                ("/atomnet/services/web", svc("web", "10.96.0.2", 80).to_json())])
    fp = FastPath(harness.maps["dns_names"], harness.maps["dns_config"])
    fp.sync(index)
    fp.enable(VIP)
    server = DnsServer(index, Upstream([]), VIP, 0)   # not started: handle() is the whole answer
    return harness, index, fp, server


def frame(payload: bytes, dst: str = VIP, dport: int = 53, **ip) -> bytes:
    return bytes(Ether(src=POD_A["mac"], dst=POD_A["node_mac"]) / IP(src=POD_A["ip"], dst=dst, **ip) /
                 UDP(sport=SPORT, dport=dport) / Raw(payload))


def query(name: str, rdtype="A", **kw) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def run(h, sent: bytes):
    return h.run("from_pod", sent, ingress_ifindex=POD_A["ifindex"])


def assert_answered_as_the_server(h, server, wire: bytes) -> dns.message.Message:
    rc, out = run(h, frame(wire))
    assert rc == TC_ACT_REDIRECT, "not answered by the fast path"
    pkt = Ether(out)
    assert (pkt.src, pkt.dst) == (POD_A["node_mac"], POD_A["mac"])
    assert (pkt[IP].src, pkt[IP].dst, pkt[UDP].sport, pkt[UDP].dport) == (VIP, POD_A["ip"], 53, SPORT)
    ip_sum, udp_sum = pkt[IP].chksum, pkt[UDP].chksum
    del pkt[IP].chksum, pkt[UDP].chksum, pkt[IP].len, pkt[UDP].len
    again = Ether(bytes(pkt))
    assert (again[IP].chksum, again[UDP].chksum) == (ip_sum, udp_sum), "checksums"
    assert len(out) == 14 + again[IP].len
    payload = bytes(pkt[UDP].payload)
    expected = server.handle(wire, POD_A["ip"], tcp=False)
    assert payload == expected, f"\nbpf    {payload.hex()}\nserver {expected.hex()}"
    return dns.message.from_wire(payload)


def assert_passed_untouched(h, sent: bytes, counted: bool = True):
    before = h.counter(CounterId.CTR_DNS_FAST_PASS)
    rc, out = run(h, sent)
    assert rc == TC_ACT_OK and out == sent
    assert h.counter(CounterId.CTR_DNS_FAST_PASS) == before + (1 if counted else 0)


COOKIE = dns.edns.CookieOption(b"\x01\x02\x03\x04\x05\x06\x07\x08", b"")


PLAIN_CASES = [
    ("web.svc.cluster.local", {}, "10.96.0.2", 30),                                   # glibc: no EDNS
    ("web.svc.cluster.local", {"use_edns": 0}, "10.96.0.2", 30),
    ("web.svc.cluster.local", {"use_edns": 0, "payload": 1232, "options": [COOKIE]}, "10.96.0.2", 30),   # dig
    ("web.svc.cluster.local", {"use_edns": 0, "payload": 4096, "want_dnssec": True}, "10.96.0.2", 30),
    ("web.svc.cluster.local", {"use_edns": 0, "payload": 100}, "10.96.0.2", 30),
    ("WEB.Svc.Cluster.LOCAL", {}, "10.96.0.2", 30),                                   # case kept in the question
    ("web.svc.cluster.local.", {"flags": 0}, "10.96.0.2", 30),                        # RD clear
    ("web.svc.cluster.local.", {"flags": dns.flags.RD | dns.flags.AD | dns.flags.CD}, "10.96.0.2", 30),
    ("web1.pod.cluster.local", {"use_edns": 0, "options": [COOKIE]}, "10.244.1.2", 5),
    (f"{LONG_POD}.pod.cluster.local", {}, "10.244.1.77", 5),
    ("n1.node.cluster.local", {}, "192.168.100.1", 30),
    ("ns.dns.cluster.local", {}, VIP, 30),
]


def test_plain_a_queries_answered_exactly_as_the_server(dns_h):
    # one program load for all cases (a load is seconds on this machine)
    h, _, _, server = dns_h
    for n, (name, kw, ip, ttl) in enumerate(PLAIN_CASES, 1):
        msg = assert_answered_as_the_server(h, server, query(name, **kw))
        rrset = msg.answer[0]
        assert [r.address for r in rrset] == [ip] and rrset.ttl == ttl, name
        assert msg.flags & dns.flags.AA and msg.flags & dns.flags.QR
        assert h.counter(CounterId.CTR_DNS_FAST_ANSWER) == n and h.counter(CounterId.CTR_DNS_FAST_PASS) == 0


def with_header(wire: bytes, **fields) -> bytes:
    names = ("id", "flags", "qd", "an", "ns", "ar")
    head = dict(zip(names, struct.unpack("!6H", wire[:12])))
    head.update(fields)
    return struct.pack("!6H", *(head[n] for n in names)) + wire[12:]


def qname_wire(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


PLAIN = query("web.svc.cluster.local")
PLAIN_EDNS = query("web.svc.cluster.local", use_edns=0)
Q_TAIL = struct.pack("!HH", 1, 1)
OPT_RR = PLAIN_EDNS[len(PLAIN):]          # the 11-byte OPT RR of PLAIN_EDNS


def opt_rr(rdata: bytes = b"", version: int = 0, udp: int = 1232, name: bytes = b"\0") -> bytes:
    return name + struct.pack("!HHBBHH", 41, udp, 0, version, 0, len(rdata)) + rdata


UNUSUAL = {
    "AAAA": query("web.svc.cluster.local", "AAAA"),
    "ANY": query("web.svc.cluster.local", "ANY"),
    "SRV": query("_80._tcp.web.svc.cluster.local", "SRV"),
    "class CH": query("web.svc.cluster.local", "A", rdclass="CH"),
    "unknown name (NXDOMAIN is the server's)": query("nope.svc.cluster.local"),
    "search-path miss": query("web.svc.cluster.local.svc.cluster.local"),
    "name outside the cluster": query("www.example.org"),
    "root name": query("."),
    "pointer in the question": PLAIN[:12] + b"\x03web\xc0\x0c" + Q_TAIL,
    "pointer loop": PLAIN[:12] + b"\xc0\x0c" + Q_TAIL,
    "extended label type": PLAIN[:12] + b"\x43web\x00" + Q_TAIL,
    "255-byte name": query(".".join(["a" * 63] * 3 + ["b" * 61])),
    "name longer than the key (129 bytes)": query(".".join(["c" * 63, "d" * 63]) + ".x"),
    "two questions": with_header(PLAIN + qname_wire("web.svc.cluster.local") + Q_TAIL, qd=2),
    "no question": with_header(PLAIN[:12], qd=0),
    "an answer in the query": with_header(PLAIN, an=1),
    "an authority record": with_header(PLAIN, ns=1),
    "TC set": with_header(PLAIN, flags=0x0300),
    "QR set (a response)": with_header(PLAIN, flags=0x8100),
    "opcode NOTIFY": with_header(PLAIN, flags=0x2000),
    "opcode UPDATE": with_header(PLAIN, flags=0x2800),
    "header only": PLAIN[:12],
    "truncated header": PLAIN[:7],
    "name without its end": PLAIN[:12] + b"\x03web\x03svc",
    "no QCLASS": PLAIN[:-2],
    "trailing byte": PLAIN + b"\0",
    "trailing byte after OPT": PLAIN_EDNS + b"\0",
    "ARCOUNT 1 without the OPT": with_header(PLAIN, ar=1),
    "two OPT RRs": with_header(PLAIN_EDNS + OPT_RR, ar=2),
    "EDNS version 1 (BADVERS)": PLAIN + opt_rr(version=1),
    "OPT with a name": PLAIN + opt_rr(name=b"\x01a\x00"),
    "not an OPT in additional": PLAIN + b"\0" + struct.pack("!HHIH", 1, 1, 30, 4) + b"\x0a\0\0\x01",
    "EDNS client subnet": query("web.svc.cluster.local", use_edns=0,
                                options=[dns.edns.ECSOption("10.244.1.0", 24)]),
    "EDNS padding": query("web.svc.cluster.local", use_edns=0, options=[dns.edns.GenericOption(12, b"\0" * 8)]),
    "EDNS client and server cookie": query("web.svc.cluster.local", use_edns=0, options=[
        dns.edns.CookieOption(b"\x01" * 8, b"\x02" * 16)]),
    "EDNS cookie of a bad size": PLAIN + opt_rr(struct.pack("!HH", 10, 7) + b"\x01" * 7 + b"\0"),
    "EDNS cookie and another option": query("web.svc.cluster.local", use_edns=0, options=[
        COOKIE, dns.edns.GenericOption(65001, b"")]),
    "OPT rdlength beyond the message": PLAIN + opt_rr()[:-2] + b"\x00\x0c",
}


def test_unusual_queries_pass_to_the_server_untouched(dns_h):
    h = dns_h[0]
    for why in sorted(UNUSUAL):
        try:
            assert_passed_untouched(h, frame(UNUSUAL[why]))
        except AssertionError as exc:
            raise AssertionError(f"{why}: {exc}") from None
    assert h.counter(CounterId.CTR_DNS_FAST_ANSWER) == 0


def test_ip_and_udp_shapes_the_fast_path_leaves_alone(dns_h):
    h = dns_h[0]
    assert_passed_untouched(h, frame(PLAIN, options=[b"\x01\x01\x01\x00"]))     # IP options
    assert_passed_untouched(h, frame(PLAIN, flags="MF"))                          # a first fragment
    bad_len = bytearray(frame(PLAIN))
    struct.pack_into("!H", bad_len, 14 + 20 + 4, len(PLAIN) + 8 - 1)            # UDP length short of IP's
    assert_passed_untouched(h, bytes(bad_len))
    # not for the node's server at all: routed as any packet, not counted
    assert_passed_untouched(h, frame(PLAIN, dst="192.0.2.53"), counted=False)   # another resolver
    assert_passed_untouched(h, frame(PLAIN, dport=5353), counted=False)
    tcp = bytes(Ether(src=POD_A["mac"], dst=POD_A["node_mac"]) / IP(src=POD_A["ip"], dst=VIP) /
                TCP(sport=SPORT, dport=53, flags="S"))
    assert_passed_untouched(h, tcp, counted=False)
    assert h.counter(CounterId.CTR_DNS_FAST_ANSWER) == 0


def test_the_map_follows_the_index(dns_h):
    h, index, fp, server = dns_h
    assert_answered_as_the_server(h, server, PLAIN)
    index.apply("/atomnet/services/web", None)
    index.apply("/atomnet/services/db", svc("db", "10.96.0.3", 5432).to_json())
    assert fp.sync(index) == 2
    assert_passed_untouched(h, frame(PLAIN))                     # gone: the server says NXDOMAIN
    msg = assert_answered_as_the_server(h, server, query("db.svc.cluster.local"))
    assert msg.answer[0][0].address == "10.96.0.3"
    index.apply("/atomnet/pods/web1", pod("web1", "10.244.1.9").to_json())     # a new address
    fp.sync(index)
    assert assert_answered_as_the_server(h, server, query("web1.pod.cluster.local")).answer[0][0].address == \
        "10.244.1.9"
    fp.disable()
    assert_passed_untouched(h, frame(query("db.svc.cluster.local")), counted=False)


def test_a_fresh_full_sync_drops_stale_names(dns_h):
    h, index, fp, server = dns_h
    fresh = NameIndex()
    fresh.load([("/atomnet/config", ClusterConfig().to_json())])   # no services, pods or nodes any more
    fp.sync(fresh)
    assert [k.to_dict()["name"] for k in h.maps["dns_names"].keys()] == ["ns.dns.cluster.local."]
    assert_passed_untouched(h, frame(PLAIN))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from([PLAIN, PLAIN_EDNS, query("web1.pod.cluster.local", use_edns=0, options=[COOKIE])]),
       edits=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=3),
       cut=st.integers(0, 6))
def test_mutated_queries_are_answered_as_the_server_would_or_passed_untouched(dns_h, base, edits, cut):
    """Whatever the bytes: either the exact answer the server gives, or the packet untouched."""
    h, _, _, server = dns_h
    wire = bytearray(base)
    for pos, value in edits:
        if pos < len(wire):
            wire[pos] = value
    wire = bytes(wire[:len(wire) - cut] if cut < len(wire) else wire)
    sent = frame(wire)
    rc, out = run(h, sent)
    if rc == TC_ACT_OK:
        assert out == sent
    else:
        assert rc == TC_ACT_REDIRECT
        assert bytes(Ether(out)[UDP].payload) == server.handle(wire, POD_A["ip"], tcp=False)
