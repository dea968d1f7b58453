"""atomnet as a CNI plugin, end to end: podman 4.3 (CNI backend) and containerd 1.6
(`ctr run --cni`) attach real containers through the installed plugin; the reference
`bandwidth`/`tuning` plugins chain after it; the plugin itself is also driven directly, as a
runtime does, for 20 concurrent ADDs, CHECK, STATUS, GC and bad input."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.cni_rig import IMAGE, CniNode, Containerd, Podman, build_rootfs_tar, image_archive, require_runtimes
from tests.e2e.rig import REPO, in_pod, sh
from tests.e2e.test_forwards import wait_frontend

HELLO = "hello from atomnet"
# A container's first packets may precede the daemon's programming of its endpoint (the
# plugin returns without waiting for it): clients retry on the condition, a bounded number of times.
# (busybox-static 1.35 wget segfaults with -T: `timeout` bounds each try instead)
WGET_RETRY = "(for i in $(seq 100); do timeout 3 wget -q -O - {url} && exit 0; sleep 0.1; done; exit 1)"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    require_runtimes("podman", "runc", "conmon")
    tmp = tmp_path_factory.mktemp("cni-images")
    tar = build_rootfs_tar(tmp)
    return tar, image_archive(tmp, tar)


@pytest.fixture
def cluster(rig, tmp_path, images):
    """Nodes made on demand, each with its daemon, the plugin installed, and a podman; all torn down."""
    made = []

    def make(name: str):
        node = rig.add_node(name)
        node.start_daemon()
        cni = CniNode(node, tmp_path)
        pm = Podman(cni, tmp_path, images[0])
        made.append(pm)
        return node, cni, pm
    try:
        yield make
    finally:
        for pm in made:
            pm.teardown()


def pod_of(node, container_id: str) -> dict:
    rows = [p for p in node.atomnet_json("pod", "list") if p["container_id"] == container_id]
    assert len(rows) == 1, rows
    return rows[0]


def traces(node, pod: dict) -> dict:
    """Everything of a pod that must go with it: store record (and so its address), forwards, host veth."""
    pods = [p for p in node.atomnet_json("pod", "list") if p["name"] == pod["name"] or p["ip"] == pod["ip"]]
    fwds = [f for f in node.atomnet_json("forward", "list") if f["pod"] == pod["name"]]
    links = node.exec("ip", "-o", "link", "show", check=False).stdout
    return {"pods": pods, "forwards": fwds, "links": [l for l in links.splitlines() if f" {pod['host_ifname']}@" in l]}


def test_podman_containers_pods_service_host_port_and_rm(rig, cluster):
    node, cni, podman = cluster("n1")
    ext = rig.add_host("ext")
    web_id = podman.run("-d", "--name", "web", "--network", "atomnet", "-p", "8080:80", IMAGE,
                        "httpd", "-f", "-p", "80", "-h", "/www").stdout.strip()
    web = pod_of(node, web_id)
    assert (web["name"], web["runtime"], web["ifname"]) == ("web", "cni", "eth0")
    assert web["netns"].startswith("/run/netns/") and web["ip"].startswith("10.244.")
    node.wait_endpoint(web["ip"])
    # container -> container on the node: TCP and ICMP
    out = podman.run("--rm", "--cap-add", "NET_RAW", "--network", "atomnet", IMAGE, "sh", "-c",
                     WGET_RETRY.format(url=f"http://{web['ip']}/") + f" ; ping -c 2 -W 2 {web['ip']}", check=False)
    assert HELLO in out.stdout and " 0% packet loss" in out.stdout, out.stdout + out.stderr
    # a service VIP in front of the container
    svc = node.atomnet_json("service", "add", "websvc", "--port", "80", "--backend", "web")
    wait_frontend(node, svc["vip"], 80)
    out = podman.run("--rm", "--network", "atomnet", IMAGE, "sh", "-c",
                     WGET_RETRY.format(url=f"http://{svc['vip']}/"), check=False)
    assert HELLO in out.stdout, out.stderr
    # -p 8080:80 from another machine on the node's LAN
    wait_frontend(node, node.ip, 8080)
    got = ext.exec("curl", "-s", "--max-time", "3", f"http://{node.ip}:8080/", check=False)
    assert got.stdout.strip() == HELLO
    fwd = [f for f in node.atomnet_json("forward", "list") if f["pod"] == "web"]
    assert [(f["host_port"], f["port"], f["owner"]) for f in fwd] == [(8080, 80, "web")]
    # podman rm removes every trace: record, address, forward, veth, endpoint
    assert traces(node, web)["links"]
    podman("rm", "-f", "-t", "0", "web")
    assert traces(node, web) == {"pods": [], "forwards": [], "links": []}
    node.wait_endpoint(web["ip"], present=False)


def test_twenty_podman_containers_started_at_once_all_get_distinct_addresses_and_work(rig, cluster):
    """Issue 11's "20 containers started at once on one node": 20 concurrent `podman run -d`
    (20 plugin processes racing for addresses and host interface names), each serving its own
    name; one client fetches all 20; `podman rm -f` of all leaves nothing."""
    node, _, podman = cluster("n1")
    names = [f"m{rig.uid}-{i}" for i in range(20)]
    serve = "mkdir -p /w && echo {0} > /w/index.html && exec httpd -f -p 80 -h /w"
    with ThreadPoolExecutor(20) as pool:
        runs = list(pool.map(lambda n: podman.run("-d", "--name", n, "--network", "atomnet", IMAGE, "sh", "-c",
                                                  serve.format(n), check=False, timeout=240), names))
    assert [r.returncode for r in runs] == [0] * 20, [r.stderr for r in runs if r.returncode]
    by_container = {p["container_id"]: p for p in node.atomnet_json("pod", "list")}
    pods = [by_container[r.stdout.strip().splitlines()[-1]] for r in runs]
    ips = [p["ip"] for p in pods]
    assert len(set(ips)) == 20, ips
    assert len({p["host_ifname"] for p in pods}) == 20
    wait_endpoints(node, set(ips))
    fetch_all = " && ".join(WGET_RETRY.format(url=f"http://{ip}/") for ip in ips)
    out = podman.run("--rm", "--network", "atomnet", IMAGE, "sh", "-c", fetch_all, check=False, timeout=240)
    assert out.stdout.split() == names, out.stdout + out.stderr
    with ThreadPoolExecutor(20) as pool:   # at once too (one `rm` of all runs their DELs one by one)
        rms = list(pool.map(lambda n: podman("rm", "-f", "-t", "0", n, check=False, timeout=240), names))
    assert [r.returncode for r in rms] == [0] * 20, [r.stderr for r in rms if r.returncode]
    assert [p for p in node.atomnet_json("pod", "list") if p["runtime"] == "cni"] == []
    links = node.exec("ip", "-o", "link", "show").stdout
    assert not [p["host_ifname"] for p in pods if f" {p['host_ifname']}@" in links]
    assert not ipam_holder(rig, *ips), "every address is free again"
    assert node.atomnet_json("forward", "list") == []


def test_podman_containers_across_two_nodes(rig, cluster):
    n1, _, pm1 = cluster("n1")
    n2, _, pm2 = cluster("n2")
    srv = pod_of(n2, pm2.run("-d", "--name", "srv", "--network", "atomnet", IMAGE,
                             "httpd", "-f", "-p", "80", "-h", "/www").stdout.strip())
    n2.wait_endpoint(srv["ip"])
    n1.wait_endpoint(srv["ip"], present=False)   # a remote pod is reached through the tunnel, not an endpoint
    out = pm1.run("--rm", "--network", "atomnet", IMAGE, "sh", "-c", WGET_RETRY.format(url=f"http://{srv['ip']}/"),
                  check=False)
    assert HELLO in out.stdout, out.stderr
    assert srv["node"] == "n2"


def test_chained_bandwidth_and_tuning_plugins(rig, cluster):
    node, cni, podman = cluster("n1")
    chained = {**cni.conflist, "name": "shaped", "plugins": [
        cni.conflist["plugins"][0],
        {"type": "tuning", "sysctl": {"net.ipv4.tcp_keepalive_time": "123"}},
        {"type": "bandwidth", "ingressRate": 8_000_000, "ingressBurst": 1_000_000}]}
    (cni.conf_dir / "20-shaped.conflist").write_text(json.dumps(chained))
    cid = podman.run("-d", "--name", "shaped", "--network", "shaped", IMAGE,
                     "httpd", "-f", "-p", "80", "-h", "/www").stdout.strip()
    pod = pod_of(node, cid)
    assert podman("exec", "shaped", "cat", "/proc/sys/net/ipv4/tcp_keepalive_time").stdout.strip() == "123"
    qdisc = node.exec("tc", "qdisc", "show", "dev", pod["host_ifname"]).stdout
    assert "tbf" in qdisc, qdisc   # bandwidth found atomnet's host veth in the prevResult
    node.wait_endpoint(pod["ip"])
    out = podman.run("--rm", "--network", "atomnet", IMAGE, "sh", "-c",
                     WGET_RETRY.format(url=f"http://{pod['ip']}/"), check=False)
    assert HELLO in out.stdout, out.stderr
    podman("rm", "-f", "-t", "0", "shaped")
    assert traces(node, pod) == {"pods": [], "forwards": [], "links": []}


def test_containerd_ctr_run_cni(rig, cluster, images, tmp_path):
    require_runtimes("containerd", "ctr")
    node, cni, _ = cluster("n1")
    peer = node.add_pod("peer")
    node.wait_endpoint(peer["ip"])
    rig.spawn(subprocess.Popen(["ip", "netns", "exec", peer["name"], "busybox", "httpd", "-f", "-p", "80", "-h",
                                str(build_www(tmp_path))]))
    ctrd = Containerd(cni, tmp_path, images[1])
    # IDs carry the test's tag: the runc shim keeps its state in /run/containerd/runc/<namespace>
    # whatever containerd's own root, so two suites at once would clash on a fixed ID
    once, detached = f"c1-{rig.uid}", f"c2-{rig.uid}"
    detached_pod = f"default-{detached}"   # ctr gives CNI "<namespace>-<id>" as the container id: the pod name
    try:
        out = ctrd.ctr("run", "--rm", "--snapshotter", "native", "--cni", IMAGE, once, "sh", "-c",
                       "ip -4 addr show eth0; " + WGET_RETRY.format(url=f"http://{peer['ip']}/"), cni_dirs=True,
                       check=False, timeout=120)
        assert out.returncode == 0 and HELLO in out.stdout, out.stdout + out.stderr
        assert "10.244." in out.stdout
        # --rm: ctr ran the DEL when the task ended (or the daemon released the pod first, its
        # netns having died with the task: then that DEL found nothing, which is fine)
        assert not [p for p in node.atomnet_json("pod", "list") if p["runtime"] == "cni"]
        # detached, then the task deleted the way the issue says
        ctrd.ctr("run", "-d", "--snapshotter", "native", "--cni", IMAGE, detached, "sleep", "300", cni_dirs=True)
        pod = pod_of(node, detached_pod)
        assert pod["name"] == detached_pod and pod["netns"].startswith("/proc/")
        node.wait_endpoint(pod["ip"])
        assert in_pod(peer["name"], "ping", "-c", "1", "-W", "2", pod["ip"], check=False).returncode == 0
        # a host port owned by the container, as a portMappings capability makes it (ctr has no -p)
        owned_forward(node, pod["name"], 80, 18081)
        assert [f["owner"] for f in node.atomnet_json("forward", "list")] == [pod["name"]]
        ctrd.ctr("task", "kill", "-s", "SIGKILL", detached)
        ctrd.wait_stopped(detached)   # kill only signals: delete refuses a task not yet stopped
        ctrd.ctr("task", "delete", detached)
        ctrd.ctr("container", "delete", detached)
        # ctr 1.6 runs CNI only in `ctr run` (ADD, and DEL with --rm). Nothing holds a `ctr run
        # --cni` netns (/proc/PID/ns/net) but the task's process: once it died the kernel deleted
        # the veth with the netns (seen already after the kill), and the daemon released the pod
        # as DEL would
        deadline = time.monotonic() + 30
        while traces(node, pod) != {"pods": [], "forwards": [], "links": []}:
            assert time.monotonic() < deadline, traces(node, pod)
            time.sleep(0.1)
        assert not ipam_holder(rig, pod["ip"]), "the address is free again"
        released = [line for line in node.log_path.read_text().splitlines() if '"event": "cni_pod_released"' in line]
        assert [line for line in released if f'"pod": "{detached_pod}"' in line], released
    finally:
        ctrd.teardown()


def owned_forward(node, pod: str, port: int, host_port: int) -> None:
    """A forward owned by the pod, made in the node's namespace the way the plugin makes one."""
    code = ("import sys; from ctl.node.forwards import add_forward; from ctl.state.store import open_store\n"
            "with open_store(sys.argv[1]) as s: add_forward(s, sys.argv[2], sys.argv[3], sys.argv[4], None, 'tcp', "
            "owner=sys.argv[5])")
    subprocess.run(node.nsenter + [sys.executable, "-c", code, node.rig.store, node.name, f"{pod}:{port}",
                                   str(host_port), pod], check=True, env=node.env(), cwd=REPO, timeout=60)


