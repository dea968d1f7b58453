"""Netlink plumbing for pods and nodes (pyroute2): namespaces, veth pairs, addresses, routes.

A pod gets a veth pair: `eth0` in its namespace with its /32 address, and an
`anXXXXXXXXXXX` end on the node. Its default route goes via 169.254.1.1, a
link-local gateway that exists only as a permanent neighbour entry pointing at the
host-side MAC: the pod never needs an ARP answer, and every frame it sends lands on
the host-side veth, where from_pod runs.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import AtomnetError
from ..state.model import HOST_IFNAME_PREFIX, POD_GATEWAY, POD_IFNAME, ValidationError
from .netlink import dump

NETNS_DIR = Path("/run/netns")
RT_PROTO_ATOMNET = 192
IN6_ADDR_GEN_MODE_NONE = 1
IFF_UP, IFF_NOARP = 0x1, 0x80  # our routes carry their own protocol number, like `proto bird` for BIRD


@dataclass(frozen=True)
class Uplink:
    ifname: str
    ip: str
    mtu: int


@dataclass(frozen=True)
class LinkInfo:
    """A link of this node as the dataplane needs it."""
    ifindex: int
    mac: str


@contextmanager
def ipr():
    conn = IPRoute()
    try:
        yield conn
    finally:
        conn.close()


def _addresses(conn) -> list[tuple[int, str]]:
    return [(a["index"], a.get_attr("IFA_ADDRESS")) for a in dump(lambda: list(conn.get_addr(family=2)))
            if a["scope"] == 0]


# A host with no network at all (no default route, no global address), as Docker runs on:
# a node of its own on lo. Its "public" address is loopback (published ports serve the node
# itself) and its MTU a plain Ethernet one (lo's 65536 would give pods an MTU no real link
# has, and a later uplink would shrink it under them).
NO_UPLINK = Uplink(ifname="lo", ip="127.0.0.1", mtu=1500)


def detect_uplink(public_ip: str | None = None, uplink: str | None = None) -> Uplink:
    """The node's uplink: named, or the one holding public_ip, or the default route's, or the
    first interface with a global IPv4 address (not ours, not loopback), or else lo (NO_UPLINK)."""
    if uplink == NO_UPLINK.ifname and public_ip in (None, NO_UPLINK.ip):
        return NO_UPLINK
    with ipr() as conn:
        links = {link["index"]: link for link in dump(lambda: list(conn.get_links()))}
        addrs = _addresses(conn)
        index = None
        if uplink:
            found = conn.link_lookup(ifname=uplink)
            if not found:
                raise AtomnetError(f"uplink interface {uplink} does not exist on this node")
            index = found[0]
        elif public_ip:
            index = next((i for i, a in addrs if a == public_ip), None)
            if index is None:
                raise AtomnetError(f"public IP {public_ip} is not configured on any interface of this node")
        else:
            for route in dump(lambda: list(conn.get_default_routes(family=2))):
                index = route.get_attr("RTA_OIF")
                break
            if index is None:
                # not a pod's veth, not our overlay device (it holds the subnet's .0)
                candidates = [i for i, _ in addrs
                              if not links[i].get_attr("IFLA_IFNAME").startswith((HOST_IFNAME_PREFIX, "atomnet."))]
                if not candidates:
                    return NO_UPLINK
                index = candidates[0]
        ip = public_ip or next((a for i, a in addrs if i == index), None)
        name = links[index].get_attr("IFLA_IFNAME")
        if ip is None:
            raise AtomnetError(f"uplink {name} has no IPv4 address: pass --public-ip")
        return Uplink(ifname=name, ip=ip, mtu=links[index].get_attr("IFLA_MTU"))


def link_table() -> dict[str, LinkInfo]:
    """ifname -> (ifindex, MAC) for every link in this namespace."""
    with ipr() as conn:
        return {link.get_attr("IFLA_IFNAME"): LinkInfo(link["index"], link.get_attr("IFLA_ADDRESS"))
                for link in dump(lambda: list(conn.get_links()))}


def netns_path(name_or_path: str) -> Path:
    return Path(name_or_path) if "/" in name_or_path else NETNS_DIR / name_or_path


CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def on_netns_thread(fn, netns: Path | None = None):
    """fn() on a fresh thread whose network namespace is `netns`, or a new one (None).
    A network namespace belongs to a thread, not a process: this is what pyroute2's NetNS and
    netns.create do with a forked child, without forking the caller (the daemon serves pod adds
    from a process of hundreds of MiB and many threads; a fork costs it more than the work).
    A fresh thread each time, never a pooled one: it dies in the namespace it entered."""
    out: dict = {}

    def body():
        try:
            if netns is None:
                _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            else:
                fd = os.open(netns, os.O_RDONLY)
                try:
                    _check(_libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
                finally:
                    os.close(fd)
            out["value"] = fn()
        except BaseException as exc:   # re-raised on the caller's thread
            out["error"] = exc

    worker = threading.Thread(target=body, name="netns")
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def create_netns(path: Path) -> None:
    """`ip netns add`: a new namespace bind-mounted on /run/netns/NAME (iproute2's steps: the
    directory a shared mount, so the binds propagate to other mount namespaces)."""
    if path.parent != NETNS_DIR:
        raise AtomnetError(f"can only create namespaces under {NETNS_DIR}; create {path} first")
    os.makedirs(NETNS_DIR, exist_ok=True)
    d = str(NETNS_DIR).encode()
    if _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) != 0:
        _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), f"mount --bind {NETNS_DIR}")
        _check(_libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None), f"mount --make-shared {NETNS_DIR}")
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        on_netns_thread(lambda: _check(_libc.mount(b"/proc/thread-self/ns/net", str(path).encode(), b"none",
                                                   MS_BIND, None), f"mount --bind {path}"))
    except BaseException:
        os.unlink(path)
        raise


def remove_netns(path: Path) -> None:
    if path.exists():
        pr_netns.remove(path.name)


def create_pod_links(netns: Path, host_if: str, ip: str, mtu: int, ifname: str = POD_IFNAME,
                     mac: str | None = None) -> tuple[str, str]:
    """Creates and configures the veth pair; returns (pod interface MAC, host-side MAC).
    On any failure the pair is removed again, so nothing half-made stays behind."""
    fd = os.open(netns, os.O_RDONLY)
    try:
        peer = {"ifname": ifname, "net_ns_fd": fd, "mtu": mtu, **({"address": mac} if mac else {})}
        _add_veth(host_if, mtu, peer, f"interface {host_if} (or {ifname} in {netns}) already exists")
    finally:
        os.close(fd)
    try:
        host_mac = _configure_host_side(host_if, ip)

        def pod_side() -> str:
            with ipr() as pod_ns:
                lo = pod_ns.link_lookup(ifname="lo")[0]
                pod_ns.link("set", index=lo, state="up")
                eth = pod_ns.link_lookup(ifname=ifname)[0]
                pod_mac = pod_ns.get_links(eth)[0].get_attr("IFLA_ADDRESS")
                pod_ns.addr("add", index=eth, address=ip, prefixlen=32)
                # IPv4-only dataplane: no IPv6 link-local address, so no RS/MLD chatter that
                # from_pod would only drop (and count) as unsupported.
                _no_ipv6_linklocal(pod_ns, eth)
                pod_ns.link("set", index=eth, state="up")
                pod_ns.route("add", dst=f"{POD_GATEWAY}/32", oif=eth, scope=253)
                pod_ns.route("add", dst="0.0.0.0/0", gateway=POD_GATEWAY, oif=eth)
                pod_ns.neigh("add", dst=POD_GATEWAY, lladdr=host_mac, ifindex=eth, state=0x80)  # NUD_PERMANENT
                return pod_mac

        return on_netns_thread(pod_side, netns), host_mac
    except Exception:
        delete_pod_links(host_if)
        raise


def create_runtime_links(host_if: str, peer_if: str, ip: str, mtu: int, mac: str | None = None) -> tuple[str, str]:
    """The veth pair of a pod whose runtime moves the pod end into the sandbox itself
    (libnetwork's remote driver: Docker moves `peer_if` at Join and sets its address and
    routes from our answers). Both ends are made here in the node's namespace; the host
    side is configured as for any pod. Docker cannot install a permanent neighbour entry
    for the gateway, so the host side also carries POD_GATEWAY (scope link): the kernel
    then answers the pod's ARP for it with the host-side MAC, whatever arp_ignore says
    (the address is on the very interface asked). Returns (peer MAC, host-side MAC)."""
    peer = {"ifname": peer_if, "mtu": mtu, **({"address": mac} if mac else {})}
    _add_veth(host_if, mtu, peer, f"interface {host_if} or {peer_if} already exists")
    try:
        host_mac = _configure_host_side(host_if, ip)
        with ipr() as conn:
            host_index = conn.link_lookup(ifname=host_if)[0]
            conn.addr("add", index=host_index, address=POD_GATEWAY, prefixlen=32, scope=253)
            index = conn.link_lookup(ifname=peer_if)[0]
            return conn.get_links(index)[0].get_attr("IFLA_ADDRESS"), host_mac
    except Exception:
        delete_pod_links(host_if)
        raise



def pod_link_problems(netns: Path, host_if: str, ifname: str, ip: str) -> list[str]:
    """What differs from what create_pod_links made (CNI CHECK): the host-side veth, the pod's
    interface, its /32 address, the gateway route and the default route. [] when all is there."""
    problems = []
    with ipr() as conn:
        if not conn.link_lookup(ifname=host_if):
            problems.append(f"host-side interface {host_if} is missing")
    if not netns.exists():
        return problems + [f"network namespace {netns} does not exist"]

    def pod_side() -> list[str]:
        with ipr() as pod_ns:
            found = pod_ns.link_lookup(ifname=ifname)
            if not found:
                return [f"interface {ifname} is missing in {netns}"]
            index, out = found[0], []
            addrs = {a.get_attr("IFA_ADDRESS") for a in pod_ns.get_addr(index=index, family=2)}
            if ip not in addrs:
                out.append(f"{ifname} does not have address {ip} (has {', '.join(sorted(addrs)) or 'none'})")
            routes = [(r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"))
                      for r in pod_ns.get_routes(family=2, table=254) if r.get_attr("RTA_OIF") == index]
            if (POD_GATEWAY, 32, None) not in routes:
                out.append(f"no route to the gateway {POD_GATEWAY} on {ifname}")
            if (None, 0, POD_GATEWAY) not in routes:
                out.append(f"no default route via {POD_GATEWAY} on {ifname}")
            return out

    return problems + on_netns_thread(pod_side, netns)



def _add_veth(host_if: str, mtu: int, peer: dict, exists_msg: str) -> None:
    try:
        with ipr() as conn:
            conn.link("add", ifname=host_if, kind="veth", mtu=mtu, peer=peer)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            raise AtomnetError(exists_msg) from None
        if exc.code == errno.EADDRNOTAVAIL and "address" in peer:
            raise ValidationError(f"invalid MAC address {peer['address']}: not a unicast address") from None
        raise


def _configure_host_side(host_if: str, ip: str) -> str:
    """Host side up, the pod's /32 routed to it; returns its MAC."""
    with ipr() as conn:
        host_index = conn.link_lookup(ifname=host_if)[0]
        host_mac = conn.get_links(host_index)[0].get_attr("IFLA_ADDRESS")
        conn.link("set", index=host_index, state="up")
        conn.route("replace", dst=f"{ip}/32", oif=host_index, scope=253, proto=RT_PROTO_ATOMNET)
        return host_mac


