"""Contract tests for ctl.state.store: every backend must pass the same suite.

Tests take the ``store`` fixture (or ``store_url`` when they open the store
from several processes); both are parametrized over BACKENDS, so a new
backend is one entry there. Backend-specific checks (URL parsing, sqlite
file errors, automatic history pruning, etcd connection errors) sit at the bottom.

The etcd backend runs against one real ``etcd`` server per test session
(tests/etcd_server.py, on loopback), wiped before each test; without the
``etcd`` binary those tests skip with the reason.

Revisions are compared relative to each other, never as absolute numbers, so
the suite also holds on a store that has seen writes before the test.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from ctl.state.store import Compacted, Event, SqliteStore, StoreError, open_store
from tests.etcd_server import EtcdServer, _free_ports, etcd_available


def _sqlite_url(tmp_path) -> str:
    return f"sqlite://{tmp_path}/state/atomnet.db"


def _etcd_url(request, tmp_path) -> str:
    server = request.getfixturevalue("etcd_server")
    server.wipe()
    return server.url


# backend name -> function(request, tmp_path) returning the URL of a fresh, empty store
BACKENDS = {
    "sqlite": lambda request, tmp_path: _sqlite_url(tmp_path),
    "etcd": _etcd_url,
}

# backend -> (lease TTL for the refresh test, margin): a lease's keys are surely gone
# `margin` seconds after it expires. etcd's leader checks expiry every 500 ms and then
# deletes through raft; the refresh test needs margin < 0.6 * TTL, hence 2 s there.
LEASE_TIMING = {
    "sqlite": (1.0, 0.2),
    "etcd": (2.0, 0.8),
}


@pytest.fixture(scope="session")
def etcd_server():
    """One real etcd for the session (loopback, free ports, temp data dir removed at the end)."""
    missing = etcd_available()
    if missing:
        pytest.skip(missing)
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(request, backend, tmp_path) -> str:
    return BACKENDS[backend](request, tmp_path)


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


# --- single keys ------------------------------------------------------------


def test_put_get_revisions_and_version(store):
    assert store.get("/k") is None
    r1 = store.put("/k", '{"v": 1}')
    kv = store.get("/k")
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        "/k", '{"v": 1}', r1, r1, 1, 0,
    )
    r2 = store.put("/k", '{"v": 2}')
    assert r2 == r1 + 1 == store.revision()
    kv = store.get("/k")
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == ('{"v": 2}', r1, r2, 2)


def test_create_if_absent(store):
    assert store.create("/c", "first") is True
    rev = store.revision()
    assert store.create("/c", "second") is False
    assert store.get("/c").value == "first"
    assert store.revision() == rev  # a lost create changes nothing


def test_replace_is_compare_and_swap(store):
    store.put("/r", "a")
    seen = store.get("/r")
    assert store.replace("/r", "b", seen.mod_revision) is True
    assert store.get("/r").value == "b"
    assert store.replace("/r", "c", seen.mod_revision) is False  # stale token
    assert store.get("/r").value == "b"
    assert store.replace("/missing", "x", seen.mod_revision) is False
    assert store.get("/missing") is None


def test_delete(store):
    r1 = store.put("/d", "x")
    assert store.delete("/d") is True
    assert store.get("/d") is None
    assert store.delete("/d") is False
    assert store.revision() == r1 + 1
    assert store.watch("/d", r1, 0) == [Event("put", "/d", "x", r1), Event("delete", "/d", None, r1 + 1)]


def test_delete_prefix_one_revision(store):
    for k in ("/p/a", "/p/b", "/p/c", "/q/a"):
        store.put(k, "x")
    r = store.revision()
    assert store.delete_prefix("/p/") == 3
    assert store.revision() == r + 1
    assert [kv.key for kv in store.list("/")[0]] == ["/q/a"]
    assert store.watch("/p/", r + 1, 0) == [Event("delete", k, None, r + 1) for k in ("/p/a", "/p/b", "/p/c")]
    assert store.delete_prefix("/p/") == 0
    assert store.revision() == r + 1


def test_list_prefix_sorted_with_revision(store):
    for k in ("/n/b", "/n/a", "/n/c/d", "/nx", "/m"):
        store.put(k, k)
    kvs, rev = store.list("/n/")
    assert [kv.key for kv in kvs] == ["/n/a", "/n/b", "/n/c/d"]
    assert [kv.value for kv in kvs] == ["/n/a", "/n/b", "/n/c/d"]
    assert rev == store.revision()
    assert store.list("/none/") == ([], rev)


# --- transactions -----------------------------------------------------------


def test_put_many_one_revision(store):
    # One transaction, one revision (its speed is the benchmark's: tests/bench, not a timed test).
    store.put("/old/1", "x")
    store.put("/old/2", "x")
    before = store.revision()
    items = [(f"/bulk/{i:05d}", f'{{"i": {i}}}') for i in range(10_000)]
    rev = store.put_many(items, deletes=["/old/1", "/old/2", "/old/absent"])
    assert rev == before + 1 == store.revision()
    kvs, _ = store.list("/bulk/")
    assert len(kvs) == 10_000
    assert {kv.mod_revision for kv in kvs} == {rev}
    assert store.list("/old/")[0] == []
    events = store.watch("/", rev, 0)
    assert len(events) == 10_002 and {e.revision for e in events} == {rev}
    # existing keys keep create_revision and gain a version
    rev2 = store.put_many([("/bulk/00000", "again")])
    kv = store.get("/bulk/00000")
    assert (kv.create_revision, kv.mod_revision, kv.version) == (rev, rev2, 2)


def test_put_many_is_atomic(store, store_url):
    # A reader on its own connection sees either none or all of a transaction.
    n = 20_000
    done = threading.Event()
    seen: set[int] = set()

    def reader():
        with open_store(store_url) as other:
            while not done.is_set():
                seen.add(len(other.list("/atom/")[0]))

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)
    store.put_many([(f"/atom/{i}", "x") for i in range(n)])
    time.sleep(0.05)
    done.set()
    t.join(10)
    assert seen <= {0, n} and n in seen


def test_put_many_rejects_bad_input_without_change(store):
    store.put("/a/keep", "1")
    before = store.revision()
    with pytest.raises(StoreError):
        store.put_many([("/a/new", "x"), ("/a/keep", "2")], deletes=["/a/keep"])
    assert store.revision() == before
    assert store.get("/a/new") is None and store.get("/a/keep").value == "1"
    assert store.put_many([], deletes=["/nothing"]) == before  # no change, no revision


# --- watch ------------------------------------------------------------------


def test_watch_returns_history_then_times_out(store):
    r1 = store.put("/w/a", "1")
    store.put("/other", "x")
    r3 = store.put("/w/b", "2")
    store.delete("/w/a")
    r4 = store.revision()
    assert store.watch("/w/", r1, 1.0) == [
        Event("put", "/w/a", "1", r1),
        Event("put", "/w/b", "2", r3),
        Event("delete", "/w/a", None, r4),
    ]
    assert store.watch("/w/", r3 + 1, 1.0) == [Event("delete", "/w/a", None, r4)]
    t0 = time.monotonic()
    assert store.watch("/w/", r4 + 1, 0.3) == []
    assert 0.25 <= time.monotonic() - t0 < 1.0


def test_watch_in_thread_sees_later_put(store):
    start = store.revision() + 1
    result: list = []
    t = threading.Thread(target=lambda: result.append(store.watch("/t/", start, 5.0)))
    t.start()
    time.sleep(0.2)
    store.put("/elsewhere", "ignored")
    rev = store.put("/t/x", "hello")
    t0 = time.monotonic()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 1.0
    assert result == [[Event("put", "/t/x", "hello", rev)]]


def test_watch_compacted(store):
    r1 = store.put("/h", "1")
    r2 = store.put("/h", "2")
    r3 = store.put("/h", "3")
    store.compact(r3)
    with pytest.raises(Compacted):
        store.watch("/h", r1, 0)
    with pytest.raises(StoreError):  # Compacted is a StoreError: one catch covers it
        store.watch("/", r2, 0)
    assert store.watch("/h", r3, 0) == [Event("put", "/h", "3", r3)]
    with pytest.raises(StoreError):
        store.compact(store.revision() + 10)


# --- leases -----------------------------------------------------------------


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def test_lease_expiry_deletes_keys_with_events(store, backend):
    _, margin = LEASE_TIMING[backend]
    lease = store.grant(1.0)
    assert 0.5 < store.lease_ttl(lease) <= 1.0
    r1 = store.put("/l/a", "1", lease=lease)
    store.put("/l/b", "2", lease=lease)
    store.put("/l/keep", "3")
    assert store.get("/l/a").lease == lease
    assert store.watch("/l/", r1 + 3, 1.6 + margin) == [
        Event("delete", "/l/a", None, r1 + 3),
        Event("delete", "/l/b", None, r1 + 3),
    ]
    assert [kv.key for kv in store.list("/l/")[0]] == ["/l/keep"]
    assert store.lease_ttl(lease) is None
    with pytest.raises(StoreError):
        store.refresh(lease)
    with pytest.raises(StoreError):
        store.put("/l/late", "x", lease=lease)


def test_refresh_extends_and_plain_put_detaches(store, backend):
    ttl, margin = LEASE_TIMING[backend]  # sqlite: refresh at 0.6 s, checks at 1.2 s and 1.8 s
    t0 = time.monotonic()
    lease = store.grant(ttl)
    store.put("/f/held", "1", lease=lease)
    store.put("/f/detached", "1", lease=lease)
    store.put("/f/detached", "2")  # no lease: detaches, as in etcd
    assert store.get("/f/detached").lease == 0
    _sleep_until(t0 + 0.6 * ttl)
    refreshed = time.monotonic()
    store.refresh(store.get("/f/held").lease)
    assert store.lease_ttl(lease) > 0.8 * ttl
    _sleep_until(t0 + ttl + margin)  # past the first expiry: alive only thanks to the refresh
    assert store.get("/f/held") is not None
    _sleep_until(refreshed + ttl + margin)
    assert store.get("/f/held") is None
    assert store.get("/f/detached").value == "2"


def test_revoke_deletes_keys(store):
    lease = store.grant(30)
    r1 = store.put("/v/a", "1", lease=lease)
    store.revoke(lease)
    assert store.get("/v/a") is None
    assert store.lease_ttl(lease) is None
    assert store.watch("/v/", r1 + 1, 0) == [Event("delete", "/v/a", None, r1 + 1)]
    store.revoke(lease)  # already gone: no error, no change
    assert store.revision() == r1 + 1


# --- several processes on one store -----------------------------------------


def _race_create(url, barrier, results, n):
    with open_store(url) as s:
        barrier.wait()
        results.put((n, s.create("/leader", str(n))))


def _race_puts(url, barrier, results, n):
    with open_store(url) as s:
        barrier.wait()
        results.put([s.put(f"/proc/{n}/{i}", str(i)) for i in range(20)])


def _run_processes(target, url, count):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, barrier, results, n)) for n in range(count)]
    for p in procs:
        p.start()
    out = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    return out


def test_concurrent_create_has_one_winner(store_url):
    results = _run_processes(_race_create, store_url, 8)
    winners = [n for n, won in results if won]
    assert len(winners) == 1
    with open_store(store_url) as s:
        assert s.get("/leader").value == str(winners[0])


def test_concurrent_puts_all_land(store_url):
    results = _run_processes(_race_puts, store_url, 4)
    revs = [r for batch in results for r in batch]
    assert len(set(revs)) == 80
    with open_store(store_url) as s:
        kvs, _ = s.list("/proc/")
        assert len(kvs) == 80
        assert sorted(kv.mod_revision for kv in kvs) == sorted(revs)


# --- URLs and sqlite specifics ----------------------------------------------


def test_unknown_and_bad_urls():
    with pytest.raises(StoreError, match="unknown store URL scheme in 'redis://x'"):
        open_store("redis://x")
    with pytest.raises(StoreError, match="unknown store URL scheme"):
        open_store("/var/lib/atomnet/state.db")
    with pytest.raises(StoreError, match="sqlite:///"):
        open_store("sqlite://relative/path.db")
    for bad in ("etcd://", "etcd://host:port", "etcd://h:1,", "etcd://h:99999", "etcd://::1:2379", "etcd://h:1/x"):
        with pytest.raises(StoreError, match=r"bad etcd store URL .*etcd://HOST:PORT"):
            open_store(bad)


def test_sqlite_creates_private_parent_dir(tmp_path):
    path = tmp_path / "a" / "b" / "state.db"
    with open_store(f"sqlite://{path}") as s:
        s.put("/x", "1")
    assert path.parent.stat().st_mode & 0o777 == 0o700
    with open_store(f"sqlite://{path}") as s:  # reopening keeps the data
        assert s.get("/x").value == "1"


def test_sqlite_garbage_file(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(StoreError) as exc:
        open_store(f"sqlite://{path}")
    assert str(exc.value) == f"cannot open sqlite store {path}: file is not a database"


def test_sqlite_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "state.db"
    with pytest.raises(StoreError) as exc:
        open_store(f"sqlite://{path}")
    msg = str(exc.value)
    assert msg.startswith(f"cannot open sqlite store {path}:") and "not a directory" in msg
    assert "\n" not in msg


def test_sqlite_closed_store_errors(tmp_path):
    s = open_store(_sqlite_url(tmp_path))
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get("/x")


def test_sqlite_prunes_old_history(tmp_path):
    s = SqliteStore(_sqlite_url(tmp_path), history=10)
    revs = [s.put(f"/k/{i}", "x") for i in range(30)]
    with pytest.raises(Compacted):
        s.watch("/", revs[0], 0)
    recent = s.watch("/", revs[-10], 0)
    assert [e.revision for e in recent] == revs[-10:]
    s.close()


# --- etcd specifics -----------------------------------------------------------


def test_etcd_unreachable_is_one_line():
    port = _free_ports("127.0.0.1", 1)[0]  # nothing listens there now
    url = f"etcd://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(StoreError) as exc:
        open_store(url)
    assert str(exc.value) == f"etcd store {url} unreachable: connection refused"
    assert time.monotonic() - t0 < 2.0


def test_etcd_unreachable_names_every_endpoint():
    p1, p2 = _free_ports("127.0.0.1", 2)
    url = f"etcd://127.0.0.1:{p1},localhost:{p2}"
    with pytest.raises(StoreError) as exc:
        open_store(url)
    assert str(exc.value) == (
        f"etcd store {url} unreachable: 127.0.0.1:{p1} connection refused; localhost:{p2} connection refused"
    )


def test_etcd_tries_endpoints_in_order(etcd_server):
    etcd_server.wipe()
    dead = _free_ports("127.0.0.1", 1)[0]
    with open_store(f"etcd://127.0.0.1:{dead},127.0.0.1:{etcd_server.client_port}") as s:
        rev = s.put("/ep", "1")
        assert s.get("/ep").value == "1"
        assert s.watch("/ep", rev, 0) == [Event("put", "/ep", "1", rev)]


def test_etcd_closed_store_errors(etcd_server):
    s = open_store(etcd_server.url)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get("/x")


def test_etcd_grant_rounds_up_to_whole_seconds(etcd_server):
    with open_store(etcd_server.url) as s:
        lease = s.grant(1.2)  # etcd TTLs are whole seconds: 2
        assert 1.0 < s.lease_ttl(lease) <= 2.0
        s.revoke(lease)
        assert s.lease_ttl(lease) is None
        with pytest.raises(StoreError):
            s.grant(0)


def test_etcd_put_many_over_max_txn_ops_says_why():
    missing = etcd_available()
    if missing:
        pytest.skip(missing)
    with EtcdServer(extra_args=["--max-txn-ops", "16"]) as small, open_store(small.url) as s:
        with pytest.raises(StoreError) as exc:
            s.put_many([(f"/k/{i}", "x") for i in range(20)])
        msg = str(exc.value)
        assert msg.startswith(f"etcd store {small.url}: ") and "--max-txn-ops >= 20" in msg and "\n" not in msg
        assert s.list("/k/")[0] == []


def test_etcd_watch_loop_keeps_one_stream_and_loses_nothing(etcd_server):
    """A watch that goes on where the last one stopped reads on the same stream (a new one set
    up after a change was written is an unsynced etcd watcher, served only every 100 ms), and
    a writer racing with the loop's calls loses no event and repeats none."""
    etcd_server.wipe()
    with open_store(etcd_server.url) as w, open_store(etcd_server.url) as s:
        start = s.revision() + 1
        s.put("/other/x", "0")   # outside the prefix: skipped on the same stream
        s.put("/k/0", "0")
        first = w.watch("/k/", start, timeout=5)
        assert [e.key for e in first] == ["/k/0"]
        done, streams = threading.Event(), set()

        def writer():
            for i in range(1, 51):
                s.put(f"/k/{i}", str(i))
            done.set()

        threading.Thread(target=writer).start()
        seen, revision = [], first[-1].revision + 1
        while len(seen) < 50:
            events = w.watch("/k/", revision, timeout=5)
            assert events, "watch timed out with puts outstanding"
            seen += [e.key for e in events]
            revision = events[-1].revision + 1
            if w._live is not None:   # a call that found the puts already written reads them from history
                streams.add(id(w._live.conn))
        assert done.wait(5)
        assert seen == [f"/k/{i}" for i in range(1, 51)]
        assert len(streams) <= 2   # the first call may catch up on history over a stream of its own
        # Another start (here: back in history) is served by a fresh stream, from that revision.
        again = w.watch("/k/", first[-1].revision, timeout=5)
        assert again[0].key == "/k/0"
