"""Conntrack timeouts, golden packets: a flow idle for just less than its timeout keeps its
entry, just more and the next packet starts a new flow (a new backend pick). The timeouts'
one home is bpf/include/conntrack.h; this test reads them from there. Ageing an entry is
writing its last_seen_ns: bpf_ktime_get_ns() is CLOCK_MONOTONIC, Python's monotonic_ns()."""
from __future__ import annotations

import re
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP

from ctl.dataplane.bpf.types import CounterId, CtDir
from tests.conftest import require_root
from tests.e2e.rig import REPO
from tests.prog.conftest import TC_ACT_REDIRECT, program_service
from tests.prog.test_services import A, B, VIP, send, setup

NSEC = 10**9
MARGIN_S = 2   # far more than the microseconds between ageing an entry and the next packet


def timeouts() -> dict[str, int]:
    """CT_TIMEOUT_* from conntrack.h, in nanoseconds."""
    text = (REPO / "bpf" / "include" / "conntrack.h").read_text()
    out = {}
    for name, expr in re.findall(r"#define (CT_TIMEOUT_\w+)\s+\(([^)]*)\)", text):
        assert re.fullmatch(r"[\d\s*]+NSEC", expr), expr
        out[name] = eval(expr.replace("NSEC", str(NSEC)))   # digits, spaces and * only (checked above)
    return out


def age(h, proto: int, idle_ns: int) -> int:
    """Makes every entry of proto look idle for idle_ns; returns how many."""
    n = 0
    for key, entry in list(h.maps["conntrack"].items()):
        if key.proto == proto:
            entry.last_seen_ns = time.monotonic_ns() - idle_ns
            h.maps["conntrack"].put(key, entry)
            n += 1
    return n


def new_flows(h) -> int:
    return h.counter(CounterId.CTR_LB_NEW_FLOW)


CASES = {
    # name: (proto, the packet that opens the flow, a packet that may close it, the timeout, a later packet)
    "tcp_established": (6, TCP(sport=40000, dport=80, flags="S"), None, "CT_TIMEOUT_TCP",
                        TCP(sport=40000, dport=80, flags="A")),
    "tcp_closing": (6, TCP(sport=40001, dport=80, flags="S"), TCP(sport=40001, dport=80, flags="FA"),
                    "CT_TIMEOUT_CLOSING", TCP(sport=40001, dport=80, flags="A")),
    "udp": (17, UDP(sport=40002, dport=53), None, "CT_TIMEOUT_OTHER", UDP(sport=40002, dport=53)),
}


@pytest.mark.parametrize("case", CASES)
def test_flow_expires_after_its_timeout_and_not_before(harness, case):
    require_root()
    proto, opening, closing, timeout_name, later = CASES[case]
    timeout = timeouts()[timeout_name]
    setup(harness)
    program_service(harness, VIP, opening.dport, "tcp" if proto == 6 else "udp", [(B["ip"], 8080)])
    for pkt in filter(None, (opening, closing)):
        rc, _ = send(harness, A, IP(src=A["ip"], dst=VIP) / pkt)
        assert rc == TC_ACT_REDIRECT
    assert new_flows(harness) == 1
    assert age(harness, proto, timeout - MARGIN_S * NSEC) == 2   # forward and reply entries
    send(harness, A, IP(src=A["ip"], dst=VIP) / later)
    assert new_flows(harness) == 1, f"{case}: idle {timeout / NSEC - MARGIN_S} s, still the same flow"
    fwd = [v for k, v in harness.maps["conntrack"].items() if k.dir == CtDir.CT_FORWARD]
    assert fwd and fwd[0].last_seen_ns > time.monotonic_ns() - NSEC, "the packet refreshed the entry"
    age(harness, proto, timeout + MARGIN_S * NSEC)
    send(harness, A, IP(src=A["ip"], dst=VIP) / later)
    assert new_flows(harness) == 2, f"{case}: idle {timeout / NSEC + MARGIN_S} s, a new flow"


def test_the_timeouts_are_what_the_readme_says():
    t = timeouts()
    assert (t["CT_TIMEOUT_TCP"], t["CT_TIMEOUT_CLOSING"], t["CT_TIMEOUT_OTHER"]) == (6 * 3600 * NSEC, 10 * NSEC,
                                                                                      120 * NSEC)
