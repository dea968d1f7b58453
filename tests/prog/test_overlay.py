"""Overlay golden packets: from_pod encapsulates to the node owning the destination
(inner MACs: our VtepMAC -> the remote VtepMAC, redirect to the VXLAN device),
to_overlay does the same for the node's own traffic, from_overlay delivers to local pods
and translates replies of flows balanced on this node."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from ctl.dataplane.bpf.types import Config, CounterId, TunnelInfo, TunnelKey, U32
from tests.prog.conftest import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, program_service
from tests.prog.test_services import A, VIP, checksums_ok, setup

OUR_VTEP, REMOTE_VTEP, REMOTE_NODE = "02:aa:00:00:00:01", "0e:11:22:33:44:55", "192.168.100.2"
REMOTE_POD = "10.244.2.7"
OVERLAY_IFINDEX = 99


def from_remote_vtep(inner: bytes) -> bytes:
    """What the VXLAN device hands up after decapsulation: the remote VTEP's inner Ethernet
    header (flannel's rule: to our VtepMAC) and the inner IPv4 packet, as given (any bytes)."""
    return bytes(Ether(src=REMOTE_VTEP, dst=OUR_VTEP, type=0x0800)) + inner


def with_overlay(h):
    setup(h)
    h.maps["config"].put(U32(value=0), Config.from_dict({
        "service_net": "10.96.0.0", "service_mask": "255.240.0.0", "overlay_ifindex": OVERLAY_IFINDEX, "vni": 1,
        "vtep_mac": OUR_VTEP, "snat_ip": "10.244.1.0"}))
    h.maps["tunnels"].put(TunnelKey.from_dict({"prefixlen": 24, "ip": "10.244.2.0"}),
                          TunnelInfo.from_dict({"node_ip": REMOTE_NODE, "vtep_mac": REMOTE_VTEP}))


def test_from_pod_encapsulates_to_the_owning_node(harness):
    with_overlay(harness)
    frame = bytes(Ether(src=A["mac"], dst=A["node_mac"]) / IP(src=A["ip"], dst=REMOTE_POD) / TCP(dport=80, flags="S"))
    rc, out = harness.run("from_pod", frame, ingress_ifindex=A["ifindex"])
    assert rc == TC_ACT_REDIRECT
    pkt = Ether(out)
    assert (pkt.src, pkt.dst) == (OUR_VTEP, REMOTE_VTEP), "flannel's rule: inner destination = remote VtepMAC"
    assert pkt[IP].dst == REMOTE_POD and pkt[IP].src == A["ip"]
    assert harness.counter(CounterId.CTR_FWD_OVERLAY) == 1


def test_no_owner_goes_to_the_stack(harness):
    with_overlay(harness)
    frame = bytes(Ether(src=A["mac"], dst=A["node_mac"]) / IP(src=A["ip"], dst="10.244.9.9") / TCP(dport=80))
    rc, out = harness.run("from_pod", frame, ingress_ifindex=A["ifindex"])
    assert rc == TC_ACT_OK and out == frame


def test_to_overlay_sets_the_key_for_the_nodes_own_traffic(harness):
    with_overlay(harness)
    frame = bytes(Ether(src=OUR_VTEP, dst="00:00:00:00:00:00") / IP(src="10.244.1.0", dst=REMOTE_POD) / TCP(dport=80))
    rc, out = harness.run("to_overlay", frame)
    assert rc == TC_ACT_OK and Ether(out).dst == REMOTE_VTEP
    stray = bytes(Ether() / IP(src="10.244.1.0", dst="10.244.9.9") / TCP(dport=80))
    rc, _ = harness.run("to_overlay", stray)
    assert rc == TC_ACT_SHOT and harness.counter(CounterId.CTR_DROP_NO_TUNNEL) == 1


def test_from_overlay_delivers_to_the_local_pod(harness):
    with_overlay(harness)
    frame = from_remote_vtep(bytes(IP(src=REMOTE_POD, dst=A["ip"], ttl=63) / TCP(sport=80, dport=4000)))
    rc, out = harness.run("from_overlay", frame, ingress_ifindex=OVERLAY_IFINDEX)
    assert rc == TC_ACT_REDIRECT
    pkt = Ether(out)
    assert (pkt.dst, pkt.src) == (A["mac"], A["node_mac"]) and pkt[IP].ttl == 62
    assert harness.counter(CounterId.CTR_FROM_OVERLAY) == 1


def test_reply_from_a_remote_backend_is_translated_on_the_clients_node(harness):
    with_overlay(harness)
    program_service(harness, VIP, 80, "tcp", [(REMOTE_POD, 8080)])
    syn = bytes(Ether(src=A["mac"], dst=A["node_mac"]) / IP(src=A["ip"], dst=VIP) / TCP(sport=41000, dport=80, flags="S"))
    rc, out = harness.run("from_pod", syn, ingress_ifindex=A["ifindex"])
    assert rc == TC_ACT_REDIRECT and Ether(out)[IP].dst == REMOTE_POD and Ether(out).dst == REMOTE_VTEP
    reply = from_remote_vtep(bytes(IP(src=REMOTE_POD, dst=A["ip"]) / TCP(sport=8080, dport=41000, flags="SA")))
    rc, out = harness.run("from_overlay", reply, ingress_ifindex=OVERLAY_IFINDEX)
    pkt = Ether(out)
    assert rc == TC_ACT_REDIRECT and (pkt[IP].src, pkt[TCP].sport, pkt.dst) == (VIP, 80, A["mac"])
    assert checksums_ok(pkt)
