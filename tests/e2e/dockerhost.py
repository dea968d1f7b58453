"""A Docker host on an e2e node: `atomnet docker-plugin` and a real dockerd (Debian's
docker.io 20.10), both inside the node's network namespace, removed at teardown.

dockerd 20.10 discovers plugins only in the fixed directory /run/docker/plugins (not
under its --exec-root), so each host's dockerd runs in a mount namespace of its own where
the test's own run directory is bound onto /run: that node's plugin socket is then
/run/docker/plugins/atomnet.sock, the driver "atomnet", exactly as in production, and
nothing outside the test's directory is touched. (Two node namespaces share one
filesystem, so without it both dockerds would find the same socket.) The mount namespace
is persistent (bound to a file) and outlives a dockerd restart, as a host's would: the
containers' netns bind mounts under --exec-root and the shims' sockets under
/run/containerd/s live there, and a restarted dockerd (--live-restore) must find them, or
it deletes every endpoint it cannot restore.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from tests.e2e.rig import ATOMNET, REPO, Node, sh

DOCKER = "/usr/bin/docker"      # Debian's docker.io client (another `docker` may be earlier on PATH)
DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"
IMAGE = "atomnet-test/busybox:latest"


def docker_available() -> str | None:
    for path, pkg in ((DOCKER, "docker.io"), (DOCKERD, "docker.io"), (BUSYBOX, "busybox-static")):
        if not Path(path).exists():
            return f"{path} missing: apt-get install {pkg} (make setup does)"
    return None


def busybox_rootfs(tmp: Path) -> Path:
    """A one-binary image: busybox-static and a link per applet (httpd, wget, nc, sh, ...)."""
    tar_path = tmp / "busybox.tar"
    if tar_path.exists():
        return tar_path
    applets = sh(BUSYBOX, "--list").stdout.split()
    with tarfile.open(tar_path, "w") as tar:
        for d in ("bin", "etc", "tmp", "www"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        for name in applets:
            if name != "busybox":
                info = tarfile.TarInfo(f"bin/{name}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io
            tar.addfile(info, io.BytesIO(data))
    return tar_path


class DockerHost:
    def __init__(self, node: Node, tmp: Path):
        self.node = node
        # Short: containerd's socket under --exec-root must fit a unix socket path (108 bytes),
        # which pytest's tmp_path does not.
        self.dir = Path(f"/tmp/andk-{node.rig.uid}-{node.name}")
        self.run_dir = self.dir / "run"
        self.plugin_dir = self.run_dir / "docker" / "plugins"
        self.sock = self.dir / "docker.sock"
        self.plugin: subprocess.Popen | None = None
        self.dockerd: subprocess.Popen | None = None
        self.plugin_log = self.dir / "plugin.log"
        self.dockerd_log = self.dir / "dockerd.log"
        for d in (self.plugin_dir, self.dir / "data", self.dir / "exec", self.dir / "ns"):
            d.mkdir(parents=True, exist_ok=True)
        self.mnt_ns = self.dir / "ns" / "mnt"
        self._mount_namespace()

    def _mount_namespace(self) -> None:
        ns_dir = self.mnt_ns.parent
        sh("mount", "--bind", ns_dir, ns_dir)       # a namespace file must sit on a private mount
        try:
            sh("mount", "--make-private", ns_dir)
            self.mnt_ns.touch()
            sh("unshare", f"--mount={self.mnt_ns}", "--propagation", "private", "mount", "--bind", self.run_dir,
               "/run")
        except BaseException:
            sh("umount", self.mnt_ns, check=False)
            sh("umount", ns_dir, check=False)
            raise

    # ------------------------------------------------------------ processes
    def start_plugin(self) -> None:
        sock = self.plugin_dir / "atomnet.sock"
        ready = self._count(self.plugin_log, "docker_plugin_ready") + 1
        self.plugin = subprocess.Popen(self.node.nsenter + ATOMNET + ["docker-plugin", "--socket", str(sock),
                                                                  "--docker-host", f"unix://{self.sock}"],
                                       env=self.node.env(), stdout=open(self.plugin_log, "a"),
                                       stderr=subprocess.STDOUT, cwd=REPO)
        self._wait(lambda: self._count(self.plugin_log, "docker_plugin_ready") >= ready, "plugin ready",
                   self.plugin, self.plugin_log)

    def stop_plugin(self, sig=signal.SIGTERM) -> None:
        self._stop(self.plugin, sig)
        self.plugin = None

    def dns_flags(self) -> list[str]:
        """dockerd's --dns/--dns-search/--dns-opt for the cluster DNS, as README's Docker section
        tells a user to configure (daemon.json keys of the same names)."""
        from ctl.state.cluster import resolver_config
        from ctl.state.names import docker_daemon_dns
        from ctl.state.store import open_store
        with open_store(self.node.rig.store) as store:
            conf = docker_daemon_dns(resolver_config(store))
        flag = {"dns": "--dns", "dns-search": "--dns-search", "dns-opts": "--dns-opt"}
        return [arg for key, values in conf.items() for v in values for arg in (flag[key], v)]

    def start_dockerd(self) -> None:
        d = self.dir
        cmd = [DOCKERD, *self.dns_flags(), *("--iptables=false --ip6tables=false --bridge=none --ip-masq=false --live-restore "
                  "--default-ulimit nofile=1024:1024 --default-ulimit nproc=1024:1024").split(),
               "--data-root", f"{d}/data", "--exec-root", f"{d}/exec", "--pidfile", f"{d}/dockerd.pid",
               "-H", f"unix://{self.sock}"]
        # nsenter execs (no --fork): the PID held is dockerd's.
        self.dockerd = subprocess.Popen(self.node.nsenter + [f"--mount={self.mnt_ns}", *cmd],
                                        stdout=open(self.dockerd_log, "a"), stderr=subprocess.STDOUT)
        self._wait(lambda: self.sock.exists() and self.docker("version", check=False).returncode == 0,
                   "dockerd answering", self.dockerd, self.dockerd_log, timeout=60)

    def stop_dockerd(self) -> None:
        self._stop(self.dockerd, signal.SIGTERM, timeout=30)
        self.dockerd = None

    def teardown(self) -> None:
        if self.dockerd and self.dockerd.poll() is None:
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
            for net in self.docker("network", "ls", "-q", "--filter", "driver=atomnet", check=False).stdout.split():
                self.docker("network", "rm", net, check=False)
        self.stop_dockerd()
        self._reap_leftovers()
        self.stop_plugin()
        sh("umount", self.mnt_ns, check=False)
        sh("umount", self.mnt_ns.parent, check=False)
        for log in (self.plugin_log, self.dockerd_log):   # kept with the test's other logs
            if log.exists():
                shutil.copy(log, self.node.rig.tmp / f"{self.node.name}-{log.name}")
        shutil.rmtree(self.dir, ignore_errors=True)

    def _reap_leftovers(self) -> None:
        """With --live-restore, a stopped dockerd leaves its containerd and shims running
        (that is the point); at teardown they go too: the processes whose command line
        names this host's directory (unique per test), container processes first."""
        mine = [pid for pid, cmd in _processes().items() if str(self.dir) in cmd]
        for pid in mine:
            for child in _children(pid):
                _kill(child)
        for pid in mine:
            _kill(pid)

    # ------------------------------------------------------------ clients
    def docker(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        res = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *map(str, args)], capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(map(str, args))} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def import_image(self, tar: Path) -> None:
        self.docker("import", tar, IMAGE)

    def inspect(self, name: str) -> dict:
        return json.loads(self.docker("inspect", name).stdout)[0]

    def container_ip(self, name: str, network: str = "atomnet") -> str:
        return self.inspect(name)["NetworkSettings"]["Networks"][network]["IPAddress"]

    def endpoint_pod(self, name: str, network: str = "atomnet") -> str:
        return "docker-" + self.inspect(name)["NetworkSettings"]["Networks"][network]["EndpointID"][:12]

    def calls(self) -> list[dict]:
        """Every call Docker made to the plugin, as logged (method, request, status)."""
        out = []
        for line in self.plugin_log.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "docker_call":
                out.append(ev)
        return out

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _count(path: Path, event: str) -> int:
        return path.read_text().count(f'"event": "{event}"') if path.exists() else 0

    @staticmethod
    def _wait(cond, what: str, proc, log: Path, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if proc.poll() is not None:
                raise AssertionError(f"{what}: process exited: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {what} in {timeout}s: {log.read_text()[-3000:]}")

    @staticmethod
    def _stop(proc, sig, timeout: float = 10) -> None:
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _processes() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _kill(pid: int, timeout: float = 10) -> None:
    import os
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            if (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return   # exited; its parent reaps it
        except OSError:
            return
        time.sleep(0.05)
