"""The cluster-scale control-plane row of issue 15: one real node's daemon against a real
etcd that also holds 200 simulated nodes' subnet leases and 10 000 pods spread over them
(the simulated nodes have no dataplane: they are store writes, as their daemons would make
them), with services that select those remote pods. Measured:

- follow: the first write -> every tunnel and every service programmed on the real node;
- a node joins / leaves: its lease written or deleted -> its tunnel in / out of the map;
- a remote pod joins a service: its pod record written -> the service's backend count grows;
- the daemon's RSS, and its CPU while nothing changes.

The bench process reaches etcd from a thread inside the underlay namespace (setns: a
thread's own network namespace), and reads the pinned maps from the root one.
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from .control_plane import fresh_rig, pctl, wait_for
from .harness import cpu_seconds, memory_kib

CLONE_NEWNET = 0x40000000
TXN_OPS = 100   # etcd's default --max-txn-ops is 128


def _enter_netns(path: str) -> None:
    fd = open(path)
    if ctypes.CDLL(None, use_errno=True).setns(fd.fileno(), CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {path}")
    fd.close()


def sim_lease(k: int, octets: list[int]) -> tuple[str, str]:
    """Simulated node k's lease: subnet 10.244.octets[k].0/24 (octets: the /24s nobody holds)."""
    from ctl.state.model import Lease, subnet_key
    subnet = ipaddress.IPv4Network(f"10.244.{octets[k]}.0/24")
    return subnet_key(subnet), Lease(str(subnet), f"172.31.{k // 250}.{k % 250 + 1}", 1,
                                     f"02:5e:00:00:{k // 256:02x}:{k % 256:02x}").to_json()


def sim_pod(k: int, j: int, group: int, octets: list[int]) -> tuple[str, str]:
    from ctl.state.model import PODS_PREFIX, Pod, host_ifname
    name = f"sim{k}-{j}"
    pod = Pod(name=name, node=f"sim{k}", ip=f"10.244.{octets[k]}.{j + 10}", netns=f"/run/netns/{name}",
              host_ifname=host_ifname(name), mac=f"02:5f:00:{k // 256:02x}:{k % 256:02x}:{j:02x}",
              labels={"grp": str(group)})
    return PODS_PREFIX + name, pod.to_json()


