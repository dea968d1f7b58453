"""Service conntrack under races and evictions, golden packets (issue 16).

1. Another CPU's stamp. Both packets of one direction of a flow can run on two CPUs at
   once (a backend's data from its process on one CPU, its ACKs from softirq on the
   other), and each stamps the flow's entry. A CPU that read its clock just before the
   other CPU's stamp used to compute `now - last_seen` unsigned: ~2^64, "expired"
   (issue 14's masquerade resets, fixed by `ct_quiet_for`). These tests stamp an entry
   in the future, as that other CPU would have, and check the service paths. On objects
   built with the unsigned age (`ct_quiet_for` returning `now - last_seen`, everything
   else as now; see the module's report in the issue) the reply test sees the backend's
   reply passed untranslated (the client's stack answers it with an RST to the backend,
   whose own RST then comes back translated: the client's ConnectionResetError), and the
   forward test sees a live flow re-balanced away from a backend that left the service.
   The stamp is 50 ms ahead rather than a few microseconds only so that it is still ahead
   when the program reads its clock after Python's write; any amount ahead wraps alike.
"""
from __future__ import annotations

import time

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctl.dataplane.bpf.types import CtDir, CtEntry, CounterId
from tests.prog.conftest import TC_ACT_REDIRECT, TC_ACT_SHOT, program_service
from tests.prog.test_services import A, B, C, VIP, send, setup

AHEAD_NS = 50_000_000   # see the module docstring


def stamp(h, direction: CtDir, at_ns: int) -> int:
    """Sets last_seen_ns of every service entry of one direction; returns how many."""
    n = 0
    for k, v in list(h.maps["conntrack"].items()):
        if k.dir == direction:
            v.last_seen_ns = at_ns
            h.maps["conntrack"].put(k, v)
            n += 1
    return n


def test_a_reply_entry_stamped_by_another_cpu_still_translates_the_reply(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45000, dport=80, flags="S"))
    send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45000, flags="SA"))
    assert stamp(harness, CtDir.CT_REPLY, time.monotonic_ns() + AHEAD_NS) == 1
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45000, flags="PA") / Raw(b"ok"))
    assert rc == TC_ACT_REDIRECT and rep.dst == A["mac"]
    assert (rep[IP].src, rep[TCP].sport) == (VIP, 80), "the reply comes from the VIP, not the backend"
    assert harness.counter(CounterId.CTR_REV_NAT) == 2


def test_a_forward_entry_stamped_by_another_cpu_keeps_its_backend(harness):
    """B left the service (a terminating pod finishing its connections): the live flow must
    stay on B. Taken for new, it would be balanced to C, which answers with an RST."""
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45001, dport=80, flags="S"))
    program_service(harness, VIP, 80, "tcp", [(C["ip"], 8080)])
    assert stamp(harness, CtDir.CT_FORWARD, time.monotonic_ns() + AHEAD_NS) == 1
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45001, dport=80, flags="PA") / Raw(b"GET"))
    assert rc == TC_ACT_REDIRECT and (pkt[IP].dst, pkt[TCP].dport) == (B["ip"], 8080)
    assert harness.counter(CounterId.CTR_LB_NEW_FLOW) == 1, "not taken for a new flow"


# ------------------------------------------------------------------ 2. a reply entry lost while its forward entry lives

def entries(h, direction: CtDir):
    return [(k, v) for k, v in h.maps["conntrack"].items() if k.dir == direction]


def evict(h, direction: CtDir) -> None:
    """What the LRU does to the least recently used entries of a full table."""
    for k, _ in entries(h, direction):
        h.maps["conntrack"].delete(k)


