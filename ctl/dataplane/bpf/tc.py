"""clsact + cls_bpf (direct-action) attachment with pyroute2.

atomnet owns exactly one filter per hook: priority ATOMNET_PRIO, handle ATOMNET_HANDLE,
named "atomnet:<program>". Re-attaching is `tc filter replace` on that same
handle/prio, which swaps the program atomically: no packet sees a missing program.
Detaching deletes only filters with that name prefix; other tools' filters stay.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import sched_bpf

from ...node.netlink import dump

INGRESS, EGRESS = "ingress", "egress"
PARENTS = {INGRESS: 0xFFFFFFF2, EGRESS: 0xFFFFFFF3}
ATOMNET_PRIO = 1
ATOMNET_HANDLE = 1
NAME_PREFIX = "atomnet:"

# pyroute2 0.7's cls_bpf attribute map stops at TCA_BPF_FLAGS; the kernel also sends
# FLAGS_GEN, TAG and ID (linux/pkt_cls.h). Extend the map once so filters carry the
# program id that `net show` needs to agree with bpftool.
if len(sched_bpf.options.nla_map) <= 9:
    sched_bpf.options.nla_map = tuple(sched_bpf.options.nla_map) + (
        ("TCA_BPF_FLAGS_GEN", "uint32"), ("TCA_BPF_TAG", "hex"), ("TCA_BPF_ID", "uint32"))


@dataclass(frozen=True)
class Filter:
    ifindex: int
    direction: str
    prio: int
    handle: int
    name: str
    prog_id: int | None
    direct_action: bool

    @property
    def ours(self) -> bool:
        return self.name.startswith(NAME_PREFIX)


def ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def attach(ipr: IPRoute, ifindex: int, direction: str, prog_fd: int, prog_name: str) -> None:
    ensure_clsact(ipr, ifindex)
    ipr.tc("replace-filter", "bpf", ifindex, ATOMNET_HANDLE, fd=prog_fd, name=NAME_PREFIX + prog_name,
           parent=PARENTS[direction], prio=ATOMNET_PRIO, classid=1, direct_action=True)


def detach(ipr: IPRoute, ifindex: int, direction: str) -> bool:
    for f in filters(ipr, ifindex, direction):
        if f.ours:
            try:
                ipr.tc("del-filter", "bpf", ifindex, f.handle, parent=PARENTS[direction], prio=f.prio)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    raise
            return True
    return False


def filters(ipr: IPRoute, ifindex: int, direction: str) -> list[Filter]:
    try:
        msgs = dump(lambda: list(ipr.get_filters(index=ifindex, parent=PARENTS[direction])))
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):  # no clsact here
            return []
        raise
    out = []
    for msg in msgs:
        if msg.get_attr("TCA_KIND") != "bpf":
            continue
        opts = msg.get_attr("TCA_OPTIONS")
        if opts is None:
            continue
        out.append(Filter(ifindex=ifindex, direction=direction, prio=msg["info"] >> 16,
                          handle=msg["handle"], name=opts.get_attr("TCA_BPF_NAME") or "",
                          prog_id=opts.get_attr("TCA_BPF_ID"), direct_action=bool((opts.get_attr("TCA_BPF_FLAGS") or 0) & 1)))
    return out
