"""The node API's protocol and error mapping (ctl/runtimes/nodeapi.py, nodeapi_server.py), over
real unix sockets and a real sqlite store, with operations that need no privilege (store-only
pod deletes, validation failures): no netlink, no root needed."""
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ctl.errors import AtomnetError
from ctl.runtimes import nodeapi
from ctl.runtimes.nodeapi_server import NodeAPI, RecordingStore, answer
from ctl.state.model import PODS_PREFIX, Pod
from ctl.state.store import open_store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    url = f"sqlite://{tmp_path}/state.db"
    s = open_store(url)
    s.url = url
    yield s
    s.close()


def stored_pod(store, name: str, node: str = "n1") -> Pod:
    """A pod record whose links never existed (deleting it touches only the store)."""
    pod = Pod(name=name, node=node, ip="10.244.1.5", netns=f"/nonexistent/{name}", host_ifname="anzzzzzzzzzzz",
              mac="02:00:00:00:00:05", labels={"app": "x"}, netns_owned=False)
    store.put(PODS_PREFIX + name, pod.to_json())
    return pod


@pytest.fixture
def server(store, tmp_path):
    written = []
    api = NodeAPI(str(tmp_path / "api" / "n1.sock"), store, store.url, "n1", written.extend)
    api.start()
    api.written_keys = written
    yield api
    api.stop()


def test_socket_path_per_node_and_bpffs_root_with_override_and_off():
    assert nodeapi.socket_path("n1", "/sys/fs/bpf/atomnet", env={}) == "/run/atomnet/api/n1.sock"
    assert nodeapi.socket_path("n1", "/sys/fs/bpf/atomnet/", env={}) == "/run/atomnet/api/n1.sock"
    a = nodeapi.socket_path("n1", "/sys/fs/bpf/atomnet-test-abc-n1", env={})
    b = nodeapi.socket_path("n1", "/sys/fs/bpf/atomnet-test-def-n1", env={})
    assert a != b and a == "/run/atomnet/api/n1@sys_fs_bpf_atomnet-test-abc-n1.sock"
    long = nodeapi.socket_path("n" * 60, "/sys/fs/bpf/" + "x" * 60, env={})
    assert len(long.encode()) <= 107 and long.startswith("/run/atomnet/api/")
    assert long != nodeapi.socket_path("n" * 60, "/sys/fs/bpf/" + "y" * 60, env={})
    assert nodeapi.socket_path("n1", env={"ATOMNET_API_SOCKET": "/tmp/x.sock"}) == "/tmp/x.sock"
    assert nodeapi.socket_path("n1", env={"ATOMNET_API_SOCKET": "off"}) is None
    with pytest.raises(nodeapi.Unavailable):
        nodeapi.call(None, "pod.add", "sqlite:///x", "n1", {})


def test_messages_are_one_json_object_per_line():
    doc = nodeapi.request("pod.add", "sqlite:///s.db", "n1", {"name": "a\nb", "labels": ["k=v"]})
    line = nodeapi.encode(doc)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert nodeapi.decode(line) == doc
    for bad in (b'{"op": "x"}', b"[1, 2]\n", b"nonsense\n"):
        with pytest.raises(ValueError):
            nodeapi.decode(bad)


def test_result_of_maps_ok_error_and_fallback():
    assert nodeapi.result_of({"ok": {"ip": "10.0.0.1"}}) == {"ip": "10.0.0.1"}
    assert nodeapi.result_of({"ok": None}) is None
    with pytest.raises(AtomnetError, match="^pod a already exists$"):
        nodeapi.result_of({"error": "pod a already exists\n"})
    with pytest.raises(nodeapi.Unavailable, match="another store"):
        nodeapi.result_of({"fallback": "another store"})
    with pytest.raises(AtomnetError, match="unexpected"):
        nodeapi.result_of({"what": 1})


def test_answer_refuses_other_stores_and_nodes_and_maps_errors_to_one_line(store):
    written = []
    ask = lambda doc: answer(store, store.url, "n1", doc, written.extend)   # noqa: E731
    assert "fallback" in ask(nodeapi.request("pod.del", "sqlite:///other.db", "n1", {"name": "a"}))
    assert "fallback" in ask(nodeapi.request("pod.del", store.url, "n2", {"name": "a"}))
    bad_label = ask(nodeapi.request("pod.add", store.url, "n1", {"name": "a", "labels": ["novalue"]}))
    assert set(bad_label) == {"error"} and "label" in bad_label["error"] and "\n" not in bad_label["error"]
    assert "unknown node API operation" in ask(nodeapi.request("pod.rename", store.url, "n1", {}))["error"]
    assert "missing argument" in ask(nodeapi.request("pod.del", store.url, "n1", {}))["error"]
    assert "JSON object" in ask(nodeapi.request("pod.del", store.url, "n1", ["a"]))["error"]
    assert ask(nodeapi.request("pod.del", store.url, "n1", {"name": "absent"})) == {"ok": None}
    assert written == [], "nothing was written, so nothing to program"
    assert store.list(PODS_PREFIX)[0] == []


