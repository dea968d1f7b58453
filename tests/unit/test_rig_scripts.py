"""The rig's scripts and files, checked without VMs or root:
- every shell script in the repo passes shellcheck (and so do the Vagrantfile's inline scripts);
- `vagrant validate` accepts the Vagrantfile for both providers, and bad settings give one line;
- scripts/node-bootstrap.sh: --help, usage errors (exit 2), runtime errors (exit 1), and its
  --systemd mode against stand-in systemctl/journalctl: the env file it writes, the unit it
  installs, when it restarts; the unit's ExecStart, expanded with that env file, is a command
  line the real `atomnet` parser accepts; `systemd-analyze verify` accepts the unit.

No VM provider runs here: `vagrant validate` is the check. VirtualBox's provider only
validates when it finds VBoxManage, so a stand-in that reports a version is put on PATH;
the libvirt provider's block is validated by the vagrant-libvirt plugin.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctl.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "scripts" / "node-bootstrap.sh"
SMOKE = REPO / "vagrant" / "smoke.sh"
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"
UNIT = REPO / "systemd" / "atomnet-daemon.service"
SHEBANG = re.compile(rb"^#!\s*\S*/(env\s+)?(ba|da)?sh\b")


def _is_shell_script(path: Path) -> bool:
    if path.suffix == ".sh":
        return True
    try:
        with path.open("rb") as f:
            return bool(SHEBANG.match(f.readline(200)))
    except OSError:
        return False


def shell_scripts() -> list[Path]:
    """Tracked and untracked (not ignored) files that are shell scripts: named *.sh or
    starting with a sh/bash shebang (such as .ci/run)."""
    res = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True)
    if res.returncode == 0:
        names = {n for n in res.stdout.split("\0") if n}
    else:  # not a git checkout (e.g. an unpacked tarball): look at the files themselves
        names = {str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not {".git", ".venv"} & set(p.relative_to(REPO).parts)}
    names |= {str(p.relative_to(REPO)) for d in ("vagrant", "scripts") for p in (REPO / d).glob("*.sh")}
    return sorted(REPO / n for n in names if (REPO / n).is_file() and _is_shell_script(REPO / n))


def vagrantfile_scripts() -> dict[str, str]:
    """The Vagrantfile's inline provisioning scripts (NAME = <<~'SHELL' ... SHELL), dedented as
    Ruby's squiggly heredoc does."""
    text = VAGRANTFILE.read_text()
    return {m.group(1): textwrap.dedent(m.group(2))
            for m in re.finditer(r"^(\w+) = <<~'SHELL'\n(.*?)^SHELL$", text, re.S | re.M)}


def need(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed ({why}): `make setup` installs it")
    return path


# --- shellcheck -------------------------------------------------------------------------

def test_the_rig_scripts_are_found():
    found = set(shell_scripts())
    assert {BOOTSTRAP, SMOKE, REPO / "scripts" / "build-box.sh", REPO / "vagrant" / "rig.sh"} <= found, found
    assert set(vagrantfile_scripts()) == {"COMMON_SCRIPT", "ETCD_SCRIPT", "NODE_SCRIPT"}


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path):
    need("shellcheck", "Debian package shellcheck")
    res = subprocess.run(["shellcheck", "--format=gcc", str(script)], capture_output=True, text=True,
                         cwd=script.parent)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", sorted(vagrantfile_scripts()))