def _no_ipv6_linklocal(conn, index: int) -> None:
    conn.link("set", index=index, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [
        ["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]})


def delete_pod_links(host_if: str) -> bool:
    """Deleting the host end deletes its peer and the /32 route with it."""
    with ipr() as conn:
        found = conn.link_lookup(ifname=host_if)
        if not found:
            return False
        try:
            conn.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
        return True


def overlay_ifname(vni: int) -> str:
    """flannel names its device flannel.<VNI>; ours is atomnet.<VNI>."""
    return f"atomnet.{vni}"


def ensure_overlay(vni: int, port: int, mac: str, mtu: int, subnet: str, cluster_cidr: str) -> int:
    """The node's one VXLAN device in external (collect_md) mode: the programs choose the
    remote VTEP per packet. Like flannel: the subnet's .0 address on it (the node's source
    for traffic to remote pods) and the cluster network routed through it. NOARP: nobody
    resolves neighbours on it; inner MACs are set by the programs. Returns its ifindex."""
    import ipaddress
    name = overlay_ifname(vni)
    net = ipaddress.IPv4Network(subnet)
    with ipr() as conn:
        found = conn.link_lookup(ifname=name)
        if found:
            link = conn.get_links(found[0])[0]
            info = link.get_attr("IFLA_LINKINFO")
            data = info.get_attr("IFLA_INFO_DATA") if info else None
            if (info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan" or data is None
                    or data.get_attr("IFLA_VXLAN_PORT") != port or not data.get_attr("IFLA_VXLAN_COLLECT_METADATA")):
                conn.link("del", index=found[0])   # not what we need (e.g. VXLAN port changed): recreate
                found = []
        if not found:
            try:
                conn.link("add", ifname=name, kind="vxlan", vxlan_collect_metadata=1, vxlan_port=port,
                          vxlan_learning=0, address=mac, mtu=mtu)
            except NetlinkError as exc:
                if exc.code == errno.EADDRINUSE:
                    raise AtomnetError(f"UDP port {port} is taken by another VXLAN device on this node "
                                       "(flannel.1?): one node runs one overlay") from None
                raise
        index = conn.link_lookup(ifname=name)[0]
        conn.link("set", index=index, address=mac, mtu=mtu, flags=IFF_NOARP | IFF_UP, mask=IFF_NOARP | IFF_UP)
        conn.link("set", index=index, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [
            ["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]})
        wanted = str(net.network_address)
        for a in dump(lambda: list(conn.get_addr(index=index, family=2))):
            if a.get_attr("IFA_ADDRESS") != wanted:
                conn.addr("del", index=index, address=a.get_attr("IFA_ADDRESS"), prefixlen=a["prefixlen"])
        if not conn.get_addr(index=index, family=2):
            conn.addr("add", index=index, address=wanted, prefixlen=32)
        conn.route("replace", dst=cluster_cidr, oif=index, scope=253, prefsrc=wanted, proto=RT_PROTO_ATOMNET)
        return index


NODE_SYSCTLS = {
    # A node routes for its pods (and the programs' FIB lookups require it), like every
    # Kubernetes node.
    "net/ipv4/ip_forward": "1",
    # Replies to the node's own connections to a published port come back translated to
    # "from the node's address"; the programs hand them to lo, which must accept a local
    # source there (nothing else arrives on lo from outside).
    "net/ipv4/conf/lo/accept_local": "1",
    # ... and, for a port published on 127.0.0.1, a reply from and to 127.0.0.1: handed to
    # lo by the program it carries no route, and the stack drops 127/8 as martian unless
    # lo may route it. On lo only (kube-proxy's route_localnet=1 on every interface let
    # other hosts reach localhost services, CVE-2020-8558); nothing reaches lo from outside.
    "net/ipv4/conf/lo/route_localnet": "1",
}


def node_sysctls() -> list[str]:
    """Sets NODE_SYSCTLS in this namespace; returns the ones it changed."""
    changed = []
    for key, value in NODE_SYSCTLS.items():
        path = Path("/proc/sys") / key
        if path.read_text().strip() != value:
            path.write_text(value)
            changed.append(key.replace("/", "."))
    return changed
