"""What the CLI asks of the node's DNS: `dns list` (computed from the store by the same
index the server uses, so it needs no daemon), `dns query` and the server's counters
(real queries to the server on the DNS VIP, from the node itself)."""
from __future__ import annotations

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.rcode

from ..errors import AtomnetError
from ..node import dnsdevice
from ..state.store import Store
from .records import PREFIXES, NameIndex
from .server import STATS_NAME

TIMEOUT = 2.0


def list_records(store: Store) -> list[dict]:
    items = []
    for prefix in PREFIXES:
        kvs, _ = store.list(prefix)
        items += [(kv.key, kv.value) for kv in kvs]
    index = NameIndex()
    index.load(items)
    return index.rows()


def _ask(vip: str, msg: dns.message.Message, tcp: bool) -> tuple[dns.message.Message, str]:
    # Only ever the node's own server: without the VIP on lo a query would be routed away.
    if not dnsdevice.present(vip):
        raise AtomnetError(f"this node does not hold the DNS VIP {vip}: is the daemon running here?")
    try:
        if not tcp:
            response = dns.query.udp(msg, vip, timeout=TIMEOUT)
            if not response.flags & dns.flags.TC:
                return response, "udp"
        return dns.query.tcp(msg, vip, timeout=TIMEOUT), "tcp"
    except (dns.exception.Timeout, OSError) as exc:
        raise AtomnetError(f"no answer from this node's DNS at {vip}:53 ({type(exc).__name__}): is the daemon "
                           "running here?") from None


def query(vip: str, name: str, rdtype: str = "A", tcp: bool = False) -> dict:
    try:
        qname = dns.name.from_text(name)
        qtype = dns.rdatatype.from_text(rdtype.upper())
    except (dns.exception.DNSException, ValueError) as exc:
        raise AtomnetError(f"invalid query {name!r} {rdtype!r}: {exc}") from None
    response, transport = _ask(vip, dns.message.make_query(qname, qtype, use_edns=0, payload=1232), tcp)

    def rows(section):
        return [{"name": rrset.name.to_text(), "ttl": rrset.ttl, "type": dns.rdatatype.to_text(rrset.rdtype),
                 "data": rd.to_text()} for rrset in section for rd in rrset]
    return {"server": vip, "transport": transport, "rcode": dns.rcode.to_text(response.rcode()),
            "authoritative": bool(response.flags & dns.flags.AA), "answer": rows(response.answer),
            "authority": rows(response.authority), "additional": rows(response.additional)}


def server_stats(vip: str) -> dict[str, int] | None:
    """The server's counters (None when no server answers)."""
    msg = dns.message.make_query(STATS_NAME, dns.rdatatype.TXT, rdclass=dns.rdataclass.CH)
    try:
        response, _ = _ask(vip, msg, False)
    except AtomnetError:
        return None
    out = {}
    for rrset in response.answer:
        for rd in rrset:
            for s in rd.strings:
                key, _, value = s.decode().partition("=")
                out[key] = int(value)
    return out
