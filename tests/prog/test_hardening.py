"""Hardening, golden packets: an ICMP error about a translated flow is translated only
when it comes from the flow's backend; fragments to a host port / NodePort (from_netdev)
follow their first fragment like service fragments do in from_pod."""
from __future__ import annotations

from scapy.layers.inet import ICMP, IP, IPerror, UDP, UDPerror, defragment, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctl.dataplane.bpf.types import CounterId
from tests.prog.conftest import TC_ACT_OK, TC_ACT_REDIRECT, program_service
from tests.prog.test_forwards import CLIENT, NODE_IP, UPLINK
from tests.prog.test_services import A, B, C, D, VIP, send, setup


def test_icmp_error_about_a_service_flow_is_translated_only_from_its_backend(harness):
    setup(harness)
    program_service(harness, VIP, 53, "udp", [(B["ip"], 5353)])
    send(harness, A, IP(src=A["ip"], dst=VIP) / UDP(sport=30010, dport=53) / Raw(b"q"))
    offending = bytes(IP(src=A["ip"], dst=B["ip"]) / UDP(sport=30010, dport=5353) / Raw(b"q"))[:28]
    frag_needed = ICMP(type=3, code=4, nexthopmtu=576)
    # C is not the flow's backend: its forged frag-needed must not be turned into the VIP's.
    rc, err = send(harness, C, IP(src=C["ip"], dst=A["ip"]) / frag_needed / offending)
    assert rc == TC_ACT_REDIRECT and err.dst == A["mac"]
    assert err[IP].src == C["ip"] and (err[IPerror].dst, err[UDPerror].dport) == (B["ip"], 5353), "left untranslated"
    assert harness.counter(CounterId.CTR_ICMP_ERROR_NAT) == 0
    rc, err = send(harness, B, IP(src=B["ip"], dst=A["ip"]) / frag_needed / offending)
    assert rc == TC_ACT_REDIRECT and err[IP].src == VIP and (err[IPerror].dst, err[UDPerror].dport) == (VIP, 53)
    assert harness.counter(CounterId.CTR_ICMP_ERROR_NAT) == 1


def from_outside(h, ip):
    frame = bytes(Ether(src="02:00:00:00:99:99", dst="02:00:00:00:99:01") / ip)
    rc, out = h.run("from_netdev", frame, ingress_ifindex=UPLINK)
    return rc, Ether(out)


def test_fragments_to_a_host_port_follow_their_first_fragment(harness):
    setup(harness)
    program_service(harness, NODE_IP, 5353, "udp", [(B["ip"], 53)], sid=43)
    frags = fragment(IP(src=CLIENT, dst=NODE_IP, id=777) / UDP(sport=40001, dport=5353) / Raw(b"x" * 3000),
                     fragsize=1200)
    assert len(frags) == 3
    outs = []
    for f in frags:
        rc, pkt = from_outside(harness, f)
        assert rc == TC_ACT_REDIRECT and pkt.dst == B["mac"], "every fragment to the pod, not to the node's stack"
        assert (pkt[IP].src, pkt[IP].dst) == (CLIENT, B["ip"])
        ip = IP(bytes(pkt[IP]))
        check, ip.chksum = ip.chksum, None
        assert IP(bytes(ip)).chksum == check, "each fragment's IP checksum"
        outs.append(pkt[IP])
    whole = IP(bytes(defragment(outs)[0]))
    assert whole[UDP].dport == 53 and bytes(whole[UDP].payload) == b"x" * 3000
    check, whole[UDP].chksum = whole[UDP].chksum, None
    assert IP(bytes(whole))[UDP].chksum == check, "the UDP checksum of the reassembled datagram"
    # Fragments of a datagram to a port that is not published stay the node's own.
    other = fragment(IP(src=CLIENT, dst=NODE_IP, id=778) / UDP(sport=40002, dport=9999) / Raw(b"y" * 3000),
                     fragsize=1200)
    for f in other:
        frame = bytes(Ether() / f)
        rc, out = harness.run("from_netdev", frame, ingress_ifindex=UPLINK)
        assert rc == TC_ACT_OK and out == frame
    # A later fragment whose first one was never seen: to the stack untouched (the port is unknown).
    orphan = bytes(Ether() / fragment(IP(src=CLIENT, dst=NODE_IP, id=779) / UDP(sport=40003, dport=5353)
                                      / Raw(b"z" * 3000), fragsize=1200)[1])
    rc, out = harness.run("from_netdev", orphan, ingress_ifindex=UPLINK)
    assert rc == TC_ACT_OK and out == orphan


