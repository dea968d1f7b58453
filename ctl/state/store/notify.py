"""Wakes a sqlite watch the moment another process commits to the database, instead of at
a poll: inotify (through libc, no dependency) on the database's directory.

Every writer marks each commit that bumps the revision by writing one byte to a sidecar file,
`<db>-notify`, *after* the commit is published (ctl/state/store/sqlite.py). That is what makes
waiting on inotify alone correct: the WAL write of a commit (an IN_MODIFY too) comes before
the commit is visible to readers (it is published through the -shm mapping, which inotify does
not report), so a watch woken by it may find nothing yet; the sidecar's write comes after, and
wakes it again. Events for other files in the directory (a log file next to the database, say)
are read and ignored: they do not wake the watch."""
from __future__ import annotations

import ctypes
import os
import select
import struct
import time

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x4, 0x8, 0x80, 0x100
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")   # struct inotify_event: wd, mask, cookie, len; then name[len]


def relevant(buf: bytes, stem: bytes) -> bool:
    """Whether a read of inotify events names a file of the database (stem, stem-wal,
    stem-notify...) or says events were lost (then the caller must look)."""
    off = 0
    while off + _EVENT.size <= len(buf):
        _, mask, _, length = _EVENT.unpack_from(buf, off)
        name = buf[off + _EVENT.size: off + _EVENT.size + length].rstrip(b"\0")
        off += _EVENT.size + length
        if mask & IN_Q_OVERFLOW or name.startswith(stem):
            return True
    return False


class DirNotifier:
    def __init__(self, directory: str, stem: str):
        self.fd = -1
        self.stem = stem.encode()
        self.wakeups = 0   # times wait() returned for a write to the database's files (tests count them)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                return
            mask = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
            if libc.inotify_add_watch(fd, directory.encode(), mask) < 0:
                os.close(fd)
                return
            self.fd = fd
        except (OSError, AttributeError):
            self.fd = -1

    def wait(self, timeout: float | None) -> bool:
        """Returns at the next write to one of the database's files (True), or after timeout
        seconds (False; None: no timeout)."""
        if self.fd < 0:
            time.sleep(timeout if timeout is not None else 1.0)
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return False
            hit = False
            try:
                while True:
                    buf = os.read(self.fd, 65536)
                    if not buf:
                        break
                    hit = hit or relevant(buf, self.stem)
            except BlockingIOError:
                pass
            if hit:
                self.wakeups += 1
                return True
            # only other files in the directory changed: keep waiting, to the same deadline

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
