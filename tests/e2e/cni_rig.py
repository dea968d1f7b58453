"""CNI runtimes for the e2e rig: the atomnet plugin installed per node (`atomnet cni install`
into the test's own dirs), podman with its own storage and config, containerd started by the
test with its own root/state/socket, and a busybox-static image built offline. Everything is
removed at teardown, even when the test failed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.rig import Node, sh

BUSYBOX = Path("/bin/busybox")
IMAGE = "localhost/atomnet-busybox:test"


def require_runtimes(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make setup installs them)")


def build_rootfs_tar(tmp: Path) -> Path:
    """busybox-static's binary and its applet links, an index page for httpd: the whole image."""
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "www").mkdir()
    (root / "www" / "index.html").write_text("hello from atomnet\n")
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = sh(BUSYBOX, "--list").stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for d in ("etc", "tmp", "proc", "sys", "dev"):
        (root / d).mkdir(exist_ok=True)
    tar = tmp / "rootfs.tar"
    sh("tar", "-C", root, "-cf", tar, ".")
    return tar


class CniNode:
    """One rig node's CNI side: plugin + conflist dirs, and the command to call the plugin."""

    def __init__(self, node: Node, tmp: Path):
        self.node, self.tmp = node, tmp
        self.bin_dir, self.conf_dir = tmp / f"cni-bin-{node.name}", tmp / f"cni-conf-{node.name}"
        out = node.atomnet_json("cni", "install", "--bin-dir", self.bin_dir, "--conf-dir", self.conf_dir)
        self.plugin = Path(out["plugin"])
        self.conflist = json.loads(Path(out["conflist"]).read_text())

    def plugin_conf(self, version: str = "1.0.0", **extra) -> dict:
        """The network config a runtime hands the plugin: the conflist's entry plus name/cniVersion."""
        return {"cniVersion": version, "name": "atomnet", **self.conflist["plugins"][0], **extra}

    def call(self, command: str, container_id: str = "", netns: str = "", ifname: str = "eth0", conf: dict | None = None,
             args: str = "", drop: tuple = ()) -> tuple[int, dict | None]:
        """Runs the installed plugin as a runtime does (in the node's netns, CNI_* env, config on stdin)."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": f"{self.bin_dir}:/usr/lib/cni", "CNI_ARGS": args}
        env = {k: v for k, v in env.items() if k not in drop}
        res = subprocess.run(self.node.nsenter + [str(self.plugin)], input=json.dumps(conf or self.plugin_conf()),
                             env=env, capture_output=True, text=True, timeout=120)
        return res.returncode, json.loads(res.stdout) if res.stdout.strip() else None


def short_dir() -> Path:
    """podman refuses a --runroot longer than 50 characters: pytest's tmp paths are longer."""
    return Path(tempfile.mkdtemp(prefix="anpm-", dir="/tmp"))


