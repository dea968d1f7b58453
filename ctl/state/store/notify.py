"""Wakes a sqlite watch the moment another process writes the database, instead of at its
next poll: inotify (through libc, no dependency) on the database's directory. A write to the
database or its WAL is an IN_MODIFY; the watch then queries at once. Polling stays as the
fallback (no inotify, or an event missed), so correctness never depends on it."""
from __future__ import annotations

import ctypes
import os
import select

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000


class DirNotifier:
    def __init__(self, directory: str):
        self.fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                return
            if libc.inotify_add_watch(fd, directory.encode(), IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) < 0:
                os.close(fd)
                return
            self.fd = fd
        except (OSError, AttributeError):
            self.fd = -1

    def wait(self, timeout: float) -> bool:
        """Returns at the next write in the directory (True), or after timeout (False)."""
        if self.fd < 0:
            import time
            time.sleep(timeout)
            return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                while os.read(self.fd, 65536):
                    pass
            except BlockingIOError:
                pass
        return bool(ready)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
