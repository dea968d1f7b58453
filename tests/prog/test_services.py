"""Service load balancing in from_pod, golden packets: DNAT and reverse NAT with checksums
checked by scapy, UDP zero checksums, affinity, refusal without backends, ICMP error
translation, fragments, conntrack pinning across backend changes, hairpin."""
from __future__ import annotations

from scapy.layers.inet import ICMP, IP, IPerror, TCP, UDP, UDPerror, defragment, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctl.dataplane.bpf.types import BackendKey, CounterId, EndpointInfo, EndpointKey
from tests.prog.conftest import TC_ACT_REDIRECT, TC_ACT_SHOT, program_service, set_service_cidr

VIP = "10.96.0.10"
A = dict(ip="10.244.1.2", ifindex=11, mac="02:00:00:00:00:0a", node_mac="02:00:00:00:01:0a")
B = dict(ip="10.244.1.3", ifindex=12, mac="02:00:00:00:00:0b", node_mac="02:00:00:00:01:0b")
C = dict(ip="10.244.1.4", ifindex=13, mac="02:00:00:00:00:0c", node_mac="02:00:00:00:01:0c")
D = dict(ip="10.244.1.5", ifindex=14, mac="02:00:00:00:00:0d", node_mac="02:00:00:00:01:0d")
PODS = {p["ip"]: p for p in (A, B, C, D)}


def setup(h):
    for p in PODS.values():
        h.maps["endpoints"].put(EndpointKey.from_dict({"ip": p["ip"]}),
                                EndpointInfo.from_dict({k: p[k] for k in ("ifindex", "mac", "node_mac")}))
    set_service_cidr(h, "10.96.0.0/12")


def send(h, src_pod, l3, ifindex=None):
    frame = bytes(Ether(src=src_pod["mac"], dst=src_pod["node_mac"]) / l3)
    rc, out = h.run("from_pod", frame, ingress_ifindex=ifindex or src_pod["ifindex"])
    return rc, Ether(out)


def checksums_ok(pkt) -> bool:
    """Recompute every checksum with scapy and compare with what the program left."""
    fresh = Ether(bytes(pkt))
    layers = [fresh[IP]] + [l for l in (fresh[IP].payload,) if hasattr(l, "chksum")]
    if fresh.haslayer(IPerror):
        layers.append(fresh[IPerror])
    got = [l.chksum for l in layers]
    for l in layers:
        l.chksum = None
    rebuilt = Ether(bytes(fresh))
    want = [rebuilt[IP].chksum] + ([rebuilt[IP].payload.chksum] if len(got) > 1 else [])
    if fresh.haslayer(IPerror):
        want.append(rebuilt[IPerror].chksum)
    return got[: len(want)] == want


def test_tcp_dnat_and_reverse_nat(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=40000, dport=80, flags="S") / Raw(b"hi"))
    assert rc == TC_ACT_REDIRECT
    assert (pkt[IP].dst, pkt[TCP].dport, pkt.dst) == (B["ip"], 8080, B["mac"])
    assert pkt[IP].src == A["ip"] and pkt[TCP].sport == 40000
    assert checksums_ok(pkt)
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=40000, flags="SA"))
    assert rc == TC_ACT_REDIRECT
    assert (rep[IP].src, rep[TCP].sport, rep.dst) == (VIP, 80, A["mac"])
    assert checksums_ok(rep)
    assert harness.counter(CounterId.CTR_LB_NEW_FLOW) == 1 and harness.counter(CounterId.CTR_REV_NAT) == 1
    stats = harness.maps["backends"].get(BackendKey.from_dict({"service_id": 1, "ip": B["ip"], "port": 8080}))
    assert sum(c.packets for c in stats) == 1


def test_udp_dnat_keeps_checksums_right_and_zero_checksum_zero(harness):
    setup(harness)
    program_service(harness, VIP, 53, "udp", [(B["ip"], 5353)])
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / UDP(sport=30000, dport=53) / Raw(b"query"))
    assert rc == TC_ACT_REDIRECT and (pkt[IP].dst, pkt[UDP].dport) == (B["ip"], 5353)
    assert checksums_ok(pkt)
    zero = IP(src=A["ip"], dst=VIP) / UDP(sport=30001, dport=53, chksum=0) / Raw(b"query")
    rc, pkt = send(harness, A, zero)
    assert rc == TC_ACT_REDIRECT and pkt[UDP].chksum == 0 and pkt[IP].dst == B["ip"]


