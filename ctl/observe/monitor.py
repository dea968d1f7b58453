"""`atomnet monitor`: live dataplane events from the programs' perf event array, read with
bcc's perf reader. Works whether or not the daemon runs: it needs only the pinned maps.
Events the kernel could not hand over (a full ring) are counted and shown, never dropped
silently."""
from __future__ import annotations

import ctypes as ct
import json
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from ..dataplane.bpf import syscalls as sc
from ..dataplane.bpf.loader import Loader, map_catalog, open_map
from ..dataplane.bpf.maps import possible_cpus
from ..dataplane.bpf.types import U32, CounterId, Event, EventType
from ..errors import AtomnetError

PROTO = {6: "tcp", 17: "udp", 1: "icmp"}


def reason_name(reason: int) -> str:
    try:
        return CounterId(reason).name.removeprefix("CTR_DROP_").removeprefix("CTR_").lower()
    except ValueError:
        return str(reason)


def decode(raw: bytes) -> dict:
    """One event as a dict with stable keys (the -j line)."""
    ev = Event.from_buffer_copy(raw[: ct.sizeof(Event)]).to_dict()
    kind = EventType(ev["type"]).name.removeprefix("EV_").lower() if ev["type"] in (1, 2) else str(ev["type"])
    out = {"type": kind, "ts_ns": ev["ts_ns"], "ifindex": ev["ifindex"], "proto": PROTO.get(ev["proto"], ev["proto"]),
           "src": f"{ev['saddr']}:{ev['sport']}", "dst": f"{ev['daddr']}:{ev['dport']}", "len": ev["len"]}
    if kind == "drop":
        out["reason"] = reason_name(ev["reason"])
    else:
        out["backend"] = f"{ev['nat_ip']}:{ev['nat_port']}"
        out["service_id"] = ev["service_id"]
    return out


def format_line(ev: dict, ifnames: dict[int, str]) -> str:
    where = ifnames.get(ev["ifindex"], str(ev["ifindex"]))
    stamp = time.strftime("%H:%M:%S")
    if ev["type"] == "drop":
        return f"{stamp} drop      {ev['reason']:<16} {where:<14} {ev['proto']} {ev['src']} -> {ev['dst']} len={ev['len']}"
    return (f"{stamp} translate service={ev['service_id']:<6} {where:<14} {ev['proto']} {ev['src']} -> {ev['dst']}"
            f" => {ev['backend']}")


@dataclass
class Monitor:
    loader: Loader
    emit: Callable[[dict], None]
    lost_report: Callable[[int, int], None]
    lost_total: int = 0
    seen: int = 0
    readers: list[int] = field(default_factory=list)

    def run(self, count: int | None = None, duration: float | None = None) -> None:
        d = map_catalog().get("events")
        pin = self.loader.map_pin("events")
        if d is None or not pin.exists():
            raise AtomnetError(f"nothing pinned under {self.loader.root}: has `atomnet daemon` run on this node "
                               "(or is --bpffs/ATOMNET_BPFFS pointing elsewhere)?")
        events = open_map(pin, d)

        def on_event(_cookie, data, size):
            self.seen += 1
            self.emit(decode(ct.string_at(data, size)))

        def on_lost(_cookie, lost):
            self.lost_total += lost
            self.lost_report(lost, self.lost_total)

        # Keep the callbacks referenced: libbcc calls them from C.
        self._callbacks = (sc.RAW_CB(on_event), sc.LOST_CB(on_lost))
        stop = []
        previous = {s: signal.signal(s, lambda *_: stop.append(1)) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for cpu in range(possible_cpus()):
                try:
                    reader = sc.open_perf_buffer(*self._callbacks, cpu=cpu)
                except sc.BpfError:
                    continue   # a possible but offline CPU
                self.readers.append(reader)
                events.put(U32(value=cpu), U32(value=sc.perf_reader_fd(reader)))
            deadline = time.monotonic() + duration if duration else None
            while not stop and (count is None or self.seen < count):
                if deadline and time.monotonic() >= deadline:
                    break
                sc.perf_poll(self.readers, 200)
        finally:
            for cpu in range(possible_cpus()):
                events.delete(U32(value=cpu))   # no reader: programs' output fails fast again
            for reader in self.readers:
                sc.perf_free(reader)
            events.close()
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_monitor(loader: Loader, as_json: bool, out: TextIO, err: TextIO, count: int | None,
                duration: float | None, ifnames: dict[int, str]) -> int:
    def emit(ev: dict) -> None:
        out.write((json.dumps(ev) if as_json else format_line(ev, ifnames)) + "\n")
        out.flush()

    def lost(n: int, total: int) -> None:
        if as_json:
            out.write(json.dumps({"type": "lost", "count": n, "total": total}) + "\n")
        else:
            err.write(f"lost {n} events (ring full; {total} so far)\n")
        out.flush()

    mon = Monitor(loader, emit, lost)
    mon.run(count, duration)
    return mon.lost_total