def test_an_evicted_reply_entry_is_recreated_by_the_next_forward_packet_after_a_pause(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45100, dport=80, flags="S"))
    send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45100, flags="SA"))
    evict(harness, CtDir.CT_REPLY)
    stamp(harness, CtDir.CT_FORWARD, time.monotonic_ns() - 2 * 10**9)   # an idle flow: what the LRU evicts from
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45100, dport=80, flags="PA") / Raw(b"GET"))
    assert rc == TC_ACT_REDIRECT and pkt[IP].dst == B["ip"]
    (k, v), = ((k.to_dict(), v.to_dict()) for k, v in entries(harness, CtDir.CT_REPLY))
    assert (k["saddr"], k["sport"], k["daddr"], k["dport"]) == (B["ip"], 8080, A["ip"], 45100)
    assert (v["nat_ip"], v["nat_port"], v["snat_ip"], v["service_id"]) == (VIP, 80, "0.0.0.0", 1)
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45100, flags="PA") / Raw(b"200"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport) == (VIP, 80), "the reply is translated again"
    assert harness.counter(CounterId.CTR_LB_NEW_FLOW) == 1


def test_a_busy_one_way_flow_gets_its_reply_entry_back_within_64_packets(harness):
    """No pause in a busy flow: every 64th forward packet looks (a mask test on the others)."""
    setup(harness)
    program_service(harness, VIP, 53, "udp", [(B["ip"], 5353)])
    dgram = IP(src=A["ip"], dst=VIP) / UDP(sport=45101, dport=53) / Raw(b"q")
    send(harness, A, dgram)
    evict(harness, CtDir.CT_REPLY)
    sent = 1
    while not entries(harness, CtDir.CT_REPLY):
        assert sent < 65, "not back after 64 packets"
        send(harness, A, dgram)
        sent += 1
    assert sent == 65, "the established packets in between never looked (no second lookup on the fast path)"
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / UDP(sport=5353, dport=45101) / Raw(b"a"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[UDP].sport) == (VIP, 53)


