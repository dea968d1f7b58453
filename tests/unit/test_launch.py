"""The lean launchers (ctl/launch.py): `atomnet` started without site behaves exactly as
`python -m ctl.cli` does, verb by verb (stdout, stderr, exit status), with a real sqlite store,
a real node API server for the pod verbs' fast path, and the in-process fallback; and its
fast path really runs on the standard library alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctl import launch
from ctl.runtimes.nodeapi_server import NodeAPI
from ctl.state.model import PODS_PREFIX, Pod
from ctl.state.store import open_store

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the node API answers root only")


@pytest.fixture
def launcher(tmp_path):
    path = tmp_path / "bin" / "atomnet"
    path.parent.mkdir()
    launch.write_script(str(path), launch.script_text("ctl.cli:main"))
    return str(path)


class Way:
    """One way to start the CLI, with its own store and node API server (state verbs change
    state: each way starts from the same empty store)."""

    def __init__(self, cmd: list[str], tmp: Path):
        tmp.mkdir()
        self.cmd, self.tmp = cmd, tmp
        self.url = f"sqlite://{tmp}/state.db"
        self.store = open_store(self.url)
        self.api = NodeAPI(str(tmp / "api" / "n1.sock"), self.store, self.url, "n1", lambda keys: None)
        self.api.start()
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ATOMNET_STORE": self.url, "ATOMNET_NODE": "n1",
                    "ATOMNET_BPFFS": str(tmp / "bpffs"), "ATOMNET_API_SOCKET": self.api.path, "LANG": "C.UTF-8"}

    def run(self, argv, env=None, stdin=None):
        res = subprocess.run(self.cmd + list(argv), env={**self.env, **(env or {})}, capture_output=True, text=True,
                             input=stdin, timeout=120, cwd="/")
        # the store's path differs between the two ways (and nothing else may)
        return res.returncode, res.stdout.replace(str(self.tmp), "TMP"), res.stderr.replace(str(self.tmp), "TMP")

    def stored_pod(self, name: str) -> None:
        """A pod record whose links never existed: deleting it touches only the store."""
        pod = Pod(name=name, node="n1", ip="10.244.1.5", netns=f"/nonexistent/{name}", host_ifname="anzzzzzzzzzzz",
                  mac="02:00:00:00:00:05", labels={"app": "x"}, netns_owned=False)
        self.store.put(PODS_PREFIX + name, pod.to_json())

    def close(self):
        self.api.stop()
        self.store.close()


@pytest.fixture
def ways(tmp_path, launcher):
    old = Way([sys.executable, "-m", "ctl.cli"], tmp_path / "old")
    old.env["PYTHONPATH"] = str(REPO)   # `python -m ctl.cli` from anywhere, as the rig runs it
    new = Way([launcher], tmp_path / "new")
    yield old, new
    old.close()
    new.close()


# (argv, the exit status it must have: the parity must cover successes, errors and usage errors)
SCRIPT = [
    ([], 2),
    (["bogus"], 2),
    (["pod", "add"], 2),
    (["pod", "add", "x", "--bogus"], 2),
    (["-j", "pod"], 2),
    (["network", "init", "--cidr", "10.244.0.0/16", "--masquerade", "maybe"], 2),
    (["--store"], 2),
    (["network", "show"], 1),                        # no network yet
    (["network", "init", "--cidr", "10.244.0.0/16"], 0),
    (["-j", "network", "show"], 0),
    (["network", "show", "-j"], 0),                  # global flags after the verb
    (["service", "add", "web", "--port", "80:8080/tcp", "--selector", "app=web"], 0),
    (["-j", "service", "add", "api", "--port", "443:8443", "--backend", "keep"], 0),
    (["service", "add", "bad", "--port", "99999"], 1),
    (["service", "list"], 0),
    (["-j", "service", "show", "web"], 0),
    (["service", "show", "nope"], 1),
    (["service", "del", "api"], 0),
    (["-j", "service", "del", "api"], 0),
    (["pod", "list"], 0),
    (["-j", "pod", "list"], 0),
    (["pod", "del", "ghost"], 0),                    # the fast path: the node API answers
    (["-j", "pod", "del", "ghost"], 0),
    (["pod", "del", "stored1"], 0),                  # deleted by the node API's server
    (["-j", "pod", "del", "stored2"], 0),
    (["pod", "add", "Bad_Name!"], 1),                # refused by the server: one line, exit 1
    (["-j", "pod", "add", "p1", "--netns", "/nonexistent/ns"], 1),
    (["pod", "add", "p1", "--label", "novalue"], 1),
    (["apply", "-f", "/nonexistent.yaml"], 1),
    (["forward", "list"], 0),
    (["tunnel", "list"], 1),                         # no pins under the bpffs: needs bcc (site)
    (["-j", "map", "list"], 1),
]
OFF = {"ATOMNET_API_SOCKET": "off"}   # the pod verbs' in-process fallback (site completed there)
SCRIPT_OFF = [
    (["pod", "del", "ghost"], 0),
    (["-j", "pod", "del", "stored3"], 0),
    (["pod", "add", "Bad_Name!"], 1),
    (["pod", "add", "p1", "--netns", "/nonexistent/ns"], 1),
]


@needs_root
def test_every_verb_the_same_through_the_launcher(ways):
    old, new = ways
    for way in ways:
        for name in ("stored1", "stored2", "stored3", "keep"):
            way.stored_pod(name)
    for script, env in ((SCRIPT, None), (SCRIPT_OFF, OFF)):
        for argv, status in script:
            want = old.run(argv, env)
            assert want[0] == status, (argv, want)
            assert new.run(argv, env) == want, argv
            if status:
                assert want[2].count("\n") == 1 and not want[1], (argv, want)   # one line, on stderr


@needs_root
def test_stdin_and_help_of_every_verb_the_same(ways):
    old, new = ways
    doc = json.dumps([{"kind": "service", "name": "web", "ports": [{"port": 80}], "selector": {"app": "web"}}])
    for argv in (["-j", "apply", "-f", "-"], ["apply", "-f", "-"], ["-j", "service", "list"]):
        assert new.run(argv, stdin=doc) == old.run(argv, stdin=doc), argv
    for path in [(), ("pod",), ("pod", "add"), ("daemon",), ("network", "init")]:   # every verb: test_cli
        want = old.run([*path, "--help"])
        assert want[0] == 0 and want[1].startswith("usage: atomnet"), path
        assert new.run([*path, "--help"]) == want, path


def lean_run(argv: list[str], env: dict) -> dict:
    """What a launcher's process had imported when the verb returned (it runs the launcher's body)."""
    code = ("import sys, json\n"
            f"sys.path.append({str(REPO)!r})\n"
            f"sys.argv = ['atomnet', *{argv!r}]\n"
            "from ctl.launch import run\n"
            "rc = run('ctl.cli', 'main')\n"
            "mods = [m for m in ('site', 'structlog', 'pyroute2', 'ctl.state.store', 'ctl.node.pods')"
            " if m in sys.modules]\n"
            "print(json.dumps({'rc': rc, 'mods': mods, 'site_packages': any('-packages' in p for p in sys.path)}),"
            " file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd="/")
    return json.loads(res.stderr.strip().splitlines()[-1])


@needs_root
def test_the_fast_path_runs_without_site_and_the_fallback_completes_it(ways):
    _old, new = ways
    fast = lean_run(["pod", "del", "ghost"], new.env)
    assert fast == {"rc": 0, "mods": [], "site_packages": False}
    fallback = lean_run(["pod", "del", "ghost"], {**new.env, **OFF})
    assert fallback["rc"] == 0 and {"site", "ctl.state.store"} <= set(fallback["mods"]) and fallback["site_packages"]
    other = lean_run(["pod", "list"], new.env)
    assert other["rc"] == 0 and "site" in other["mods"] and other["site_packages"]


def test_without_the_launcher_site_is_never_added_behind_your_back():
    """`python -S -m ctl.cli` by hand keeps the environment it was given (only a launcher defers site)."""
    res = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.append({str(REPO)!r})\n"
                          "from ctl import launch; launch.full_environment(); print('site' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_script_text_shebang_or_sh_line_for_paths_a_shebang_cannot_hold(tmp_path):
    plain = launch.script_text("ctl.cli:main", python="/opt/v/bin/python", root="/opt/src")
    assert plain.startswith("#!/opt/v/bin/python -S\n") and "sys.path.append('/opt/src')" in plain
    assert "run('ctl.cli', 'main')" in plain
    # a venv in a directory with a blank: the interpreter re-executed by /bin/sh, really run
    odd = tmp_path / "my venv"
    odd.mkdir()
    (odd / "python").symlink_to(sys.executable)
    path = tmp_path / "atomnet"
    launch.write_script(str(path), launch.script_text("ctl.cli:main", python=str(odd / "python"), root=str(REPO)))
    assert path.read_text().startswith("#!/bin/sh\n")
    res = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60, cwd="/",
                         env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.startswith("usage: atomnet")


def test_make_build_installed_the_launcher_as_the_atomnet_command():
    """What the README tells users to run is the launcher, of pip's own entry point."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not run from a virtualenv made by make build")
    text = (Path(sys.executable).parent / "atomnet").read_text()
    assert text.startswith(f"#!{sys.executable} -S\n") or text.startswith("#!/bin/sh\n'''exec'")
    assert "run('ctl.cli', 'main')" in text
