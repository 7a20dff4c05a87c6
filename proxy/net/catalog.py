"""Read the schema snapshot from the upstream database through asyncpg.

The service account reads pg_catalog once at startup and on refresh; the result is
a frozen `Snapshot` (proxy/analysis/catalog.py). Catalog relations are listed by
name only; user relations carry their columns and primary keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from proxy.analysis.catalog import CATALOG_SCHEMAS, Column, Relation, Snapshot
from proxy.analysis.engine import Engine
from proxy.net.upstream import asyncpg_ssl
from proxy.policy import Policy
from proxy.settings import UpstreamSettings

_RELATIONS = """
SELECT c.oid::int8 AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
       CASE WHEN n.nspname = ANY($1::text[]) THEN NULL ELSE
         (SELECT array_agg(ARRAY[a.attname, a.attnum::text, format_type(a.atttypid, a.atttypmod)]
                           ORDER BY a.attnum)
          FROM pg_attribute a
          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) END AS columns,
       (SELECT array_agg(a.attname ORDER BY k.ord)
        FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
        WHERE i.indrelid = c.oid AND i.indisprimary) AS primary_key
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""


_USER_FUNCTIONS = """
SELECT DISTINCT p.proname
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname <> ALL($1::text[]) AND n.nspname NOT LIKE 'pg\\_%'
"""


async def read_snapshot(conn: asyncpg.Connection) -> Snapshot:
    """The snapshot of everything `conn`'s user can see."""
    rows = await conn.fetch(_RELATIONS, list(CATALOG_SCHEMAS))
    functions = await conn.fetch(_USER_FUNCTIONS, list(CATALOG_SCHEMAS))
    return Snapshot.of(
        (_relation(row) for row in rows), user_functions=(r["proname"] for r in functions)
    )


async def fetch_snapshot(**connect: Any) -> Snapshot:
    """Connect (asyncpg.connect's arguments), read the snapshot, disconnect."""
    conn = await asyncpg.connect(**connect)
    try:
        return await read_snapshot(conn)
    finally:
        await conn.close()


def _relation(row: asyncpg.Record) -> Relation:
    columns = tuple(Column(name, int(num), typ) for name, num, typ in row["columns"] or ())
    return Relation(
        schema=row["schema"],
        name=row["name"],
        kind=row["kind"],
        oid=int(row["oid"]),
        columns=columns,
        primary_key=tuple(row["primary_key"] or ()),
    )


class SchemaKeeper:
    """Holds the current policy engine and keeps its schema snapshot fresh.

    The snapshot is read at startup (retried until it succeeds), every
    `refresh_s` seconds, on SIGHUP and, at most every `MISS_INTERVAL_S`, when a
    statement names a relation the snapshot does not know. Every new snapshot or
    policy builds a new Engine (and so a fresh verdict cache).
    """

    RETRY_S = 2.0
    MISS_INTERVAL_S = 5.0

    def __init__(
        self,
        upstream: UpstreamSettings,
        upstream_ssl: ssl.SSLContext | None,
        policy: Policy,
        hash_key: bytes | None,
        *,
        refresh_s: float = 300.0,
        on_loaded: Callable[[Snapshot], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.upstream_ssl = upstream_ssl
        self.policy = policy
        self.hash_key = hash_key
        self.refresh_s = refresh_s
        self.snapshot: Snapshot | None = None
        self.engine: Engine | None = None
        self._on_loaded = on_loaded
        self._on_failed = on_failed
        self._wake = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self._retired = (0, 0)  # set once the first load succeeded or failed
        self._last_miss = 0.0

    def set_policy(self, policy: Policy, hash_key: bytes | None) -> None:
        self.policy = policy
        self.hash_key = hash_key
        self._rebuild()

    def schema_miss(self) -> None:
        now = time.monotonic()
        if now - self._last_miss >= self.MISS_INTERVAL_S:
            self._last_miss = now
            self._wake.set()

    def refresh_soon(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Load now, then refresh periodically or when woken; runs until cancelled."""
        while True:
            ok = await self.load_once()
            self.first_attempt.set()
            delay = self.refresh_s if ok else self.RETRY_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def load_once(self) -> bool:
        up = self.upstream
        ssl_arg = asyncpg_ssl(up)
        try:
            conn = await asyncpg.connect(
                host=up.host,
                port=up.port,
                user=up.user,
                database=up.database,
                password=up.password,
                ssl=ssl_arg,
                timeout=up.connect_timeout_s,
                server_settings={"application_name": "pgwarden schema"},
            )
            try:
                snapshot = await read_snapshot(conn)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError) as exc:
            if self._on_failed is not None:
                self._on_failed(type(exc).__name__)
            return False
        self.snapshot = snapshot
        self._rebuild()
        if self._on_loaded is not None:
            self._on_loaded(snapshot)
        return True

    def _rebuild(self) -> None:
        if self.snapshot is not None:
            if self.engine is not None:  # keep its verdict-cache counts for the metrics
                self._retired = (
                    self._retired[0] + self.engine.hits,
                    self._retired[1] + self.engine.misses,
                )
            self.engine = Engine(self.policy, self.snapshot, self.hash_key)

    def cache_stats(self) -> tuple[int, int]:
        """Verdict-cache (hits, misses) of every engine this process built."""
        hits, misses = self._retired
        if self.engine is not None:
            hits, misses = hits + self.engine.hits, misses + self.engine.misses
        return hits, misses
