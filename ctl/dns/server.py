"""The node's DNS server: UDP and TCP on the DNS VIP, answers cluster names from the
NameIndex, forwards everything else upstream (ctl/dns/upstream.py).

Threads, none of them the daemon's: one UDP loop (cluster answers inline; an upstream
query is handed to a small pool so a slow upstream never stalls cluster names), one TCP
accept loop with a thread per connection (bounded). The wire format is dnspython's.

Protocol points: one question per query (0 or several: FORMERR, as BIND); opcode other
than QUERY: NOTIMP; EDNS version > 0: BADVERS; UDP answers fit the client's size (512
bytes without EDNS, its advertised size up to 1232 with it) or are truncated (TC, empty
sections: the client retries over TCP); malformed input with a readable header gets
FORMERR, shorter input or a response sent to us is dropped; all of it is counted.
"""
from __future__ import annotations

import select
import socket
import struct
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog

from .records import NameIndex
from .upstream import Upstream

log = structlog.get_logger("atomnet.dns")

OUR_PAYLOAD = 1232          # the DNS flag day 2020 size: no IP fragmentation on any path
TCP_IDLE_SECONDS = 10.0
TCP_MAX_CONNECTIONS = 64
UPSTREAM_WORKERS = 8
ANSWER_CACHE_MAX = 65536    # memoised cluster answers (query bytes -> response bytes), per index generation
# `atomnet stats` asks the node's own server for its counters with this CHAOS TXT query
# (like BIND's version.bind); only a client on the node itself (source = the VIP) gets them.
STATS_NAME = dns.name.from_text("stats.atomnet.")


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self._c: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


