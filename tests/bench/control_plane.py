"""Control-plane measurements on a fresh node (its own rig, store and pins), issue 15's goals:

- program N services x B backends, each service with its own backend set (B of P live pods),
  in one `atomnet apply -f`: CLI start -> the daemon's `reconciled` event;
- change one service among N (add one, delete one, change one's backends): the store write
  (ctl.state.services, what the CLI calls, in this process: no CLI start-up) -> the change
  visible in the pinned kernel maps (polled with lookups: the "maps updated" condition);
- pod add -> its endpoint in the endpoints map (CLI start, through the node's daemon: the node
  API), and -> the pod a backend on a second node (a service selecting it there: what another
  node programs for a new pod; tunnels are per node lease and a pod changes none); interleaved
  with the same add done in the CLI's process (ATOMNET_API_SOCKET=off: what it costs without a
  daemon, and what it cost before the node API);
- daemon RSS after programming, its CPU while nothing changes, one metrics scrape.
"""
from __future__ import annotations

import itertools
import json
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from tests.e2e.rig import Rig, sh

from .harness import cpu_seconds, memory_kib

POLL = 0.0002   # seconds between two lookups while waiting for a map to show a change


def distinct_sets(pods: list[str], count: int, size: int, seed: int = 15) -> list[list[str]]:
    """count different backend sets of `size` pods each (C(20, 10) = 184 756 of them exist)."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    out = []
    while len(out) < count:
        pick = tuple(sorted(rng.sample(pods, size)))
        if pick in seen:
            continue
        seen.add(pick)
        out.append(list(pick))
    return out


class Maps:
    """The node's pinned services and endpoints maps, read from this process."""

    def __init__(self, bpffs: str):
        from ctl.dataplane.bpf import syscalls as sc
        from ctl.dataplane.bpf.maps import Map
        from ctl.dataplane.bpf.types import EndpointKey, EndpointInfo, ServiceInfo, ServiceKey
        self.services = Map(sc.obj_get(f"{bpffs}/maps/services"), ServiceKey, ServiceInfo)
        self.endpoints = Map(sc.obj_get(f"{bpffs}/maps/endpoints"), EndpointKey, EndpointInfo)
        self.ServiceKey, self.EndpointKey = ServiceKey, EndpointKey

    def service(self, vip: str, port: int):
        v = self.services.get(self.ServiceKey.from_dict({"vip": vip, "port": port, "proto": 6}))
        return None if v is None else v.to_bytes()

    def backend_count(self, vip: str, port: int) -> int | None:
        v = self.services.get(self.ServiceKey.from_dict({"vip": vip, "port": port, "proto": 6}))
        return None if v is None else v.backend_count

    def endpoint(self, ip: str):
        return self.endpoints.get(self.EndpointKey.from_dict({"ip": ip}))

    def close(self):
        self.services.close()
        self.endpoints.close()


