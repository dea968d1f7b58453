"""Idle means idle (issue 15): the loops that wait for something block on their event source.
Counted, not timed: wake-ups and reads of an idle store watch over a window, context switches
of an idle server thread, and the daemon's sleep between deadlines. A poll loop (the 0.5 s
safety-net poll that re-read the whole events table, the 1 s main-loop cap) fails these."""
from __future__ import annotations

import threading
import time

from ctl.observe.metrics import Metrics
from ctl.state.store import open_store
from ctl.state.store.sqlite import SqliteStore

WINDOW = 1.0   # seconds an idle loop is watched for; the old loops woke 2-50 times in it


def voluntary_switches(tid: int) -> int:
    """How often the thread went to sleep (each wake-up ends one): the kernel's count."""
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_an_idle_sqlite_watch_neither_wakes_nor_reads(tmp_path):
    path = tmp_path / "state.db"
    with open_store(f"sqlite://{path}") as store:
        assert isinstance(store, SqliteStore)
        rev = store.put("/services/a", "{}")
        log = tmp_path / "daemon.log"   # the rig keeps the daemon's log next to the database
        stop = threading.Event()

        def write_log():
            with open(log, "a") as f:
                while not stop.wait(0.05):
                    f.write("a log line\n")
                    f.flush()

        writer = threading.Thread(target=write_log)
        writer.start()
        try:
            assert store.watch("/", rev + 1, timeout=WINDOW) == []
        finally:
            stop.set()
            writer.join()
        assert store._notify.wakeups == 0, "woken without a write to the database"
        assert store.watch_reads == 0, "read the events table with nothing new"


def test_a_commit_by_another_connection_wakes_the_watch_once_it_is_visible(tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    with open_store(url) as store, open_store(url) as other:
        rev = store.put("/services/a", "{}")
        done: list = []

        def put_later():
            store.watch("/nothing/", rev + 1, timeout=0.2)   # some time for the watch below to block
            done.append(other.put("/services/b", "{}"))

        t = threading.Thread(target=put_later)
        t.start()
        events = store.watch("/services/", rev + 1, timeout=30)
        t.join()
        assert [(e.type, e.key, e.revision) for e in events] == [("put", "/services/b", done[0])]
        # one read of the events table for the one commit (a wake-up by its WAL write, before
        # the commit is visible, costs a look at the revision only)
        assert store.watch_reads == 1


def test_a_lease_expiry_is_the_idle_watch_s_one_deadline(tmp_path):
    """Nobody writes, yet the keys of an expired lease must go (and be seen to go) at its expiry:
    the watch looks then, not at a polling interval."""
    with open_store(f"sqlite://{tmp_path / 'state.db'}") as store:
        lease = store.grant(0.3)
        rev = store.put("/subnets/10.244.1.0-24", "{}", lease=lease)
        events = store.watch("/subnets/", rev + 1, timeout=30)
        assert [(e.type, e.key) for e in events] == [("delete", "/subnets/10.244.1.0-24")]
        assert store._notify.wakeups == 0


def test_the_idle_metrics_server_thread_sleeps_until_a_scrape(tmp_path):
    m = Metrics()
    m.serve("127.0.0.1:0", lambda: {})
    try:
        thread = next(t for t in threading.enumerate() if t.name == "metrics")
        time.sleep(0.1)   # past its start-up
        before = voluntary_switches(thread.native_id)
        time.sleep(WINDOW)
        assert voluntary_switches(thread.native_id) - before <= 1
    finally:
        m.server.shutdown()
        m.server.server_close()


def test_the_daemon_sleeps_until_its_next_deadline_not_a_poll_period():
    from ctl.daemon import DRIFT_SECONDS, Daemon
    d = Daemon.__new__(Daemon)   # only the deadlines: no store, maps or threads
    now = 1000.0
    d.last_drift, d.lease_deadline, d.renew_margin = now, now + 24 * 3600, 3600
    assert d.idle_timeout(now) == DRIFT_SECONDS
    d.lease_deadline = now + 60 + 3600   # the lease renewal is due first
    assert d.idle_timeout(now) == 60
    d.last_drift = now - DRIFT_SECONDS - 5   # overdue: no sleep at all
    assert d.idle_timeout(now) == 0
