"""What a node exposes: the metrics endpoint is loopback unless an address is asked for;
the sqlite store is private (file 0600, a directory we create 0700) whatever the umask."""
import os
import socket

import pytest

from ctl.observe.metrics import Metrics
from ctl.state.store import open_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("spec,bound", [(":{port}", "127.0.0.1"), ("127.0.0.1:{port}", "127.0.0.1"),
                                        ("0.0.0.0:{port}", "0.0.0.0")])
def test_metrics_without_a_host_bind_loopback_only(spec, bound):
    port = free_port()
    m = Metrics()
    m.serve(spec.format(port=port), lambda: {})
    try:
        assert m.server.server_address[:2] == (bound, port)
    finally:
        m.server.shutdown()
        m.server.server_close()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o002])
def test_sqlite_store_is_private_whatever_the_umask(tmp_path, umask):
    path = tmp_path / "new" / "dir" / "state.db"
    old = os.umask(umask)
    try:
        with open_store(f"sqlite://{path}") as s:
            s.put("/x", "1")
            files = [p for p in path.parent.iterdir()]
            assert {p.name for p in files} >= {"state.db", "state.db-wal", "state.db-notify"}
            for p in files:
                assert p.stat().st_mode & 0o777 == 0o600, p
        assert path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def test_an_existing_directory_and_file_keep_their_modes(tmp_path):
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    (d / "state.db").touch(mode=0o640)
    (d / "state.db").chmod(0o640)
    with open_store(f"sqlite://{d}/state.db") as s:
        s.put("/x", "1")
    assert d.stat().st_mode & 0o777 == 0o755 and (d / "state.db").stat().st_mode & 0o777 == 0o640