def test_the_nodes_own_connection_to_a_loopback_port_is_snated(harness):
    """A node with no uplink publishes on 127.0.0.1: the pod cannot answer 127.0.0.1, so
    from_netdev on lo SNATs to the node's overlay address, and from_pod sends the reply back."""
    from ctl.dataplane.bpf.types import U32, Config
    from scapy.layers.inet import TCP
    setup(harness)
    harness.maps["config"].put(U32(value=0), Config.from_dict({
        "service_net": "10.96.0.0", "service_mask": "255.240.0.0", "snat_ip": "10.244.1.0"}))
    program_service(harness, "127.0.0.1", 8080, "tcp", [(B["ip"], 80)], sid=44)
    frame = bytes(Ether(src="00:00:00:00:00:00", dst="00:00:00:00:00:00") / IP(src="127.0.0.1", dst="127.0.0.1")
                  / TCP(sport=50500, dport=8080, flags="S"))
    rc, out = harness.run("from_netdev", frame, ingress_ifindex=1)
    pkt = Ether(out)
    assert rc == TC_ACT_REDIRECT and (pkt[IP].src, pkt[IP].dst, pkt[TCP].dport) == ("10.244.1.0", B["ip"], 80)
    reply = bytes(Ether(src=B["mac"], dst=B["node_mac"]) / IP(src=B["ip"], dst="10.244.1.0")
                  / TCP(sport=80, dport=50500, flags="SA"))
    rc, out = harness.run("from_pod", reply, ingress_ifindex=B["ifindex"])
    rep = Ether(out)
    assert (rep[IP].src, rep[TCP].sport, rep[IP].dst, rep[TCP].dport) == ("127.0.0.1", 8080, "127.0.0.1", 50500)


# ------------------------------------------------------------------ claims the README makes, now tested

def test_udp_flows_of_a_removed_backend_are_flushed_and_rebalanced(harness):
    """kube-proxy's `conntrack -D`: a UDP flow pinned to a backend that left the service
    would keep going to it; the daemon's flush (reconcile.flush_udp_flows) frees it."""
    from ctl.dataplane.reconcile import flush_udp_flows
    from scapy.layers.inet import TCP
    setup(harness)
    program_service(harness, VIP, 53, "udp", [(B["ip"], 5353)])
    program_service(harness, VIP, 80, "tcp", [(B["ip"], 8080)], sid=2)
    dgram = IP(src=A["ip"], dst=VIP) / UDP(sport=30020, dport=53) / Raw(b"q")
    assert send(harness, A, dgram)[1][IP].dst == B["ip"]
    send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=30021, dport=80, flags="S"))
    program_service(harness, VIP, 53, "udp", [(C["ip"], 5353)])   # B left the service
    assert send(harness, A, dgram)[1][IP].dst == B["ip"], "without the flush the flow stays pinned to B"
    flushed = flush_udp_flows(harness.maps["conntrack"], [{"service_id": 1, "ip": B["ip"], "port": 5353}])
    assert flushed == 2, "its forward and reply entries"
    assert send(harness, A, dgram)[1][IP].dst == C["ip"], "the next datagram picks a live backend"
    tcp = [k for k, _ in harness.maps["conntrack"].items() if k.proto == 6]
    assert len(tcp) == 2, "TCP flows are never flushed (they finish on the terminating pod)"


def test_affinity_times_out_and_falls_back_to_maglev(harness):
    import time
    from ctl.dataplane.bpf.types import AffinityKey, AffinityValue, BackendKey
    from scapy.layers.inet import TCP
    setup(harness)
    backends = [(B["ip"], 80), (C["ip"], 80), (D["ip"], 80)]
    program_service(harness, VIP, 80, "tcp", backends, affinity=600)
    affinity = harness.maps["affinity"]
    key = AffinityKey.from_dict({"client": A["ip"], "service_id": 1})

    def connect(sport):   # a SYN, then an RST so the tuple can be reopened (balanced afresh)
        rc, pkt = send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=sport, dport=80, flags="S"))
        send(harness, A, IP(src=A["ip"], dst=VIP) / TCP(sport=sport, dport=80, flags="R"))
        return pkt[IP].dst

    pinned = connect(31000)
    # A source port whose Maglev pick is another backend (affinity cleared before each try).
    for sport in range(31001, 31100):
        affinity.delete(key)
        if (maglev_pick := connect(sport)) != pinned:
            break
    else:
        raise AssertionError("every port hashed to one backend")

    def pin(age_s: float):
        value = AffinityValue.from_dict({"last_used_ns": time.monotonic_ns() - int(age_s * 1e9),
                                         "backend": {"ip": pinned, "port": 80}})
        affinity.put(key, value)

    pin(1)
    assert connect(sport) == pinned, "within the timeout the client's backend wins over Maglev"
    pin(601)
    assert connect(sport) == maglev_pick, "after the timeout: Maglev again"
    assert affinity.get(key).backend.to_dict()["ip"] == maglev_pick, "and the affinity follows the new pick"
    pin(-0.5)   # stamped by another CPU after this packet's clock read: the age is negative
    assert connect(sport) == pinned, "an entry younger than our clock read is within the timeout"
    pin(1)
    harness.maps["backends"].delete(BackendKey.from_dict({"service_id": 1, "ip": pinned, "port": 80}))
    assert connect(sport) == maglev_pick, "a pinned backend that left the service is not used"