def ipam_holder(rig, *ips: str) -> dict[str, str]:
    """Who holds these addresses in the store ({} when all are free)."""
    from ctl.state.model import IPAM_PREFIX
    from ctl.state.store import open_store
    with open_store(rig.store) as store:
        kvs = {ip: store.get(IPAM_PREFIX + ip) for ip in ips}
    return {ip: kv.value for ip, kv in kvs.items() if kv}


def build_www(tmp_path):
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text(HELLO + "\n")
    return www


# ---------------------------------------------------------------- the plugin driven directly


@pytest.fixture
def direct(rig, tmp_path):
    node = rig.add_node("n1")
    node.start_daemon()
    return node, CniNode(node, tmp_path)


def wait_endpoints(node, ips: set[str], timeout: float = 60) -> None:
    """All of them in the dataplane: one `endpoint list` per round, not one wait per address."""
    deadline = time.monotonic() + timeout
    while not ips <= {e["ip"] for e in node.atomnet_json("endpoint", "list")}:
        assert time.monotonic() < deadline, f"endpoints never all programmed: {sorted(ips)}"
        time.sleep(0.1)


def make_netns(rig, short: str) -> str:
    name = f"an{rig.uid}-c{short}"
    sh("ip", "netns", "add", name)
    rig.extra_netns.append(name)
    return f"/run/netns/{name}"


