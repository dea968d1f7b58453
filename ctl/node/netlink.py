"""Netlink dumps that survive concurrent changes. The kernel flags a dump interrupted
(NLM_F_DUMP_INTR) when links or addresses change while it runs, which is routine on a
node where pods come and go; pyroute2 then raises NetlinkDumpInterrupted. Repeating the
dump is the documented answer."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

T = TypeVar("T")
DUMP_ATTEMPTS = 10


def dump(fn: Callable[[], T]) -> T:
    """fn() (which must materialise its result), repeated while the kernel interrupts it."""
    for attempt in range(DUMP_ATTEMPTS):
        try:
            return fn()
        except NetlinkDumpInterrupted:
            if attempt == DUMP_ATTEMPTS - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")