def wait_for(cond, timeout: float = 30.0) -> float:
    """Polls cond() until true; returns the time it became true (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(POLL)
    raise AssertionError(f"condition not met in {timeout}s")


def fresh_rig(parent_tmp: Path, uids: list[str], prefix: str) -> Rig:
    """A rig of its own (uid recorded in uids for the caller's clean-up), in a new directory
    under parent_tmp; a half-made underlay namespace is removed if the rig cannot be built."""
    uid = uuid.uuid4().hex[:6]
    uids.append(uid)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{uid}-", dir=parent_tmp))
    try:
        return Rig(uid, tmp)
    except Exception:
        sh("ip", "netns", "del", f"an{uid}-ul", check=False)
        raise


def pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def lb_map_max_for(services: int, backends_each: int) -> int | None:
    """The daemon's --bpf-lb-map-max for this many services (None: the compiled sizes fit):
    a power of two with room for the services, their tables and 4 x N backend entries, and
    for what the changes add and the Maglev pool's spares."""
    from ctl.dataplane.mapsizes import FACTORS
    need = max(services + 1024, -(-(services * backends_each + 1024) // FACTORS["backends"]))
    if need <= 65536:
        return None
    return 1 << (need - 1).bit_length()


def run_node(parent_tmp: Path, uids: list[str], n: int, nb: int, pool: int, changes: int, apply_fn,
             idle_window: float = 0.0, metrics_port: int = 0, pod_adds: int = 0, log=print) -> dict:
    """One fresh node: pool pods, n services (distinct backend sets of nb), then the changes.
    Beyond the compiled map sizes (50 000 services x 10) the daemon gets --bpf-lb-map-max."""
    from ctl.state import services as svclib
    from ctl.state.model import SERVICES_PREFIX, Service
    from ctl.state.store import open_store
    from .cases import service_doc, vip

    rig = fresh_rig(parent_tmp, uids, "cp")
    maps = store = None
    rig.bench_maps = []   # the second node's, closed with the rest
    try:
        node = rig.add_node("cp")
        lb_max = lb_map_max_for(n + changes, nb)
        node.lb_args = ["--bpf-lb-map-max", str(lb_max)] if lb_max else []   # the second node's too (pod adds)
        extra = ["--metrics", f"127.0.0.1:{metrics_port}"] if metrics_port else []
        node.start_daemon(*extra, *node.lb_args)
        pods = [node.add_pod(f"e{j}")["name"] for j in range(pool)]
        for p in node.atomnet_json("pod", "list"):
            node.wait_endpoint(p["ip"])
        sets = distinct_sets(pods, n + changes, nb)
        docs = [service_doc(i, sets[i]) for i in range(n)]
        out: dict = {"program": apply_fn(node, docs, min_changes=n, timeout=900)}
        mem = memory_kib(node.daemon.pid)
        out["rss_mib"], out["hwm_mib"] = mem["VmRSS"] / 1024, mem["VmHWM"] / 1024
        maps = Maps(node.bpffs)
        store = open_store(rig.store)
        adds, dels, backs, writes = [], [], [], []
        for k in range(changes):
            # add one service with its own backend set
            i = n + k
            svc = Service.from_dict({**service_doc(i, sets[i]), "name": f"s{i}"})
            t0 = time.monotonic()
            svclib.add_service(store, svc)
            adds.append(wait_for(lambda: maps.service(vip(i), 80) is not None) - t0)
            # change one existing service's backends (one pod swapped for another)
            j = (k * 7919) % n
            cur = svclib.get_service(store, f"s{j}")
            names = [b.pod for b in cur.backends]
            spare = next(p for p in pods if p not in names)
            changed = replace(cur, backends=tuple(replace(b, pod=spare) if idx == 0 else b
                                                  for idx, b in enumerate(cur.backends)))
            before = maps.service(cur.vip, 80)
            t0 = time.monotonic()
            store.put(SERVICES_PREFIX + cur.name, changed.to_json())
            writes.append(time.monotonic() - t0)   # the store's own part (sqlite: one fsync'd commit)
            backs.append(wait_for(lambda: maps.service(cur.vip, 80) not in (before, None)) - t0)
            # delete the one just added
            t0 = time.monotonic()
            svclib.delete_service(store, f"s{i}")
            dels.append(wait_for(lambda: maps.service(vip(i), 80) is None) - t0)
        out["change"] = {"add": adds, "delete": dels, "backends": backs, "backends_write": writes}
        all_changes = adds + dels + backs
        out["write_p50"] = pctl(writes, 0.5)
        out["change_p50"], out["change_p99"] = pctl(all_changes, 0.5), pctl(all_changes, 0.99)
        if pod_adds:
            out.update(pod_add_latencies(rig, node, store, maps, pod_adds, vip(n + changes), log))
        if metrics_port:
            scrape = node.exec("/usr/bin/python3", "-c",
                               "import time,urllib.request\n"
                               "u=f'http://127.0.0.1:%d/metrics'\n"
                               "urllib.request.urlopen(u).read()\n"
                               "ts=[]\n"
                               "for _ in range(5):\n"
                               "    t=time.perf_counter(); urllib.request.urlopen(u).read(); ts.append(time.perf_counter()-t)\n"
                               "print(sorted(ts)[2])" % metrics_port, timeout=120)
            out["scrape"] = float(scrape.stdout.strip())
        if idle_window:
            before = cpu_seconds(node.daemon.pid)
            time.sleep(idle_window)   # the measurement window itself: nothing changes meanwhile
            out["idle"] = (cpu_seconds(node.daemon.pid) - before) / idle_window
        mem = memory_kib(node.daemon.pid)
        out["rss_end_mib"] = mem["VmRSS"] / 1024
        prog = out["program"]
        log(f"  cp node n={n} nb={nb}: program {prog['wall']:.2f}s (CLI {prog['cli']:.2f}s, watch + dispatch "
            f"{prog['wall'] - prog['cli'] - prog['reconcile']:.2f}s, reconcile {prog['reconcile']:.2f}s; CPU: CLI "
            f"{prog['cli_cpu']:.2f}s, daemon {prog['daemon_cpu']:.2f}s), change p50 {out['change_p50'] * 1000:.1f} ms p99 "
            f"{out['change_p99'] * 1000:.1f} ms (store write alone p50 {out['write_p50'] * 1000:.1f} ms), RSS {out['rss_mib']:.0f} MiB"
            + (f", scrape {out['scrape'] * 1000:.0f} ms" if "scrape" in out else "")
            + (f", idle {out['idle'] * 100:.2f}%" if "idle" in out else ""))
        return out
    finally:
        if maps is not None:
            maps.close()
        for m in rig.bench_maps:
            m.close()
        if store is not None:
            store.close()
        rig.teardown()


PROBE_LABEL = "bench=podadd"


def installed_atomnet() -> list[str]:
    """The `atomnet` command make build installs (the lean launcher), or why it cannot be timed."""
    from tests.e2e.rig import INSTALLED_ATOMNET
    text = INSTALLED_ATOMNET.read_text() if INSTALLED_ATOMNET.exists() else ""
    if "from ctl.launch import run" not in text:
        raise AssertionError(f"{INSTALLED_ATOMNET} is not atomnet's launcher: run `make build`")
    return [str(INSTALLED_ATOMNET)]


def daemon_events(node, offset: int, event: str) -> list[dict]:
    """The daemon's JSON log lines `event` written after byte `offset` of its log."""
    with open(node.log_path, "rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").splitlines()
    out = []
    for line in lines:
        if f'"event": "{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def pod_add_ways(command: list[str], module: list[str]) -> list[tuple[str, str, list[str], dict]]:
    """(result key, pod name tag, command, extra env) of each interleaved way to add a pod."""
    return [("pod_add", "x", command, {}), ("pod_add_inproc", "y", command, {"ATOMNET_API_SOCKET": "off"}),
            ("pod_add_module", "z", module, {})]


def pod_add_latencies(rig, node, store, maps: Maps, count: int, probe_vip: str, log=print) -> dict:
    """`atomnet pod add` (the installed command's start) -> its endpoint in this node's map, and
    -> a backend of a service on a second node whose selector matches it; each add through the
    daemon interleaved with one done in the CLI's process and one started as `python -m
    ctl.cli` (a normal interpreter start, with site: what this row timed before the launcher).
    The daemon's own part of each add is read from its log (nodeapi_request, and the sync that
    programmed it: `reconciled`, with the Maglev tables it rebuilt). The second node starts
    here, so the change timings above ran beside one daemon only; it programs the same N
    services before the first add."""
    import subprocess
    from ctl.state import services as svclib
    from ctl.state.model import Service
    from tests.e2e.rig import ATOMNET
    command = installed_atomnet()
    svclib.add_service(store, Service.from_dict({
        "name": "podadd-probe", "vip": probe_vip, "selector": dict([PROBE_LABEL.split("=")]),
        "ports": [{"port": 80, "target_port": 8080, "proto": "tcp"}]}))
    other = rig.add_node("cq")
    other.start_daemon(*getattr(node, "lb_args", ()), wait=False)
    other.wait_log("dataplane_ready", timeout=900)   # it programs the N services first
    remote = Maps(other.bpffs)
    rig.bench_maps.append(remote)
    wait_for(lambda: remote.backend_count(probe_vip, 80) is not None, timeout=900)
    wait_for(lambda: maps.backend_count(probe_vip, 80) is not None, timeout=60)
    ways = pod_add_ways(command, ATOMNET)
    out: dict = {key: [] for key, _, _, _ in ways}
    for k in range(count):
        for key, tag, cmd, env in ways:
            name = f"p{rig.uid}-{tag}{k}"
            node.pods.append(name)   # the rig's teardown removes it
            before = remote.backend_count(probe_vip, 80)
            offset = node.log_path.stat().st_size
            t0 = time.monotonic()
            res = subprocess.run(node.nsenter + cmd + ["-j", "pod", "add", name, "--label", PROBE_LABEL],
                                 env={**node.env(), **env}, capture_output=True, text=True, timeout=120)
            cli = time.monotonic() - t0
            if res.returncode != 0:
                raise AssertionError(f"pod add failed: {res.stderr.strip()}")
            ip = json.loads(res.stdout)["ip"]
            t_ep = wait_for(lambda: maps.endpoint(ip) is not None)
            t_remote = wait_for(lambda: remote.backend_count(probe_vip, 80) == before + 1)
            sample = {"wall": t_ep - t0, "remote": t_remote - t0, "cli": cli}
            served = [e for e in daemon_events(node, offset, "nodeapi_request") if e.get("op") == "pod.add"]
            if served:
                sample["daemon"] = served[-1]["seconds"]
                synced = daemon_events(node, offset, "reconciled")
                if synced:
                    sample["sync"], sample["tables_built"] = synced[0]["seconds"], synced[0].get("tables_built")
            out[key].append(sample)
    for key, _, _, _ in ways:
        lat = out[key]
        daemon = [x["daemon"] for x in lat if "daemon" in x]
        sync = [x["sync"] for x in lat if "sync" in x]
        log(f"  {key}: CLI start -> endpoint p50 {pctl([x['wall'] for x in lat], .5) * 1000:.1f} ms, -> backend on "
            f"another node p50 {pctl([x['remote'] for x in lat], .5) * 1000:.1f} ms (CLI exit p50 "
            f"{pctl([x['cli'] for x in lat], .5) * 1000:.1f} ms, {len(lat)} adds"
            + (f"; daemon's nodeapi_request p50 {pctl(daemon, .5) * 1000:.1f} ms" if daemon else "")
            + (f", of which its sync p50 {pctl(sync, .5) * 1000:.1f} ms" if sync else "") + ")")
    return out


if __name__ == "__main__":   # a quick look: python -m tests.bench.control_plane N NB [CHANGES IDLE POD_ADDS]
    import sys
    from .cases import Bench, Config
    n, nb = int(sys.argv[1]), int(sys.argv[2])
    tmp = Path(tempfile.mkdtemp(prefix="cpq-"))
    bench = Bench.__new__(Bench)
    bench.log = print
    res = run_node(tmp, [], n, nb, 20, int(sys.argv[3]) if len(sys.argv) > 3 else 10,
                   lambda node, docs, min_changes, timeout: Bench.atomnet_apply(bench, node, docs, min_changes=min_changes,
                                                                                timeout=timeout),
                   idle_window=float(sys.argv[4]) if len(sys.argv) > 4 else 0, metrics_port=9641, pod_adds=int(sys.argv[5]) if len(sys.argv) > 5 else 5)
    print(json.dumps({k: v for k, v in res.items()}, default=str)[:3000])
