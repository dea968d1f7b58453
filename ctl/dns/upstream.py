"""Names outside the cluster: forwarded to the node's own resolvers, with a small cache.

Failure is fast: each upstream gets one try of at most TRY_SECONDS, the whole query at
most BUDGET_SECONDS, and an upstream that timed out or refused is skipped for
DOWN_SECONDS (so while every upstream is down a query gets SERVFAIL at once instead of
waiting out a timeout per query)."""
from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import structlog

from ..state.model import ValidationError

log = structlog.get_logger("atomnet.dns")

TRY_SECONDS = 1.0
BUDGET_SECONDS = 2.0
DOWN_SECONDS = 5.0
CACHE_ENTRIES = 4096
CACHE_MAX_TTL = 300      # a cached upstream answer is kept at most this long ...
NEGATIVE_MAX_TTL = 30    # ... and an NXDOMAIN/NODATA at most this long


def parse_upstream(text: str) -> tuple[str, int]:
    """IP[:PORT] (IPv4)."""
    host, sep, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    try:
        ipaddress.IPv4Address(host)
        number = int(port) if sep else 53
    except ValueError:
        raise ValidationError(f"invalid upstream {text!r}: use IP[:PORT], e.g. 192.0.2.53 or 192.0.2.53:5353") from None
    if not 1 <= number <= 65535:
        raise ValidationError(f"invalid upstream {text!r}: port must be 1-65535")
    return host, number


def system_upstreams(path: str = "/etc/resolv.conf", exclude: set[str] = frozenset()) -> list[tuple[str, int]]:
    """The node's own resolvers (IPv4 nameserver lines), minus our own VIP (no loop)."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and parts[1] not in exclude:
            try:
                ipaddress.IPv4Address(parts[1])
            except ValueError:
                continue
            out.append((parts[1], 53))
    return out


class Upstream:
    def __init__(self, servers: list[tuple[str, int]]):
        self.servers = list(servers)
        self._down_until: dict[tuple[str, int], float] = {}
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def resolve(self, query: dns.message.Message, tcp: bool) -> dns.message.Message | None:
        """The upstream's answer (TTLs aged if cached), or None: SERVFAIL."""
        q = query.question[0]
        key = (q.name, q.rdtype, q.rdclass, bool(query.ednsflags & dns.flags.DO), tcp)
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                expires, stored, wire = entry
                if expires > now:
                    self._cache.move_to_end(key)
                    self.hits += 1
                    return _aged(wire, int(now - stored))
                del self._cache[key]
        deadline = now + BUDGET_SECONDS
        for server in self.servers:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._down_until.get(server, 0) > time.monotonic():
                continue
            try:
                if tcp:
                    response = dns.query.tcp(query, server[0], timeout=min(TRY_SECONDS, left), port=server[1])
                else:
                    response = dns.query.udp(query, server[0], timeout=min(TRY_SECONDS, left), port=server[1],
                                             ignore_unexpected=True)
            except (dns.exception.Timeout, OSError) as exc:
                self._down_until[server] = time.monotonic() + DOWN_SECONDS
                log.warning("dns_upstream_down", upstream=f"{server[0]}:{server[1]}", error=type(exc).__name__,
                            skip_seconds=DOWN_SECONDS)
                continue
            except dns.exception.DNSException as exc:   # a garbled reply: try the next one
                log.warning("dns_upstream_bad_reply", upstream=f"{server[0]}:{server[1]}", error=str(exc))
                continue
            if response.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                continue
            self._down_until.pop(server, None)
            self._store(key, response)
            return response
        return None

    def _store(self, key, response: dns.message.Message) -> None:
        if response.flags & dns.flags.TC:
            return
        ttls = [rrset.ttl for section in (response.answer, response.authority) for rrset in section]
        negative = response.rcode() == dns.rcode.NXDOMAIN or not response.answer
        ttl = min(ttls + [NEGATIVE_MAX_TTL if negative else CACHE_MAX_TTL])
        if ttl <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._cache[key] = (now + ttl, now, response.to_wire())
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)


def _aged(wire: bytes, elapsed: int) -> dns.message.Message:
    msg = dns.message.from_wire(wire)
    for section in (msg.answer, msg.authority, msg.additional):
        for rrset in section:
            if rrset.rdtype != dns.rdatatype.OPT:
                rrset.ttl = max(0, rrset.ttl - elapsed)
    return msg
