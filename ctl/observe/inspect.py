"""Read this node's live dataplane, like bpftool and cilium-dbg: pinned programs and maps,
tc attachments, decoded map contents. Each function returns a list of dicts (the `-j`
shape); the CLI only formats them."""
from __future__ import annotations

import time
from pathlib import Path

from ..node import netplumb
from ..dataplane.bpf import syscalls as sc, tc
from ..dataplane.bpf.loader import Loader, map_catalog, open_map
from ..dataplane.bpf.maps import Map
from ..dataplane.bpf.types import CounterId, CtDir
from ..errors import AtomnetError
from ..node.netlink import dump


def _pins(loader: Loader, kind: str) -> list[Path]:
    d = loader.root / kind
    if not d.is_dir():
        raise AtomnetError(f"nothing pinned under {loader.root}: has `atomnet daemon` run on this node "
                           "(or is --bpffs/ATOMNET_BPFFS pointing elsewhere)?")
    return sorted(d.iterdir())


def _boot_time_ns() -> int:
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def prog_show(loader: Loader) -> list[dict]:
    out = []
    for pin in _pins(loader, "progs"):
        fd = sc.obj_get(str(pin))
        try:
            info = sc.prog_info(fd)
            out.append({
                "id": info.id, "name": info.name.decode(), "type": sc.PROG_TYPES.get(info.type, str(info.type)),
                "tag": bytes(info.tag).hex(), "loaded_at": time.strftime(
                    "%Y-%m-%dT%H:%M:%S%z", time.localtime((_boot_time_ns() + info.load_time) / 1e9)),
                "xlated_bytes": info.xlated_prog_len, "jited_bytes": info.jited_prog_len,
                "map_ids": sc.prog_map_ids(fd), "pinned": str(pin),
                "run_cnt": info.run_cnt, "run_time_ns": info.run_time_ns,
            })
        finally:
            sc.close(fd)
    return out


def net_show() -> list[dict]:
    """Every tc BPF filter on every link of this namespace (atomnet's and others')."""
    out = []
    with netplumb.ipr() as conn:
        for link in dump(lambda: list(conn.get_links())):
            for direction in (tc.INGRESS, tc.EGRESS):
                for f in tc.filters(conn, link["index"], direction):
                    out.append({"ifname": link.get_attr("IFLA_IFNAME"), "ifindex": link["index"],
                                "direction": direction, "prog_id": f.prog_id, "name": f.name,
                                "prio": f.prio, "handle": f.handle, "direct_action": f.direct_action,
                                "atomnet": f.ours})
    return out


def _open_pinned_maps(loader: Loader) -> list[tuple[Path, Map | None, int]]:
    catalog = map_catalog()
    out = []
    for pin in _pins(loader, "maps"):
        d = catalog.get(pin.name)
        if d is None:  # a map this version no longer defines: show it, undecoded
            fd = sc.obj_get(str(pin))
            out.append((pin, None, fd))
        else:
            out.append((pin, open_map(pin, d), -1))
    return out


def map_list(loader: Loader) -> list[dict]:
    """Every pinned map; `needed` is what the daemon's desired state needs of a service-side
    map too small for it (ctl/dataplane/capacity.py), None where it fits."""
    from ..node.readiness import read_overflow
    overflow = read_overflow(str(loader.root))
    out = []
    for pin, m, raw_fd in _open_pinned_maps(loader):
        info = m.info if m else sc.map_info(raw_fd)
        entries = None
        if m is not None:
            entries = sum(1 for _ in m.keys())
            m.close()
        else:
            sc.close(raw_fd)
        out.append({"id": info.id, "name": pin.name, "type": sc.MAP_TYPES.get(info.type, str(info.type)),
                    "key_size": info.key_size, "value_size": info.value_size,
                    "max_entries": info.max_entries, "entries": entries, "flags": info.map_flags,
                    "pinned": str(pin), "needed": overflow.get(pin.name, {}).get("needed")})
    return out


def overflow_hints(loader: Loader) -> list[str]:
    """One line per service-side map too small for the desired state: what to raise."""
    from ..node.readiness import read_overflow
    return [f"map {o['map']} is too small: the desired state needs {o['needed']} entries, {o['capacity']} fit; "
            f"{o['refused']} service ports are not programmed (raise {o['flag']} or --bpf-lb-map-max of "
            f"this node's daemon)" for o in read_overflow(str(loader.root)).values()]