def test_twenty_concurrent_adds_all_work_then_del_twice(rig, direct):
    node, cni = direct
    netns = [make_netns(rig, str(i)) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: cni.call("ADD", f"ctr{i}", netns[i], args=f"K8S_POD_NAME=c{rig.uid}-{i}"),
                                range(20)))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]]
    ips = [r["ips"][0]["address"].split("/")[0] for _, r in results]
    assert len(set(ips)) == 20
    wait_endpoints(node, set(ips))
    first = netns[0].rsplit("/", 1)[1]
    for ip in ips[1:]:
        assert in_pod(first, "ping", "-c", "1", "-W", "2", ip, check=False).returncode == 0, ip
    with ThreadPoolExecutor(20) as pool:
        dels = list(pool.map(lambda i: cni.call("DEL", f"ctr{i}", netns[i]), range(20)))
    assert dels == [(0, None)] * 20
    assert cni.call("DEL", "ctr0", netns[0]) == (0, None), "a second DEL succeeds"
    assert cni.call("DEL", "never-added", "") == (0, None), "a DEL for an unknown container succeeds"
    assert not [p for p in node.atomnet_json("pod", "list") if p["runtime"] == "cni"]


def test_check_fails_once_the_veth_is_deleted_by_hand(rig, direct):
    node, cni = direct
    ns = make_netns(rig, "chk")
    rc, res = cni.call("ADD", "chk1", ns)
    assert rc == 0
    ip = res["ips"][0]["address"].split("/")[0]
    node.wait_endpoint(ip)
    check_conf = cni.plugin_conf(prevResult=res)
    assert cni.call("CHECK", "chk1", ns, conf=check_conf) == (0, None)
    node.exec("ip", "link", "del", res["interfaces"][0]["name"])
    rc, err = cni.call("CHECK", "chk1", ns, conf=check_conf)
    assert rc == 1 and err["code"] == 102, err
    assert "is missing" in err["msg"] and "\n" not in err["msg"]
    rc, err = cni.call("CHECK", "unknown", ns, conf=check_conf)
    assert rc == 1 and err["code"] == 3
    assert cni.call("DEL", "chk1", ns) == (0, None)
    assert cni.call("DEL", "chk1", ns) == (0, None)


