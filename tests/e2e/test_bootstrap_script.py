"""scripts/node-bootstrap.sh and vagrant/smoke.sh for real, as root, on namespaces:

- the bootstrap script (--background) brings a daemon up in a fresh network namespace
  against a temporary sqlite store: dataplane_ready, the network initialised, pins made;
  stopped by the PID it printed; a conflicting --init-network fails with one line and starts
  nothing;
- smoke.sh, the Vagrant rig's end-to-end check, passes on two namespace nodes whose daemons
  the bootstrap script started (it reaches the other node through SMOKE_REMOTE instead of
  ssh), and leaves none of its pods behind.

Everything made here has a unique name and is removed at teardown: namespaces, the bpffs
directories (/sys/fs/bpf/atomnet-test-*), the daemons (by PID). Only addresses inside the
test's own namespaces are used.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require_root

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "scripts" / "node-bootstrap.sh"
SMOKE = REPO / "vagrant" / "smoke.sh"
ATOMNET_BIN = f"{sys.executable} -m ctl.cli"
PR_SET_CHILD_SUBREAPER = 36


def sh(*cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, timeout=timeout, capture_output=True, text=True, **kw)


@contextmanager
def subreaper():
    """A --background daemon outlives the script that started it. Adopt such orphans while
    the test runs, so that they can be waited for (reaped) once stopped, whatever PID 1 is."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) failed")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def stop_pid(pid: int, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL; then reap it (it is our child: we are its subreaper)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def reap_adopted() -> None:
    """Reap the zombies adopted while we were a subreaper (e.g. the smoke test's servers)."""
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] == "Z":
            try:
                os.waitpid(int(stat.parent.name), os.WNOHANG)
            except ChildProcessError:
                pass


def ready_lines(log: Path) -> int:
    return sum('"event": "dataplane_ready"' in line for line in log.read_text().splitlines()) if log.exists() else 0


def bootstrap_in(netns: str, *args, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{netns}", str(BOOTSTRAP), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "ATOMNET_BIN": ATOMNET_BIN, **(env or {})})


@pytest.fixture
def netns_node(uid, tmp_path):
    """A fresh namespace with an uplink: one end of a veth pair (both ends inside it; this
    kernel has no dummy links) holding a private address."""
    require_root()
    if not shutil.which("nsenter"):
        pytest.skip("nsenter not found (util-linux)")
    netns, bpffs = f"anbt{uid}", f"/sys/fs/bpf/atomnet-test-{uid}"
    sh("ip", "netns", "add", netns)
    pids: list[int] = []
    try:
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p")
        sh("ip", "-n", netns, "link", "set", "uplink0p", "up")
        sh("ip", "-n", netns, "addr", "add", "192.168.77.1/24", "dev", "uplink0")
        sh("ip", "-n", netns, "link", "set", "uplink0", "up")
        with subreaper():
            yield netns, bpffs, f"sqlite://{tmp_path}/state.db", pids
            for pid in pids:
                stop_pid(pid)
            reap_adopted()
    finally:
        sh("ip", "netns", "del", netns, check=False)
        shutil.rmtree(bpffs, ignore_errors=True)


def test_background_daemon_comes_up_and_stops_by_its_pid(netns_node, tmp_path, uid):
    netns, bpffs, store, pids = netns_node
    log = tmp_path / "daemon.log"
    res = bootstrap_in(netns, "--store", store, "--node", f"bt{uid}", "--bpffs", bpffs, "--public-ip", "192.168.77.1",
                       "--init-network", "10.244.0.0/16", "--lease-ttl", "30", "--background", log, "--wait", "60")
    if res.stdout.strip().isdigit():
        pids.append(int(res.stdout.strip()))
    assert res.returncode == 0, f"{res.stderr}\n{log.read_text() if log.exists() else ''}"
    [pid] = pids
    assert ready_lines(log) == 1
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"daemon" in cmdline and b"--uplink" in cmdline and b"uplink0" in cmdline, "uplink found from the public IP"
    assert "cluster network 10.244.0.0/16" in res.stderr and "is up: dataplane_ready" in res.stderr
    assert any(Path(bpffs).rglob("*")), "the daemon pinned its maps and programs under the given bpffs"
    shown = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", *ATOMNET_BIN.split(), "-j", "--store", store,
                            "--node", f"bt{uid}", "network", "show"], capture_output=True, text=True, cwd=REPO)
    assert json.loads(shown.stdout)["network"] == "10.244.0.0/16" and json.loads(shown.stdout)["subnet"]

    # A different network for the same store: one line, exit 1, and no second daemon.
    res = bootstrap_in(netns, "--store", store, "--node", f"bt{uid}", "--bpffs", bpffs,
                       "--init-network", "10.200.0.0/16", "--background", tmp_path / "second.log")
    assert res.returncode == 1 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "network already initialised with 10.244.0.0/16" in res.stderr
    assert not (tmp_path / "second.log").exists()

    stop_pid(pid)
    pids.remove(pid)
    assert '"event": "daemon_stopped"' in log.read_text(), "SIGTERM to the printed PID stops the daemon cleanly"