def _decode_value(value) -> dict:
    if isinstance(value, list):  # per-CPU: the sum for people, every CPU for machines
        per_cpu = [v.to_dict() for v in value]
        total = {k: sum(d[k] for d in per_cpu) if all(isinstance(d[k], int) for d in per_cpu) else None
                 for k in per_cpu[0]}
        return {**total, "per_cpu": per_cpu}
    return value.to_dict()


def map_dump(loader: Loader, name: str) -> list[dict]:
    d = map_catalog().get(name)
    pin = loader.map_pin(name)
    if d is None:
        raise AtomnetError(f"unknown map {name!r}: `atomnet map list` shows the maps")
    if not pin.exists():
        raise AtomnetError(f"map {name} is not pinned under {loader.root}: has the daemon run on this node?")
    with open_map(pin, d) as m:
        return [{"key": k.to_dict(), "value": _decode_value(v)} for k, v in m.items()]


def endpoint_list(loader: Loader, pods_by_ip: dict[str, str]) -> list[dict]:
    links = {info.ifindex: name for name, info in netplumb.link_table().items()}
    out = []
    for entry in map_dump(loader, "endpoints"):
        ip, v = entry["key"]["ip"], entry["value"]
        out.append({"ip": ip, "pod": pods_by_ip.get(ip), "ifindex": v["ifindex"],
                    "host_ifname": links.get(v["ifindex"]), "mac": v["mac"], "node_mac": v["node_mac"]})
    return sorted(out, key=lambda e: tuple(int(x) for x in e["ip"].split(".")))


def counters(loader: Loader) -> list[dict]:
    rows = {e["key"]["value"]: e["value"] for e in map_dump(loader, "counters")}
    return [{"counter": cid.name.removeprefix("CTR_").lower(), "packets": rows.get(cid, {}).get("packets", 0),
             "bytes": rows.get(cid, {}).get("bytes", 0)} for cid in CounterId if cid != CounterId.CTR_MAX]



_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp"}


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def lb_list(loader: Loader, service_names: dict[int, str]) -> list[dict]:
    """Frontend -> backends, with each backend's packets/bytes (summed over CPUs)."""
    per_backend: dict[int, list[dict]] = {}
    for e in map_dump(loader, "backends"):
        k, v = e["key"], e["value"]
        per_backend.setdefault(k["service_id"], []).append(
            {"ip": k["ip"], "port": k["port"], "packets": v["packets"], "bytes": v["bytes"]})
    out = []
    for e in map_dump(loader, "services"):
        k, v = e["key"], e["value"]
        backends = sorted(per_backend.get(v["id"], []), key=lambda b: (b["ip"], b["port"]))
        out.append({"service": service_names.get(v["id"]), "id": v["id"],
                    "frontend": f"{k['vip']}:{k['port']}/{_PROTO_NAMES.get(k['proto'], k['proto'])}",
                    "vip": k["vip"], "port": k["port"], "proto": _PROTO_NAMES.get(k["proto"], k["proto"]),
                    "backends": backends, "table_size": v["table_size"],
                    "affinity_timeout": v["affinity_timeout"],
                    "packets": sum(b["packets"] for b in backends), "bytes": sum(b["bytes"] for b in backends)})
    return sorted(out, key=lambda r: (r["service"] or "", r["port"]))


