"""Which CNI pods the daemon releases on its own (ctl/runtimes/cni/orphans.py): only those
whose host veth AND netns are gone, of this node, made by the CNI plugin."""
from ctl.runtimes.cni.orphans import forgotten
from ctl.state.model import Pod, host_ifname


def pod(name, netns, runtime="cni", node="n1", owned=False):
    return Pod(name=name, node=node, ip="10.244.1.2", netns=netns, host_ifname=host_ifname(name), mac="m",
               container_id=f"cid-{name}", runtime=runtime, netns_owned=owned)


def test_only_pods_whose_veth_and_netns_are_both_gone():
    pods = [pod("gone", "/proc/4242/ns/net"),             # ctr task delete: veth and netns gone
            pod("deleting", "/run/netns/netns-1"),        # podman DEL under way: veth gone, netns still there
            pod("veth-up", "/proc/4343/ns/net"),          # netns gone but the veth is there (not yet seen)
            pod("docker", "/var/run/docker/netns/x", runtime="docker"),
            pod("mine", "/run/netns/mine", runtime="", owned=True),   # `atomnet pod add`
            pod("remote", "/proc/1/ns/net", node="n2"),
            pod("no-netns", ""),
            None]                                          # a record deleted meanwhile
    links = {host_ifname("veth-up")}
    alive = {"/run/netns/netns-1"}
    assert [p.name for p in forgotten(pods, links, alive.__contains__, "n1")] == ["gone"]
    # a name a new ADD re-used: its netns is alive, so it is left alone even before its veth is seen
    assert forgotten([pod("gone", "/proc/5151/ns/net")], set(), {"/proc/5151/ns/net"}.__contains__, "n1") == []