def test_a_pod_of_another_node_is_refused_and_left_alone(store):
    stored_pod(store, "far", node="n2")
    written = []
    res = answer(store, store.url, "n1", nodeapi.request("pod.del", store.url, "n1", {"name": "far"}), written.extend)
    assert res == {"error": "pod far lives on node n2: delete it there"}
    assert store.get(PODS_PREFIX + "far") is not None and written == []


def test_a_delete_through_the_socket_returns_the_pod_and_reports_its_keys(store, server):
    pod = stored_pod(store, "web")
    got = nodeapi.call(server.path, "pod.del", store.url, "n1", {"name": "web"})
    assert got == pod.to_dict()
    assert store.get(PODS_PREFIX + "web") is None
    assert PODS_PREFIX + "web" in server.written_keys, "the daemon is told which keys to program now"
    assert nodeapi.call(server.path, "pod.del", store.url, "n1", {"name": "web"}) is None   # idempotent
    with pytest.raises(nodeapi.Unavailable):
        nodeapi.call(server.path, "pod.del", "sqlite:///elsewhere.db", "n1", {"name": "web"})
    with pytest.raises(AtomnetError, match="invalid label"):
        nodeapi.call(server.path, "pod.add", store.url, "n1", {"name": "x", "labels": ["=v"]})


def test_twenty_concurrent_requests_are_all_answered(store, server):
    for i in range(20):
        stored_pod(store, f"c{i}")
    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(lambda i: nodeapi.call(server.path, "pod.del", store.url, "n1", {"name": f"c{i}"}),
                            range(20)))
    assert [g["name"] for g in got] == [f"c{i}" for i in range(20)]
    assert store.list(PODS_PREFIX)[0] == []


def test_no_daemon_is_unavailable_and_a_vanished_one_is_a_clear_error(tmp_path):
    with pytest.raises(nodeapi.Unavailable):
        nodeapi.call(str(tmp_path / "absent.sock"), "pod.del", "s", "n1", {"name": "a"})
    stale = tmp_path / "stale.sock"   # a SIGKILLed daemon's socket: nobody listens
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(nodeapi.Unavailable):
        nodeapi.call(str(stale), "pod.del", "s", "n1", {"name": "a"})
    # a daemon that takes the request and dies before answering
    gone = tmp_path / "gone.sock"
    t, listener = one_request_daemon(gone, answer=None)
    with pytest.raises(AtomnetError, match="went away during pod.add") as exc:
        nodeapi.call(str(gone), "pod.add", "s", "n1", {"name": "a"})
    assert "\n" not in str(exc.value)
    t.join()
    listener.close()


def one_request_daemon(path, answer: bytes | None):
    """A daemon that takes one request and answers `answer`, or dies without answering (None)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def take_one():
        conn, _ = listener.accept()
        conn.recv(65536)
        if answer is not None:
            conn.sendall(answer)
        conn.close()
    t = threading.Thread(target=take_one)
    t.start()
    return t, listener


def test_garbage_from_a_daemon_is_an_error(tmp_path):
    path = tmp_path / "garbage.sock"
    t, listener = one_request_daemon(path, answer=b"not json\n")
    with pytest.raises(AtomnetError, match="garbage"):
        nodeapi.call(str(path), "pod.del", "s", "n1", {"name": "a"})
    t.join()
    listener.close()


def test_server_takes_over_a_stale_socket_refuses_a_live_one_and_removes_its_own(store, tmp_path):
    path = tmp_path / "api" / "n1.sock"
    path.parent.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    first = NodeAPI(str(path), store, store.url, "n1", lambda keys: None)
    first.start()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    second = NodeAPI(str(path), store, store.url, "n1", lambda keys: None)
    with pytest.raises(AtomnetError, match="another daemon"):
        second.start()
    first.stop()
    assert not path.exists()


def test_a_bad_request_line_is_answered_with_an_error(server):
    c = socket.socket(socket.AF_UNIX)
    c.connect(server.path)
    c.sendall(b"[]\n")
    assert "bad request" in json.loads(nodeapi.read_line(c))["error"]
    c.close()


def test_recording_store_remembers_every_written_key(store):
    rec = RecordingStore(store)
    rec.put("/a", "1")
    rec.create("/b", "2")
    rec.delete("/a")
    rec.put_many([("/c", "3")], deletes=["/b"])
    assert rec.keys == ["/a", "/b", "/a", "/c", "/b"]
    assert rec.get("/c").value == "3"   # reads pass through


def test_the_clients_import_nothing_heavy():
    """What the CLI's pod verbs and the CNI plugin's entry load before they know they need more."""
    code = ("import sys, ctl.cli, ctl.runtimes.nodeapi, ctl.runtimes.cni.entry\n"
            "heavy = [m for m in ('pyroute2', 'structlog', 'ctl.state.store', 'ctl.node.pods', 'bcc', 'ctl.logs')"
            " if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert out.strip() == "[]"