def test_status_follows_the_daemon_and_gc_removes_stale_attachments(rig, direct):
    node, cni = direct
    conf11 = cni.plugin_conf("1.1.0")
    assert cni.call("STATUS", conf=conf11) == (0, None)
    keep, stale = make_netns(rig, "k"), make_netns(rig, "s")
    assert cni.call("ADD", "keep1", keep, conf=conf11)[0] == 0
    assert cni.call("ADD", "stale1", stale, conf=conf11)[0] == 0
    gc = cni.plugin_conf("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "keep1", "ifname": "eth0"}]})
    assert cni.call("GC", conf=gc) == (0, None)
    assert sorted(p["container_id"] for p in node.atomnet_json("pod", "list") if p["runtime"] == "cni") == ["keep1"]
    node.stop_daemon()
    rc, err = cni.call("STATUS", conf=conf11)
    assert rc == 1 and err["code"] == 50 and "ready" in err["msg"], err
    # ... while ADD still works: the store is written, the daemon programs it when it is back
    other = make_netns(rig, "o")
    rc, res = cni.call("ADD", "late1", other, conf=conf11)
    assert rc == 0, res
    node.start_daemon()
    assert cni.call("STATUS", conf=conf11) == (0, None)
    node.wait_endpoint(res["ips"][0]["address"].split("/")[0])


def nothing_left(node, before_links: str) -> None:
    assert not [p for p in node.atomnet_json("pod", "list") if p["runtime"] == "cni"]
    assert not node.atomnet_json("forward", "list")
    assert node.exec("ip", "-o", "link", "show").stdout.count("@") == before_links.count("@")


def test_bad_input_is_a_cni_error_and_leaves_nothing(rig, direct):
    node, cni = direct
    ns = make_netns(rig, "bad")
    before = node.exec("ip", "-o", "link", "show").stdout
    subnet = node.atomnet_json("network", "show")["subnet"]
    cases = {
        "unknown cniVersion": (dict(conf=cni.plugin_conf("0.2.0")), 1),
        "missing CNI_NETNS": (dict(drop=("CNI_NETNS",)), 4),
        "address outside the subnet": (dict(conf=cni.plugin_conf(runtimeConfig={"ips": ["10.9.9.9/24"]})), 7),
    }
    for what, (kw, code) in cases.items():
        rc, err = cni.call("ADD", "bad1", ns, **kw)
        assert rc == 1 and err["code"] == code and err["msg"] and "\n" not in err["msg"], (what, err)
        nothing_left(node, before)
    # a host port already bound on the node fails half way (after the veth): all of it is undone
    holder = rig.spawn(subprocess.Popen(node.nsenter + ["socat", f"TCP-LISTEN:8181,bind={node.ip},reuseaddr",
                                                        "EXEC:/bin/true"]))
    deadline = time.monotonic() + 10
    while ":8181" not in node.exec("ss", "-ltn").stdout:
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    taken = cni.plugin_conf(runtimeConfig={"portMappings": [
        {"hostPort": 8182, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 8181, "containerPort": 80, "protocol": "tcp"}]})
    rc, err = cni.call("ADD", "bad1", ns, conf=taken)
    assert rc == 1 and err["code"] == 100 and "8181" in err["msg"], err
    nothing_left(node, before)
    # a container id reused for a second ADD
    rc, res = cni.call("ADD", "dup1", ns)
    assert rc == 0
    other = make_netns(rig, "dup")
    rc, err = cni.call("ADD", "dup1", other)
    assert rc == 1 and err["code"] == 100 and "already" in err["msg"], err
    assert [p["netns"] for p in node.atomnet_json("pod", "list") if p["container_id"] == "dup1"] == [ns]
    # an address inside the subnet but taken by that pod
    rc, err = cni.call("ADD", "dup2", other, conf=cni.plugin_conf(runtimeConfig={"ips": [res["ips"][0]["address"]]}))
    assert rc == 1 and err["code"] == 100 and res["ips"][0]["address"].split("/")[0] in err["msg"], err
    assert cni.call("DEL", "dup1", ns) == (0, None)
    nothing_left(node, before)
    # and a free requested address in the subnet, with a MAC, is honoured
    want = subnet.rsplit(".", 1)[0] + ".200"
    rc, res = cni.call("ADD", "ok1", other, conf=cni.plugin_conf(runtimeConfig={"ips": [f"{want}/24"],
                                                                              "mac": "02:42:0a:f4:01:c8"}))
    assert rc == 0 and res["ips"][0]["address"] == f"{want}/32" and res["interfaces"][1]["mac"] == "02:42:0a:f4:01:c8"
    assert cni.call("DEL", "ok1", other) == (0, None)