def test_smoke_script_passes_on_namespace_nodes(uid, tmp_path):
    """The Vagrant rig's smoke check, run on node 1 of two namespace nodes that the bootstrap
    script started; the other node is reached with SMOKE_REMOTE instead of ssh."""
    require_root()
    for tool in ("nsenter", "curl", "ping"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not found: `make setup` installs it")
    from tests.e2e.rig import Rig
    rig = Rig(uid, tmp_path)
    pids: list[int] = []
    tag = f"smk{uid}"
    try:
        with subreaper():
            try:
                nodes = [rig.add_node(name) for name in ("n1", "n2")]
                for node in nodes:
                    res = bootstrap_in(node.netns, "--store", rig.store, "--node", node.name, "--bpffs", node.bpffs,
                                       "--public-ip", node.ip, "--background", node.log_path, "--wait", "60")
                    if res.stdout.strip().isdigit():
                        pids.append(int(res.stdout.strip()))
                    assert res.returncode == 0, f"{res.stderr}\n{node.log_path.read_text()}"
                remote = tmp_path / "remote.sh"
                remote.write_text("#!/bin/sh\n# run COMMAND on the namespace node with underlay address $1\n"
                                  'ip=$1; shift\ncase $ip in\n'
                                  + "".join(f"  {n.ip}) exec nsenter --net=/run/netns/{n.netns} env ATOMNET_NODE={n.name}"
                                            f" ATOMNET_BPFFS={n.bpffs} \"$@\" ;;\n" for n in nodes)
                                  + 'esac\necho "no node $ip" >&2\nexit 1\n')
                remote.chmod(0o755)
                n1 = nodes[0]
                env = {**n1.env(), "ATOMNET_BIN": ATOMNET_BIN, "SMOKE_REMOTE": str(remote), "SMOKE_TAG": tag,
                       "SMOKE_TIMEOUT": "30"}
                # wait until n1's overlay knows n2: that is how smoke.sh finds the other nodes
                deadline = time.monotonic() + 30
                while len(n1.atomnet_json("tunnel", "list")) < 1:
                    assert time.monotonic() < deadline, "n1 never learnt n2's subnet"
                    time.sleep(0.2)
                res = subprocess.run(["nsenter", f"--net=/run/netns/{n1.netns}", str(SMOKE), "--nodes", "2"],
                                     capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
                print(res.stdout, res.stderr)
                assert res.returncode == 0, f"smoke.sh failed:\n{res.stdout}\n{res.stderr}"
                assert "PASS:" in res.stdout and "FAIL" not in res.stdout + res.stderr
                for check in ("2 node(s)", "every pod pings and fetches from every other pod",
                              "every pod is answered by all 2 backends", "reaches"):
                    assert check in res.stdout, check
                assert not [ns for ns in sh("ip", "netns", "list").stdout.split() if ns.startswith(tag)], \
                    "smoke.sh removed its pods"
                assert n1.atomnet_json("pod", "list") == [] and n1.atomnet_json("service", "list") == []
                assert n1.atomnet_json("forward", "list") == []

                # A failing check: exit 1 with a FAIL line, and it still cleans up.
                res = subprocess.run(["nsenter", f"--net=/run/netns/{n1.netns}", str(SMOKE), "--nodes", "3"],
                                     capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
                assert res.returncode == 1 and "FAIL: expected 3 nodes" in res.stderr
            finally:
                for pid in pids:
                    stop_pid(pid)
                for ns in sh("ip", "netns", "list").stdout.split():
                    if ns.startswith(tag):
                        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                            os.kill(int(pid), signal.SIGKILL)
                        sh("ip", "netns", "del", ns, check=False)
                reap_adopted()
    finally:
        rig.teardown()
