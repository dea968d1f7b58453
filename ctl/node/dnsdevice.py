"""The node-local home of the DNS VIP: VIP/32 on the node's `lo` (label lo:atomnet-dns),
as NodeLocal DNSCache binds 169.254.20.10 on a device of its own. (A dummy device would
be tidier, but this kernel has no dummy driver: `ip link add x type dummy` answers
EOPNOTSUPP; an address on lo needs no driver.)

Why this and not a service entry: from_pod DNATs service traffic and translates replies
back when they come through from_pod or from_overlay. A pod's query DNAT'd to a node
address would go up the node's stack, but the node's reply to the pod leaves through the
host veth's egress, where no program runs: its source would stay the node address and the
pod's resolver would drop it. With the VIP a local address of every node, a pod's query
(no service matches VIP:53 in from_pod, so it is passed to the stack) is delivered to the
local server, and the reply's source already is the VIP: nothing needs translating, and a
query never leaves its node."""
from __future__ import annotations

from .netlink import dump
from .netplumb import ipr

LABEL = "lo:atomnet-dns"


def ensure(vip: str) -> int:
    """VIP/32 on lo, and no other address with our label (a changed VIP); returns lo's ifindex."""
    with ipr() as conn:
        index = conn.link_lookup(ifname="lo")[0]
        present = False
        for a in dump(lambda: list(conn.get_addr(index=index, family=2))):
            if a.get_attr("IFA_LABEL") != LABEL:
                continue
            if a.get_attr("IFA_ADDRESS") == vip and a["prefixlen"] == 32:
                present = True
            else:
                conn.addr("del", index=index, address=a.get_attr("IFA_ADDRESS"), prefixlen=a["prefixlen"])
        if not present:
            conn.addr("add", index=index, address=vip, prefixlen=32, label=LABEL)
        return index


def present(vip: str) -> bool:
    """Whether this node holds the DNS VIP (so a query to it stays on the node)."""
    with ipr() as conn:
        index = conn.link_lookup(ifname="lo")[0]
        return any(a.get_attr("IFA_ADDRESS") == vip and a.get_attr("IFA_LABEL") == LABEL
                   for a in dump(lambda: list(conn.get_addr(index=index, family=2))))
