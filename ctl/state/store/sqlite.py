"""Embedded store backend: one sqlite3 file, shared by every process on the host.

CLI commands and the daemon open the same file at the same time, so:
- WAL mode lets readers run while one process writes;
- every write is one ``BEGIN IMMEDIATE`` transaction (taking the write lock up
  front instead of upgrading a read lock, which sqlite may refuse without
  waiting), and busy_timeout makes racing writers queue instead of failing;
- the revision counter, the watch history and the leases live in the file,
  so every process sees the same ones. Lease expiry uses the wall clock for
  the same reason, and is swept lazily by whichever process touches the store
  next: there is no background thread that could die with its process.

Watches block on inotify (ctl/state/store/notify.py): every commit that bumps the
revision is followed by a one-byte write to ``<db>-notify``, after it is published, and
that write wakes every watch on the host. An idle watch does not wake at all, except at
the earliest lease expiry (the sweep that deletes that lease's keys is a deadline) and
at a long safety-net interval. A woken watch first compares the store revision with the
one it waits for (one page read) and reads the events table through its revision index
only when there is something new.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .base import KV, Compacted, Event, Store, StoreError, split_batch

HISTORY = 100_000  # events kept for watch; older ones are pruned (-> Compacted)
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another process's write lock
POLL_INTERVAL = 0.05  # seconds between watch polls where inotify is not available
# With inotify every commit wakes the watch (the -notify write follows it); a look at this
# interval only covers a writer killed between its commit and that write, or an older
# atomnet writing the same file. Not a poll loop: one page read every 30 s.
NOTIFIED_POLL_INTERVAL = 30.0
NOTIFY_SUFFIX = "-notify"

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev    INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    lease      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease != 0;

-- seq orders events, also the several events of one revision
CREATE TABLE IF NOT EXISTS events (
    seq   INTEGER PRIMARY KEY,
    rev   INTEGER NOT NULL,
    type  TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT
);
CREATE INDEX IF NOT EXISTS events_rev ON events(rev);

-- AUTOINCREMENT: a lease id is never reused, so a stale holder cannot refresh someone else's
CREATE TABLE IF NOT EXISTS leases (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl        REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_at);

-- compacted: events with rev < compacted may be gone, so watches from there raise Compacted
CREATE TABLE IF NOT EXISTS meta (
    id        INTEGER PRIMARY KEY CHECK (id = 0),
    revision  INTEGER NOT NULL,
    compacted INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta VALUES (0, 0, 0);
"""

_UPSERT = """
INSERT INTO kv (key, value, create_rev, mod_rev, version, lease) VALUES (?1, ?2, ?3, ?3, 1, ?4)
ON CONFLICT (key) DO UPDATE SET
    value = excluded.value, mod_rev = excluded.mod_rev, version = kv.version + 1, lease = excluded.lease
"""
_KV_COLUMNS = "key, value, create_rev, mod_rev, version, lease"


