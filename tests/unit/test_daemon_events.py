"""The daemon's event bookkeeping that needs no store, maps or threads: the node API's
refresh against the watch's late copies, and the repair's back-off after failed passes."""
from ctl.daemon import DRIFT_SECONDS, REPAIR_RETRY_FIRST, Daemon, Refreshed
from ctl.state.store import Event

KEY = "/atomnet/pods/web"


def test_the_watchs_late_put_does_not_undo_a_refreshed_delete():
    r = Refreshed()
    r.record([Event("put", KEY, "{}", 7)])        # pod add through the API: applied at once
    r.record([Event("delete", KEY, None, 9)])     # then pod del: the revision read before its get
    assert r.stale(Event("put", KEY, "{}", 7))    # the watch's copy of the add, late
    assert r.stale(Event("delete", KEY, None, 8))  # its copy of the delete: skipped, and forgotten
    assert not r.stale(Event("put", KEY, "{}", 12))   # a later change is applied
    assert r.applied == {}


def test_a_refreshed_put_is_forgotten_at_its_own_revision():
    r = Refreshed()
    r.record([Event("put", KEY, "{}", 7)])
    assert r.stale(Event("put", KEY, "{}", 5))    # older: skipped, still waiting for 7
    assert KEY in r.applied
    assert r.stale(Event("put", KEY, "{}", 7))
    assert r.applied == {}
    assert not r.stale(Event("put", KEY, "{}", 7))   # other keys, and this one now, pass
    assert not r.stale(Event("put", "/atomnet/pods/other", "{}", 3))


def test_failed_passes_in_a_row_back_off_the_repair_and_a_success_resets_it():
    d = Daemon.__new__(Daemon)   # only the deadlines
    now = 1000.0
    d.last_drift, d.lease_deadline, d.renew_margin = now, now + 24 * 3600, 3600
    d.repair_retry = REPAIR_RETRY_FIRST
    waits = []
    for _ in range(12):
        waits.append(d.repair_soon(now))
        assert d.idle_timeout(now) == waits[-1]
        d.last_drift = now   # the repair ran (and failed again)
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == DRIFT_SECONDS   # never a tighter loop than 1 s, never slower than the drift check
