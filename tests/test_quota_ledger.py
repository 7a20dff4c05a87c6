"""The durable quota ledger (proxy/net/ledger.py) on the session's real PostgreSQL.

Strategy: the window arithmetic (proxy/quota.py) is checked as plain functions;
the ledger itself runs against `pg`, in schema pgwarden of `shop` as the service
account (the default placement), or through `state_dsn` in a throwaway database
where a test needs an empty or a broken schema. Time is injected (`now=`), so
windows are tested without waiting. The `quota` command runs as a subprocess
with a pgwarden.yaml written here; pgwarden itself is not started.

Every test uses its own user-name prefix and deletes its rows afterwards: the
ledger in `shop` is shared with every other test of the session.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import yaml
from conftest import SVC_PASSWORD, SVC_USER

from proxy.errors import PgWardenError
from proxy.net.ledger import VERSION, Ledger
from proxy.pgserver import PgServer, free_port
from proxy.policy.model import Limits
from proxy.quota import (
    LedgerSchemaError,
    LedgerUnavailable,
    QuotaExhausted,
    Usage,
    bucket_of,
    exhausted_hint,
    quota_left,
    remaining,
    usage_from_buckets,
)
from proxy.settings import PASSWORD_ENV, Settings, load_settings

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
QUOTA = Limits(rows_per_query=50, rows_per_hour=500, rows_per_day=2000)


def run(coro: Coroutine[Any, Any, T], limit: float = 20) -> T:
    """Run coro to completion, failing (not hanging) after limit seconds."""
    return asyncio.run(asyncio.wait_for(coro, limit))


def policy_text(support: list[str], dba: list[str]) -> str:
    return yaml.safe_dump(
        {
            "version": 1,
            "classify": {"public.customers": {"email": "email"}},
            "roles": {
                "support": {
                    "members": support,
                    "statements": ["select"],
                    "tables": ["public.customers"],
                    "columns": {"email": {"mask": "email"}},
                    "limits": {"rows_per_query": 50, "rows_per_hour": 500, "rows_per_day": 2000},
                },
                "dba": {"members": dba, "unrestricted": True},
            },
        },
        sort_keys=False,
    )


def write_config(
    folder: Path,
    pg: PgServer,
    *,
    port: int | None = None,
    state_dsn: str | None = None,
    members: tuple[list[str], list[str]] = (["qt-someone"], ["qt-admin"]),
) -> Path:
    """A pgwarden.yaml in the shape of conftest's ProxyLauncher, pointing at `pg`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(policy_text(*members))
    (folder / "users.txt").write_text("")
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "upstream": {
            "dsn": f"postgresql://{SVC_USER}@{pg.host}:{port or pg.port}/shop",
            "tls": "disable",
            "connect_timeout_s": 3,
        },
        "auth": {"users_file": str(folder / "users.txt")},
        "policy": str(folder / "policy.yaml"),
        "metrics_listen": None,
        "log": {"format": "json", "level": "info"},
    }
    if state_dsn is not None:
        config["state_dsn"] = state_dsn
    path = folder / "pgwarden.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def settings_for(path: Path) -> Settings:
    return load_settings(path, environ={PASSWORD_ENV: SVC_PASSWORD})


@pytest.fixture(scope="module")
def settings(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The default placement: schema pgwarden of shop, as the service account."""
    return settings_for(write_config(tmp_path_factory.mktemp("ledger"), pg))


async def _open_and_close(settings: Settings) -> None:
    async with Ledger(settings):
        pass


async def _delete_users(dsn: str, prefix: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("DELETE FROM pgwarden.quota_usage WHERE starts_with(usr, $1)", prefix)
    finally:
        await conn.close()


@pytest.fixture
def prefix(pg: PgServer, settings: Settings) -> Iterator[str]:
    """A user-name prefix of this test's own; its ledger rows go at teardown."""
    name = f"qt-{secrets.token_hex(4)}-"
    run(_open_and_close(settings))  # the schema exists before anything deletes from it
    yield name
    run(_delete_users(pg.dsn(SVC_USER, SVC_PASSWORD, "shop"), name))


@pytest.fixture
def fresh_db(pg: PgServer) -> Iterator[str]:
    """A new, empty database owned by the service account; yields its DSN."""
    name = f"quota_{secrets.token_hex(4)}"
    pg.psql(f"CREATE DATABASE {name} OWNER {SVC_USER};")
    try:
        yield pg.dsn(SVC_USER, SVC_PASSWORD, name)
    finally:
        pg.psql(f"DROP DATABASE {name} WITH (FORCE);")


def now_utc() -> datetime:
    # 30 s into a minute, so "now - N minutes" never straddles a bucket edge.
    return bucket_of(datetime.now(UTC)) + timedelta(seconds=30)


# --- pure window arithmetic ----------------------------------------------------------


def test_bucket_is_the_utc_minute() -> None:
    cet = timezone(timedelta(hours=1))
    ts = datetime(2025, 3, 4, 15, 32, 41, 123, tzinfo=cet)
    assert bucket_of(ts) == datetime(2025, 3, 4, 14, 32, tzinfo=UTC)
    with pytest.raises(ValueError, match="time zone"):
        bucket_of(datetime(2025, 3, 4, 14, 32))


def test_windows_from_buckets() -> None:
    now = datetime(2025, 3, 4, 14, 32, 30, tzinfo=UTC)
    usage = usage_from_buckets(
        [
            (now, 10),
            (now - timedelta(minutes=59), 1),  # bucket 13:33: still in the hour
            (now - timedelta(minutes=60), 100),  # bucket 13:32: left the hour at 14:32
            (now - timedelta(hours=23, minutes=59), 1000),
            (now - timedelta(hours=24), 10000),  # left the day at 14:32
        ],
        now,
    )
    assert (usage.hour, usage.day) == (11, 1111)
    assert usage.hour_frees_at == datetime(2025, 3, 4, 14, 33, tzinfo=UTC)
    assert usage.day_frees_at == datetime(2025, 3, 4, 14, 33, tzinfo=UTC)
    assert usage_from_buckets([], now) == Usage()


def test_remaining_is_the_tighter_window() -> None:
    assert remaining(QUOTA, Usage(hour=120, day=1900)) == 100
    assert remaining(QUOTA, Usage(hour=450, day=900)) == 50
    assert remaining(QUOTA, Usage(hour=600, day=600)) == 0  # overshoot never goes negative
    assert remaining(Limits(rows_per_query=10), Usage(hour=5, day=5)) is None
    assert remaining(None, Usage(hour=5, day=5)) is None
    assert remaining(Limits(rows_per_day=10), Usage(hour=0, day=4)) == 6


def test_exhausted_hint_names_the_quota_and_when_it_frees() -> None:
    frees = datetime(2025, 3, 4, 14, 32, tzinfo=UTC)
    hourly = Usage(hour=500, day=700, hour_frees_at=frees, day_frees_at=frees)
    assert exhausted_hint(hourly, QUOTA) == (
        "hourly quota of 500 rows used; it frees up from 14:32 UTC"
    )
    later = frees + timedelta(hours=20, minutes=1)
    both = Usage(hour=500, day=2000, hour_frees_at=frees, day_frees_at=later)
    assert exhausted_hint(both, QUOTA) == (
        "daily quota of 2000 rows used; it frees up from 10:33 UTC"
    )
    assert exhausted_hint(Usage(hour=1, day=1), QUOTA) == "499 rows left in the quota"
    assert exhausted_hint(Usage(), None) == "no row quota applies"


def test_quota_left_is_rows_or_a_53400() -> None:
    assert quota_left(QUOTA, Usage(hour=120, day=1900)) == 100
    frees = datetime(2025, 3, 4, 9, 5, tzinfo=UTC)
    refusal = quota_left(QUOTA, Usage(hour=80, day=2004, hour_frees_at=frees, day_frees_at=frees))
    assert isinstance(refusal, QuotaExhausted)
    assert refusal.sqlstate == "53400"
    assert refusal.message == "pgwarden: daily row quota exhausted; statement refused"
    assert refusal.hint == "daily quota of 2000 rows used; it frees up from 09:05 UTC"
    with pytest.raises(ValueError, match="rows_per_hour or rows_per_day"):
        quota_left(Limits(rows_per_query=5), Usage())


def test_ledger_unavailable_is_one_pgwarden_error() -> None:
    exc = LedgerUnavailable("ConnectionRefusedError: nope")
    assert isinstance(exc, PgWardenError)
    assert exc.sqlstate == "08006"
    assert exc.message == "pgwarden: the quota ledger is unreachable; statement refused"
    assert "nope" not in exc.message
    assert isinstance(LedgerSchemaError(2, 1), LedgerUnavailable)


# --- schema and migration ---------------------------------------------------------------


def test_open_creates_the_versioned_schema_once(
    pg: PgServer, fresh_db: str, tmp_path: Path
) -> None:
    settings = settings_for(write_config(tmp_path, pg, state_dsn=fresh_db))

    async def scenario() -> tuple[list[int | None], list[Any]]:
        first, second = Ledger(settings), Ledger(settings)
        await asyncio.gather(first.open(), second.open())  # two processes starting together
        await first.close()
        await second.close()
        third = Ledger(settings)
        await third.open()  # and once more, later
        await third.close()
        conn = await asyncpg.connect(fresh_db, timeout=10)
        try:
            versions = await conn.fetch("SELECT version FROM pgwarden.ledger_version")
        finally:
            await conn.close()
        found = sorted([first.migrated_from, second.migrated_from], key=str)
        return [*found, third.migrated_from], [r["version"] for r in versions]

    migrated, versions = run(scenario())
    assert versions == list(range(1, VERSION + 1)) == [1, 2]
    assert migrated == [0, None, None]  # exactly one open created it


def test_a_newer_schema_version_is_refused(pg: PgServer, fresh_db: str, tmp_path: Path) -> None:
    settings = settings_for(write_config(tmp_path, pg, state_dsn=fresh_db))

    async def scenario() -> None:
        async with Ledger(settings):
            pass
        conn = await asyncpg.connect(fresh_db, timeout=10)
        try:
            await conn.execute("INSERT INTO pgwarden.ledger_version (version) VALUES (3)")
        finally:
            await conn.close()
        await Ledger(settings).open()

    with pytest.raises(LedgerSchemaError) as caught:
        run(scenario())
    assert caught.value.found == 3
    assert "version 3, newer than this pgwarden understands (2)" in caught.value.message


# --- windows, sharing, durability --------------------------------------------------------


def test_charges_count_in_rolling_windows(settings: Settings, prefix: str) -> None:
    user, now = prefix + "alice", now_utc()

    async def scenario() -> tuple[Usage, Usage, Usage]:
        async with Ledger(settings) as ledger:
            await ledger.charge(user, 10, now=now)
            await ledger.charge(user, 5, now=now)  # same minute: one bucket, summed
            await ledger.charge(user, 1, now=now - timedelta(minutes=59))
            await ledger.charge(user, 20, now=now - timedelta(minutes=61))
            await ledger.charge(user, 40, now=now - timedelta(hours=25))
            await ledger.charge(user, 0, now=now)  # nothing to record
            later = await ledger.usage(user, now=now + timedelta(minutes=2))
            return await ledger.usage(user, now=now), later, await ledger.usage(prefix + "x")

    usage, later, nobody = run(scenario())
    # 61 minutes ago: out of the hour, in the day; 25 h ago: in neither.
    assert (usage.hour, usage.day) == (16, 36)
    assert usage.hour_frees_at == bucket_of(now - timedelta(minutes=59)) + timedelta(hours=1)
    assert usage.day_frees_at == bucket_of(now - timedelta(minutes=61)) + timedelta(hours=24)
    assert (later.hour, later.day) == (15, 36)  # the 59-minute bucket left the hour
    assert nobody == Usage()
    assert exhausted_hint(usage, Limits(rows_per_hour=16)).startswith("hourly quota of 16 rows")


def test_charge_refuses_negative_rows(settings: Settings, prefix: str) -> None:
    async def scenario() -> None:
        async with Ledger(settings) as ledger:
            await ledger.charge(prefix + "a", -1)

    with pytest.raises(ValueError, match="negative"):
        run(scenario())


def test_concurrent_charges_from_many_connections_sum_exactly(
    settings: Settings, prefix: str
) -> None:
    user = prefix + "busy"

    async def scenario() -> Usage:
        async with Ledger(settings) as one, Ledger(settings) as two:  # up to 8 connections
            await asyncio.gather(*((one if i % 2 else two).charge(user, i + 1) for i in range(50)))
            return await one.usage(user)

    usage = run(scenario())
    assert (usage.hour, usage.day) == (sum(range(1, 51)),) * 2


def test_two_ledgers_share_usage_and_it_survives_a_restart(settings: Settings, prefix: str) -> None:
    user = prefix + "shared"

    async def scenario() -> tuple[Usage, Usage]:
        first, second = Ledger(settings), Ledger(settings)
        await first.open()
        await second.open()
        await first.charge(user, 30)
        await second.charge(user, 12)
        seen = await second.usage(user)
        await first.close()
        await second.close()
        async with Ledger(settings) as restarted:
            return seen, await restarted.usage(user)

    seen, after_restart = run(scenario())
    assert (seen.hour, seen.day) == (42, 42)
    assert after_restart == seen


def test_all_usage_lists_users_with_rows_in_the_day(settings: Settings, prefix: str) -> None:
    now = now_utc()

    async def scenario() -> list[tuple[str, Usage]]:
        async with Ledger(settings) as ledger:
            await ledger.charge(prefix + "b", 3, now=now)
            await ledger.charge(prefix + "a", 7, now=now - timedelta(hours=2))
            await ledger.charge(prefix + "c", 9, now=now - timedelta(hours=25))
            return await ledger.all_usage(now=now)

    mine = [(u, (usage.hour, usage.day)) for u, usage in run(scenario()) if u.startswith(prefix)]
    assert mine == [(prefix + "a", (0, 7)), (prefix + "b", (3, 3))]


def test_reset_clears_one_user_and_counts_buckets(settings: Settings, prefix: str) -> None:
    now = now_utc()

    async def scenario() -> tuple[int, int, Usage, Usage]:
        async with Ledger(settings) as ledger:
            for minutes in (0, 0, 5, 90):
                await ledger.charge(prefix + "gone", 4, now=now - timedelta(minutes=minutes))
            await ledger.charge(prefix + "kept", 4, now=now)
            buckets = await ledger.reset(prefix + "gone")
            again = await ledger.reset(prefix + "gone")
            return (
                buckets,
                again,
                await ledger.usage(prefix + "gone"),
                await ledger.usage(prefix + "kept"),
            )

    buckets, again, gone, kept = run(scenario())
    assert (buckets, again) == (3, 0)
    assert gone == Usage()
    assert kept.hour == 4


def test_prune_deletes_buckets_older_than_a_day(
    pg: PgServer, settings: Settings, prefix: str
) -> None:
    user, now = prefix + "old", now_utc()

    async def scenario() -> tuple[int, list[datetime]]:
        async with Ledger(settings) as ledger:
            await ledger.charge(user, 1, now=now - timedelta(hours=25))
            await ledger.charge(user, 1, now=now - timedelta(hours=24, minutes=1))
            await ledger.charge(user, 1, now=now - timedelta(hours=23))
            pruned = await ledger.prune(now=now)
        conn = await asyncpg.connect(pg.dsn(SVC_USER, SVC_PASSWORD, "shop"), timeout=10)
        try:
            rows = await conn.fetch("SELECT bucket FROM pgwarden.quota_usage WHERE usr = $1", user)
        finally:
            await conn.close()
        return pruned, [r["bucket"] for r in rows]

    pruned, left = run(scenario())
    assert pruned >= 2
    assert left == [bucket_of(now - timedelta(hours=23))]


# --- failure -----------------------------------------------------------------------------


def test_an_unreachable_ledger_fails_fast_and_closed(pg: PgServer, tmp_path: Path) -> None:
    dead = free_port()
    by_upstream = settings_for(write_config(tmp_path / "a", pg, port=dead))
    by_state = settings_for(
        write_config(tmp_path / "b", pg, state_dsn=f"postgresql://x@127.0.0.1:{dead}/state")
    )

    async def attempt(settings: Settings) -> list[LedgerUnavailable]:
        ledger = Ledger(settings)
        caught = []
        for call in (ledger.open, lambda: ledger.usage("u"), lambda: ledger.charge("u", 1)):
            try:
                await call()
            except LedgerUnavailable as exc:
                caught.append(exc)
        await ledger.close()
        return caught

    for settings in (by_upstream, by_state):
        started = time.monotonic()
        caught = run(attempt(settings))
        assert time.monotonic() - started < 3
        assert len(caught) == 3
        assert all(exc.sqlstate == "08006" for exc in caught)
        assert caught[0].message == LedgerUnavailable.MESSAGE
        assert "Connect" in caught[0].reason or "connect" in caught[0].reason


def test_a_dropped_connection_is_replaced(pg: PgServer, settings: Settings, prefix: str) -> None:
    user = prefix + "drop"

    async def scenario() -> tuple[int, Usage]:
        async with Ledger(settings) as ledger:
            await ledger.charge(user, 7)
            started = await fresh_ledger_backends(pg)
            killed = await terminate(pg, started)
            return killed, await ledger.usage(user)

    killed, usage = run(scenario())
    assert killed >= 1
    assert usage.hour == 7


async def fresh_ledger_backends(pg: PgServer) -> list[int]:
    """Backends of ledgers opened in the last few seconds (this test's)."""
    conn = await asyncpg.connect(pg.dsn(dbname="shop"), timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgwarden ledger'"
            " AND datname = 'shop' AND backend_start > now() - interval '5 seconds'"
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


async def terminate(pg: PgServer, pids: list[int]) -> int:
    conn = await asyncpg.connect(pg.dsn(dbname="shop"), timeout=10)
    try:
        done = await conn.fetch("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p", pids)
    finally:
        await conn.close()
    return sum(1 for r in done if r[0])


# --- the quota command -------------------------------------------------------------------


def pgwarden(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env[PASSWORD_ENV] = SVC_PASSWORD
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_quota_show_and_reset_from_the_command_line(
    pg: PgServer, settings: Settings, prefix: str, tmp_path: Path
) -> None:
    support, dba, stranger = prefix + "sup", prefix + "dba", prefix + "nobody"
    config = str(write_config(tmp_path, pg, members=([support], [dba])))

    async def charge() -> None:
        async with Ledger(settings) as ledger:
            await ledger.charge(support, 120)
            await ledger.charge(support, 300, now=datetime.now(UTC) - timedelta(hours=3))
            await ledger.charge(dba, 9000)

    run(charge())

    shown = pgwarden("quota", "show", support, "-c", config, "--json")
    assert shown.returncode == 0, shown.stderr
    [row] = json.loads(shown.stdout)
    assert row["user"] == support
    assert row["role"] == "support"
    assert (row["rows_last_hour"], row["rows_last_day"]) == (120, 420)
    assert (row["rows_per_hour"], row["rows_per_day"], row["remaining"]) == (500, 2000, 380)
    assert row["hour_frees_at"] is not None

    table = pgwarden("quota", "show", "-c", config)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "user", "role", "rows", "last", "hour", "rows", "last", "24", "h",
        "rows_per_hour", "rows_per_day", "remaining",
    ]  # fmt: skip
    by_user = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert by_user[support] == ["support", "120", "420", "500", "2000", "380"]
    assert by_user[dba] == ["dba", "9000", "9000", "-", "-", "-"]  # unrestricted: no quota

    idle = pgwarden("quota", "show", dba + "-idle", "-c", config)
    assert idle.returncode == 1
    assert "no role in the policy and no usage" in idle.stderr
    in_policy = pgwarden("quota", "show", dba, "-c", config, "--json")
    assert in_policy.returncode == 0

    reset = pgwarden("quota", "reset", support, "-c", config)
    assert reset.returncode == 0, reset.stderr
    [line] = reset.stdout.splitlines()
    event = json.loads(line)
    assert event["event"] == "quota.reset"
    assert event["user"] == support
    assert event["buckets"] == 2
    assert event["level"] == "warning"
    assert event["operator"]
    assert "ts" in event

    after = pgwarden("quota", "show", support, "-c", config, "--json")
    assert json.loads(after.stdout)[0]["rows_last_day"] == 0
    assert pgwarden("quota", "show", stranger, "-c", config).returncode == 1


def test_quota_command_errors_exit_2(pg: PgServer, tmp_path: Path) -> None:
    dead = str(write_config(tmp_path / "dead", pg, port=free_port()))
    down = pgwarden("quota", "show", "-c", dead)
    assert down.returncode == 2
    assert "the quota ledger is unavailable" in down.stderr
    assert SVC_PASSWORD not in down.stderr

    reset_down = pgwarden("quota", "reset", "someone", "-c", dead)
    assert reset_down.returncode == 2
    assert reset_down.stdout == ""  # nothing was reset, so nothing is logged

    missing = pgwarden("quota", "show", "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr

    usage = pgwarden("quota", "reset", "-c", dead)  # USER is required
    assert usage.returncode == 2
