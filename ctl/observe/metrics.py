"""Prometheus metrics for the daemon (prometheus-client). Dataplane numbers are read from
the maps at scrape time by a custom collector, so a scrape always sees the kernel's
current values and the daemon keeps no copies of them."""
from __future__ import annotations

import errno
from typing import Callable

import ctypes as ct

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
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


def frontend_counters(backends: Map, frontends: dict, names: dict[int, str]) -> list[dict]:
    """Packets/bytes per service frontend: the per-CPU backend counters read with batch
    lookups and summed with numpy (100 000 backends in tens of milliseconds), frontends from
    the daemon's cache of the services map (what it wrote), names from its model."""
    cpus = possible_cpus()
    ksize, vsize = ct.sizeof(BackendKey), 16 * cpus
    keys, values, count = sc.lookup_batch(backends.fd, ksize, vsize, backends.info.max_entries)
    packets = np.zeros(0)
    if count:
        ids = np.frombuffer(keys, dtype=np.uint32).reshape(count, ksize // 4)[:, 0]
        vals = np.frombuffer(values, dtype=np.uint64).reshape(count, cpus, 2).sum(axis=1)
        size = int(ids.max()) + 1
        packets = np.bincount(ids, weights=vals[:, 0], minlength=size)
        nbytes = np.bincount(ids, weights=vals[:, 1], minlength=size)
    out = []
    for key, value in frontends.items():
        k, v = dict(key), dict(value)
        sid = v["id"]
        seen = sid < len(packets)
        out.append({"service": names.get(sid), "id": sid,
                    "frontend": f"{k['vip']}:{k['port']}/{_PROTO_NAMES.get(k['proto'], k['proto'])}",
                    "packets": int(packets[sid]) if seen else 0, "bytes": int(nbytes[sid]) if seen else 0})
    return out

RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30)


# Counters that are drops without the drop_ prefix (their name says why, as in `atomnet stats`).
DROP_COUNTERS = {"snat_port_exhausted"}


class DataplaneCollector:
    """Reads the pinned maps of this node on every scrape."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot   # -> {"counters": [...], "maps": [...], "services": [...], "lease": {...}}

    def collect(self):
        snap = self.snapshot()
        packets = CounterMetricFamily("atomnet_dataplane_packets", "Packets by dataplane outcome", labels=["outcome"])
        nbytes = CounterMetricFamily("atomnet_dataplane_bytes", "Bytes by dataplane outcome", labels=["outcome"])
        drops = CounterMetricFamily("atomnet_drops", "Packets dropped by the dataplane, by reason", labels=["reason"])
        for row in snap.get("counters", []):
            packets.add_metric([row["counter"]], row["packets"])
            nbytes.add_metric([row["counter"]], row["bytes"])
            if row["counter"].startswith("drop_") or row["counter"] in DROP_COUNTERS:
                drops.add_metric([row["counter"].removeprefix("drop_")], row["packets"])
        yield from (packets, nbytes, drops)

        entries = GaugeMetricFamily("atomnet_map_entries", "Entries in each pinned map", labels=["map"])
        capacity = GaugeMetricFamily("atomnet_map_capacity", "max_entries of each pinned map", labels=["map"])
        for m in snap.get("maps", []):
            if m["entries"] is not None:
                entries.add_metric([m["name"]], m["entries"])
            capacity.add_metric([m["name"]], m["max_entries"])
        yield from (entries, capacity)

        svc_packets = CounterMetricFamily("atomnet_service_packets", "Packets to each service frontend",
                                          labels=["service", "frontend"])
        svc_bytes = CounterMetricFamily("atomnet_service_bytes", "Bytes to each service frontend",
                                        labels=["service", "frontend"])
        for s in snap.get("services", []):
            labels = [s["service"] or str(s["id"]), s["frontend"]]
            svc_packets.add_metric(labels, s["packets"])
            svc_bytes.add_metric(labels, s["bytes"])
        yield from (svc_packets, svc_bytes)

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
        self.registry = CollectorRegistry()
        self.reconcile_seconds = Histogram("atomnet_reconcile_duration_seconds", "Time one reconcile took",
                                           buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.drift_repairs = Counter("atomnet_drift_repairs", "Differences the drift check found and repaired "
                                     "(kind=kernel: a map entry; kind=model: the incremental model itself)",
                                     labelnames=["kind"], registry=self.registry)

    def serve(self, address: str, snapshot: Callable[[], dict]) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise AtomnetError(f"invalid metrics address {address!r}: use HOST:PORT, e.g. 127.0.0.1:9641")
        self.registry.register(DataplaneCollector(snapshot))
        try:
            # No host means loopback: the endpoint is unauthenticated, so every address
            # (0.0.0.0, or a node IP) has to be asked for by name.
            self.server, _thread = start_http_server(int(port), addr=(host or DEFAULT_METRICS_HOST).strip("[]"),
                                                     registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AtomnetError(f"metrics address {address} is already in use") from None
            raise AtomnetError(f"cannot serve metrics on {address}: {exc.strerror}") from None

    def time_reconcile(self):
        return self.reconcile_seconds.time()