def test_a_hairpin_flows_reply_entry_is_recreated_with_its_client(harness):
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(A["ip"], 8080)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45102, dport=80, flags="S"))
    evict(harness, CtDir.CT_REPLY)
    stamp(harness, CtDir.CT_FORWARD, time.monotonic_ns() - 2 * 10**9)
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45102, dport=80, flags="A"))
    rc, rep = send(harness, A, IP(src=A["ip"], dst="169.254.42.1") / TCP(sport=8080, dport=45102, flags="A"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport, rep[IP].dst) == (VIP, 80, A["ip"])


def test_a_udp_reply_entry_outlived_by_its_forward_entry_is_kept_alive(harness):
    """A UDP flow whose backend answers rarely: the reply entry alone would expire after
    CT_TIMEOUT_OTHER (120 s) although the client keeps sending."""
    setup(harness)
    program_service(harness, VIP, 53, "udp", [(B["ip"], 5353)])
    dgram = IP(src=A["ip"], dst=VIP) / UDP(sport=45103, dport=53) / Raw(b"q")
    send(harness, A, dgram)
    stamp(harness, CtDir.CT_REPLY, time.monotonic_ns() - 121 * 10**9)
    stamp(harness, CtDir.CT_FORWARD, time.monotonic_ns() - 2 * 10**9)
    send(harness, A, dgram)
    (_, v), = entries(harness, CtDir.CT_REPLY)
    assert v.last_seen_ns > time.monotonic_ns() - 10**9, "refreshed by the forward packet after the pause"
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / UDP(sport=5353, dport=45103) / Raw(b"a"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[UDP].sport) == (VIP, 53)


def test_an_evicted_masquerade_claim_is_retaken_with_the_flows_own_port(harness):
    """The flow got the second candidate port (the first was busy); later the first is free
    and the flow's claim is evicted. Starting over would give the live flow the first port
    (a new tuple at the remote: its server answers with an RST); it keeps its own."""
    from tests.prog.test_egress import WORLD, configure, egress, ingress, nat_port
    configure(harness)
    syn = IP(src=A["ip"], dst=WORLD) / TCP(sport=45104, dport=443, flags="S")
    first = nat_port(egress(harness, syn)[1])
    (ik, iv), = entries(harness, CtDir.CT_SNAT_IN)
    evict(harness, CtDir.CT_SNAT_OUT)
    other = CtEntry.from_dict({**iv.to_dict(), "nat_ip": C["ip"]})   # the first port is now another pod's flow's
    harness.maps["conntrack"].put(ik, other)
    port = nat_port(egress(harness, syn)[1])
    assert port != first
    harness.maps["conntrack"].delete(ik)         # that other flow ends: the first port is free again
    own = [k for k, _ in entries(harness, CtDir.CT_SNAT_IN) if k.to_dict()["dport"] == port]
    harness.maps["conntrack"].delete(own[0])     # and the LRU evicts our flow's claim
    rc, out, _ = egress(harness, IP(src=A["ip"], dst=WORLD) / TCP(sport=45104, dport=443, flags="A", seq=1))
    assert nat_port(out) == port, "the live flow keeps its port"
    rc, got = ingress(harness, IP(src=WORLD, dst="192.168.100.1") / TCP(sport=443, dport=port, flags="A"))
    assert rc == TC_ACT_REDIRECT and (Ether(got)[IP].dst, Ether(got)[TCP].dport) == (A["ip"], 45104)
    assert harness.counter(CounterId.CTR_SNAT_NEW) == 2, "the first SYN and the second, not the ACK"


# ------------------------------------------------------------------ 3. the DNAT tuple clash conntrack can see

VIP2 = "10.96.0.11"


def test_a_second_frontend_to_the_same_backend_from_the_same_port_does_not_steal_the_first_flow(harness):
    """One pod, one source port, two VIPs that DNAT to B:8080: one 4-tuple at B. The second
    flow is refused (dropped, counted) rather than given the first flow's reply entry, which
    would send the first flow's replies to the second socket, from the wrong VIP."""
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)], sid=1)
    program_service(harness, VIP2, 80, "tcp", [(B["ip"], 8080)], sid=2)
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45200, dport=80, flags="S"))
    send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45200, flags="SA"))
    rc, _ = send(harness, A, IP(src=A["ip"], dst=VIP2) / TCP(sport=45200, dport=80, flags="S"))
    assert rc == TC_ACT_SHOT and harness.counter(CounterId.CTR_DROP_TUPLE_CLASH) == 1
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45200, flags="PA") / Raw(b"1"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport) == (VIP, 80), "still the first flow's"
    # The first flow's established packets are unaffected, and the refused one leaves no entry.
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45200, dport=80, flags="A"))
    assert rc == TC_ACT_REDIRECT and pkt[IP].dst == B["ip"]
    assert len(entries(harness, CtDir.CT_FORWARD)) == 1
    # Once the first flow closes, the second one's retransmitted SYN gets through.
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45200, dport=80, flags="FA"))
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP2) / TCP(sport=45200, dport=80, flags="S"))
    assert rc == TC_ACT_REDIRECT and (pkt[IP].dst, pkt[TCP].dport) == (B["ip"], 8080)
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45200, flags="SA"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport) == (VIP2, 80)


def test_a_flow_recreated_after_its_rst_and_never_answered_blocks_no_other_frontend(harness):
    """The client's last ACK, sent from the other CPU, can reach from_pod after its RST
    deleted the flow: it re-creates the flow, which nothing will ever answer. It is
    protected like a live flow for CT_UNANSWERED_NS (1 s), no longer: it used to hold the
    tuple for 6 h, refusing that pod port through every other VIP of the backend (the bench
    smoke: one connection in a few thousand timed out, SYN retransmitted twice)."""
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)], sid=1)
    program_service(harness, VIP2, 80, "tcp", [(B["ip"], 8080)], sid=2)
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45210, dport=80, flags="S"))
    send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45210, flags="SA"))
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45210, dport=80, flags="R"))
    assert not entries(harness, CtDir.CT_FORWARD), "the RST ended the flow"
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45210, dport=80, flags="A"))   # late ACK
    assert len(entries(harness, CtDir.CT_FORWARD)) == 1, "re-created"
    rc, _ = send(harness, A, IP(src=A["ip"], dst=VIP2) / TCP(sport=45210, dport=80, flags="S"))
    assert rc == TC_ACT_SHOT, "within the first second it is protected like any new flow"
    stamp(harness, CtDir.CT_REPLY, time.monotonic_ns() - 2 * 10**9)
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP2) / TCP(sport=45210, dport=80, flags="S"))
    assert rc == TC_ACT_REDIRECT and (pkt[IP].dst, pkt[TCP].dport) == (B["ip"], 8080)
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45210, flags="SA"))
    assert rc == TC_ACT_REDIRECT and (rep[IP].src, rep[TCP].sport) == (VIP2, 80)
    assert harness.counter(CounterId.CTR_DROP_TUPLE_CLASH) == 1


