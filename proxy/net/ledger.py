"""The durable quota ledger: rows read per user and minute, in PostgreSQL through asyncpg.

Where: `state_dsn` when set, else schema `pgwarden` of the upstream database,
reached as the service account with the upstream's credentials and TLS (as
proxy/net/catalog.py does). Every pgwarden process and worker writes to the
same table, so quotas are shared by all of a user's connections and survive a
restart. The window arithmetic is proxy/quota.py; docs/quota.md is the
operator's page.

Schema (versioned, created on first open, no manual step):

    pgwarden.ledger_version(version int PRIMARY KEY, applied_at timestamptz)
    pgwarden.quota_usage(usr text, bucket timestamptz, rows bigint, PRIMARY KEY (usr, bucket))
    pgwarden.records_seen(usr text, rec bigint, last_seen timestamptz, PRIMARY KEY (usr, rec))
    pgwarden.locks(usr text PRIMARY KEY, locked_at timestamptz, reason text, details jsonb)
    pgwarden.alerts(usr text, at timestamptz, kind text, tbl text, count int, threshold int)

records_seen holds, per user, one row per record (a 64-bit digest of table and
primary key, never the key itself) with the last time it was shown: the
distinct-record budgets count the rows newer than each window's start
(proxy/net/records.py). Rows older than the longest window (30 days) are pruned.

`open()` takes a transaction-scoped advisory lock, so processes starting
together migrate one at a time, applies the migrations the database lacks and
refuses (LedgerSchemaError) a version newer than `VERSION`.

Errors: every asyncpg, OS or timeout error surfaces as LedgerUnavailable (a
PgWardenError with SQLSTATE 08006); the caller decides, and pgwarden fails
closed for roles with quotas. A pooled connection found dead is replaced and
the operation tried once more; after a failed open, new attempts wait
`RETRY_S` so a down ledger refuses fast instead of stalling every statement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from proxy.net.upstream import asyncpg_ssl
from proxy.quota import (
    LedgerSchemaError,
    LedgerUnavailable,
    Usage,
    bucket_of,
    day_cutoff,
    hour_cutoff,
    now_utc,
    usage_of,
)
from proxy.settings import Settings

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[asyncpg.Record]

T = TypeVar("T")

SCHEMA = "pgwarden"
VERSION = 2
LOCK_KEY = 0x70677764  # "pgwd": the advisory lock that serialises migrations
APPLICATION_NAME = "pgwarden ledger"
POOL_MIN, POOL_MAX = 1, 4

# Migration N takes the schema from version N-1 to N. Append, never edit.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS pgwarden.quota_usage (
              usr text NOT NULL,
              bucket timestamptz NOT NULL,
              rows bigint NOT NULL CHECK (rows >= 0),
              PRIMARY KEY (usr, bucket))""",
        "CREATE INDEX IF NOT EXISTS quota_usage_bucket ON pgwarden.quota_usage (bucket)",
    ),
    2: (
        """CREATE TABLE IF NOT EXISTS pgwarden.records_seen (
              usr text NOT NULL,
              rec bigint NOT NULL,
              last_seen timestamptz NOT NULL,
              PRIMARY KEY (usr, rec))""",
        "CREATE INDEX IF NOT EXISTS records_seen_last ON pgwarden.records_seen (last_seen)",
        """CREATE TABLE IF NOT EXISTS pgwarden.locks (
              usr text PRIMARY KEY,
              locked_at timestamptz NOT NULL,
              reason text NOT NULL,
              details jsonb NOT NULL DEFAULT '{}')""",
        """CREATE TABLE IF NOT EXISTS pgwarden.alerts (
              usr text NOT NULL,
              at timestamptz NOT NULL,
              kind text NOT NULL,
              tbl text NOT NULL,
              count int NOT NULL,
              threshold int NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS alerts_usr_at ON pgwarden.alerts (usr, at)",
    ),
}
RECORDS_KEPT_S = 30 * 86400.0  # the longest records window: older rows are pruned

_SCHEMA_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)"
_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS pgwarden.ledger_version (
    version int PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now())"""
_CURRENT_VERSION = "SELECT coalesce(max(version), 0) FROM pgwarden.ledger_version"
_RECORD_VERSION = "INSERT INTO pgwarden.ledger_version (version) VALUES ($1)"

_CHARGE = """INSERT INTO pgwarden.quota_usage (usr, bucket, rows) VALUES ($1, $2, $3)
ON CONFLICT (usr, bucket) DO UPDATE SET rows = quota_usage.rows + EXCLUDED.rows"""
# $1: user, $2: hour cutoff, $3: day cutoff (buckets strictly after a cutoff count)
_USAGE = """SELECT coalesce(sum(rows) FILTER (WHERE bucket > $2), 0)::int8 AS hour,
       coalesce(sum(rows), 0)::int8 AS day,
       min(bucket) FILTER (WHERE bucket > $2) AS hour_oldest,
       min(bucket) AS day_oldest
FROM pgwarden.quota_usage WHERE usr = $1 AND bucket > $3"""
# $1: day cutoff, $2: hour cutoff
_ALL_USAGE = """SELECT usr,
       coalesce(sum(rows) FILTER (WHERE bucket > $2), 0)::int8 AS hour,
       coalesce(sum(rows), 0)::int8 AS day,
       min(bucket) FILTER (WHERE bucket > $2) AS hour_oldest,
       min(bucket) AS day_oldest
FROM pgwarden.quota_usage WHERE bucket > $1
GROUP BY usr ORDER BY usr"""
_PRUNE = """WITH gone AS (DELETE FROM pgwarden.quota_usage WHERE bucket <= $1 RETURNING 1)
SELECT count(*) FROM gone"""
_RESET = """WITH gone AS (DELETE FROM pgwarden.quota_usage WHERE usr = $1 RETURNING 1)
SELECT count(*) FROM gone"""

_SEEN = """SELECT rec, extract(epoch FROM last_seen)::float8 AS at
FROM pgwarden.records_seen WHERE usr = $1 AND last_seen > to_timestamp($2)"""
_MARK_SEEN = """INSERT INTO pgwarden.records_seen (usr, rec, last_seen)
SELECT $1, r, to_timestamp(t) FROM unnest($2::int8[], $3::float8[]) AS u(r, t)
ON CONFLICT (usr, rec) DO UPDATE
SET last_seen = greatest(records_seen.last_seen, EXCLUDED.last_seen)"""
_PRUNE_SEEN = """WITH gone AS (
    DELETE FROM pgwarden.records_seen WHERE last_seen <= to_timestamp($1) RETURNING 1)
SELECT count(*) FROM gone"""
_LOCK = """INSERT INTO pgwarden.locks (usr, locked_at, reason, details)
VALUES ($1, to_timestamp($2), $3, $4::jsonb) ON CONFLICT (usr) DO NOTHING"""
_LOCK_OF = """SELECT extract(epoch FROM locked_at)::float8 AS at, reason, details::text AS details
FROM pgwarden.locks WHERE usr = $1"""
_UNLOCK = (
    "WITH gone AS (DELETE FROM pgwarden.locks WHERE usr = $1 RETURNING 1) SELECT count(*) FROM gone"
)
_ALERT = """INSERT INTO pgwarden.alerts (usr, at, kind, tbl, count, threshold)
VALUES ($1, to_timestamp($2), $3, $4, $5, $6)"""
_ALERTS_OF = """SELECT extract(epoch FROM at)::float8 AS at, kind, tbl, count, threshold
FROM pgwarden.alerts WHERE usr = $1 ORDER BY at DESC LIMIT $2"""
_SEEN_COUNTS = """SELECT count(*) FILTER (WHERE last_seen > to_timestamp($2))::int8 AS day,
       count(*) FILTER (WHERE last_seen > to_timestamp($3))::int8 AS week,
       count(*) FILTER (WHERE last_seen > to_timestamp($4))::int8 AS month
FROM pgwarden.records_seen WHERE usr = $1"""
_RESET_SEEN = """WITH gone AS (DELETE FROM pgwarden.records_seen WHERE usr = $1 RETURNING 1)
SELECT count(*) FROM gone"""

# Errors that mean "the ledger cannot be used now"; all become LedgerUnavailable.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
_UNAVAILABLE_OR_VALUE: tuple[type[BaseException], ...] = (ValueError, *_UNAVAILABLE)
_CLOSE_FAILED: tuple[type[BaseException], ...] = (TimeoutError, *_UNAVAILABLE)
# Of those, the ones a dead pooled connection gives: worth one more try on a fresh one.
_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # a connection whose backend died mid-operation can be left in a broken state
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Ledger:
    """Per-user minute buckets of rows read; shared by every pgwarden process on one database.

    Use: `await ledger.open()` once (creates or migrates the schema), then
    `usage`, `charge`, `all_usage`, `reset`, `prune`; `await ledger.close()` at
    the end. Every method raises LedgerUnavailable and nothing else for a
    database fault. `now` parameters exist for tests and tools; the default is
    this host's clock (UTC).
    """

    RETRY_S = 1.0  # after a failed open, attempts within this time fail at once

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._timeout = settings.upstream.connect_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._retry_at = 0.0
        self._last_failure = "not opened yet"
        self.migrated_from: int | None = None  # the version found by the open that migrated

    @property
    def where(self) -> str:
        """Where the ledger lives, without any password: for logs and messages."""
        if self._settings.state_dsn is not None:
            return "state_dsn"
        up = self._settings.upstream
        return f"{up.dsn} schema pgwarden"

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create or migrate the schema; idempotent."""
        await self._ready()

    async def close(self) -> None:
        """Close the pool; the ledger cannot be used afterwards."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except _CLOSE_FAILED:
            pool.terminate()

    async def __aenter__(self) -> Ledger:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- operations ------------------------------------------------------------------

    async def usage(self, user: str, now: datetime | None = None) -> Usage:
        """What `user` read in the last hour and the last 24 hours."""
        at = now or now_utc()
        row = await self._run(lambda c: c.fetchrow(_USAGE, user, hour_cutoff(at), day_cutoff(at)))
        assert row is not None  # an aggregate without GROUP BY returns one row
        return usage_of(row["hour"], row["day"], row["hour_oldest"], row["day_oldest"])

    async def all_usage(self, now: datetime | None = None) -> list[tuple[str, Usage]]:
        """(user, Usage) for every user who read rows in the last 24 hours, by name."""
        at = now or now_utc()
        rows = await self._run(lambda c: c.fetch(_ALL_USAGE, day_cutoff(at), hour_cutoff(at)))
        return [
            (r["usr"], usage_of(r["hour"], r["day"], r["hour_oldest"], r["day_oldest"]))
            for r in rows
        ]

    async def charge(self, user: str, rows: int, now: datetime | None = None) -> None:
        """Add `rows` to `user`'s bucket for the current minute (atomic across processes)."""
        if rows < 0:
            raise ValueError("rows charged must not be negative")
        if rows == 0:
            return
        bucket = bucket_of(now or now_utc())
        await self._run(lambda c: c.execute(_CHARGE, user, bucket, rows))

    async def prune(self, now: datetime | None = None) -> int:
        """Delete buckets no window counts any more (older than 24 h); returns how many."""
        cutoff = day_cutoff(now or now_utc())
        return int(await self._run(lambda c: c.fetchval(_PRUNE, cutoff)))

    async def reset(self, user: str) -> int:
        """Delete all of `user`'s buckets; returns how many there were."""
        return int(await self._run(lambda c: c.fetchval(_RESET, user)))

    # --- records, locks and alerts (proxy/net/records.py) --------------------------------

    async def seen(self, user: str, since: float) -> list[tuple[int, float]]:
        """(record digest, last shown, epoch seconds) of `user`'s records shown after `since`."""
        rows = await self._run(lambda c: c.fetch(_SEEN, user, since))
        return [(int(r["rec"]), float(r["at"])) for r in rows]

    async def mark_seen(self, user: str, records: dict[int, float]) -> None:
        """Record that `user` was shown these records at these times (epoch seconds)."""
        if not records:
            return
        recs, times = list(records), list(records.values())
        await self._run(lambda c: c.execute(_MARK_SEEN, user, recs, times))

    async def seen_counts(self, user: str, now: float) -> dict[str, int]:
        """Distinct records shown to `user` in the last 24 h, 7 days and 30 days."""
        day = 86400.0
        row = await self._run(
            lambda c: c.fetchrow(_SEEN_COUNTS, user, now - day, now - 7 * day, now - 30 * day)
        )
        assert row is not None
        return {"day": int(row["day"]), "7d": int(row["week"]), "30d": int(row["month"])}

    async def prune_seen(self, before: float) -> int:
        return int(await self._run(lambda c: c.fetchval(_PRUNE_SEEN, before)))

    async def reset_seen(self, user: str) -> int:
        return int(await self._run(lambda c: c.fetchval(_RESET_SEEN, user)))

    async def lock(self, user: str, at: float, reason: str, details: str) -> None:
        """Lock `user` (a JSON `details` text); a user already locked keeps the first lock."""
        await self._run(lambda c: c.execute(_LOCK, user, at, reason, details))

    async def lock_of(self, user: str) -> tuple[float, str, str] | None:
        """(locked at, reason, details JSON) when `user` is locked."""
        row = await self._run(lambda c: c.fetchrow(_LOCK_OF, user))
        return None if row is None else (float(row["at"]), str(row["reason"]), str(row["details"]))

    async def unlock(self, user: str) -> bool:
        return bool(await self._run(lambda c: c.fetchval(_UNLOCK, user)))

    async def alert(
        self, user: str, at: float, kind: str, table: str, *, count: int, threshold: int
    ) -> None:
        await self._run(lambda c: c.execute(_ALERT, user, at, kind, table, count, threshold))

    async def alerts_of(self, user: str, limit: int = 5) -> list[tuple[float, str, str, int, int]]:
        rows = await self._run(lambda c: c.fetch(_ALERTS_OF, user, limit))
        return [
            (float(r["at"]), str(r["kind"]), str(r["tbl"]), int(r["count"]), int(r["threshold"]))
            for r in rows
        ]

    # --- internals -------------------------------------------------------------------

    async def _run(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        pool = await self._ready()
        attempts = POOL_MAX + 1  # every pooled connection may have died with the server
        for attempt in range(attempts):
            try:
                async with pool.acquire(timeout=self._timeout) as conn:
                    return await op(conn)
            except _LOST as exc:
                if attempt == attempts - 1:
                    raise LedgerUnavailable(_reason(exc)) from exc
            except _UNAVAILABLE as exc:
                raise LedgerUnavailable(_reason(exc)) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ready(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        if self._closed:
            raise LedgerUnavailable("the ledger was closed")
        async with self._lock:
            if self._pool is not None:
                return self._pool
            if time.monotonic() < self._retry_at:
                raise LedgerUnavailable(self._last_failure)
            try:
                self._pool = await self._open_pool()
            except LedgerUnavailable as exc:
                self._last_failure = exc.reason
                self._retry_at = time.monotonic() + self.RETRY_S
                raise
            return self._pool

    async def _open_pool(self) -> asyncpg.Pool:
        try:
            pool = await asyncio.wait_for(self._create_pool(), self._timeout * 2)
        except _UNAVAILABLE_OR_VALUE as exc:
            raise LedgerUnavailable(_reason(exc)) from exc
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                await self._migrate(conn)
                await conn.execute(_PRUNE, day_cutoff(now_utc()))
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _UNAVAILABLE):
                raise LedgerUnavailable(_reason(exc)) from exc
            raise
        return pool

    def _create_pool(self) -> Awaitable[asyncpg.Pool]:
        common: dict[str, Any] = {
            "min_size": POOL_MIN,
            "max_size": POOL_MAX,
            "timeout": self._timeout,
            "command_timeout": self._timeout,
            "server_settings": {"application_name": APPLICATION_NAME},
        }
        if self._settings.state_dsn is not None:
            # Password and TLS as asyncpg reads them from the URI (sslmode=...),
            # PGPASSWORD or the passfile.
            return asyncpg.create_pool(self._settings.state_dsn, **common)
        up = self._settings.upstream
        ssl_arg = asyncpg_ssl(up)
        return asyncpg.create_pool(
            host=up.host,
            port=up.port,
            user=up.user,
            database=up.database,
            password=up.password,
            ssl=ssl_arg,
            **common,
        )

    async def _migrate(self, conn: Conn) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            # CREATE SCHEMA IF NOT EXISTS checks the database's CREATE privilege even
            # when the schema exists, so it only runs when the schema is missing.
            if not await conn.fetchval(_SCHEMA_EXISTS, SCHEMA):
                await conn.execute("CREATE SCHEMA pgwarden")
            await conn.execute(_VERSION_TABLE)
            found = int(await conn.fetchval(_CURRENT_VERSION))
            if found > VERSION:
                raise LedgerSchemaError(found, VERSION)
            for version in range(found + 1, VERSION + 1):
                for statement in MIGRATIONS[version]:
                    await conn.execute(statement)
                await conn.execute(_RECORD_VERSION, version)
            if found < VERSION:
                self.migrated_from = found