class DnsServer:
    def __init__(self, index: NameIndex, upstream: Upstream, address: str, port: int = 53):
        self.index, self.upstream = index, upstream
        self.address, self.port = address, port
        self.stats = Stats()
        self._cache: dict[bytes, bytes] = {}
        self._cache_gen = -1
        self._threads: list[threading.Thread] = []
        self._stop_r, self._stop_w = socket.socketpair()
        self._tcp_slots = threading.BoundedSemaphore(TCP_MAX_CONNECTIONS)
        self.udp = self.tcp = None
        self.pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.udp.bind((self.address, self.port))
            self.port = self.udp.getsockname()[1]   # port 0 (tests): TCP takes the port UDP got
            self.tcp.bind((self.address, self.port))
            self.tcp.listen(128)
        except OSError:
            self.udp.close()
            self.tcp.close()
            raise
        self.pool = ThreadPoolExecutor(UPSTREAM_WORKERS, thread_name_prefix="dns-upstream")
        for target, name in ((self._udp_loop, "dns-udp"), (self._tcp_loop, "dns-tcp")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        if self._stop_w.fileno() < 0:
            return   # stopped already
        self._stop_w.send(b"x")   # wakes both loops' select()
        for t in self._threads:
            t.join(timeout=5)
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
        for s in (self.udp, self.tcp, self._stop_r, self._stop_w):
            if s:
                s.close()

    # ------------------------------------------------------------------ transports

    def _udp_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self.udp, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                wire, addr = self.udp.recvfrom(65535)
            except OSError:
                continue
            self.stats.add("queries_udp")
            try:
                reply = self.handle(wire, addr[0], tcp=False)
            except Exception as exc:   # a bug must cost one answer, not the server
                self.stats.add("internal_errors")
                log.exception("dns_handle_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if isinstance(reply, Forward):
                self.pool.submit(self._forward_udp, reply, addr)
            elif reply is not None:
                self._sendto(reply, addr)

    def _sendto(self, data: bytes, addr) -> None:
        try:
            self.udp.sendto(data, addr)
        except OSError as exc:
            self.stats.add("send_errors")
            log.debug("dns_send_failed", client=addr[0], error=str(exc))

    def _forward_udp(self, fwd: "Forward", addr) -> None:
        self._sendto(self.finish_forward(fwd), addr)

    def _tcp_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self.tcp, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                conn, addr = self.tcp.accept()
            except OSError:
                continue
            if not self._tcp_slots.acquire(blocking=False):
                self.stats.add("tcp_refused_busy")
                conn.close()
                continue
            threading.Thread(target=self._tcp_conn, args=(conn, addr), name="dns-tcp-conn", daemon=True).start()

    def _tcp_conn(self, conn: socket.socket, addr) -> None:
        try:
            conn.settimeout(TCP_IDLE_SECONDS)
            while True:
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                wire = _recv_exact(conn, struct.unpack("!H", head)[0])
                if wire is None:
                    return
                self.stats.add("queries_tcp")
                reply = self.handle(wire, addr[0], tcp=True)
                if isinstance(reply, Forward):
                    reply = self.finish_forward(reply)
                if reply is None:
                    return   # dropped: close, as a server does with garbage on a stream
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except (OSError, socket.timeout):
            pass
        except Exception as exc:
            self.stats.add("internal_errors")
            log.exception("dns_tcp_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
            self._tcp_slots.release()

    # ------------------------------------------------------------------ one query

    def handle(self, wire: bytes, client: str, tcp: bool) -> "bytes | Forward | None":
        """The response bytes, None to drop, or a Forward for the upstream."""
        gen = self.index.generation
        if gen != self._cache_gen:
            self._cache, self._cache_gen = {}, gen
        # This thread's view: an answer computed while the index changes lands in a dict
        # that the next query discards, never in the new generation's.
        cache = self._cache
        key = (b"T" if tcp else b"U") + wire[2:]
        hit = cache.get(key)
        if hit is not None:
            self.stats.add("answered_cached")
            return wire[:2] + hit
        try:
            query = dns.message.from_wire(wire)
        except dns.message.ShortHeader:
            self.stats.add("malformed_dropped")
            return None
        except Exception as exc:   # dnspython raises a zoo: BadPointer, LabelTooLong, NameTooLong, FormError...
            return self._formerr_raw(wire, type(exc).__name__)
        if query.flags & dns.flags.QR:
            self.stats.add("malformed_dropped")   # a response sent to a server: never answer it (loops)
            return None
        if query.opcode() != dns.opcode.QUERY:
            return self._reply(query, dns.rcode.NOTIMP, tcp, "notimp")
        if len(query.question) != 1:
            self.stats.add("malformed_formerr")
            return self._reply(query, dns.rcode.FORMERR, tcp, None, keep_question=False)
        if query.edns > 0:
            return self._reply(query, dns.rcode.BADVERS, tcp, "badvers")
        q = query.question[0]
        if q.rdclass == dns.rdataclass.CH and q.name == STATS_NAME and q.rdtype == dns.rdatatype.TXT:
            return self._stats_reply(query, client, tcp)
        if q.rdclass != dns.rdataclass.IN:
            return self._reply(query, dns.rcode.REFUSED, tcp, "refused")
        ans = self.index.lookup(q.name, q.rdtype)
        if ans is None:
            return Forward(query, tcp)
        response = self._response(query)
        response.flags |= dns.flags.AA
        response.set_rcode(ans.rcode)
        response.answer, response.authority, response.additional = ans.answer, ans.authority, ans.additional
        self.stats.add({dns.rcode.NXDOMAIN: "answered_nxdomain"}.get(ans.rcode, "answered_cluster" if ans.answer
                                                                             else "answered_nodata"))
        out = self._render(response, query, tcp)
        if len(cache) < ANSWER_CACHE_MAX:
            cache[key] = out[2:]
        return out

    def finish_forward(self, fwd: "Forward") -> bytes:
        response = self.upstream.resolve(fwd.query, fwd.tcp)
        if response is None:
            self.stats.add("upstream_servfail")
            return self._reply(fwd.query, dns.rcode.SERVFAIL, fwd.tcp, None)
        self.stats.add("forwarded")
        response.id = fwd.query.id
        return self._render(response, fwd.query, fwd.tcp)

    def _response(self, query: dns.message.Message) -> dns.message.Message:
        return dns.message.make_response(query, recursion_available=True, our_payload=OUR_PAYLOAD)

    def _reply(self, query, rcode, tcp: bool, counter: str | None, keep_question: bool = True) -> bytes:
        if counter:
            self.stats.add(counter)
        response = self._response(query)
        if not keep_question:
            response.question = []
        response.set_rcode(rcode)
        return self._render(response, query, tcp)

    def _render(self, response: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
        limit = 65535 if tcp else (max(512, min(query.payload, OUR_PAYLOAD)) if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            self.stats.add("truncated")
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    def _formerr_raw(self, wire: bytes, why: str) -> bytes | None:
        """A query we cannot parse but whose header we can read: FORMERR with its id (RFC 1035 4.1.1)."""
        ident, flags = struct.unpack("!HH", wire[:4])
        if flags & dns.flags.QR:
            self.stats.add("malformed_dropped")
            return None
        self.stats.add("malformed_formerr")
        log.debug("dns_malformed", error=why)
        response = dns.message.Message(id=ident)
        response.flags = dns.flags.QR | (flags & dns.flags.RD)
        response.set_opcode(dns.opcode.from_flags(flags))
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()

    def _stats_reply(self, query, client: str, tcp: bool) -> bytes:
        if client != self.address:
            return self._reply(query, dns.rcode.REFUSED, tcp, "refused")
        self.stats.add("queries_tcp" if tcp else "queries_udp", -1)   # reading the counters must not move them
        response = self._response(query)
        texts = [f'"{k}={v}"' for k, v in sorted(self.stats.snapshot().items())] or ['"queries_udp=0"']
        response.answer = [dns.rrset.from_text_list(STATS_NAME, 0, dns.rdataclass.CH, dns.rdatatype.TXT, texts)]
        return self._render(response, query, tcp)


class Forward:
    """A query that is not ours: to be resolved upstream (off the UDP loop)."""
    __slots__ = ("query", "tcp")

    def __init__(self, query: dns.message.Message, tcp: bool):
        self.query, self.tcp = query, tcp


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
