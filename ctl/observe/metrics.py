"""Prometheus metrics for the daemon (prometheus-client). Dataplane numbers are read from
the maps at scrape time by a custom collector, so a scrape always sees the kernel's
current values and the daemon keeps no copies of them."""
from __future__ import annotations

import errno
import socket
import threading
from typing import Callable

import ctypes as ct

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..dataplane.bpf import syscalls as sc
from ..dataplane.bpf.maps import Map, possible_cpus
from ..dataplane.bpf.types import BackendKey
from ..errors import AtomnetError
from ..state.validate import INVALID, KINDS

DEFAULT_METRICS_HOST = "127.0.0.1"

_PROTO_NAMES = {6: "tcp", 17: "udp"}


def dataplane_counters(counters: Map) -> list[dict]:
    """The dataplane's outcome counters (per-CPU array), summed over CPUs."""
    from ..dataplane.bpf.types import CounterId
    rows = {}
    for key, per_cpu in counters.items():
        rows[key.value] = (sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu))
    return [{"counter": cid.name.removeprefix("CTR_").lower(), "packets": rows.get(cid, (0, 0))[0],
             "bytes": rows.get(cid, (0, 0))[1]} for cid in CounterId if cid != CounterId.CTR_MAX]


def backend_totals(backends: Map) -> tuple[np.ndarray, np.ndarray]:
    """(packets, bytes) per service-port id, from the per-CPU backend counters: batch lookups
    summed with numpy (100 000 backends in tens of milliseconds)."""
    cpus = possible_cpus()
    ksize, vsize = ct.sizeof(BackendKey), 16 * cpus
    keys, values, count = sc.lookup_batch(backends.fd, ksize, vsize, backends.info.max_entries)
    if not count:
        return np.zeros(0), np.zeros(0)
    ids = np.frombuffer(keys, dtype=np.uint32).reshape(count, ksize // 4)[:, 0]
    vals = np.frombuffer(values, dtype=np.uint64).reshape(count, cpus, 2).sum(axis=1)
    size = int(ids.max()) + 1
    return np.bincount(ids, weights=vals[:, 0], minlength=size), np.bincount(ids, weights=vals[:, 1], minlength=size)


def frontend_counters(backends: Map, frontends: dict, names: dict[int, str]) -> list[dict]:
    """Packets/bytes per service frontend as rows (frontends: the daemon's cache of the
    services map, what it wrote; names from its model)."""
    packets, nbytes = backend_totals(backends)
    out = []
    for key, value in frontends.items():
        k, v = dict(key), dict(value)
        sid = v["id"]
        seen = sid < len(packets)
        out.append({"service": names.get(sid), "id": sid,
                    "frontend": f"{k['vip']}:{k['port']}/{_PROTO_NAMES.get(k['proto'], k['proto'])}",
                    "packets": int(packets[sid]) if seen else 0, "bytes": int(nbytes[sid]) if seen else 0})
    return out


SERVICE_FAMILIES = (("atomnet_service_packets", "Packets to each service frontend"),
                    ("atomnet_service_bytes", "Bytes to each service frontend"))


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


class FrontendSeries:
    """The per-frontend counter families, rendered as exposition text without building a
    sample object per frontend (prometheus-client takes ~160 ms of CPU for 20 000 samples):
    each frontend's label part is rendered once per change of the frontends (`version`), and
    a scrape formats only the lines whose number changed since the last one (a numpy compare
    finds them; an idle node's scrape formats none and joins the kept lines). Byte for byte
    what prometheus-client renders for the same rows (tests/unit/test_events_metrics.py)."""

    def __init__(self):
        self.version = None
        self.sids = np.zeros(0, dtype=np.int64)
        self.labels: list[str] = []
        self._reset()

    def _reset(self) -> None:
        # per family: the numbers last rendered, their lines, and the family's whole text
        self._values = [None] * len(SERVICE_FAMILIES)
        self._lines: list[list[str]] = [[] for _ in SERVICE_FAMILIES]
        self._text = [""] * len(SERVICE_FAMILIES)
        self.formatted = 0   # lines formatted by the last render (tests: only what changed)

    def rows(self, version, frontends: dict, names) -> None:
        """frontends: services-map key -> value (frozen); names() -> {id: service name}."""
        if version == self.version:
            return
        named = names()
        items = []
        for key, value in frontends.items():
            k, sid = dict(key), dict(value)["id"]
            fe = f"{k['vip']}:{k['port']}/{_PROTO_NAMES.get(k['proto'], k['proto'])}"
            items.append((sid, f'{{frontend="{_label(fe)}",service="{_label(named.get(sid) or str(sid))}"}} '))
        self.sids = np.array([sid for sid, _ in items], dtype=np.int64)
        self.labels = [label for _, label in items]
        self.version = version
        self._reset()

    def render(self, packets: np.ndarray, nbytes: np.ndarray) -> str:
        self.formatted = 0
        size = int(self.sids.max()) + 1 if len(self.sids) else 0
        for f, ((name, help_text), totals) in enumerate(zip(SERVICE_FAMILIES, (packets, nbytes))):
            padded = np.zeros(size)
            padded[:min(len(totals), size)] = totals[:size]
            values = padded[self.sids] if len(self.sids) else padded[:0]
            old, lines, prefix = self._values[f], self._lines[f], name + "_total"
            if old is None:
                changed = range(len(values))
                lines[:] = [""] * len(values)
            else:
                changed = np.flatnonzero(values != old).tolist()
            if old is None or changed:
                for i in changed:
                    lines[i] = f"{prefix}{self.labels[i]}{floatToGoString(float(values[i]))}\n"
                self._text[f] = (f"# HELP {prefix} {help_text}\n# TYPE {prefix} counter\n" + "".join(lines))
                self.formatted += len(changed)
            self._values[f] = values
        return "".join(self._text)

def _serve(port: int, host: str, scrape: Callable[[], bytes]):
    """prometheus-client's start_http_server, with our body (Metrics.scrape)."""
    from wsgiref.simple_server import make_server
    from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler

    def app(environ, start_response):
        body = scrape()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]

    class Server(ThreadingWSGIServer):
        def shutdown(self):
            """serve_forever runs without a poll interval (it sleeps until a connection comes),
            so the stop request is followed by connections to ourselves until it is seen."""
            stopper = threading.Thread(target=super().shutdown, daemon=True)
            stopper.start()
            while stopper.is_alive():
                try:
                    socket.create_connection(self.server_address[:2], timeout=1).close()
                except OSError:
                    pass
                stopper.join(0.05)

    Server.address_family, addr = _get_best_family(host, port)
    httpd = make_server(addr, port, app, Server, handler_class=_SilentHandler)
    # No poll interval: it only serves shutdown(), which wakes the loop itself (Server above),
    # so the thread sleeps until a scrape arrives instead of waking twice a second.
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": None}, name="metrics",
                     daemon=True).start()
    return httpd


RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30)


# Counters that are drops without the drop_ prefix (their name says why, as in `atomnet stats`).
DROP_COUNTERS = {"snat_port_exhausted"}


def is_drop_counter(name: str) -> bool:
    return name.startswith("drop_") or name in DROP_COUNTERS


class DataplaneCollector:
    """Reads the pinned maps of this node on every scrape."""

    def __init__(self, snapshot: Callable[[], dict]):
        # -> {"counters": [...], "maps": [...], "services": [...] or "services_text": "...", "lease": {...}}
        self.snapshot = snapshot
        self.text = ""   # the last collect's pre-rendered families, appended by the server

    def collect(self):
        snap = self.snapshot()
        packets = CounterMetricFamily("atomnet_dataplane_packets", "Packets by dataplane outcome", labels=["outcome"])
        nbytes = CounterMetricFamily("atomnet_dataplane_bytes", "Bytes by dataplane outcome", labels=["outcome"])
        drops = CounterMetricFamily("atomnet_drops", "Packets dropped by the dataplane, by reason", labels=["reason"])
        for row in snap.get("counters", []):
            packets.add_metric([row["counter"]], row["packets"])
            nbytes.add_metric([row["counter"]], row["bytes"])
            if is_drop_counter(row["counter"]):
                drops.add_metric([row["counter"].removeprefix("drop_")], row["packets"])
        yield from (packets, nbytes, drops)

        entries = GaugeMetricFamily("atomnet_map_entries", "Entries in each pinned map", labels=["map"])
        capacity = GaugeMetricFamily("atomnet_map_capacity", "max_entries of each pinned map", labels=["map"])
        for m in snap.get("maps", []):
            if m["entries"] is not None:
                entries.add_metric([m["name"]], m["entries"])
            capacity.add_metric([m["name"]], m["max_entries"])
        yield from (entries, capacity)

        if "services" in snap:   # rows; the daemon gives pre-rendered text instead (services_text)
            svc_packets = CounterMetricFamily(*SERVICE_FAMILIES[0], labels=["service", "frontend"])
            svc_bytes = CounterMetricFamily(*SERVICE_FAMILIES[1], labels=["service", "frontend"])
            for s in snap["services"]:
                labels = [s["service"] or str(s["id"]), s["frontend"]]
                svc_packets.add_metric(labels, s["packets"])
                svc_bytes.add_metric(labels, s["bytes"])
            yield from (svc_packets, svc_bytes)
        self.text = snap.get("services_text", "")

        lease = snap.get("lease") or {}
        ttl = GaugeMetricFamily("atomnet_subnet_lease_remaining_seconds",
                                "Seconds until this node's subnet lease expires", labels=["subnet"])
        held = GaugeMetricFamily("atomnet_subnet_lease_held", "1 while this node holds its subnet lease",
                                 labels=["subnet"])
        if lease:
            held.add_metric([lease["subnet"]], 1 if lease["remaining"] else 0)
            ttl.add_metric([lease["subnet"]], lease["remaining"] or 0)
        yield from (ttl, held)

        invalid = CounterMetricFamily("atomnet_invalid_records", "Store records skipped as invalid, by kind",
                                      labels=["kind"])
        for kind in KINDS:
            invalid.add_metric([kind], INVALID.counts[kind])
        yield invalid


