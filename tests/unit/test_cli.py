"""CLI contract without root: usage errors exit 2 with one line; bad input exits 1 with
one line and changes nothing; -j prints JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def atomnet(*args, store=None, env_extra=None, as_nobody=False):
    env = {**os.environ, "PYTHONPATH": str(REPO), "ATOMNET_NODE": "n1", **(env_extra or {})}
    if store:
        env["ATOMNET_STORE"] = store
    cmd = [sys.executable, "-m", "ctl.cli", *args]
    if as_nobody:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd="/")


def one_line(res):
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize("args", [[], ["pod"], ["pod", "frobnicate"], ["network", "init"], ["pod", "add"],
                                  ["network", "init", "--cidr", "x", "--subnet-len", "abc"]])
def test_usage_errors_exit_2_with_one_line(args):
    res = atomnet(*args)
    assert res.returncode == 2
    assert one_line(res).startswith("atomnet")


def test_unknown_store_scheme(tmp_path):
    res = atomnet("pod", "list", store="redis://localhost")
    assert res.returncode == 1 and "unknown store URL scheme" in one_line(res)


def test_unreadable_sqlite_file(tmp_path):
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not a database" * 100)
    res = atomnet("pod", "list", store=f"sqlite://{bad}")
    assert res.returncode == 1 and "cannot open sqlite store" in one_line(res)
    assert bad.read_bytes() == b"this is not a database" * 100, "the file is left alone"


def test_network_init_then_conflicting_init_changes_nothing(tmp_path):
    store = f"sqlite://{tmp_path}/s.db"
    ok = atomnet("-j", "network", "init", "--cidr", "10.244.0.0/16", store=store)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["network"] == "10.244.0.0/16"
    res = atomnet("network", "init", "--cidr", "10.245.0.0/16", store=store)
    assert res.returncode == 1 and "already initialised" in one_line(res)
    shown = atomnet("network", "show", "-j", store=store)  # global flag after the verb works too
    assert json.loads(shown.stdout)["network"] == "10.244.0.0/16"


@pytest.mark.parametrize("cidr", ["10.244.0.0/33", "banana", "10.244.0.1/16"])
def test_network_init_rejects_bad_cidr(tmp_path, cidr):
    res = atomnet("network", "init", "--cidr", cidr, store=f"sqlite://{tmp_path}/s.db")
    assert res.returncode == 1 and "invalid cluster network" in one_line(res)


def test_invalid_pod_name_and_label(tmp_path):
    store = f"sqlite://{tmp_path}/s.db"
    assert "invalid pod name" in one_line(atomnet("pod", "add", "Bad_Name", store=store))
    assert "invalid label" in one_line(atomnet("pod", "add", "ok", "--label", "novalue", store=store))
    assert json.loads(atomnet("-j", "pod", "list", store=store).stdout) == []


def test_daemon_refuses_without_root(tmp_path):
    if os.geteuid() != 0:
        res = atomnet("daemon", store=f"sqlite://{tmp_path}/s.db")
    else:
        tmp_path.chmod(0o777)
        res = atomnet("daemon", store=f"sqlite://{tmp_path}/s.db", as_nobody=True)
    assert res.returncode == 1 and "must run as root" in one_line(res)


def test_inspection_without_pins_is_one_clear_line(tmp_path):
    res = atomnet("map", "list", env_extra={"ATOMNET_BPFFS": str(tmp_path / "nothing")})
    assert res.returncode == 1 and "nothing pinned" in one_line(res)


def test_missing_bcc_names_the_package(tmp_path):
    # Shadow the OS's bcc with a package that fails to import, as on a machine without python3-bpfcc.
    (tmp_path / "bcc").mkdir()
    (tmp_path / "bcc" / "__init__.py").write_text("raise ImportError('No module named bcc')\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    res = atomnet("prog", "show", env_extra=env)
    assert res.returncode == 1 and "apt-get install python3-bpfcc" in one_line(res)


def test_build_without_clang_says_so(tmp_path):
    res = subprocess.run(["make", "-s", "-C", str(REPO), f"OBJDIR={tmp_path}", "CLANG=no-such-clang",
                          f"{tmp_path}/from_pod.o"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "clang not found: apt-get install clang llvm" in res.stderr


def test_build_error_shows_clangs_message(tmp_path):
    broken = tmp_path / "src"
    broken.mkdir()
    (broken / "broken.c").write_text("int f(void) { return undefined_symbol; }\n")
    res = subprocess.run(["make", "-s", "-C", str(REPO), f"OBJDIR={tmp_path}/out", f"{tmp_path}/out/broken.o",
                          f"BPF_DIR={broken}"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "undefined_symbol" in res.stderr


def _every_parser(parser, path=()):
    """(path, parser) for every command path, filling each lazy parser on the way."""
    yield path, parser.filled()
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for name, sub in action.choices.items():
            yield from _every_parser(sub, (*path, name))


def _outcome(parser, argv):
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns = vars(parser.parse_args(argv))
            ns["func"] = ns["func"].__name__
            result = ("parsed", ns)
        except SystemExit as exc:
            result = ("exit", exc.code)
    return result, out.getvalue(), err.getvalue()


LAZY_CASES = [[], ["bogus"], ["-j"], ["pod"], ["pod", "add"], ["pod", "add", "x", "--bogus"], ["-j", "pod"],
              ["network", "init", "--cidr", "x", "--masquerade", "m"], ["daemon", "--log-level", "x"],
              ["service", "add", "w"], ["ct", "list", "--nat", "z"], ["--node", "a", "pod", "list", "--node", "b"],
              ["-j", "pod", "add", "x", "--label", "a=b", "--label", "c=d", "--store", "sqlite:///x"],
              ["service", "add", "web", "--port", "80:8080/tcp", "--selector", "app=web", "-j"],
              ["daemon", "--uplink", "eth1", "--upstream", "192.0.2.53", "--dns-ttl", "3"], ["pod", "list", "--store"]]


def test_a_parser_built_on_first_use_prints_and_parses_as_one_built_whole(monkeypatch):
    """build_parser fills a verb's parser when it is used (only the command's path is built):
    help of every command path, usage errors and parsed values are the same as with every
    parser filled up front."""
    from ctl.cli import build_parser
    monkeypatch.setenv("COLUMNS", "100")
    eager = build_parser()
    paths = [path for path, _ in _every_parser(eager)]
    assert len(paths) > 40 and ("pod", "add") in paths
    for argv in [[*path, "--help"] for path in paths] + LAZY_CASES:
        lazy = _outcome(build_parser(), argv)
        assert lazy == _outcome(eager, argv), argv
        assert lazy[0][0] == "parsed" or lazy[1] or lazy[2], argv   # printed something, or parsed
