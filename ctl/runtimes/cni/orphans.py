"""CNI pods their runtime forgot, released by the daemon (what Cilium's endpoint GC does).

containerd 1.6's `ctr` runs CNI DEL only for `ctr run --rm`: after `ctr task delete` of a
detached container the process, and with it the netns (`/proc/PID/ns/net`), is gone, so the
kernel deleted the veth pair, but nothing ever tells the plugin. The daemon sees the host
veth disappear (ctl/node/linkwatch.py) and releases such a pod exactly as DEL would
(plugin.remove_pod: its forwards, links, address, record).

Only when BOTH are gone: the host veth and the netns the pod was put in. A podman DEL
deletes the veth while the netns still exists (podman unmounts it after DEL returned, and
DEL removed the record by then); a veth deleted by hand leaves the netns; so neither is
taken for a forgotten pod. Each candidate is read again from the store and the kernel when
acted on, so a name re-used by a new ADD (its netns alive) is never touched.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import structlog

from ...node import netplumb
from ...state.model import Pod
from ...state.pods import get_pod
from ...state.store import Store
from .plugin import RUNTIME, remove_pod

log = structlog.get_logger("atomnet.cni")


def forgotten(pods: Iterable[Pod | None], links, netns_exists: Callable[[str], bool], node: str) -> list[Pod]:
    """The CNI pods of `node` whose host veth is not in `links` and whose netns does not exist.
    Never a pod of another runtime (Docker's, `pod add`'s) or one whose netns atomnet owns."""
    return [p for p in pods if p is not None and p.node == node and p.runtime == RUNTIME and not p.netns_owned
            and p.netns and p.host_ifname not in links and not netns_exists(p.netns)]


def release_forgotten(store: Store, node: str, names: Iterable[str]) -> list[Pod]:
    """Releases those of the named pods that are forgotten now; returns them."""
    links = netplumb.link_table()
    gone = forgotten([get_pod(store, n) for n in sorted(set(names))], links, os.path.exists, node)
    for pod in gone:
        remove_pod(store, node, pod)
        log.info("cni_pod_released", pod=pod.name, container_id=pod.container_id, ip=pod.ip, netns=pod.netns,
                 reason="host veth and netns gone (the runtime ran no DEL)")
    return gone
