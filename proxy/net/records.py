"""Distinct-record budgets, locks and enumeration alerts: this process's view of the ledger.

Strategy: the relay hands over, for each completed statement (or batch) of a
restricted role whose rows are accounted, the records each row shows (one key
per classified FROM item, see proxy/analysis/records.py). A record is a 64-bit
digest of its table and primary-key text: the ledger never holds a key. For a
user with a records budget the book keeps, in memory, when each record was last
shown (read from the ledger at login and again when older than REFRESH_S), so
`admit` answers synchronously how many rows of a result fit the budgets; `shown`
applies a delivered result at once and writes it to the ledger in the
background (retried until it lands, flushed at shutdown), as QuotaBook does for
rows.

Rules:
* A budget counts the distinct records shown in a rolling window (24 h, 7 days,
  30 days). Re-showing a record shown within the window is free; one shown
  before the window's start counts again. A row whose record cannot be named (a
  group of several records, a form the engine cannot key) counts as one new
  record every time.
* Fail closed: a user with a records budget whose records were never read (the
  ledger is down) gets 08006 for statements that show records, like quotas.
* Locks (a decoy touched, an alert with `action: lock`) are written to the ledger
  at once and kept in memory; a locked user is refused at login and at every
  statement, in every pgwarden process that reads the same ledger, until
  `pgwarden quota unlock USER` or `pgwarden quota reset USER`.
* A user's records are read whole at login and every FULL_READ_S; in between, the
  reads every REFRESH_S fetch only records shown since shortly before the previous
  read (SLACK_S covers a batch written late), so an active user costs one small
  query every few seconds, not a reload of a month of records.
* Counts per window are kept incrementally and recomputed from the timestamps at
  most every RECOUNT_S, so a record leaving a window is noticed up to RECOUNT_S
  late: the budget then errs on the strict side, never the lenient one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.enumeration import Alert, AlertRules, Observation, Watcher
from proxy.net.ledger import RECORDS_KEPT_S, Ledger
from proxy.net.quotas import LedgerClient
from proxy.policy.model import Alerts
from proxy.quota import LedgerUnavailable

Budget = tuple[str, float, int]  # (window name, seconds, distinct records allowed)
Row = tuple[int, ...]  # the record digests one result row shows


@dataclass(frozen=True, slots=True)
class Lock:
    at: float  # epoch seconds
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Seen:
    recs: dict[int, float]  # record -> last shown (epoch seconds)
    read_at: float  # monotonic time of the last ledger read
    full_at: float = float("-inf")  # monotonic time of the last full read
    synced: float = float("-inf")  # clock() when the last read started
    counts: dict[str, int] = field(default_factory=dict)  # window name -> records in it
    counted_at: float = float("-inf")  # epoch seconds of the last full count


@functools.lru_cache(maxsize=64)
def alert_rules(alerts: Alerts) -> AlertRules:
    """The watcher's rules for a policy's `alerts:` (made once per policy value)."""
    return AlertRules(
        window_s=alerts.window_s,
        distinct_lookups=alerts.distinct_lookups,
        id_run=alerts.id_run,
        offset_pages=alerts.offset_pages,
        action=alerts.action,
    )


def watch_all(
    watcher: Watcher,
    who: tuple[str, str, float],
    alerts: Alerts | None,
    observed: list[tuple[str, tuple[str, ...], bool, bool]],
) -> list[Alert]:
    """One statement's (table, keys, lookup, paging) per table into `watcher`: the alerts.

    `who` is (user, role, now); no alerts when the role's `alerts:` is off.
    """
    if alerts is None:
        return []
    rules = alert_rules(alerts)
    user, role, now = who
    raised: list[Alert] = []
    for table, keys, lookup, paging in observed:
        raised += watcher.observe(Observation(user, role, table, keys, lookup, paging, now), rules)
    return raised


class RecordBook(LedgerClient):
    """Records shown per user, locks and alert state, as this process knows them."""

    REFRESH_S = 5.0
    BATCH_S = 0.05
    RETRY_S = 2.0
    RECOUNT_S = 60.0
    FULL_READ_S = 600.0  # between them, reads fetch only what changed since the last one
    SLACK_S = 60.0  # ... and since SLACK_S before it (a charge written late still shows)
    PRUNE_S = 600.0

    def __init__(self, ledger: Ledger, log: Any, clock: Callable[[], float] = time.time) -> None:
        super().__init__(log)
        self.ledger = ledger
        self.clock = clock  # wall time, epoch seconds (a test injects its own)
        # 10,000 keys an hour is 50 times the default id_run threshold: past it a user has
        # long been alerted, and the bound keeps each statement's watch cheap
        self.watcher = Watcher(max_keys_per_user=10_000)
        self._seen: dict[str, _Seen] = {}
        self._locks: dict[str, Lock] = {}
        self._lock_read: dict[str, float] = {}  # monotonic time of the last lock read
        self._unwritten: dict[str, dict[int, float]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._io = asyncio.Lock()
        self.on_lock: Callable[[str], None] | None = None  # ends the user's open sessions
        # --workers: tell the other workers (proxy/net/workers.py) at once
        self.relay_lock: Callable[[str], None] | None = None
        self.relay_seen: Callable[[str, dict[int, float]], None] | None = None

    # --- reading ---------------------------------------------------------------------

    async def load(self, user: str, *, records: bool) -> bool:
        """Read `user`'s lock (and records shown, when `records`); False if the ledger failed."""
        known = self._seen.get(user)
        started, wall = time.monotonic(), self.clock()
        full = known is None or started - known.full_at > self.FULL_READ_S
        since = wall - RECORDS_KEPT_S if full or known is None else known.synced - self.SLACK_S
        try:
            async with self._io:
                lock = await self.ledger.lock_of(user)
                seen = await self.ledger.seen(user, since) if records else []
                pending = dict(self._unwritten.get(user, {}))
        except LedgerUnavailable as exc:
            self._ledger_error(error=exc.reason, during="read")
            return False
        finally:
            self._loading.discard(user)
        self._lock_read[user] = time.monotonic()
        if lock is None:
            self._locks.pop(user, None)
        elif user not in self._locks:
            self._locks[user] = Lock(lock[0], lock[1], orjson.loads(lock[2]))
            if self.on_lock is not None:  # locked by another process: end sessions here
                self.on_lock(user)
        if records:
            self._merge(user, seen, pending, full=full, started=(started, wall))
        return True

    def _merge(
        self,
        user: str,
        seen: list[tuple[int, float]],
        pending: dict[int, float],
        *,
        full: bool,
        started: tuple[float, float],
    ) -> None:
        """Fold a ledger read into what this process knows (never losing a later show)."""
        known = self._seen.get(user)
        if known is None:
            known = self._seen[user] = _Seen({}, started[0], full_at=started[0])
        recs = known.recs
        if full:
            ours = recs
            recs = known.recs = dict(seen)
            for rec, at in ours.items():
                if at > recs.get(rec, float("-inf")):
                    recs[rec] = at
            known.full_at = started[0]
        else:
            for rec, at in seen:
                if at > recs.get(rec, float("-inf")):
                    recs[rec] = at
        for rec, at in pending.items():
            if at > recs.get(rec, float("-inf")):
                recs[rec] = at
        known.read_at, known.synced = started
        known.counted_at = float("-inf")  # count the windows afresh

    def locked(self, user: str) -> Lock | None:
        """`user`'s lock as known here; re-read from the ledger at most every REFRESH_S.

        So a lock set by another process (or lifted by `pgwarden quota unlock`) reaches
        this one within REFRESH_S of the user's next statement; a lock found that way
        ends the user's sessions here too.
        """
        now = time.monotonic()
        if now - self._lock_read.get(user, float("-inf")) > self.REFRESH_S:
            self._lock_read[user] = now
            self._keep(asyncio.ensure_future(self._read_lock(user)))
        return self._locks.get(user)

    async def _read_lock(self, user: str) -> None:
        try:
            found = await self.ledger.lock_of(user)
        except LedgerUnavailable as exc:
            self._ledger_error(error=exc.reason, during="read")
            return
        if found is None:
            if self._locks.pop(user, None) is not None:
                self.watcher.forget(user)  # unlocked elsewhere: a fresh start
            return
        if user not in self._locks:
            self._locks[user] = Lock(found[0], found[1], orjson.loads(found[2]))
            if self.on_lock is not None:
                self.on_lock(user)

    def ready(self, user: str) -> bool:
        """Whether `user`'s records are known (refreshed in the background when stale)."""
        seen = self._seen.get(user)
        if seen is None or time.monotonic() - seen.read_at > self.REFRESH_S:
            self._spawn_load(user)
        return seen is not None

    def counts(self, user: str) -> dict[str, int]:
        """Records shown per window (day, 7d, 30d) as known here."""
        seen = self._seen.get(user)
        return {} if seen is None else dict(self._count(seen, self.clock()))

    # --- budgets ---------------------------------------------------------------------

    def admit(
        self, user: str, budgets: Iterable[Budget], rows: list[Row]
    ) -> tuple[int, Budget | None]:
        """How many leading rows fit every budget, and the budget that stops the next one."""
        seen = self._seen.get(user)
        budgets = tuple(budgets)
        if seen is None or not budgets:
            return len(rows), None
        now = self.clock()
        counts = self._count(seen, now)
        new = dict.fromkeys(counts, 0)
        taken: set[int] = set()
        for index, row in enumerate(rows):
            for rec in row:
                if rec in taken:
                    continue
                taken.add(rec)
                at = seen.recs.get(rec)
                for name, window, _ in budgets:
                    if at is None or at <= now - window:
                        new[name] += 1
            for budget in budgets:
                name, _, allowed = budget
                if counts[name] + new[name] > allowed:
                    return index, budget
        return len(rows), None

    def shown(self, user: str, rows: list[Row], *, budgets: bool) -> None:
        """`rows` were delivered: remember their records (and write them, for budgets)."""
        if not budgets or not rows:
            return
        now = self.clock()
        shown = {rec: now for row in rows for rec in row}
        self._unwritten.setdefault(user, {}).update(shown)
        self._note(user, shown)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        if self.relay_seen is not None:
            self.relay_seen(user, shown)

    def add_remote(self, user: str, records: dict[int, float]) -> None:
        """Another worker showed `user` these records (it writes them to the ledger)."""
        self._note(user, records)

    def _note(self, user: str, records: dict[int, float]) -> None:
        seen = self._seen.get(user)
        if seen is None:
            return  # read whole from the ledger at the next use
        for rec, at in records.items():
            before = seen.recs.get(rec)
            if before is not None and before >= at:
                continue
            seen.recs[rec] = at
            for name, window in _WINDOWS:
                if name in seen.counts and (before is None or before <= at - window):
                    seen.counts[name] += 1

    def _count(self, seen: _Seen, now: float) -> dict[str, int]:
        if not seen.counted_at <= now < seen.counted_at + self.RECOUNT_S:
            oldest = now - RECORDS_KEPT_S
            for rec in [r for r, at in seen.recs.items() if at <= oldest]:
                del seen.recs[rec]
            seen.counts = {
                name: sum(1 for at in seen.recs.values() if at > now - window)
                for name, window in _WINDOWS
            }
            seen.counted_at = now
        return seen.counts

    # --- alerts and locks ------------------------------------------------------------

    def watch(
        self,
        user: str,
        role: str,
        alerts: Alerts | None,
        observed: list[tuple[str, tuple[str, ...], bool, bool]],
    ) -> list[Alert]:
        """Feed the enumeration watcher: (table, keys, lookup, paging) per classified table."""
        now = self.clock()
        raised = watch_all(self.watcher, (user, role, now), alerts, observed)
        for alert in raised:
            self._keep(
                asyncio.ensure_future(
                    self._quietly(
                        self.ledger.alert(
                            user,
                            now,
                            alert.kind,
                            alert.table,
                            count=alert.count,
                            threshold=alert.threshold,
                        ),
                        "alert",
                    )
                )
            )
        return raised

    def lock(self, user: str, reason: str, details: Mapping[str, Any]) -> None:
        """Lock `user` here at once, in the ledger in the background, and end their sessions."""
        if user in self._locks:
            return
        now = self.clock()
        self._locks[user] = Lock(now, reason, dict(details))
        text = orjson.dumps(dict(details)).decode()
        self._keep(asyncio.ensure_future(self._write_lock(user, now, reason, text)))
        if self.on_lock is not None:
            self.on_lock(user)
        if self.relay_lock is not None:
            self.relay_lock(user)

    def remote_lock(self, user: str) -> None:
        """Another worker locked `user` (and writes the lock): end their sessions here too."""
        if user in self._locks:
            return
        self._locks[user] = Lock(self.clock(), "locked by another worker")
        self._lock_read[user] = time.monotonic()  # the ledger read will bring the details
        if self.on_lock is not None:
            self.on_lock(user)

    async def _write_lock(self, user: str, at: float, reason: str, details: str) -> None:
        while True:
            try:
                await self.ledger.lock(user, at, reason, details)
            except LedgerUnavailable as exc:
                self._ledger_error(error=exc.reason, during="lock")
                await asyncio.sleep(self.RETRY_S)
            else:
                return

    def forget(self, user: str) -> None:
        """An unlock or reset: drop what is known of `user` (read again at next use)."""
        self._locks.pop(user, None)
        self._seen.pop(user, None)
        self.watcher.forget(user)

    # --- writing ---------------------------------------------------------------------

    async def _write(self) -> None:
        while self._unwritten:
            await asyncio.sleep(self.BATCH_S)
            user, recs = next(iter(self._unwritten.items()))
            batch = dict(recs)
            async with self._io:
                try:
                    await self.ledger.mark_seen(user, batch)
                except LedgerUnavailable as exc:
                    failure = exc.reason
                else:
                    failure = ""
                    left = self._unwritten.get(user, {})
                    for rec, at in batch.items():
                        if left.get(rec) == at:
                            del left[rec]
                    if not left:
                        self._unwritten.pop(user, None)
            if failure:
                self._ledger_error(error=failure, during="records")
                await asyncio.sleep(self.RETRY_S)

    async def close(self, flush_s: float) -> None:
        """Flush unwritten records (for at most `flush_s`); the ledger is closed by QuotaBook."""
        pending = [t for t in (self._writer, *self._tasks) if t is not None and not t.done()]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(asyncio.gather(*pending)), flush_s)
        if self._unwritten:
            count = sum(len(r) for r in self._unwritten.values())
            self.log.error("ledger.error", error="records not written at shutdown", records=count)
        for task in list(self._tasks):
            task.cancel()

    async def prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.PRUNE_S)
            with contextlib.suppress(LedgerUnavailable):
                await self.ledger.prune_seen(self.clock() - RECORDS_KEPT_S)

    async def _quietly(self, op: Any, during: str) -> None:
        try:
            await op
        except LedgerUnavailable as exc:
            self._ledger_error(error=exc.reason, during=during)

    async def _load_user(self, user: str) -> None:
        await self.load(user, records=True)


_WINDOWS = (("day", 86400.0), ("7d", 7 * 86400.0), ("30d", 30 * 86400.0))