def test_shellcheck_vagrantfile_inline_scripts(name: str):
    need("shellcheck", "Debian package shellcheck")
    res = subprocess.run(["shellcheck", "--format=gcc", "--shell=bash", "-"], input=vagrantfile_scripts()[name],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"{name} in vagrant/Vagrantfile:\n{res.stdout}{res.stderr}"


# --- vagrant validate -------------------------------------------------------------------

def vagrant_env(tmp_path: Path, provider: str, **settings: str) -> dict:
    """Vagrant with its state in tmp_path (nothing written into the checkout or ~/.vagrant.d),
    no update check (no network), and only the rig settings given here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATOMNET_", "VAGRANT_"))}
    env.update({"VAGRANT_CWD": str(VAGRANTFILE.parent), "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"),
                "VAGRANT_HOME": str(tmp_path / "vagrant.d"), "VAGRANT_CHECKPOINT_DISABLE": "1",
                "VAGRANT_DEFAULT_PROVIDER": provider, **settings})
    if provider == "virtualbox":
        # The VirtualBox provider is only "usable" (and so only validated) when VBoxManage
        # reports a supported version; validation itself asks it nothing else.
        stub = tmp_path / "bin" / "VBoxManage"
        stub.parent.mkdir(exist_ok=True)
        stub.write_text('#!/bin/sh\necho "$*" >>"$(dirname "$0")/calls"\n[ "$1" = --version ] && echo 7.0.20r163906\n'
                        "exit 0\n")
        stub.chmod(0o755)
        env["PATH"] = f"{stub.parent}:{env['PATH']}"
    return env


def vagrant_validate(tmp_path: Path, provider: str, **settings: str) -> subprocess.CompletedProcess:
    need("vagrant", "Debian package vagrant")
    if provider == "libvirt":
        plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True,
                                 env=vagrant_env(tmp_path, "virtualbox"), timeout=120).stdout
        if "vagrant-libvirt" not in plugins:
            pytest.skip("the vagrant-libvirt plugin is not installed (apt-get install vagrant-libvirt; "
                        "apt installs it with vagrant unless recommends are off): the libvirt block is not validated")
    return subprocess.run(["vagrant", "validate", "--no-color"], capture_output=True, text=True,
                          env=vagrant_env(tmp_path, provider, **settings), timeout=120)


@pytest.mark.parametrize("provider", ["virtualbox", "libvirt"])
@pytest.mark.parametrize("settings", [{}, {"ATOMNET_NODES": "1", "ATOMNET_NETWORK": "10.123.45",
                                           "ATOMNET_MEMORY": "4096", "ATOMNET_BOX": "debian/bookworm64"},
                                      # what `make -C vagrant up` passes: the offline box, small VMs
                                      {"ATOMNET_BOX": "atomnet/bookworm", "ATOMNET_NODES": "2", "ATOMNET_MEMORY": "1536",
                                       "ATOMNET_CPUS": "1", "ATOMNET_LIBVIRT_POOL": "atomnet-rig"}],
                         ids=["defaults", "settings", "offline"])
def test_vagrant_validate(tmp_path, provider, settings):
    dotvagrant = VAGRANTFILE.parent / ".vagrant"
    existed = dotvagrant.exists()
    res = vagrant_validate(tmp_path, provider, **settings)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout
    assert existed or not dotvagrant.exists(), "validate wrote into the checkout"
    # The rig's SSH key was made once, with Vagrant's state, and is a valid OpenSSH key pair.
    key = tmp_path / "dotfile" / "atomnet-rig" / "id_rsa"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True)
    if derived.returncode == 0:  # ssh-keygen comes with vagrant's dependency openssh-client
        assert derived.stdout.split()[:2] == key.with_suffix(".pub").read_text().split()[:2]


@pytest.mark.parametrize("var,value", [("ATOMNET_NODES", "three"), ("ATOMNET_NODES", "0"),
                                       ("ATOMNET_MEMORY", "lots"), ("ATOMNET_NETWORK", "192.168"),
                                       ("ATOMNET_NETWORK", "192.168.300"), ("ATOMNET_CIDR", "10.244.0.0"),
                                       ("ATOMNET_OFFLINE", "yes"), ("ATOMNET_LIBVIRT_POOL", "my pool"),
                                       ("ATOMNET_MGMT_NETWORK", "192.168.121")])
def test_vagrant_bad_settings_give_one_line(tmp_path, var, value):
    res = vagrant_validate(tmp_path, "virtualbox", **{var: value})
    assert res.returncode != 0
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and var in lines[0] and repr(value).replace("'", '"') in lines[0], lines


def test_vagrant_catches_a_wrong_provider_setting(tmp_path):
    """validate really looks at the VirtualBox block (so a pass above means something)."""
    broken = tmp_path / "vagrant"
    broken.mkdir()
    (broken / "Vagrantfile").write_text(VAGRANTFILE.read_text().replace("vb.linked_clone = true",
                                                                        "vb.linked_clone = true\n    vb.no_such = 1"))
    need("vagrant", "Debian package vagrant")
    env = vagrant_env(tmp_path, "virtualbox")
    env["VAGRANT_CWD"] = str(broken)
    res = subprocess.run(["vagrant", "validate", "--no-color"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "no_such" in res.stdout + res.stderr


# --- node-bootstrap.sh: arguments ---------------------------------------------------------

def bootstrap(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BOOTSTRAP), *map(str, args)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, **kw)


def test_bootstrap_help():
    res = bootstrap("--help")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("Usage: node-bootstrap.sh")
    for option in ("--systemd", "--foreground", "--background LOGFILE", "--init-network", "ATOMNET_BIN"):
        assert option in res.stdout


@pytest.mark.parametrize("args,message", [
    (["--store", "sqlite:///x.db"], "choose a mode"),
    (["--foreground"], "no store"),
    (["--store", "s", "--foreground", "--systemd"], "choose one of"),
    (["--store", "s", "--foreground", "--frobnicate"], "unknown option --frobnicate"),
    (["--store", "s", "--foreground", "stray"], "unexpected argument stray"),
    (["--store", "s", "--foreground", "--node"], "--node needs a value"),
    (["--store", "s", "--background"], "--background needs a value"),
    (["--store", "s", "--foreground", "--lease-ttl", "soon"], "--lease-ttl needs a number"),
    (["--store", "s", "--foreground", "--log-level", "loud"], "--log-level must be"),
    (["--store", "s", "--foreground", "--wait", "5"], "--wait is for"),
    (["--store", "s", "--systemd", "--log-file", "x.log"], "--log-file is for --foreground"),
    (["--store", "s", "--background", "x.log", "--restart"], "--restart is for --systemd"),
])
def test_bootstrap_usage_errors_exit_2_with_one_line(args, message):
    res = bootstrap(*args, env={"ATOMNET_STORE": ""})
    assert res.returncode == 2, res
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
    assert message in res.stderr and res.stderr.startswith("node-bootstrap: error:")


@pytest.mark.parametrize("args,env,message", [
    (["--foreground"], {"ATOMNET_BIN": "/nonexistent/atomnet"}, "atomnet command not found"),
    (["--foreground", "--uplink", "nosuchif0"], {"ATOMNET_BIN": "true"}, "uplink interface nosuchif0 does not exist"),
    (["--foreground", "--public-ip", "203.0.113.77"], {"ATOMNET_BIN": "true"}, "public IP 203.0.113.77 is not configured"),
    (["--systemd", "--uplink", "lo", "--public-ip", "127.0.0.1"],
     {"ATOMNET_BIN": "true", "ATOMNET_UNIT_BIN": "/nonexistent/atomnet"}, "is not an executable"),
    (["--background", "/dev/null", "--init-network", "10.244.0.0/16"], {"ATOMNET_BIN": "false"}, "network init failed"),
])
def test_bootstrap_runtime_errors_exit_1_with_one_line(args, env, message):
    res = bootstrap("--store", "sqlite:///nonexistent/state.db", "--node", "n1", *args, env=env)
    assert res.returncode == 1, res
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
    assert message in res.stderr and res.stderr.startswith("node-bootstrap: ")


def test_bootstrap_waits_for_an_unreachable_etcd_then_gives_up(tmp_path):
    """--init-network against etcd that is not up yet: retried until --store-wait, then one
    final line. (127.0.0.1 port 1: refused at once, nothing leaves the machine.)"""
    res = bootstrap("--store", "etcd://127.0.0.1:1", "--node", "n1", "--init-network", "10.244.0.0/16",
                    "--store-wait", "3", "--background", tmp_path / "d.log",
                    env={"ATOMNET_BIN": f"{sys.executable} -m ctl.cli"}, cwd=REPO)
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) >= 2 and all("retrying network init" in line and "unreachable" in line for line in lines[:-1])
    assert lines[-1].startswith("node-bootstrap: network init failed after 3s: etcd store etcd://127.0.0.1:1 unreachable")
    assert not (tmp_path / "d.log").exists(), "no daemon started"


# --- node-bootstrap.sh --systemd, against stand-in systemctl and journalctl ------------------

STUB_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >>"$STUB_DIR/calls"
case "$1" in
  is-active) [ -f "$STUB_DIR/active" ] ;;
  show) echo 4242 ;;
  enable|restart) touch "$STUB_DIR/active" ;;
esac
"""
STUB_JOURNALCTL = """#!/bin/sh
echo "journalctl $*" >>"$STUB_DIR/calls"
echo '{"event": "dataplane_ready", "level": "info"}'
"""


@pytest.fixture
def systemd_stubs(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("systemctl", STUB_SYSTEMCTL), ("journalctl", STUB_JOURNALCTL), ("atomnet", "#!/bin/sh\n")):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "ATOMNET_BIN": str(bindir / "atomnet"),
           "ATOMNET_UNIT_BIN": str(bindir / "atomnet"), "ATOMNET_ENV_FILE": str(tmp_path / "etc" / "atomnet.env"),
           "ATOMNET_UNIT_DIR": str(tmp_path / "units")}

    def run(*args):
        (tmp_path / "calls").unlink(missing_ok=True)
        res = bootstrap("--store", "etcd://192.0.2.10:2379", "--node", "node1", "--public-ip", "127.0.0.1",
                        "--systemd", "--wait", "5", *args, env=env)
        assert res.returncode == 0, res.stderr
        calls = (tmp_path / "calls").read_text().splitlines()
        return res, [c for c in calls if c.startswith("systemctl") and " show " not in c], calls
    return tmp_path, run


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value[1:-1] if value[:1] == value[-1:] == '"' and len(value) > 1 else value
    return out


