"""`atomnet explain`: what the real program does to a packet a pod would send.

The packet is built here and run through BPF_PROG_TEST_RUN by a fresh load of the same
compiled from_pod, wired to the live read-only state (endpoints, services, Maglev
tables, tunnels, config) and to scratch copies of everything the program writes
(counters, conntrack, affinity, fragments, backend counters, events). So the answer
uses exactly the live state, including the conntrack and affinity entries of this very
flow, and leaves nothing behind: no conntrack entry, no counter change.
"""
from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass, replace

from ..node import netplumb
from . import packets
from ..dataplane.bpf import syscalls as sc
from ..dataplane.bpf.elf import BpfObject
from ..dataplane.bpf.loader import Loader, create_map, load_program, map_catalog, object_path, open_map
from ..dataplane.bpf.maps import Map, copy_entries, mirror
from ..dataplane.bpf.types import CounterId, CtDir, CtKey
from ..errors import AtomnetError
from ..state.model import PROTOCOLS, ValidationError

SCRATCH = ("counters", "conntrack", "affinity", "fragments", "backends", "events")
VERDICTS = {0: "pass to the node's stack", 2: "drop", 7: "redirect"}


def parse_target(text: str) -> tuple[str, int, str]:
    """IP:PORT[/tcp|udp] (or IP for ICMP echo)."""
    addr, _, proto = text.partition("/")
    ip, sep, port = addr.partition(":")
    proto = (proto or ("tcp" if sep else "icmp")).lower()
    try:
        ipaddress.IPv4Address(ip)
        p = int(port) if sep else 0
    except ValueError:
        raise ValidationError(f"malformed destination {text!r}: use IP:PORT[/tcp|udp]") from None
    if proto not in packets.PROTOS or (proto != "icmp" and not 1 <= p <= 65535):
        raise ValidationError(f"malformed destination {text!r}: use IP:PORT[/tcp|udp] with a port 1-65535")
    return ip, p, proto


@dataclass
class Scratch:
    maps: dict[str, Map]

    def close(self):
        for m in self.maps.values():
            m.close()


def _scratch_maps(live: dict[str, Map], flow: tuple) -> Scratch:
    """Empty private copies of what the program writes, seeded with the entries this flow reads."""
    catalog = map_catalog()
    out = {}
    try:
        for name in SCRATCH:
            # as large as the live map: the daemon may run with other sizes than the objects'
            # (--bpf-lb-*-map-max), and every live backend is copied in
            d = replace(catalog[name], max_entries=live[name].info.max_entries) if name in live else catalog[name]
            out[name] = Map(create_map(d), mirror(d.key_type, d.key_size), mirror(d.value_type, d.value_size), name)
        copy_entries(live["backends"], out["backends"])   # liveness of backends (keys)
        src, dst, sport, dport, proto = flow
        for direction in (CtDir.CT_FORWARD, CtDir.CT_REPLY):
            key = CtKey.from_dict({"saddr": src, "daddr": dst, "sport": sport, "dport": dport,
                                   "proto": proto, "dir": int(direction)})
            value = live["conntrack"].get(key)
            if value is not None:
                out["conntrack"].put(key, value)
        for key, value in live["affinity"].items():
            if key.to_dict()["client"] == src:
                out["affinity"].put(key, value)
    except BaseException:
        Scratch(out).close()
        raise
    return Scratch(out)


def explain(loader: Loader, pod, to: str, sport: int | None = None) -> dict:
    ip, port, proto = parse_target(to)
    links = netplumb.link_table()
    host = links.get(pod.host_ifname)
    if host is None:
        raise AtomnetError(f"pod {pod.name} has no link on this node ({pod.host_ifname}): is it on another node?")
    sport = sport or random.randint(32768, 60999)
    frame = packets.build(pod.mac, host.mac, pod.ip, ip, proto, sport, port)

    catalog = map_catalog()
    live: dict[str, Map] = {}
    try:
        for name, d in catalog.items():
            pin = loader.map_pin(name)
            if not pin.exists():
                raise AtomnetError(f"nothing pinned under {loader.root}: has `atomnet daemon` run on this node?")
            live[name] = open_map(pin, d)
        scratch = _scratch_maps(live, (pod.ip, ip, sport, port, PROTOCOLS.get(proto, 1)))
        obj = BpfObject(object_path("from_pod"))
        try:
            fds = {n: (scratch.maps[n] if n in scratch.maps else live[n]).fd for n in obj.maps}
            prog = load_program(obj, "from_pod", fds)
            try:
                layout = obj.layout("__sk_buff")
                ctx = bytearray(layout.size)
                off = next(m.offset for m in layout.members if m.name == "ingress_ifindex")
                struct.pack_into("<I", ctx, off, host.ifindex)
                retval, out, _ = sc.test_run(prog, frame, bytes(ctx))
                tag = bytes(sc.prog_info(prog).tag).hex()
            finally:
                sc.close(prog)
        finally:
            obj.close()
        fired = {CounterId(k.value).name.removeprefix("CTR_").lower(): sum(c.packets for c in v)
                 for k, v in scratch.maps["counters"].items() if sum(c.packets for c in v)}
        scratch.close()
        return _interpret(pod, frame, retval, out, fired, live, tag, loader)
    finally:
        for m in live.values():
            m.close()


def _interpret(pod, frame: bytes, retval: int, out: bytes, fired: dict, live: dict[str, Map], tag: str,
               loader: Loader) -> dict:
    before, after = packets.parse(frame), packets.parse(out)
    verdict = VERDICTS.get(retval, f"tc action {retval}")
    result = {"from": pod.name, "packet": f"{before.src}:{before.sport} -> {before.dst}:{before.dport}",
              "verdict": verdict, "counters": fired, "rewrites": [], "delivered_to": None, "backend": None,
              "tunnel": None, "reply": None, "program_tag": tag}
    attached = _attached_tag(loader)
    result["same_as_attached"] = attached == tag if attached else None
    for field in ("src_mac", "dst_mac", "src", "dst", "sport", "dport", "ttl"):
        a, b = getattr(before, field), getattr(after, field)
        if a != b:
            result["rewrites"].append({"field": field, "from": a, "to": b})
    if "lb_new_flow" in fired or any(r["field"] == "dst" for r in result["rewrites"]):
        result["backend"] = f"{after.dst}:{after.dport}"
    if retval == 2:
        result["reason"] = next((k.removeprefix("drop_") for k in fired if k.startswith("drop_")), None)
    elif retval == 7:
        if "lb_reject" in fired:
            result["reply"] = "TCP RST" if after.tcp_flags and after.tcp_flags & packets.TCP_RST else \
                "ICMP port unreachable"
            result["delivered_to"] = f"back to pod {pod.name}"
        elif "fwd_overlay" in fired:
            for k, v in live["tunnels"].items():
                info = v.to_dict()
                if info["vtep_mac"] == after.dst_mac:
                    kd = k.to_dict()
                    result["tunnel"] = {"subnet": f"{kd['ip']}/{kd['prefixlen']}", "node_ip": info["node_ip"],
                                        "vtep_mac": info["vtep_mac"]}
            result["delivered_to"] = "overlay"
        else:
            for k, v in live["endpoints"].items():
                if v.to_dict()["mac"] == after.dst_mac:
                    result["delivered_to"] = f"pod with {k.to_dict()['ip']}"
    return result


def _attached_tag(loader: Loader) -> str | None:
    try:
        fd = loader.pinned_program("from_pod")
    except AtomnetError:
        return None
    try:
        return bytes(sc.prog_info(fd).tag).hex()
    finally:
        sc.close(fd)


