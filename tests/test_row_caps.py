"""limits.rows_per_query through real clients: no path delivers more than the cap.

Role support has rows_per_query: 50 with on_exceed: reject (TEST_POLICY); the shop
holds 200 customers and 400 orders. A truncating variant of the policy is started
where a test needs it.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import pytest
from conftest import PASSWORDS, TEST_POLICY, Proxy, ProxyLauncher
from tlsutil import Pki

from proxy.pgserver import PgServer, bin_dir

Launcher = Callable[..., Proxy]
CAP = 50
TRUNCATING = TEST_POLICY.replace("on_exceed: reject", "on_exceed: truncate")


@pytest.fixture(scope="module")
def truncating(pgwarden_module: Launcher) -> Proxy:
    return pgwarden_module(policy_text=TRUNCATING)


@pytest.fixture(scope="module")
def pgwarden_module(
    pg: PgServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    launcher = ProxyLauncher(pg, pki, tmp_path_factory.mktemp("caps"))
    yield launcher
    launcher.stop_all()


def alice(proxy: Proxy) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn("alice", PASSWORDS["alice"]), autocommit=True)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM orders",
        "SELECT id FROM orders WHERE id <= 51",
        "SELECT o.id FROM orders o CROSS JOIN orders p WHERE p.id <= 2 AND o.id <= 30",
        "SELECT id FROM orders ORDER BY id % 2 FETCH FIRST 1 ROWS WITH TIES",
        "SELECT id FROM orders LIMIT 100",
        "SELECT generate_series(1, 60)",
    ],
)
def test_reject_delivers_no_row_over_the_cap(proxy: Proxy, sql: str) -> None:
    with alice(proxy) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="row cap"):
            conn.execute(sql)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_within_the_cap_is_delivered(proxy: Proxy) -> None:
    with alice(proxy) as conn:
        assert len(conn.execute("SELECT id FROM orders WHERE id <= 50").fetchall()) == CAP
        assert len(conn.execute("SELECT id FROM orders LIMIT 50").fetchall()) == CAP


def test_a_transaction_stays_usable_after_a_refusal(proxy: Proxy) -> None:
    with alice(proxy) as conn:
        conn.autocommit = False
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("SELECT id FROM orders")
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (400,)
        conn.commit()


def test_the_extended_protocol_is_capped(proxy: Proxy) -> None:
    async def run() -> tuple[int, int, str]:
        conn = await asyncpg.connect(proxy.dsn("alice", PASSWORDS["alice"]))
        try:
            with pytest.raises(asyncpg.ProgramLimitExceededError) as whole:
                await conn.fetch("SELECT id FROM orders WHERE id > $1", 0)
            assert whole.value.args[0].endswith("; no rows delivered")
            within = len(await conn.fetch("SELECT id FROM orders WHERE id <= $1", 50))
            seen: list[object] = []

            async def page_through() -> None:
                async with conn.transaction():
                    async for row in conn.cursor("SELECT id FROM orders", prefetch=7):
                        seen.append(row)  # noqa: PERF401 - rows seen before the error count

            with pytest.raises(asyncpg.ProgramLimitExceededError) as crossing:
                await page_through()
            return within, len(seen), crossing.value.args[0]
        finally:
            await conn.close()

    within, seen, message = asyncio.run(run())
    assert within == CAP
    assert seen <= CAP  # a portal's batches are summed; the batch that crosses the cap fails
    assert message.endswith(f"no rows of this batch delivered ({seen} before it)")


def named_cursor_rows(proxy: Proxy) -> tuple[int, Exception | None]:
    """Rows a psycopg server-side cursor (DECLARE, then FETCH 10 at a time) delivers."""
    got = 0
    refusal: Exception | None = None
    with alice(proxy) as conn:
        conn.autocommit = False
        try:
            with conn.cursor(name="pages") as cur:
                cur.itersize = 10
                cur.execute("SELECT id FROM orders ORDER BY id")
                for _ in cur:
                    got += 1
        except psycopg.errors.ProgramLimitExceeded as exc:
            refusal = exc
        conn.rollback()
    return got, refusal


def test_a_cursor_is_capped_over_all_its_fetches(proxy: Proxy) -> None:
    got, refusal = named_cursor_rows(proxy)
    assert got == CAP  # five FETCHes of 10; the sixth would cross the cap
    assert refusal is not None
    assert "no rows of this batch delivered (50 before it)" in str(refusal)


def test_a_truncating_cursor_stops_at_the_cap(truncating: Proxy) -> None:
    assert named_cursor_rows(truncating) == (CAP, None)


def test_psql_with_fetch_count_gets_the_refusal_and_no_row(proxy: Proxy) -> None:
    # psql 17+ fetches FETCH_COUNT rows at a time in libpq's chunked mode, not a cursor:
    # the statement is one statement, refused whole.
    env = {"PGPASSWORD": PASSWORDS["alice"], "PATH": "/usr/bin:/bin"}
    host, port = proxy.dsn("alice", None).split("@")[1].split("/")[0].split(":")
    psql = [str(bin_dir() / "psql"), "-X", "-At", "-h", host, "-p", port, "-U", "alice"]
    out = subprocess.run(
        [*psql, "shop", "-v", "FETCH_COUNT=10", "-c", "SELECT id FROM orders ORDER BY id"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert "row cap" in out.stderr
    assert out.stdout.split() == []


def test_copy_to_stdout_counts_rows(pgwarden: Launcher) -> None:
    policy = TEST_POLICY.replace(
        "statements: [select]\n    tables: [public.customers",
        "statements: [select, copy_out]\n    tables: [public.customers",
        1,
    )
    proxy = pgwarden(policy_text=policy)
    with alice(proxy) as conn, conn.cursor() as cur:
        refused = pytest.raises(psycopg.errors.ProgramLimitExceeded)
        with refused, cur.copy("COPY (SELECT id FROM orders) TO STDOUT") as copy:
            list(copy)
        with cur.copy("COPY (SELECT id FROM orders LIMIT 50) TO STDOUT") as copy:
            assert len(b"".join(bytes(c) for c in copy).splitlines()) == CAP


def test_truncate_delivers_the_cap_and_a_notice(truncating: Proxy) -> None:
    notices: list[str] = []
    with alice(truncating) as conn:
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        cur = conn.execute("SELECT id FROM orders")
        assert len(cur.fetchall()) == CAP
        assert cur.rowcount == CAP
    assert any("truncated to 50 rows" in n for n in notices)


def test_unrestricted_roles_have_no_cap(proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn("dora", PASSWORDS["dora"]), autocommit=True) as conn:
        assert len(conn.execute("SELECT id FROM orders").fetchall()) == 400