def test_bootstrap_systemd_writes_settings_installs_unit_and_restarts_only_on_change(systemd_stubs):
    tmp, run = systemd_stubs
    res, systemctl, calls = run("--lease-ttl", "600", "--lease-renew-margin", "60", "--", "--metrics", "127.0.0.1:9641")
    env = read_env_file(tmp / "etc" / "atomnet.env")
    assert env == {"ATOMNET_STORE": "etcd://192.0.2.10:2379", "ATOMNET_NODE": "node1",
                   "ATOMNET_BPFFS": "/sys/fs/bpf/atomnet", "ATOMNET_UPLINK": "lo", "ATOMNET_PUBLIC_IP": "127.0.0.1",
                   "ATOMNET_DAEMON_LOG_LEVEL": "info",
                   "ATOMNET_DAEMON_ARGS": "--lease-ttl 600 --lease-renew-margin 60 --metrics 127.0.0.1:9641"}
    assert (tmp / "units" / "atomnet-daemon.service").read_text() == UNIT.read_text()
    assert systemctl == ["systemctl daemon-reload", "systemctl is-active --quiet atomnet-daemon.service",
                         "systemctl enable --now atomnet-daemon.service"]
    assert any("_PID=4242" in c and "_SYSTEMD_UNIT=atomnet-daemon.service" in c for c in calls)
    assert "is up: dataplane_ready" in res.stderr

    _, systemctl, _ = run("--lease-ttl", "600", "--lease-renew-margin", "60", "--", "--metrics", "127.0.0.1:9641")
    assert systemctl == ["systemctl is-active --quiet atomnet-daemon.service",
                         "systemctl enable --now atomnet-daemon.service"], "nothing changed: no reload, no restart"

    _, systemctl, _ = run("--lease-ttl", "900")
    assert systemctl[-1] == "systemctl restart atomnet-daemon.service", "new settings: restarted"
    assert read_env_file(tmp / "etc" / "atomnet.env")["ATOMNET_DAEMON_ARGS"] == "--lease-ttl 900"

    res, systemctl, _ = run("--lease-ttl", "900", "--restart")
    assert systemctl[-1] == "systemctl restart atomnet-daemon.service", "--restart: new code runs"
    assert "(--restart)" in res.stderr

    (tmp / "active").unlink()
    _, systemctl, _ = run("--lease-ttl", "900", "--restart")
    assert systemctl[-1] == "systemctl enable --now atomnet-daemon.service", "not running: started, once"