def run_cluster(parent_tmp: Path, uids: list[str], nodes: int = 200, pods: int = 10_000, services: int = 1000,
                reps: int = 20, idle_window: float = 10.0, log=print) -> dict:
    from ctl.dataplane.bpf import syscalls as sc
    from ctl.dataplane.bpf.maps import Map
    from ctl.dataplane.bpf.types import ServiceInfo, ServiceKey, TunnelInfo, TunnelKey
    from ctl.state.model import SERVICES_PREFIX, SUBNETS_PREFIX, Service
    from ctl.state.store import open_store
    from .cases import vip

    rig = fresh_rig(parent_tmp, uids, "cc")
    pool = store = None
    maps: list[Map] = []
    try:
        rig.use_etcd()
        node = rig.add_node("cc")
        node.start_daemon()
        pool = ThreadPoolExecutor(1, initializer=_enter_netns, initargs=(f"/run/netns/{rig.underlay}",))
        store = pool.submit(open_store, rig.store).result()
        tunnels = Map(sc.obj_get(f"{node.bpffs}/maps/tunnels"), TunnelKey, TunnelInfo)
        svcmap = Map(sc.obj_get(f"{node.bpffs}/maps/services"), ServiceKey, ServiceInfo)
        maps += [tunnels, svcmap]

        def put_all(items):
            for i in range(0, len(items), TXN_OPS):
                store.put_many(items[i:i + TXN_OPS])

        def service(i: int):
            v = svcmap.get(ServiceKey.from_dict({"vip": vip(i), "port": 80, "proto": 6}))
            return None if v is None else v.backend_count

        def tunnel(k: int) -> bool:
            return tunnels.get(TunnelKey.from_dict({"prefixlen": 24, "ip": f"10.244.{octets[k]}.0"})) is not None

        taken = {kv.key for kv in pool.submit(store.list, SUBNETS_PREFIX).result()[0]}
        octets = [n for n in range(256) if f"{SUBNETS_PREFIX}10.244.{n}.0-24" not in taken]
        if len(octets) < nodes + reps:
            raise AssertionError(f"only {len(octets)} free /24s in 10.244.0.0/16 for {nodes + reps} nodes")
        per_node = pods // nodes
        pod_items = [sim_pod(k, j, (k * per_node + j) % services, octets) for k in range(nodes) for j in range(per_node)]
        svc_items = [(SERVICES_PREFIX + f"s{i}", Service.from_dict({
            "name": f"s{i}", "vip": vip(i), "selector": {"grp": str(i)},
            "ports": [{"port": 80, "target_port": 8080, "proto": "tcp", "id": i + 1}]}).to_json())
            for i in range(services)]
        t0 = time.monotonic()
        pool.submit(put_all, [sim_lease(k, octets) for k in range(nodes)] + pod_items + svc_items).result()
        written = time.monotonic() - t0
        want = pods // services
        wait_for(lambda: len(list(tunnels.keys())) >= nodes and service(services - 1) == want and service(0) == want,
                 timeout=300)
        follow = time.monotonic() - t0
        out: dict = {"nodes": nodes, "pods": pods, "services": services, "write": written, "follow": follow}
        mem = memory_kib(node.daemon.pid)
        out["rss_mib"] = mem["VmRSS"] / 1024
        joins, leaves, pod_adds = [], [], []
        for r in range(reps):
            k = nodes + r   # a node joins: its lease; then leaves
            key, value = sim_lease(k, octets)
            t = time.monotonic()
            pool.submit(store.put, key, value).result()
            joins.append(wait_for(lambda: tunnel(k)) - t)
            # a pod on that node joins service r: the backend count of service r grows
            before = service(r)
            pkey, pvalue = sim_pod(k, 0, r, octets)
            t = time.monotonic()
            pool.submit(store.put, pkey, pvalue).result()
            pod_adds.append(wait_for(lambda: service(r) == before + 1) - t)
            pool.submit(store.delete, pkey).result()
            wait_for(lambda: service(r) == before)
            t = time.monotonic()
            pool.submit(store.delete, key).result()
            leaves.append(wait_for(lambda: not tunnel(k)) - t)
        out["lease_join"], out["lease_leave"], out["remote_pod_add"] = joins, leaves, pod_adds
        changes = joins + leaves + pod_adds
        out["change_p50"], out["change_p99"] = pctl(changes, 0.5), pctl(changes, 0.99)
        if idle_window:
            before = cpu_seconds(node.daemon.pid)
            time.sleep(idle_window)   # the measurement window itself: nothing changes meanwhile
            out["idle"] = (cpu_seconds(node.daemon.pid) - before) / idle_window
        out["rss_end_mib"] = memory_kib(node.daemon.pid)["VmRSS"] / 1024
        log(f"  cluster: {nodes} simulated nodes, {pods} pods, {services} services in etcd: written in "
            f"{written:.2f}s, followed in {follow:.2f}s; join/leave/remote pod p50 "
            f"{pctl(joins, .5) * 1000:.1f}/{pctl(leaves, .5) * 1000:.1f}/{pctl(pod_adds, .5) * 1000:.1f} ms, "
            f"all p99 {out['change_p99'] * 1000:.1f} ms, RSS {out['rss_end_mib']:.0f} MiB"
            + (f", idle {out['idle'] * 100:.2f}%" if "idle" in out else ""))
        return out
    finally:
        for m in maps:
            m.close()
        if store is not None:
            pool.submit(store.close).result()
        if pool is not None:
            pool.shutdown()
        rig.teardown()


if __name__ == "__main__":   # python -m tests.bench.cluster [NODES PODS SERVICES]
    import sys
    args = [int(a) for a in sys.argv[1:4]]
    res = run_cluster(Path(tempfile.mkdtemp(prefix="ccq-")), [], *args)
    print(json.dumps(res, default=str)[:3000])
