"""Event decoding (the monitor's lines) and metric names, without root."""
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ctl.dataplane.bpf.types import CounterId, Event, EventType
from ctl.observe.metrics import DataplaneCollector, Metrics
from ctl.observe.monitor import decode, format_line


def event_bytes(**fields) -> bytes:
    return bytes(Event.from_dict(fields))


def test_drop_event_decodes_with_its_reason():
    raw = event_bytes(ts_ns=5, ifindex=7, type=EventType.EV_DROP, reason=CounterId.CTR_DROP_SPOOFED, proto=6,
                      saddr="10.244.9.9", daddr="10.244.1.3", sport=40000, dport=80, len=74)
    ev = decode(raw + b"\0" * 4)   # perf records may carry padding
    assert ev == {"type": "drop", "ts_ns": 5, "ifindex": 7, "proto": "tcp", "src": "10.244.9.9:40000",
                  "dst": "10.244.1.3:80", "len": 74, "reason": "spoofed"}
    assert "drop      spoofed" in format_line(ev, {7: "an123"}) and "an123" in format_line(ev, {7: "an123"})


def test_translate_event_decodes_with_the_backend():
    ev = decode(event_bytes(type=EventType.EV_TRANSLATE, proto=17, saddr="10.244.1.2", daddr="10.96.0.10",
                            sport=5000, dport=53, nat_ip="10.244.2.5", nat_port=5353, service_id=3))
    assert ev["type"] == "translate" and ev["backend"] == "10.244.2.5:5353" and ev["service_id"] == 3
    assert "=> 10.244.2.5:5353" in format_line(ev, {})


def test_metric_names_follow_prometheus_conventions():
    m = Metrics()
    m.registry.register(DataplaneCollector(lambda: {
        "counters": [{"counter": "fwd_local", "packets": 3, "bytes": 300}, {"counter": "drop_spoofed", "packets": 1,
                                                                          "bytes": 98}],
        "maps": [{"name": "endpoints", "entries": 2, "max_entries": 65536}],
        "services": [{"service": "web", "id": 1, "frontend": "10.96.0.10:80/tcp", "packets": 9, "bytes": 900}],
        "lease": {"subnet": "10.244.1.0/24", "remaining": 3600.0}}))
    with m.time_reconcile():
        pass
    text = generate_latest(m.registry).decode()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    for name in ("atomnet_dataplane_packets_total", "atomnet_dataplane_bytes_total", "atomnet_drops_total",
                 "atomnet_map_entries", "atomnet_map_capacity", "atomnet_service_packets_total",
                 "atomnet_service_bytes_total", "atomnet_subnet_lease_remaining_seconds", "atomnet_subnet_lease_held",
                 "atomnet_reconcile_duration_seconds_count"):
        assert name in samples, name
    assert all(n.startswith("atomnet_") for n in samples)
    drops = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "atomnet_drops_total"]
    assert drops[0].labels == {"reason": "spoofed"} and drops[0].value == 1


def test_pre_rendered_frontend_series_equal_what_prometheus_client_renders():
    """The daemon's scrape renders the per-frontend families itself (FrontendSeries): the
    same text as the collector's rows path, for the same frontends and counters."""
    import numpy as np
    from ctl.dataplane.desired import freeze
    from ctl.observe.metrics import FrontendSeries
    frontends = {freeze({"vip": "10.96.0.10", "port": 80, "proto": 6}): freeze({"id": 1, "digest": 5}),
                 freeze({"vip": "10.96.0.11", "port": 53, "proto": 17}): freeze({"id": 4}),
                 freeze({"vip": "192.168.0.1", "port": 8080, "proto": 6}): freeze({"id": 7})}
    names = {1: 'we"b\\x', 7: "forward:f1"}   # id 4 has no name: its id is the label
    packets, nbytes = np.array([0, 9, 0, 0, 3.0]), np.array([0, 12345678901234, 0, 0, 7.0])   # id 7: none yet
    rows = [{"service": names.get(dict(v)["id"]), "id": dict(v)["id"],
             "frontend": f"{dict(k)['vip']}:{dict(k)['port']}/{ {6: 'tcp', 17: 'udp'}[dict(k)['proto']]}",
             "packets": int(packets[dict(v)["id"]]) if dict(v)["id"] < 5 else 0,
             "bytes": int(nbytes[dict(v)["id"]]) if dict(v)["id"] < 5 else 0} for k, v in frontends.items()]
    m = Metrics()
    collector = DataplaneCollector(lambda: {"services": rows})
    m.registry.register(collector)
    want = generate_latest(m.registry).decode()
    series = FrontendSeries()
    series.rows(1, frontends, lambda: names)
    text = series.render(packets, nbytes)
    start = want.index("# HELP atomnet_service_packets_total")
    end = want.index("# HELP atomnet_subnet_lease")
    assert text == want[start:end]
    calls = []
    series.rows(1, {}, lambda: calls.append(1) or {})   # same version: labels kept, names not asked
    assert calls == [] and series.render(packets, nbytes) == text
    m2 = Metrics()
    c2 = DataplaneCollector(lambda: {"services_text": text})
    m2.registry.register(c2)
    parsed = {s.labels["frontend"]: s.value for f in text_string_to_metric_families(m2.scrape(c2).decode())
              for s in f.samples if s.name == "atomnet_service_packets_total"}
    assert parsed == {"10.96.0.10:80/tcp": 9, "10.96.0.11:53/udp": 3, "192.168.0.1:8080/tcp": 0}


def test_a_scrape_formats_only_the_frontend_lines_whose_number_changed():
    """Issue 15's scrape at 10 000 services: an idle node's scrape formats no line; a changed
    counter re-formats its own line only; the text equals a fresh render of the same numbers."""
    import numpy as np
    from ctl.dataplane.desired import freeze
    from ctl.observe.metrics import FrontendSeries
    frontends = {freeze({"vip": f"10.96.0.{i}", "port": 80, "proto": 6}): freeze({"id": i}) for i in range(1, 200)}
    names = {i: f"s{i}" for i in range(1, 200)}
    packets, nbytes = np.arange(200, dtype=float), np.arange(200, dtype=float) * 100
    series = FrontendSeries()
    series.rows(1, frontends, lambda: names)
    first = series.render(packets, nbytes)
    assert series.formatted == 2 * 199
    assert series.render(packets.copy(), nbytes.copy()) == first and series.formatted == 0
    packets[7] += 1
    nbytes[7] += 60
    nbytes[150] += 1
    text = series.render(packets, nbytes)
    assert series.formatted == 3
    fresh = FrontendSeries()
    fresh.rows(1, frontends, lambda: names)
    assert text == fresh.render(packets, nbytes) != first
    series.rows(2, dict(list(frontends.items())[:10]), lambda: names)   # the frontends changed: all again
    assert series.render(packets, nbytes).count("\n") == 2 * (2 + 10) and series.formatted == 20
