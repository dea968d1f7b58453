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

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from ctl.dataplane.bpf.types import CtDir, CounterId
from tests.prog.conftest import TC_ACT_REDIRECT, program_service
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
