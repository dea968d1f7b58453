"""The libvirt rig's host-side scripts, fast and without VMs: scripts/build-box.sh and
vagrant/rig.sh reject bad input with one line and the right exit status before they create
anything; vagrant/Makefile's `check` does the same. (shellcheck of both scripts is in
test_rig_scripts.py, which finds every shell script of the checkout; the real boot is
`make -C vagrant test`, too long for `make test`.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_BOX = REPO / "scripts" / "build-box.sh"
RIG = REPO / "vagrant" / "rig.sh"


def run(cmd: list, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, **kw)


def one_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def as_nobody(cmd: list) -> list:
    """cmd run as an unprivileged user (setpriv, util-linux), when we are root."""
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not found")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]


# --- build-box.sh -----------------------------------------------------------------------

def test_build_box_help():
    res = run([BUILD_BOX, "--help"])
    assert res.returncode == 0 and "Usage: build-box.sh --out FILE.box" in res.stdout
    for option in ("--mirror", "--suite", "--size", "--pyproject", "--keep-work"):
        assert option in res.stdout


@pytest.mark.parametrize("args,message", [
    ([], "--out FILE.box is required"),
    (["--out"], "--out needs a value"),
    (["--out", ""], "--out needs a value"),
    (["--out", "x.qcow2"], "--out must name a .box file"),
    (["--out", "/no/such/dir/x.box"], "directory /no/such/dir does not exist"),
    (["--out", "{tmp}/x.box", "--size", "3"], "--size must be a whole number of GiB from 4 to 256"),
    (["--out", "{tmp}/x.box", "--size", "ten"], "--size must be a whole number of GiB from 4 to 256"),
    (["--out", "{tmp}/x.box", "--mirror", "deb.debian.org"], "--mirror must be an http(s):// or file:// URL"),
    (["--out", "{tmp}/x.box", "--suite", "Bookworm 12"], "--suite must be a Debian suite name"),
    (["--out", "{tmp}/x.box", "--pyproject", "/no/such.toml"], "--pyproject: cannot read /no/such.toml"),
    (["--out", "{tmp}/x.box", "--frobnicate"], "unknown argument --frobnicate"),
])
def test_build_box_usage_errors_exit_2_with_one_line_and_create_nothing(tmp_path, args, message):
    res = run([BUILD_BOX, *(a.replace("{tmp}", str(tmp_path)) for a in args)],
              env={"BOX_WORKDIR": str(tmp_path)})
    assert res.returncode == 2, res.stdout + res.stderr
    line = one_line(res)
    assert line.startswith("build-box: error: ") and message in line, line
    assert list(tmp_path.iterdir()) == [], "nothing is created on bad input"


def test_build_box_not_root_exits_1_before_creating_anything():
    # a directory the unprivileged user can reach (pytest's tmp_path is root's, mode 700)
    out = Path(tempfile.mkdtemp(prefix="atomnet-box-test."))
    try:
        out.chmod(0o777)
        res = run(as_nobody([BUILD_BOX, "--out", out / "x.box"]), env={"BOX_WORKDIR": str(out)})
        assert res.returncode == 1, res.stdout + res.stderr
        assert "run me as root" in one_line(res)
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(out)


# --- rig.sh -----------------------------------------------------------------------------

def test_rig_preflight_passes_here_with_a_small_need(tmp_path):
    if os.geteuid() != 0 or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs root and /dev/kvm")
    (tmp_path / "modules" / "kvm_intel").mkdir(parents=True)
    res = run([RIG, "preflight", "1"], env={"RIG_SYS_MODULE": str(tmp_path / "modules")})
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("case", ["not-root", "no-kvm", "pvm", "memory"])
def test_rig_preflight_says_what_is_missing_in_one_line(tmp_path, case):
    modules = tmp_path / "modules"
    (modules / "kvm_intel").mkdir(parents=True)
    cmd, env = [RIG, "preflight", "1"], {"RIG_STATE": str(tmp_path / "state"), "RIG_KVM": os.devnull,
                                         "RIG_SYS_MODULE": str(modules)}
    if case == "pvm":
        if os.geteuid() != 0:
            pytest.skip("the root check comes first")
        (modules / "kvm_intel").rmdir()
        (modules / "kvm_pvm").mkdir()
        expect = "is PVM (kvm_pvm, no kvm_intel/kvm_amd): its guests need a PVM guest kernel"
    elif case == "not-root":
        cmd = as_nobody(cmd)
        expect = "not root: run it as root"
    elif case == "no-kvm":
        if os.geteuid() != 0:
            pytest.skip("the root check comes first")
        env["RIG_KVM"] = str(tmp_path / "kvm")
        expect = f"no {tmp_path}/kvm: enable KVM"
    else:
        if os.geteuid() != 0:
            pytest.skip("the root check comes first")
        cmd = [RIG, "preflight", str(10 ** 9)]
        expect = f"not enough memory: the VMs need {10 ** 9} MiB"
    res = run(cmd, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    line = one_line(res)
    assert line.startswith("rig: error: ") and expect in line, line
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["preflight"], ["preflight", "lots"]])
def test_rig_usage_errors_exit_2(args):
    res = run([RIG, *args])
    assert res.returncode == 2 and one_line(res).startswith("rig: error: "), res.stdout + res.stderr


def test_make_check_refuses_too_many_nodes_for_the_memory_in_one_line():
    """`make -C vagrant test NODES=...` with more VMs than memory: one line, nothing created."""
    if os.geteuid() != 0 or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs root and /dev/kvm (the checks before the memory one)")
    if not shutil.which("make"):
        pytest.skip("make not found")
    before = {p.name for p in (REPO / "vagrant").iterdir()}
    res = run(["make", "-s", "-C", REPO / "vagrant", "check", "NODES=100000"], env={"RIG_IGNORE_PVM": "1"})
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("make")]
    assert len(lines) == 1 and "not enough memory" in lines[0], res.stderr
    assert {p.name for p in (REPO / "vagrant").iterdir()} == before