def test_flows_spread_and_stay_pinned(harness):
    setup(harness)
    backends = [(B["ip"], 80), (C["ip"], 80), (D["ip"], 80)]
    program_service(harness, VIP, 80, "tcp", backends)
    chosen = {}
    for sport in range(20000, 20060):
        _, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=sport, dport=80, flags="S"))
        chosen[sport] = pkt[IP].dst
    assert len(set(chosen.values())) == 3, "different flows spread over the backends"
    # Remove D from the backend set: every established flow stays on its backend (D's
    # connections finish on the terminating pod), and no new flow goes to D.
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 80), (C["ip"], 80)])
    for sport, dst in chosen.items():
        _, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=sport, dport=80, flags="A"))
        assert pkt[IP].dst == dst, "conntrack pins the flow to its backend"
    fresh = {send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=s, dport=80, flags="S"))[1][IP].dst
             for s in range(22000, 22060)}
    assert fresh == {B["ip"], C["ip"]}, "new flows only go to the remaining backends"
    # A closed connection's tuple reused with a new SYN is balanced afresh.
    d_port = next(s for s, dst in chosen.items() if dst == D["ip"])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=d_port, dport=80, flags="FA"))
    _, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=d_port, dport=80, flags="S"))
    assert pkt[IP].dst in (B["ip"], C["ip"])


def test_client_ip_affinity(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 80), (C["ip"], 80), (D["ip"], 80)], affinity=600)
    seen = {send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=s, dport=80, flags="S"))[1][IP].dst
            for s in range(21000, 21040)}
    assert len(seen) == 1, "every connection of one client goes to the same backend"


def test_no_backend_tcp_gets_rst_from_the_vip(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [])
    rc, rst = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=40001, dport=80, flags="S", seq=1000))
    assert rc == TC_ACT_REDIRECT, "sent straight back into the client's pod"
    assert (rst[IP].src, rst[IP].dst, rst[TCP].sport, rst[TCP].dport) == (VIP, A["ip"], 80, 40001)
    assert rst[TCP].flags == "RA" and rst[TCP].ack == 1001
    assert rst.dst == A["mac"]
    assert checksums_ok(rst)
    assert harness.counter(CounterId.CTR_LB_REJECT) == 1


def test_no_backend_udp_gets_icmp_port_unreachable(harness):
    setup(harness)
    program_service(harness, VIP, 53, "udp", [])
    sent = IP(src=A["ip"], dst=VIP, id=77) / UDP(sport=30002, dport=53) / Raw(b"x" * 100)
    rc, err = send(harness, A, sent)
    assert rc == TC_ACT_REDIRECT
    assert (err[IP].src, err[IP].dst, err[ICMP].type, err[ICMP].code) == (VIP, A["ip"], 3, 3)
    assert err[IPerror].dst == VIP and err[IPerror].id == 77 and err[UDPerror].dport == 53
    assert len(bytes(err[ICMP])) == 8 + 28
    assert checksums_ok(err)
    icmp = err[ICMP]
    check = icmp.chksum
    icmp.chksum = None
    assert ICMP(bytes(icmp)).chksum == check


def test_icmp_error_from_backend_is_translated_back(harness):
    setup(harness)
    program_service(harness, VIP, 53, "udp", [(B["ip"], 5353)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / UDP(sport=30003, dport=53) / Raw(b"q"))
    # B's kernel answers the (translated) datagram with port unreachable, or a router with frag-needed.
    offending = IP(src=A["ip"], dst=B["ip"]) / UDP(sport=30003, dport=5353) / Raw(b"q")
    for icmp in (ICMP(type=3, code=3), ICMP(type=3, code=4, nexthopmtu=1400)):
        rc, err = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / icmp / bytes(offending)[:28])
        assert rc == TC_ACT_REDIRECT and err.dst == A["mac"]
        assert err[IP].src == VIP, "the error comes from the address the client talked to"
        assert (err[IPerror].dst, err[UDPerror].dport) == (VIP, 53)
        assert checksums_ok(err)
        check = err[ICMP].chksum
        fresh = ICMP(bytes(err[ICMP]))
        fresh.chksum = None
        assert ICMP(bytes(fresh)).chksum == check, "ICMP checksum covers the rewritten inner header"
    assert harness.counter(CounterId.CTR_ICMP_ERROR_NAT) == 2


def test_fragments_follow_their_first_fragment(harness):
    setup(harness)
    program_service(harness, VIP, 53, "udp", [(B["ip"], 5353)])
    frags = fragment(IP(src=A["ip"], dst=VIP, id=4242) / UDP(sport=30004, dport=53) / Raw(b"y" * 3000), fragsize=1200)
    assert len(frags) == 3
    outs = []
    for f in frags:
        rc, pkt = send(harness, A, f)
        assert rc == TC_ACT_REDIRECT and pkt[IP].dst == B["ip"]
        ip = IP(bytes(pkt[IP]))
        check, ip.chksum = ip.chksum, None
        assert IP(bytes(ip)).chksum == check, "each fragment's IP checksum"
        outs.append(pkt[IP])
    assert outs[0][UDP].dport == 5353
    # The UDP checksum covers the whole datagram: check it on the reassembled one.
    whole = IP(bytes(defragment(outs)[0]))
    check = whole[UDP].chksum
    whole[UDP].chksum = None
    assert IP(bytes(whole))[UDP].chksum == check
    # A later fragment whose first fragment never came: dropped and counted, never delivered untranslated.
    orphan = fragment(IP(src=A["ip"], dst=VIP, id=999) / UDP(sport=30005, dport=53) / Raw(b"z" * 3000), fragsize=1200)[1]
    rc, _ = send(harness, A, orphan)
    assert rc == TC_ACT_SHOT
    assert harness.counter(CounterId.CTR_DROP_FRAGMENT) == 1