def test_bootstrap_systemd_refuses_values_the_env_file_cannot_hold(systemd_stubs):
    tmp, run = systemd_stubs
    res = bootstrap("--store", "etcd://h:1", "--node", "a b", "--public-ip", "127.0.0.1", "--systemd",
                    env={"PATH": f"{tmp / 'bin'}:{os.environ['PATH']}", "ATOMNET_BIN": "true",
                         "ATOMNET_UNIT_BIN": str(tmp / "bin" / "atomnet"), "ATOMNET_ENV_FILE": str(tmp / "x.env"),
                         "ATOMNET_UNIT_DIR": str(tmp / "units"), "STUB_DIR": str(tmp)})
    assert res.returncode == 1 and "ATOMNET_NODE value 'a b'" in res.stderr
    assert not (tmp / "x.env").exists()


# --- the unit ---------------------------------------------------------------------------------

def unit_lines() -> list[str]:
    """The unit's lines with continuations joined."""
    return UNIT.read_text().replace("\\\n", " ").splitlines()


def unit_setting(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_lines() if line.startswith(f"{key}=")]


def expand_systemd(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ${VAR} stays one word, $VAR splits on blanks."""
    words = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$\w+", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def test_unit_execstart_with_the_bootstrap_env_file_is_a_valid_daemon_command(systemd_stubs):
    tmp, run = systemd_stubs
    run("--lease-ttl", "600", "--log-level", "debug", "--", "--metrics", "127.0.0.1:9641")
    env = {}
    for assignment in unit_setting("Environment"):
        env.update(dict(item.split("=", 1) for item in shlex.split(assignment)))
    assert unit_setting("EnvironmentFile") == ["/etc/atomnet/atomnet.env"]
    env.update(read_env_file(tmp / "etc" / "atomnet.env"))  # EnvironmentFile= overrides Environment=
    [exec_start] = unit_setting("ExecStart")
    argv = expand_systemd(exec_start, env)
    assert argv[0] == "/usr/local/bin/atomnet"
    args = build_parser().parse_args(argv[1:])
    assert (args.verb, args.store, args.node, args.bpffs) == ("daemon", "etcd://192.0.2.10:2379", "node1",
                                                              "/sys/fs/bpf/atomnet")
    assert (args.uplink, args.public_ip, args.log_format, args.log_level) == ("lo", "127.0.0.1", "json", "debug")
    assert (args.lease_ttl, args.metrics) == (600.0, "127.0.0.1:9641")
    for key, value in (("Restart", "always"), ("KillSignal", "SIGTERM"), ("ExecReload", "/bin/kill -HUP $MAINPID"),
                       ("After", "network-online.target"), ("StandardError", "journal")):
        assert unit_setting(key) == [value], key


def test_systemd_analyze_verify(tmp_path):
    """systemd-analyze checks every directive; ExecStart's binary must exist, so the copy it
    checks runs a stand-in instead of /usr/local/bin/atomnet."""
    need("systemd-analyze", "Debian package systemd")
    fake = tmp_path / "atomnet"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    unit = tmp_path / "atomnet-daemon.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/atomnet", str(fake)))
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr
