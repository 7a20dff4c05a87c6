"""Structured logs: one JSON object per line on stdout (structlog).

Configured as structlog's performance guide says: a filtering bound logger
(events below the level cost one method call), orjson rendering straight to
bytes, a bytes logger on stdout, and loggers cached on first use. Every event
carries ts, level and event; session loggers are bound with session, user,
role and client so one connection's lines tie together.

Writes are batched per event-loop iteration (`_Lines`): the lines rendered
while the loop runs its ready callbacks go to stdout together, in writes of at
most PIPE_BUF bytes, right after. That is one syscall for many statements under
load instead of one per line (a write per line costs more than rendering it),
and a write of at most PIPE_BUF bytes is atomic on a pipe, so the lines of
several workers sharing one stdout never interleave mid-line. What this gives
up: a process killed with SIGKILL loses the lines of its last loop iteration
(microseconds of work); every exit path pgwarden controls flushes (`flush`).
Until the server hands its loop's call_soon to `batch_on` (and after
`batch_off`), each line is written at once: the CLI, and the tests.

Rule: nothing that came from the data goes into an event: no SQL literal, no
parameter, no result value, no password. Callers pass identifiers, counts and
SQLSTATEs only.
"""

from __future__ import annotations

import atexit
import logging
import select
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def configure(fmt: str = "json", level: str = "info") -> None:
    """Set up structlog for the process (idempotent)."""
    shared: list[Any] = [
        structlog.processors.add_log_level,
        _timestamp,
        # Tracebacks as text, never with local variables: locals may hold data.
        structlog.processors.format_exc_info,
    ]
    if fmt == "console":
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=False)]
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors = [*shared, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        factory = _lines.factory
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


class _Clock:
    """ISO 8601 UTC timestamps, the seconds part formatted once per second.

    Same text as structlog's TimeStamper(fmt="iso", utc=True) ("...T01:02:03.456789Z"),
    at a fraction of the cost: one line per statement makes this a hot path.
    """

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        event["ts"] = f"{self.prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


_timestamp = _Clock()

_PIPE_BUF = getattr(select, "PIPE_BUF", 512)


class _Lines:
    """The JSON log's output: lines collected during one loop iteration, then written."""

    __slots__ = ("_lines", "_scheduled", "call_soon")

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._scheduled = False
        self.call_soon: Callable[[Callable[[], None]], object] | None = None

    def factory(self, *_args: Any) -> _Lines:
        return self

    def msg(self, message: bytes) -> None:
        self._lines.append(message + b"\n")
        if self._scheduled:
            return
        if self.call_soon is None:
            self.flush()
            return
        try:
            self.call_soon(self.flush)
        except RuntimeError:  # the loop has closed: write now rather than lose the line
            self.flush()
            return
        self._scheduled = True

    debug = info = warning = warn = error = critical = exception = fatal = log = msg

    def flush(self) -> None:
        self._scheduled = False
        lines, self._lines = self._lines, []
        if not lines:
            return
        out = sys.stdout.buffer
        chunk: list[bytes] = []
        size = 0
        for line in lines:  # writes of whole lines, each at most PIPE_BUF when it can be
            if chunk and size + len(line) > _PIPE_BUF:
                out.write(b"".join(chunk))
                out.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        out.write(b"".join(chunk))
        out.flush()


_lines = _Lines()
flush = _lines.flush
atexit.register(flush)


def batch_on(call_soon: Callable[[Callable[[], None]], object]) -> None:
    """Batch log writes per iteration of the loop whose call_soon this is."""
    _lines.call_soon = call_soon


def batch_off() -> None:
    """Write lines at once again (the loop is ending); what is pending goes now."""
    _lines.call_soon = None
    flush()


def get_logger(**context: Any) -> Any:
    """A logger bound with the given context (session id, user, ...)."""
    return structlog.get_logger("pgwarden").bind(**context)
