"""Per-user row quotas: the rolling-window arithmetic, with no I/O.

The durable ledger itself (PostgreSQL through asyncpg) is proxy/net/ledger.py;
this module holds what it and its callers compute from plain values, so the
rules are testable without a database. See docs/quota.md.

Windows are rolling and counted in whole UTC minutes ("buckets"). A row read at
14:32:41 is charged to the bucket 14:32. At time `now`, the hourly window holds
the current bucket and the 59 before it, the daily window the current bucket
and the 1439 before it. A bucket `b` leaves the hourly window at `b + 60 min`
and the daily one at `b + 24 h`: that is what `Usage.hour_frees_at` and
`Usage.day_frees_at` report for the oldest bucket still counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from proxy.errors import PgWardenError
from proxy.policy.model import Limits

BUCKET = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(hours=24)


class LedgerUnavailable(PgWardenError):
    """The quota ledger cannot be read or written; restricted statements are refused.

    `reason` says why (for the log and the command line); the client only sees
    the fixed message, which names no host, user or value.
    """

    sqlstate = "08006"
    MESSAGE = "pgwarden: the quota ledger is unreachable; statement refused"
    HINT = "roles with row quotas need the ledger; roles without quotas are not affected"

    def __init__(self, reason: str, *, message: str | None = None) -> None:
        super().__init__(message or self.MESSAGE, hint=self.HINT)
        self.reason = reason


class LedgerSchemaError(LedgerUnavailable):
    """The ledger's schema is newer than this pgwarden knows: refuse to start."""

    def __init__(self, found: int, known: int) -> None:
        reason = (
            f"the quota ledger schema is version {found}, newer than this pgwarden "
            f"understands ({known}); upgrade pgwarden, or point state_dsn elsewhere"
        )
        super().__init__(reason, message=f"pgwarden: {reason}")
        self.found = found
        self.known = known


class QuotaExhausted(PgWardenError):
    """53400: the user's hourly or daily row quota is used up; the session goes on."""

    sqlstate = "53400"


@dataclass(frozen=True, slots=True)
class Usage:
    """Rows one user read in the two windows, and when each window starts to free up."""

    hour: int = 0
    day: int = 0
    hour_frees_at: datetime | None = None  # when the oldest bucket of the hour leaves it
    day_frees_at: datetime | None = None  # when the oldest bucket of the day leaves it


NO_USAGE = Usage()


def utc(ts: datetime) -> datetime:
    """`ts` in UTC; a naive datetime is refused (it would be ambiguous)."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError("a quota timestamp must carry a time zone")
    return ts.astimezone(UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


def bucket_of(ts: datetime) -> datetime:
    """The minute bucket a timestamp is charged to (UTC, seconds dropped)."""
    return utc(ts).replace(second=0, microsecond=0)


def hour_cutoff(now: datetime) -> datetime:
    """Buckets strictly after this one are in the hourly window at `now`."""
    return bucket_of(now) - HOUR


def day_cutoff(now: datetime) -> datetime:
    """Buckets strictly after this one are in the daily window at `now`."""
    return bucket_of(now) - DAY


def usage_from_buckets(buckets: Iterable[tuple[datetime, int]], now: datetime) -> Usage:
    """The Usage at `now` of one user's (bucket, rows) pairs; older buckets are ignored."""
    hour_after, day_after = hour_cutoff(now), day_cutoff(now)
    hour = day = 0
    hour_oldest: datetime | None = None
    day_oldest: datetime | None = None
    for raw, rows in buckets:
        bucket = bucket_of(raw)
        if bucket <= day_after:
            continue
        day += rows
        day_oldest = bucket if day_oldest is None else min(day_oldest, bucket)
        if bucket > hour_after:
            hour += rows
            hour_oldest = bucket if hour_oldest is None else min(hour_oldest, bucket)
    return usage_of(hour, day, hour_oldest, day_oldest)


def usage_of(
    hour: int, day: int, hour_oldest: datetime | None, day_oldest: datetime | None
) -> Usage:
    """A Usage from window sums and the oldest bucket counted in each window."""
    return Usage(
        hour=hour,
        day=day,
        hour_frees_at=None if hour_oldest is None else utc(hour_oldest) + HOUR,
        day_frees_at=None if day_oldest is None else utc(day_oldest) + DAY,
    )


def has_quota(limits: Limits | None) -> bool:
    """Whether the limits set an hourly or a daily quota."""
    return limits is not None and (
        limits.rows_per_hour is not None or limits.rows_per_day is not None
    )


def remaining(limits: Limits | None, usage: Usage) -> int | None:
    """Rows the user may still read: the smaller of what both windows leave; None: no quota.

    Never negative: concurrent statements may overshoot a quota by their caps.
    """
    if limits is None:
        return None
    left = [
        limit - used
        for limit, used in ((limits.rows_per_hour, usage.hour), (limits.rows_per_day, usage.day))
        if limit is not None
    ]
    return max(0, min(left)) if left else None


def exhausted_hint(usage: Usage, limits: Limits | None) -> str:
    """The HINT of a 53400: which quota is used up and from when it frees up.

    "hourly quota of 500 rows used; it frees up from 14:32 UTC". When both are
    used up, the one that starts freeing up later is named. Counts and limits
    only: never a value.
    """
    windows = []
    if limits is not None:
        windows = [
            (name, limit, used, frees_at)
            for name, limit, used, frees_at in (
                ("daily", limits.rows_per_day, usage.day, usage.day_frees_at),
                ("hourly", limits.rows_per_hour, usage.hour, usage.hour_frees_at),
            )
            if limit is not None and used >= limit
        ]
    if not windows:
        left = remaining(limits, usage)
        return "no row quota applies" if left is None else f"{left} rows left in the quota"
    name, limit, _, frees_at = max(windows, key=lambda w: w[3] or datetime.max.replace(tzinfo=UTC))
    text = f"{name} quota of {limit} rows used"
    if frees_at is not None:
        text += f"; it frees up from {utc(frees_at):%H:%M} UTC"
    return text


def quota_left(limits: Limits, usage: Usage) -> int | QuotaExhausted:
    """Rows the next statement may deliver under the quotas, or the 53400 refusal.

    For the statement gate: `limits` must set rows_per_hour or rows_per_day.
    """
    left = remaining(limits, usage)
    if left is None:
        raise ValueError("quota_left needs limits with rows_per_hour or rows_per_day")
    if left > 0:
        return left
    hint = exhausted_hint(usage, limits)
    which = hint.split(" ", 1)[0]  # "hourly" or "daily"
    return QuotaExhausted(f"pgwarden: {which} row quota exhausted; statement refused", hint=hint)