def _path_from_url(url: str) -> str:
    path = url.removeprefix("sqlite://")
    if path == url or not path.startswith("/") or path.endswith("/"):
        raise StoreError(f"bad sqlite store URL {url!r}: use sqlite:///ABSOLUTE/PATH/FILE.db")
    return path


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with prefix (None: no bound).

    sqlite compares TEXT as UTF-8 bytes, which orders like code points, so
    ``prefix <= key < _prefix_end(prefix)`` is an index range scan.
    """
    while prefix:
        nxt = ord(prefix[-1]) + 1
        if nxt == 0xD800:  # surrogates cannot be stored; skip over them
            nxt = 0xE000
        if nxt <= 0x10FFFF:
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None


def _prefix_clause(prefix: str) -> tuple[str, tuple[str, ...]]:
    end = _prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


def _create_private(parent: str, path: str) -> None:
    """The store holds every record of the cluster: a directory we create is 0700 and a
    file we create 0600, whatever the umask (a mode argument is only masked by it, so
    chmod after creating). sqlite gives its -wal and -shm files the database's mode.
    What exists already keeps the mode its owner chose."""
    if parent and not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700)
            os.chmod(parent, 0o700)
        except FileExistsError:
            pass   # made meanwhile by another process: its mode is its own
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SqliteStore(Store):
    """The Store contract on a sqlite3 file; see the module docstring."""

    def __init__(self, url: str, *, history: int = HISTORY, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.url = url
        self.path = _path_from_url(url)
        self.history = history
        # Prune in batches (a tenth of the history) so most writes only do two index lookups.
        self._prune_slack = max(1, history // 10)
        # One connection shared by the threads of this process (a watch thread and
        # its owner, say); the lock keeps their transactions from interleaving.
        self._lock = threading.RLock()
        self._bumped = False
        self.watch_reads = 0   # events-table reads by watch() (tests: an idle watch reads none)
        self._notify = None   # the watch side (DirNotifier), made by the first watch()
        self._db: sqlite3.Connection | None = self._open(busy_timeout)
        self._notify_fd = self._open_notify()

    def __repr__(self) -> str:
        return f"SqliteStore({self.url!r})"

    # --- opening ---------------------------------------------------------

    def _fail_open(self, reason: str) -> StoreError:
        return StoreError(f"cannot open sqlite store {self.path}: {reason}")

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        parent = os.path.dirname(self.path)
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise self._fail_open(f"{parent} is not a directory")
        try:
            _create_private(parent, self.path)
        except OSError as e:
            raise self._fail_open(f"cannot create {e.filename or parent}: {e.strerror}") from e
        try:
            db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise self._fail_open(str(e)) from e
        try:
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            # sqlite opens lazily: this first statement is what fails on a file that is not a database.
            mode = self._enable_wal(db, time.monotonic() + busy_timeout)
            if mode.lower() != "wal":
                raise self._fail_open(f"cannot switch to WAL journal mode (got {mode})")
            # FULL: an acknowledged write survives power loss, as it would in etcd.
            db.execute("PRAGMA synchronous = FULL")
            schema = db.execute("PRAGMA user_version").fetchone()[0]
            if schema > _SCHEMA_VERSION:
                raise self._fail_open(f"schema version {schema} is newer than this atomnet understands")
            if schema < _SCHEMA_VERSION:
                # Racing first opens queue on BEGIN IMMEDIATE; IF NOT EXISTS makes the losers no-ops.
                db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;")
        except StoreError:
            db.close()
            raise
        except sqlite3.Error as e:
            db.close()
            raise self._fail_open(str(e)) from e
        return db

    def _open_notify(self) -> int:
        """The sidecar whose write after each commit wakes the watches (-1: cannot, and then
        watches see the commit at their safety-net look or the next commit's wake-up)."""
        path = self.path + NOTIFY_SUFFIX
        try:
            _create_private("", path)
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def _announce(self) -> None:
        """After a commit that bumped the revision: one byte written, one IN_MODIFY for every
        watching process. Published first, announced second: a watch woken here sees it."""
        if self._notify_fd >= 0:
            try:
                os.pwrite(self._notify_fd, b"\0", 0)
            except OSError:
                pass   # a full disk: the commit is in, the watches see it at their safety-net look

    @staticmethod
    def _enable_wal(db: sqlite3.Connection, deadline: float) -> str:
        """Switch to WAL, retrying while other processes hold the file.

        Switching a fresh file to WAL needs an exclusive lock, and sqlite
        reports SQLITE_BUSY for it without calling the busy handler, so
        processes racing to create the store would fail here without a retry.
        """
        while True:
            try:
                return db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                busy = getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    # --- transactions ----------------------------------------------------

    @contextmanager
    def _txn(self, begin: str) -> Iterator[sqlite3.Connection]:
        """One explicit transaction; sqlite errors become one-line StoreErrors."""
        with self._lock:
            db = self._db
            if db is None:
                raise StoreError(f"sqlite store {self.path} is closed")
            self._bumped = False
            try:
                db.execute(begin)
                yield db
                db.execute("COMMIT")
                if self._bumped:
                    self._announce()
            except BaseException as e:
                if db.in_transaction:
                    try:
                        db.rollback()
                    except sqlite3.Error:
                        pass  # report the error that got us here, not this one
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"sqlite store {self.path}: {e}") from e
                raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that first deletes the keys of expired leases."""
        with self._txn("BEGIN IMMEDIATE") as db:
            self._expire_leases(db)
            yield db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot, taken after sweeping expired leases.

        The due-check is a read, so readers only take the write lock when a
        lease has actually expired.
        """
        with self._lock:
            with self._txn("BEGIN") as db:
                due = db.execute("SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1", (time.time(),)).fetchone()
            if due:
                with self._write():
                    pass
            with self._txn("BEGIN") as db:
                yield db

    # --- helpers inside a write transaction ------------------------------

    @staticmethod
    def _current(db: sqlite3.Connection) -> int:
        return db.execute("SELECT revision FROM meta").fetchone()[0]

    def _bump(self, db: sqlite3.Connection) -> int:
        self._bumped = True   # the commit is announced to watches (_announce)
        return db.execute("UPDATE meta SET revision = revision + 1 RETURNING revision").fetchall()[0][0]

    def _log(self, db: sqlite3.Connection, rev: int, changes: Iterable[tuple[str, str, str | None]]) -> None:
        """Append (type, key, value) events at rev, then prune old history."""
        db.executemany(
            "INSERT INTO events (rev, type, key, value) VALUES (?, ?, ?, ?)",
            ((rev, kind, key, value) for kind, key, value in changes),
        )
        lo, hi = db.execute("SELECT (SELECT min(seq) FROM events), (SELECT max(seq) FROM events)").fetchone()
        if lo is not None and hi - lo + 1 > self.history + self._prune_slack:
            # Cut at a revision boundary so a kept revision always has all of its events.
            cut = db.execute(
                "SELECT rev FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (hi - self.history + 1,)
            ).fetchone()[0]
            self._compact(db, cut)

    @staticmethod
    def _compact(db: sqlite3.Connection, revision: int) -> None:
        db.execute("DELETE FROM events WHERE rev < ?", (revision,))
        db.execute("UPDATE meta SET compacted = max(compacted, ?)", (revision,))

    def _check_lease(self, db: sqlite3.Connection, lease: int) -> None:
        if lease and db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise StoreError(f"lease {lease} not found in sqlite store {self.path} (expired or revoked)")

    def _set(self, db: sqlite3.Connection, key: str, value: str, lease: int) -> int:
        rev = self._bump(db)
        db.execute(_UPSERT, (key, value, rev, lease))
        self._log(db, rev, [("put", key, value)])
        return rev

    def _drop_lease(self, db: sqlite3.Connection, lease: int) -> None:
        """Delete the lease and its keys, all at one new revision (like an etcd revoke)."""
        keys = sorted(k for (k,) in db.execute("DELETE FROM kv WHERE lease = ? RETURNING key", (lease,)).fetchall())
        db.execute("DELETE FROM leases WHERE id = ?", (lease,))
        if keys:
            self._log(db, self._bump(db), [("delete", k, None) for k in keys])

    def _expire_leases(self, db: sqlite3.Connection) -> None:
        expired = db.execute(
            "SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at, id", (time.time(),)
        ).fetchall()
        for (lease,) in expired:
            self._drop_lease(db, lease)

    # --- the Store contract ----------------------------------------------

    def get(self, key: str) -> KV | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE key = ?", (key,)).fetchone()
        return KV(*row) if row else None

    def list(self, prefix: str) -> tuple[list[KV], int]:
        where, args = _prefix_clause(prefix)
        with self._read() as db:
            rows = db.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE {where} ORDER BY key", args).fetchall()
            rev = self._current(db)
        return [KV(*row) for row in rows], rev

    def put(self, key: str, value: str, lease: int = 0) -> int:
        with self._write() as db:
            self._check_lease(db, lease)
            return self._set(db, key, value, lease)

    def create(self, key: str, value: str, lease: int = 0) -> bool:
        with self._write() as db:
            self._check_lease(db, lease)
            if db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone():
                return False
            self._set(db, key, value, lease)
            return True

    def replace(self, key: str, value: str, mod_revision: int, lease: int = 0) -> bool:
        with self._write() as db:
            self._check_lease(db, lease)
            row = db.execute("SELECT mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None or row[0] != mod_revision:
                return False
            self._set(db, key, value, lease)
            return True

    def delete(self, key: str) -> bool:
        with self._write() as db:
            if not db.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount:
                return False
            self._log(db, self._bump(db), [("delete", key, None)])
            return True

    def delete_prefix(self, prefix: str) -> int:
        where, args = _prefix_clause(prefix)
        with self._write() as db:
            keys = sorted(k for (k,) in db.execute(f"DELETE FROM kv WHERE {where} RETURNING key", args).fetchall())
            if keys:
                self._log(db, self._bump(db), [("delete", k, None) for k in keys])
        return len(keys)

    def put_many(self, items: Iterable[tuple[str, str]], deletes: Iterable[str] = ()) -> int:
        puts, dels = split_batch(items, deletes, f"sqlite store {self.path}")
        with self._write() as db:
            gone = [k for k in dels if db.execute("DELETE FROM kv WHERE key = ?", (k,)).rowcount]
            if not puts and not gone:
                return self._current(db)
            rev = self._bump(db)
            db.executemany(_UPSERT, ((k, v, rev, 0) for k, v in puts.items()))
            changes: list[tuple[str, str, str | None]] = [("put", k, v) for k, v in puts.items()]
            changes += [("delete", k, None) for k in gone]
            self._log(db, rev, changes)
            return rev

    def revision(self) -> int:
        with self._read() as db:
            return self._current(db)

    def watch(self, prefix: str, start_revision: int, timeout: float) -> list[Event]:
        where, args = _prefix_clause(prefix)
        deadline = time.monotonic() + timeout
        # Before the first look: a commit announced between that look and the wait is then
        # already queued on the inotify descriptor, not lost.
        notifier = self._notifier()
        start = start_revision
        while True:
            with self._read() as db:
                revision, compacted = db.execute("SELECT revision, compacted FROM meta").fetchone()
                if start < compacted:
                    raise Compacted(
                        f"sqlite store {self.path}: history before revision {compacted} is compacted, "
                        f"cannot watch from {start_revision}; list again"
                    )
                rows = []
                if revision >= start:   # something new: read it through the revision index
                    self.watch_reads += 1
                    rows = db.execute(
                        f"SELECT type, key, value, rev FROM events INDEXED BY events_rev "
                        f"WHERE rev >= ? AND {where} ORDER BY rev, seq",
                        (start, *args),
                    ).fetchall()
                    start = revision + 1   # what did not match the prefix is not read twice
                next_expiry = db.execute("SELECT min(expires_at) FROM leases").fetchone()[0]
            if rows:
                return [Event(*row) for row in rows]
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            # Wait outside the lock so this process's other threads can write meanwhile.
            wait = POLL_INTERVAL if notifier.fd < 0 else NOTIFIED_POLL_INTERVAL
            if next_expiry is not None:   # a lease's keys go at its expiry: a deadline, looked at then
                wait = min(wait, max(0.0, next_expiry - time.time()) + 0.01)
            notifier.wait(min(wait, left))

    def compact(self, revision: int) -> None:
        with self._write() as db:
            current = self._current(db)
            if revision > current:
                raise StoreError(
                    f"sqlite store {self.path}: cannot compact to revision {revision}, current is {current}"
                )
            self._compact(db, revision)

    def grant(self, ttl: float) -> int:
        if not ttl > 0:
            raise StoreError(f"sqlite store {self.path}: lease ttl must be positive, got {ttl!r}")
        with self._write() as db:
            return db.execute(
                "INSERT INTO leases (ttl, expires_at) VALUES (?, ?) RETURNING id", (ttl, time.time() + ttl)
            ).fetchall()[0][0]

    def refresh(self, lease: int) -> None:
        # The sweep in _write has already removed the lease if it expired.
        with self._write() as db:
            found = db.execute(
                "UPDATE leases SET expires_at = ? + ttl WHERE id = ?", (time.time(), lease)
            ).rowcount
        if not found:
            raise StoreError(f"lease {lease} expired or unknown in sqlite store {self.path}")

    def revoke(self, lease: int) -> None:
        with self._write() as db:
            self._drop_lease(db, lease)

    def lease_ttl(self, lease: int) -> float | None:
        with self._read() as db:
            row = db.execute("SELECT expires_at FROM leases WHERE id = ?", (lease,)).fetchone()
        left = row[0] - time.time() if row else 0.0
        return left if left > 0 else None

    def _notifier(self):
        if self._notify is None:
            from .notify import DirNotifier
            path = os.path.abspath(self.path)
            self._notify = DirNotifier(os.path.dirname(path) or ".", os.path.basename(path))
        return self._notify

    def close(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._notify_fd >= 0:
            os.close(self._notify_fd)
            self._notify_fd = -1
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
