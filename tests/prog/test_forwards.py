"""from_netdev golden packets: a published port (or NodePort) translated to its pod, TCP
and UDP, checksums checked by scapy; the reply translated back in from_pod; traffic that
is not for a published port passes untouched."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.prog.conftest import TC_ACT_OK, TC_ACT_REDIRECT, program_service
from tests.prog.test_services import B, checksums_ok, setup

NODE_IP, CLIENT = "192.168.100.1", "192.168.100.77"
UPLINK = 2


def from_outside(h, l4):
    frame = bytes(Ether(src="02:00:00:00:99:99", dst="02:00:00:00:99:01") / IP(src=CLIENT, dst=NODE_IP) / l4)
    rc, out = h.run("from_netdev", frame, ingress_ifindex=UPLINK)
    return rc, Ether(out)


def test_published_tcp_port_dnat_keeps_client_and_reply_comes_from_the_node(harness):
    setup(harness)
    program_service(harness, NODE_IP, 8080, "tcp", [(B["ip"], 80)], sid=40)
    rc, pkt = from_outside(harness, TCP(sport=50000, dport=8080, flags="S") / Raw(b"GET"))
    assert rc == TC_ACT_REDIRECT and pkt.dst == B["mac"]
    assert (pkt[IP].src, pkt[IP].dst, pkt[TCP].dport) == (CLIENT, B["ip"], 80), "client address kept"
    assert checksums_ok(pkt)
    reply = bytes(Ether(src=B["mac"], dst=B["node_mac"]) / IP(src=B["ip"], dst=CLIENT) / TCP(sport=80, dport=50000, flags="SA"))
    rc, rep = harness.run("from_pod", reply, ingress_ifindex=B["ifindex"])
    rep = Ether(rep)
    assert (rep[IP].src, rep[TCP].sport, rep[IP].dst) == (NODE_IP, 8080, CLIENT)
    assert checksums_ok(rep)


def test_published_udp_port(harness):
    setup(harness)
    program_service(harness, NODE_IP, 5353, "udp", [(B["ip"], 53)], sid=41)
    rc, pkt = from_outside(harness, UDP(sport=40000, dport=5353) / Raw(b"query"))
    assert rc == TC_ACT_REDIRECT and (pkt[IP].dst, pkt[UDP].dport) == (B["ip"], 53)
    assert checksums_ok(pkt)


def test_other_traffic_passes_untouched(harness):
    setup(harness)
    program_service(harness, NODE_IP, 8080, "tcp", [(B["ip"], 80)], sid=42)
    for l4 in (TCP(sport=50000, dport=22, flags="S"), UDP(sport=1, dport=8472)):
        frame = bytes(Ether() / IP(src=CLIENT, dst=NODE_IP) / l4)
        rc, out = harness.run("from_netdev", frame, ingress_ifindex=UPLINK)
        assert rc == TC_ACT_OK and out == frame