def test_hairpin_backend_reaches_itself(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(A["ip"], 8080)])
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=40002, dport=80, flags="S"))
    assert rc == TC_ACT_REDIRECT and pkt.dst == A["mac"]
    assert (pkt[IP].src, pkt[IP].dst, pkt[TCP].dport) == ("169.254.42.1", A["ip"], 8080)
    assert checksums_ok(pkt)
    rc, rep = send(harness, A, IP(src=A["ip"], dst="169.254.42.1") / TCP(sport=8080, dport=40002, flags="SA"))
    assert rc == TC_ACT_REDIRECT
    assert (rep[IP].src, rep[TCP].sport, rep[IP].dst) == (VIP, 80, A["ip"])
    assert checksums_ok(rep)


def test_closed_translated_flow_does_not_capture_a_new_direct_connection(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=43000, dport=80, flags="S"))
    send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=43000, flags="SA"))
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=43000, dport=80, flags="R"))   # closed (RST)
    # The same client port now connects straight to the backend: its SYN-ACK is not the VIP's.
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=43000, flags="SA"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport) == (B["ip"], 8080)


def service_flows(h) -> set[tuple]:
    return {(k.saddr, k.sport, k.daddr, k.dport, k.dir) for k, _ in h.maps["conntrack"].items()}


def test_rst_from_the_client_translates_and_forgets_the_flow(harness):
    """An RST ends the flow: it is translated like the rest, and both entries go at once
    (high RST-close rates would otherwise fill the LRU table and make every new flow evict)."""
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=44000, dport=80, flags="S"))
    assert len(service_flows(harness)) == 2
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=44000, dport=80, flags="RA"))
    assert rc == TC_ACT_REDIRECT and pkt.dst == B["mac"]
    assert (pkt[IP].dst, pkt[TCP].dport, pkt[TCP].flags) == (B["ip"], 8080, "RA")
    assert checksums_ok(pkt)
    assert service_flows(harness) == set()
    assert harness.counter(CounterId.CTR_LB_NEW_FLOW) == 1


def test_rst_from_the_backend_translates_and_forgets_the_flow(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=44001, dport=80, flags="S"))
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=44001, flags="R"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport, rep.dst) == (VIP, 80, A["mac"])
    assert checksums_ok(rep)
    assert service_flows(harness) == set()


def test_hairpin_rst_forgets_both_entries(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(A["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=44002, dport=80, flags="S"))
    rc, rep = send(harness, A, IP(src=A["ip"], dst="169.254.42.1") / TCP(sport=8080, dport=44002, flags="R"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport, rep[IP].dst) == (VIP, 80, A["ip"])
    assert service_flows(harness) == set()


def test_rst_of_an_unknown_flow_is_translated_without_creating_one(harness):
    """A late RST (retransmitted, or after the flow was forgotten) still reaches the backend
    Maglev picks for its tuple, and leaves no entry behind; a later packet of a live flow
    re-creates its entries with the same backend."""
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=44003, dport=80, flags="R"))
    assert rc == TC_ACT_REDIRECT and (pkt[IP].dst, pkt[TCP].dport) == (B["ip"], 8080)
    assert checksums_ok(pkt)
    assert service_flows(harness) == set() and harness.counter(CounterId.CTR_LB_NEW_FLOW) == 0
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=44003, dport=80, flags="A"))
    assert rc == TC_ACT_REDIRECT and (pkt[IP].dst, pkt[TCP].dport) == (B["ip"], 8080)
    assert len(service_flows(harness)) == 2


def test_fin_keeps_the_closing_flow(harness):
    """FIN is not RST: the last ACK and retransmitted FINs still need the entries (closing, 10 s)."""
    from ctl.dataplane.bpf.types import CT_F_CLOSING
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=44004, dport=80, flags="S"))
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=44004, dport=80, flags="FA"))
    entries = list(harness.maps["conntrack"].items())
    assert len(entries) == 2 and any(v.flags & CT_F_CLOSING for _, v in entries)
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=44004, flags="FA"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport) == (VIP, 80)
