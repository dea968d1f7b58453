"""`atomnet cni install`: the shim really runs the plugin (VERSION needs no root), the conflist carries the node's settings."""
import json
import os
import subprocess
import sys

from ctl.cli import main
from ctl.runtimes.cni.install import conflist


def test_install_writes_a_working_shim_and_the_conflist(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "executable", sys.executable)
    rc = main(["--store", "sqlite:////var/tmp/s.db", "--node", "n7", "--bpffs", "/sys/fs/bpf/x", "-j", "cni", "install",
               "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "net.d")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    doc = json.loads((tmp_path / "net.d" / "10-atomnet.conflist").read_text())
    assert doc["name"] == "atomnet" and doc["cniVersion"] == "1.0.0"
    plugin = doc["plugins"][0]
    assert (plugin["type"], plugin["store"], plugin["node"], plugin["bpffs"]) == \
        ("atomnet", "sqlite:////var/tmp/s.db", "n7", "/sys/fs/bpf/x")
    assert plugin["capabilities"] == {"portMappings": True, "ips": True, "mac": True}
    shim = tmp_path / "bin" / "atomnet"
    assert out["plugin"] == str(shim) and os.access(shim, os.X_OK)
    clean_env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION"}   # a runtime's env: no venv, no PYTHONPATH
    res = subprocess.run([str(shim)], input='{"cniVersion":"1.0.0"}', env=clean_env, capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}
    res = subprocess.run([str(shim)], input='{"cniVersion":"7.0.0","name":"atomnet","type":"atomnet"}',
                         env={**clean_env, "CNI_COMMAND": "ADD"}, capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 1 and json.loads(res.stdout)["code"] == 1   # error object on stdout


def test_install_refuses_a_relative_sqlite_store(tmp_path, capsys):
    rc = main(["--store", "sqlite://rel.db", "cni", "install", "--bin-dir", str(tmp_path / "b"),
               "--conf-dir", str(tmp_path / "c")])
    assert rc == 1 and "absolute path" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_chain_follows_atomnet():
    doc = conflist("sqlite:///s", "n", "/b", chain=[{"type": "bandwidth"}])
    assert [x["type"] for x in doc["plugins"]] == ["atomnet", "bandwidth"]