class Podman:
    """podman 4.3 with its CNI backend, run inside a node's netns, with storage and config of its own."""

    def __init__(self, cni: CniNode, tmp: Path, image_tar: Path):
        self.cni, self.node = cni, cni.node
        base = tmp / f"podman-{self.node.name}"
        base.mkdir()
        self.conf = base / "containers.conf"
        self.conf.write_text(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n"
            f"[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{cni.bin_dir}\", \"/usr/lib/cni\"]\n"
            f"network_config_dir = \"{cni.conf_dir}\"\n"
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n"
            f"tmp_dir = \"{base}/tmp\"\n")
        self.storage = short_dir()
        self.base = ["podman", "--root", str(self.storage / "root"), "--runroot", str(self.storage / "rr"),
                     "--storage-driver", "vfs", "--network-backend", "cni", "--cni-config-dir", str(cni.conf_dir),
                     "--cgroup-manager", "cgroupfs"]
        self.run_flags = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
        self.used = False
        self("import", image_tar, IMAGE)

    def __call__(self, *args, check=True, timeout=90) -> subprocess.CompletedProcess:
        self.used = True
        res = subprocess.run(self.node.nsenter + self.base + [str(a) for a in args], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "CONTAINERS_CONF": str(self.conf)})
        if check and res.returncode != 0:
            raise AssertionError(f"podman {' '.join(map(str, args))} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def run(self, *args, check=True, timeout=90) -> subprocess.CompletedProcess:
        return self("run", *self.run_flags, *args, check=check, timeout=timeout)

    def teardown(self) -> None:
        try:
            self("rm", "-a", "-f", "-t", "0", check=False, timeout=120)
            self("rmi", "-a", "-f", check=False, timeout=120)
        finally:
            shutil.rmtree(self.storage, ignore_errors=True)


class Containerd:
    """containerd 1.6 started by the test in a node's netns, with its own root, state, socket and
    config (the CRI plugin off: nothing of it touches the host); stopped at teardown.

    `ctr run --cni` reads the CNI dirs only from their defaults (/etc/cni/net.d, /opt/cni/bin),
    so ctr runs in a private mount namespace where the node's dirs are bind-mounted over them:
    the host's own dirs are never touched."""

    def __init__(self, cni: CniNode, tmp: Path, image_archive: Path):
        self.cni, self.node = cni, cni.node
        self.base = tmp / f"containerd-{self.node.name}"
        self.base.mkdir()
        self.sock = self.base / "containerd.sock"
        config = self.base / "config.toml"
        config.write_text(
            f"version = 2\nroot = \"{self.base}/root\"\nstate = \"{self.base}/state\"\n"
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
            f"[grpc]\n  address = \"{self.sock}\"\n[ttrpc]\n  address = \"{self.sock}.ttrpc\"\n"
            "[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n")
        self.log = open(self.base / "containerd.log", "w")
        self.proc = subprocess.Popen(self.node.nsenter + ["containerd", "--config", str(config)],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"containerd did not come up: {(self.base / 'containerd.log').read_text()[-2000:]}")
            time.sleep(0.1)
        self.ctr("image", "import", "--snapshotter", "native", image_archive)

    def ctr(self, *args, check=True, timeout=90, cni_dirs=False) -> subprocess.CompletedProcess:
        cmd = ["ctr", "--address", str(self.sock), *map(str, args)]
        if cni_dirs:
            script = (f"mount --bind {self.cni.conf_dir} /etc/cni/net.d && mkdir -p /opt/cni/bin && "
                      f"mount --bind {self.cni.bin_dir} /opt/cni/bin && exec \"$@\"")
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
        res = subprocess.run(self.node.nsenter + cmd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"ctr {' '.join(map(str, args))} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def wait_stopped(self, cid: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rows = [line.split() for line in self.ctr("task", "ls", check=False).stdout.splitlines()[1:]]
            if any(r[0] == cid and r[-1] == "STOPPED" for r in rows if r):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"task {cid} never stopped: {rows}")
            time.sleep(0.1)

    def teardown(self) -> None:
        try:
            for cid in self.ctr("task", "ls", "-q", check=False).stdout.split():
                self.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
                self.ctr("task", "delete", "-f", cid, check=False)
            for cid in self.ctr("container", "ls", "-q", check=False).stdout.split():
                self.ctr("container", "delete", cid, check=False)
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def image_archive(tmp: Path, rootfs_tar: Path) -> Path:
    """The rootfs as a docker-archive (what `ctr image import` reads), made by podman in a
    throwaway storage of its own."""
    store = short_dir()
    base = ["podman", "--root", str(store / "root"), "--runroot", str(store / "rr"), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    out = tmp / "image.tar"
    for args in (("import", rootfs_tar, IMAGE), ("save", "-o", out, IMAGE)):
        res = sh(*base, *args, timeout=120, check=False)
        if res.returncode != 0:
            raise AssertionError(f"podman {args[0]} failed: {res.stderr.strip()}")
    sh(*base, "rmi", "-a", "-f", check=False, timeout=120)
    shutil.rmtree(store, ignore_errors=True)
    return out