def ct_list(loader: Loader) -> list[dict]:
    """Decoded conntrack: the tuple as seen, the translation, age and flags."""
    now = _monotonic_ns()
    out = []
    for e in map_dump(loader, "conntrack"):
        k, v = e["key"], e["value"]
        reply = k["dir"] == CtDir.CT_REPLY
        if k["dir"] in (CtDir.CT_SNAT_OUT, CtDir.CT_SNAT_IN):
            # masquerade: out entries rewrite the source to the node, in entries the destination to the pod
            nat = f"{'src' if k['dir'] == CtDir.CT_SNAT_OUT else 'dst'}={v['nat_ip']}:{v['nat_port']}"
        else:
            # forward entries rewrite the destination to the backend; replies the source to the VIP
            nat = (f"{'src' if reply else 'dst'}={v['nat_ip']}:{v['nat_port']}"
                   + (f",{'dst' if reply else 'src'}={v['snat_ip']}" if v["snat_ip"] != "0.0.0.0" else ""))
        out.append({
            "dir": _CT_DIR_NAMES.get(k["dir"], k["dir"]), "proto": _PROTO_NAMES.get(k["proto"], k["proto"]),
            "src": f"{k['saddr']}:{k['sport']}", "dst": f"{k['daddr']}:{k['dport']}",
            "nat": nat,
            "service_id": v["service_id"], "age_s": round((now - v["created_ns"]) / 1e9, 1),
            "idle_s": round((now - v["last_seen_ns"]) / 1e9, 1), "packets": v["packets"], "bytes": v["bytes"],
            "flags": _ct_flags(v["flags"]),
        })
    return out


_CT_DIR_NAMES = {0: "forward", 1: "reply", 2: "snat_out", 3: "snat_in"}


def _ct_flags(bits: int) -> list[str]:
    from ..dataplane.bpf.types import (CT_F_CLOSING, CT_F_FIN_IN, CT_F_FIN_OUT, CT_F_HAIRPIN, CT_F_HOST, CT_F_RST,
                                       CT_F_SEEN_REPLY, CT_F_SNAT)
    return [n for bit, n in ((CT_F_CLOSING, "closing"), (CT_F_HAIRPIN, "hairpin"), (CT_F_SEEN_REPLY, "seen_reply"),
                             (CT_F_SNAT, "snat"), (CT_F_HOST, "host"), (CT_F_FIN_OUT, "fin_out"),
                             (CT_F_FIN_IN, "fin_in"), (CT_F_RST, "rst")) if bits & bit]


def snat_list(loader: Loader) -> list[dict]:
    """Masqueraded flows, one row each: the pod's tuple -> the node address and port it
    left with (CT_SNAT_OUT), with the reply side's packet count (CT_SNAT_IN)."""
    now = _monotonic_ns()
    entries = [(e["key"], e["value"]) for e in map_dump(loader, "conntrack")]
    replies = {(k["saddr"], k["sport"], k["daddr"], k["dport"], k["proto"]): v
               for k, v in entries if k["dir"] == CtDir.CT_SNAT_IN}
    out = []
    for k, v in entries:
        if k["dir"] != CtDir.CT_SNAT_OUT:
            continue
        reply = replies.get((k["daddr"], k["dport"], v["nat_ip"], v["nat_port"], k["proto"]))
        proto = _PROTO_NAMES.get(k["proto"], k["proto"])
        out.append({
            "proto": proto, "src": f"{k['saddr']}:{k['sport']}", "dst": f"{k['daddr']}:{k['dport']}",
            "nat": f"{v['nat_ip']}:{v['nat_port']}", "pod_ip": k["saddr"], "pod_port": k["sport"],
            "node_ip": v["nat_ip"], "node_port": v["nat_port"],
            "age_s": round((now - v["created_ns"]) / 1e9, 1), "idle_s": round((now - v["last_seen_ns"]) / 1e9, 1),
            "packets": v["packets"], "bytes": v["bytes"],
            "reply_packets": reply["packets"] if reply else 0, "reply_bytes": reply["bytes"] if reply else 0,
            "flags": _ct_flags(v["flags"] | (reply["flags"] if reply else 0)),
        })
    return sorted(out, key=lambda r: (r["dst"], r["src"]))


def tunnel_list(loader: Loader, lease_expiry: dict[str, float | None]) -> list[dict]:
    """Remote subnets programmed for the overlay, with their lease's remaining TTL from the store."""
    out = []
    for e in map_dump(loader, "tunnels"):
        subnet = f"{e['key']['ip']}/{e['key']['prefixlen']}"
        expiry = lease_expiry.get(subnet)
        out.append({"subnet": subnet, "node_ip": e["value"]["node_ip"], "vtep_mac": e["value"]["vtep_mac"],
                    "lease_expires_in_s": round(expiry) if expiry is not None else None})
    return sorted(out, key=lambda r: r["subnet"])
