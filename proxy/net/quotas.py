"""Hourly and daily row quotas: this process's view of the ledger.

Strategy: the session asks, synchronously, how many rows a user may still read
(`left`) before each statement that reads a classified table; the answer becomes
that statement's row cap. So the answer must come from memory: each user's usage
is read from the ledger at login and again whenever it is older than REFRESH_S,
and every charge is applied in memory at once and written to the ledger in the
background (retried until it lands; flushed at shutdown).

Rules:
* Fail closed: while the ledger cannot be read, or a user's usage has never been
  read, statements that count against a quota are refused (08006); unrestricted
  roles and statements that read no classified table are unaffected.
* Within one process, concurrent statements of a user each get at most what is
  left, so together they overshoot by at most one statement's cap each. Other
  processes' charges are seen within REFRESH_S (re-read on use); the other
  workers of one pgwarden relay theirs at once (`add_remote`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.errors import PgWardenError
from proxy.net.ledger import Ledger
from proxy.policy.model import Limits
from proxy.quota import LedgerUnavailable, Usage, quota_left


class LedgerClient:
    """What QuotaBook and RecordBook share: background tasks and ledger error reporting."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._loading: set[str] = set()  # users whose ledger read is under way
        self._tasks: set[asyncio.Task[Any]] = set()
        self.observe: Callable[[str, Mapping[str, Any]], None] | None = None  # metrics

    def _ledger_error(self, **fields: Any) -> None:
        self.log.error("ledger.error", **fields)
        if self.observe is not None:
            self.observe("ledger.error", fields)

    def _spawn_load(self, user: str) -> None:
        """Read `user` from the ledger in the background, once at a time."""
        if user in self._loading:
            return
        self._loading.add(user)
        self._keep(asyncio.ensure_future(self._load_user(user)))

    async def _load_user(self, user: str) -> None:
        raise NotImplementedError

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass
class _Entry:
    usage: Usage
    read_at: float  # monotonic time of the last ledger read


class QuotaBook(LedgerClient):
    """Usage per user, as this process knows it; writes go to the shared ledger."""

    REFRESH_S = 5.0
    BATCH_S = 0.05
    RETRY_S = 2.0
    PRUNE_S = 600.0

    def __init__(self, ledger: Ledger, log: Any) -> None:
        super().__init__(log)
        self.ledger = ledger
        self._entries: dict[str, _Entry] = {}
        self._unwritten: dict[str, int] = {}  # rows charged here, not yet in the ledger
        self._writer: asyncio.Task[None] | None = None
        # A read and a write of the ledger never overlap: a read then sees either all of a
        # batch (written, no longer in _unwritten) or none of it (still in _unwritten).
        self._io = asyncio.Lock()
        self.available = False
        self.relay: Callable[[str, int], None] | None = None  # to the other workers

    async def start(self) -> None:
        self._keep(asyncio.ensure_future(self._prune_forever()))
        try:
            await self.ledger.open()
        except LedgerUnavailable as exc:
            failure = exc.reason
        else:
            self.available = True
            return
        self._ledger_error(error=failure, during="open")

    async def load(self, user: str) -> None:
        """Read `user`'s usage (at login, and when it has grown stale)."""
        try:
            async with self._io:
                usage = await self.ledger.usage(user)
                pending = self._unwritten.get(user, 0)
        except LedgerUnavailable as exc:
            failure = exc.reason
        else:
            failure = ""
        finally:
            self._loading.discard(user)
        if failure:
            self.available = False
            self._ledger_error(error=failure, during="read")
            return
        self.available = True
        usage = replace(usage, hour=usage.hour + pending, day=usage.day + pending)
        self._entries[user] = _Entry(usage, time.monotonic())

    def left(self, user: str, limits: Limits) -> int | PgWardenError:
        entry = self._entries.get(user)
        if entry is None or not self.available:
            self._spawn_load(user)
            return _unavailable()
        if time.monotonic() - entry.read_at > self.REFRESH_S:
            self._spawn_load(user)
        return quota_left(limits, entry.usage)

    def charge(self, user: str, rows: int) -> None:
        entry = self._entries.get(user)
        if entry is not None:
            entry.usage = replace(
                entry.usage, hour=entry.usage.hour + rows, day=entry.usage.day + rows
            )
        self._unwritten[user] = self._unwritten.get(user, 0) + rows
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        if self.relay is not None:
            self.relay(user, rows)

    def add_remote(self, user: str, rows: int) -> None:
        """Another worker charged `user`: count it now (that worker writes the ledger)."""
        entry = self._entries.get(user)
        if entry is not None:
            entry.usage = replace(
                entry.usage, hour=entry.usage.hour + rows, day=entry.usage.day + rows
            )

    async def _write(self) -> None:
        """Write what was charged here to the ledger; retry until it lands.

        Charges that arrive while a write is under way, or within BATCH_S of it,
        go out together: one ledger write per user per batch, not per statement.
        """
        while self._unwritten:
            await asyncio.sleep(self.BATCH_S)
            user, rows = next(iter(self._unwritten.items()))
            async with self._io:
                try:
                    await self.ledger.charge(user, rows)
                except LedgerUnavailable as exc:
                    failure = exc.reason
                else:
                    failure = ""
                    left = self._unwritten.get(user, 0) - rows
                    if left > 0:
                        self._unwritten[user] = left
                    else:
                        self._unwritten.pop(user, None)
            if failure:
                self.available = False
                self._ledger_error(error=failure, during="charge", rows=rows)
                await asyncio.sleep(self.RETRY_S)

    async def close(self, flush_s: float) -> None:
        """Flush unwritten charges (for at most `flush_s`), then close the ledger."""
        if self._writer is not None and not self._writer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), flush_s)
        if self._unwritten:
            self.log.error(
                "ledger.error",
                error="charges not written at shutdown",
                rows=sum(self._unwritten.values()),
            )
        for task in list(self._tasks):
            task.cancel()
        await self.ledger.close()

    async def _prune_forever(self) -> None:
        """Buckets older than the day window are of no use: drop them now and then."""
        while True:
            await asyncio.sleep(self.PRUNE_S)
            with contextlib.suppress(LedgerUnavailable):
                await self.ledger.prune()

    async def _load_user(self, user: str) -> None:
        await self.load(user)


def _unavailable() -> PgWardenError:
    return PgWardenError(
        "pgwarden: the quota ledger is unreachable; statement refused",
        hint="Statements that read classified tables need the ledger; try again shortly.",
        sqlstate="08006",
    )