class Metrics:
    def __init__(self):
        self._scrape_lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.reconcile_seconds = Histogram("atomnet_reconcile_duration_seconds", "Time one reconcile took",
                                           buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.drift_repairs = Counter("atomnet_drift_repairs", "Differences the drift check found and repaired "
                                     "(kind=kernel: a map entry; kind=model: the incremental model itself)",
                                     labelnames=["kind"], registry=self.registry)
        # A desired state larger than a service-side map (ctl/dataplane/capacity.py): what the
        # operator raises with --bpf-lb-*-map-max, and how much is left out meanwhile.
        self.overflow_entries = Gauge("atomnet_map_overflow_entries", "Entries the desired state needs beyond "
                                      "the map's capacity (0: it fits)", labelnames=["map"], registry=self.registry)
        self.overflow_refused = Gauge("atomnet_map_overflow_refused_service_ports", "Service ports not programmed "
                                      "because a service-side map is full", registry=self.registry)
        for name in ("services", "backends", "maglev"):
            self.overflow_entries.labels(map=name).set(0)

    def serve(self, address: str, snapshot: Callable[[], dict]) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise AtomnetError(f"invalid metrics address {address!r}: use HOST:PORT, e.g. 127.0.0.1:9641")
        collector = DataplaneCollector(snapshot)
        self.registry.register(collector)
        try:
            # No host means loopback: the endpoint is unauthenticated, so every address
            # (0.0.0.0, or a node IP) has to be asked for by name.
            self.server = _serve(int(port), (host or DEFAULT_METRICS_HOST).strip("[]"), lambda: self.scrape(collector))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AtomnetError(f"metrics address {address} is already in use") from None
            raise AtomnetError(f"cannot serve metrics on {address}: {exc.strerror}") from None

    def scrape(self, collector: "DataplaneCollector") -> bytes:
        """One exposition: the registry's families, then the collector's pre-rendered ones
        (one scrape at a time: the text belongs to the collect that made it)."""
        with self._scrape_lock:
            return generate_latest(self.registry) + collector.text.encode()

    def set_overflow(self, overflows: list[dict], refused: int) -> None:
        short = {o["map"]: o["needed"] - o["capacity"] for o in overflows}
        for name in ("services", "backends", "maglev"):
            self.overflow_entries.labels(map=name).set(short.get(name, 0))
        self.overflow_refused.set(refused)

    def time_reconcile(self):
        return self.reconcile_seconds.time()