def test_an_answered_flow_stays_protected_however_quiet(harness):
    """The other side of that rule: a flow its backend answered keeps the tuple while it lives."""
    setup(harness)
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)], sid=1)
    program_service(harness, VIP2, 80, "tcp", [(B["ip"], 8080)], sid=2)
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=45211, dport=80, flags="S"))
    send(harness, B, IP(src=B["ip"], dst=A["ip"]) / TCP(sport=8080, dport=45211, flags="SA"))
    stamp(harness, CtDir.CT_REPLY, time.monotonic_ns() - 60 * 10**9)
    stamp(harness, CtDir.CT_FORWARD, time.monotonic_ns() - 60 * 10**9)
    rc, _ = send(harness, A, IP(src=A["ip"], dst=VIP2) / TCP(sport=45211, dport=80, flags="S"))
    assert rc == TC_ACT_SHOT and harness.counter(CounterId.CTR_DROP_TUPLE_CLASH) == 1


def test_a_udp_flow_to_a_second_frontend_is_refused_while_the_first_lives(harness):
    setup(harness)
    program_service(harness, VIP, 53, "udp", [(B["ip"], 5353)], sid=1)
    program_service(harness, VIP2, 53, "udp", [(B["ip"], 5353)], sid=2)
    send(harness, A, IP(src=A["ip"], dst=VIP) / UDP(sport=45201, dport=53) / Raw(b"q"))
    rc, _ = send(harness, A, IP(src=A["ip"], dst=VIP2) / UDP(sport=45201, dport=53) / Raw(b"q"))
    assert rc == TC_ACT_SHOT and harness.counter(CounterId.CTR_DROP_TUPLE_CLASH) == 1
    rc, rep = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / UDP(sport=5353, dport=45201) / Raw(b"a"))
    assert (rep[IP].src, rep[UDP].sport) == (VIP, 53)
    # An expired first flow (120 s without a datagram) no longer blocks the tuple.
    stamp(harness, CtDir.CT_FORWARD, time.monotonic_ns() - 121 * 10**9)
    stamp(harness, CtDir.CT_REPLY, time.monotonic_ns() - 121 * 10**9)
    rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP2) / UDP(sport=45201, dport=53) / Raw(b"q"))
    assert rc == TC_ACT_REDIRECT and pkt[IP].dst == B["ip"]


def test_two_outside_clients_with_one_port_snated_to_one_address_do_not_share_a_flow(harness):
    """A NodePort whose backend is on another node: the client's source becomes this node's
    overlay address and keeps its port, so two clients with the same port are one 4-tuple
    at the backend. The second is refused; the first flow's replies still go to the first."""
    from ctl.dataplane.bpf.types import U32, Config
    from tests.prog.test_forwards import NODE_IP
    from tests.prog.test_hardening import from_outside
    setup(harness)
    harness.maps["config"].put(U32(value=0), Config.from_dict({
        "service_net": "10.96.0.0", "service_mask": "255.240.0.0", "snat_ip": "10.244.1.0"}))
    program_service(harness, NODE_IP, 30080, "tcp", [("10.244.2.7", 80)], sid=45)   # a pod on another node
    from_outside(harness, IP(src="198.51.100.1", dst=NODE_IP) / TCP(sport=45202, dport=30080, flags="S"))
    rc, _ = from_outside(harness, IP(src="198.51.100.2", dst=NODE_IP) / TCP(sport=45202, dport=30080, flags="S"))
    assert rc == TC_ACT_SHOT and harness.counter(CounterId.CTR_DROP_TUPLE_CLASH) == 1
    (_, v), = ((k, v.to_dict()) for k, v in entries(harness, CtDir.CT_REPLY))
    assert v["snat_ip"] == "198.51.100.1", "the reply entry still sends the first flow's replies to its client"
