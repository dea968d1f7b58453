"""structlog setup: JSON lines for the daemon (machines read them), console for people."""
from __future__ import annotations

import logging
import sys

import structlog


class _StderrLogger:
    """Writes each line to the sys.stderr of the moment, not the one at configure time: a
    caller that swaps stderr (a test harness, a daemonising wrapper) never leaves the logger
    holding a closed file."""
    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def configure(fmt: str = "console", level: str = "info") -> None:
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
