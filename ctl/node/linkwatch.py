"""This node's links from netlink events (RTNLGRP_LINK), not polling: a thread reads the
kernel's link notifications and reports (ifname, LinkInfo or None) for each change. It
starts with a dump, so nothing that appeared before the subscription is missed."""
from __future__ import annotations

import os
import select
import threading
from typing import Callable

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

from .netplumb import LinkInfo

log = structlog.get_logger("atomnet.links")

Callback = Callable[[str, "LinkInfo | None"], None]


def decode(msg) -> tuple[str | None, LinkInfo | None]:
    name = msg.get_attr("IFLA_IFNAME")
    if msg["event"] == "RTM_DELLINK":
        return name, None
    return name, LinkInfo(msg["index"], msg.get_attr("IFLA_ADDRESS"))


class LinkWatch:
    def __init__(self, callback: Callback):
        self.callback = callback
        self.stopping = threading.Event()
        self._stop_r, self._stop_w = os.pipe()   # stop() wakes the select: no timeout to poll with
        self.ipr = IPRoute()
        self.ipr.bind(groups=RTMGRP_LINK)   # subscribed before the thread starts: no gap
        self.thread = threading.Thread(target=self._run, name="link-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        fd = self.ipr.fileno()
        try:
            while not self.stopping.is_set():
                ready, _, _ = select.select([fd, self._stop_r], [], [])
                if fd not in ready:
                    continue
                for msg in self.ipr.get():
                    if msg.get("event") not in ("RTM_NEWLINK", "RTM_DELLINK"):
                        continue
                    name, link = decode(msg)
                    if name:
                        self.callback(name, link)
        except Exception as exc:   # the socket closed under us at stop, or a netlink surprise
            if not self.stopping.is_set():
                log.exception("link_watch_failed", error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self.stopping.set()
        os.write(self._stop_w, b"x")
        self.thread.join(timeout=2)
        self.ipr.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
