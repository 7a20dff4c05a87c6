"""Distinct-record budgets, decoys and enumeration alerts through real clients.

Strategy: a database of its own (`people`, 12,000 persons and 3,000 cases) on the
session's PostgreSQL, so the ledger (schema pgwarden of that database) starts
empty. The 30-day test runs pgwarden in this process with its record book's clock
injected (a day passes in no time); the others start `pgwarden serve` as a
subprocess. Every test checks what the client received, never pgwarden's
internals alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from conftest import (
    HASH_KEY,
    SVC_PASSWORD,
    SVC_USER,
    Proxy,
    ProxyLauncher,
    deep_merge,
    users_file_text,
)
from test_log_events import assert_documented, documented
from tlsutil import Pki

from proxy.net.server import Server
from proxy.pgserver import PgServer
from proxy.settings import PASSWORD_ENV, load_settings

Launcher = Callable[..., Proxy]
DB = "people"
PEOPLE = 12_000
DECOYS = (777, 5001)
USERS = {name: f"{name}-pw" for name in ("honest", "insider", "walker", "pager", "mixed", "plain")}

SETUP_SQL = f"""
CREATE TABLE people (
    id int PRIMARY KEY, full_name text NOT NULL, email text NOT NULL, country text NOT NULL);
INSERT INTO people
SELECT g, 'Person ' || g, 'person' || g || '@example.org', (ARRAY['DE', 'FR', 'NL'])[1 + g % 3]
FROM generate_series(1, {PEOPLE}) AS g;
CREATE TABLE cases (id int PRIMARY KEY, person_id int NOT NULL REFERENCES people, subject text);
INSERT INTO cases SELECT g, 1 + (g * 7) % {PEOPLE}, 'case ' || g FROM generate_series(1, 3000) g;
ANALYZE people, cases;
"""  # noqa: S608 - numbers only


def policy(
    *, limits: str = "", decoys: bool = False, alerts: str = "", on_exceed: str = "reject"
) -> str:
    decoy_section = f"decoys:\n  public.people: [{', '.join(map(str, DECOYS))}]\n" if decoys else ""
    return f"""\
version: 1
classify:
  public.people: {{full_name: name, email: email}}
  public.cases: {{subject: free_text}}
{decoy_section}roles:
  agents:
    members: [{", ".join(USERS)}]
    statements: [select]
    tables: [public.people, public.cases]
    columns: {{name: allow, email: {{mask: email, lookup: equality}}, free_text: allow}}
    limits: {{rows_per_query: 50, on_exceed: {on_exceed}{limits}}}
{alerts}"""


BUDGETS = ", records_per_day: 500, records_per_7d: 2900, records_per_30d: 3000"
QUIET = "    alerts: off\n"


@pytest.fixture(scope="module")
def people_db(pg: PgServer) -> str:
    pg.psql(f"CREATE DATABASE {DB};")
    pg.psql(SETUP_SQL, dbname=DB)
    pg.create_service_account(SVC_USER, SVC_PASSWORD, DB)
    return DB


@pytest.fixture
def launch(people_db: str, pg: PgServer, pki: Pki, tmp_path: Path) -> Iterator[Launcher]:
    launcher = ProxyLauncher(pg, pki, tmp_path)

    def start(policy_text: str, **overrides: Any) -> Proxy:
        upstream = {"upstream": {"dsn": f"postgresql://{SVC_USER}@{pg.host}:{pg.port}/{DB}"}}
        return launcher(policy_text=policy_text, users=USERS, **deep_merge(upstream, overrides))

    try:
        yield start
    finally:
        launcher.stop_all()


def connect(proxy: Proxy, user: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(proxy.dsn(user, USERS[user], dbname=DB), autocommit=True)


def reset_ledger(pg: PgServer) -> None:
    pg.psql(
        "DO $$ BEGIN IF to_regclass('pgwarden.records_seen') IS NOT NULL THEN "
        "DELETE FROM pgwarden.records_seen; DELETE FROM pgwarden.locks; "
        "DELETE FROM pgwarden.alerts; END IF; END $$;",
        dbname=DB,
    )


def wait_for(proxy: Proxy, event: str, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        found = [
            e
            for e in proxy.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"no {event} {fields}\n{proxy.log_tail()}"
        time.sleep(0.05)


def raw_values() -> set[str]:
    return {f"person{i}@example.org" for i in range(1, PEOPLE + 1)}


# --- the 30-day simulation: the clock injected ------------------------------------------


DAY = 86_400.0
HONEST_DAILY = 20


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _write_config(folder: Path, pg: PgServer, pki: Pki, policy_text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(policy_text)
    (folder / "users.txt").write_text(users_file_text(USERS))
    (folder / "hash.key").write_text(HASH_KEY + "\n")
    config = ProxyLauncher(pg, pki, folder)._base_config(folder)
    config["upstream"]["dsn"] = f"postgresql://{SVC_USER}@{pg.host}:{pg.port}/{DB}"
    config["log"]["level"] = "warning"
    path = folder / "pgwarden.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def _wait_listening(host: str, port: int) -> None:
    for _ in range(300):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise AssertionError("pgwarden did not listen")


def test_thirty_days_honest_agent_never_refused_insider_stopped_at_the_budget(
    people_db: str, pg: PgServer, pki: Pki, tmp_path: Path
) -> None:
    """Honest: the same 60 customers daily plus 20 new; insider: 400 new a day, in pages."""
    reset_ledger(pg)
    path = _write_config(tmp_path, pg, pki, policy(limits=BUDGETS))
    settings = load_settings(path, environ={PASSWORD_ENV: SVC_PASSWORD})
    clock = _Clock()
    rng = random.Random(9)
    regulars = rng.sample(range(1, PEOPLE + 1), 60)
    honest_refusals: list[str] = []
    insider_seen: set[int] = set()
    insider_refused_on: list[int] = []
    refusals: list[psycopg.Error] = []

    async def scenario() -> None:
        server = Server(settings)
        server.records.clock = clock
        serving = asyncio.ensure_future(server.serve())
        host, port = settings.listen_host, settings.listen_port
        await _wait_listening(host, port)

        async def session(user: str) -> psycopg.AsyncConnection[tuple[Any, ...]]:
            dsn = f"postgresql://{user}:{USERS[user]}@{host}:{port}/{DB}"
            return await psycopg.AsyncConnection.connect(dsn, autocommit=True)

        last_id = 0
        try:
            for day in range(1, 31):
                clock.now += DAY
                honest = await session("honest")
                try:
                    for half in (regulars[:30], regulars[30:]):
                        rows = await (
                            await honest.execute(
                                "SELECT id, full_name, email FROM people WHERE id = ANY(%s)",
                                (half,),
                            )
                        ).fetchall()
                        assert len(rows) == 30
                    for new in rng.sample(range(1, PEOPLE + 1), HONEST_DAILY):
                        cur = await honest.execute(
                            "SELECT id, email FROM people WHERE email = %s",
                            (f"person{new}@example.org",),
                        )
                        assert [r[0] for r in await cur.fetchall()] == [new]
                except psycopg.Error as exc:
                    honest_refusals.append(f"day {day}: {exc.sqlstate} {exc}")
                finally:
                    await honest.close()
                insider = await session("insider")
                try:
                    for _ in range(8):  # 8 pages of 50: 400 new customers a day
                        cur = await insider.execute(
                            "SELECT id, full_name, email FROM people WHERE id > %s "
                            "ORDER BY id LIMIT 50",
                            (last_id,),
                        )
                        page = await cur.fetchall()
                        insider_seen.update(r[0] for r in page)
                        last_id = page[-1][0]
                except psycopg.Error as exc:
                    refusals.append(exc)
                    insider_refused_on.append(day)
                    # what was already shown stays free to read again
                    cur = await insider.execute(
                        "SELECT id FROM people WHERE id > 0 ORDER BY id LIMIT 50"
                    )
                    assert len(await cur.fetchall()) == 50
                finally:
                    await insider.close()
        finally:
            server._stop_signal()
            await serving

    asyncio.run(scenario())
    assert honest_refusals == []
    for exc in refusals:
        assert exc.sqlstate == "53400"
        assert "records_per_30d" in str(exc)
        assert "free" in (exc.diag.message_hint or "")
    # 3,000 distinct records in 30 days: 7 days of 400, then 4 pages on day 8
    assert insider_refused_on[0] == 8
    assert insider_refused_on == list(range(8, 31))
    assert len(insider_seen) == 3000


# --- budgets through a subprocess: refusal, re-reads, truncate, grouped rows -------------


def test_budget_refuses_new_records_and_keeps_seen_ones_free(
    launch: Launcher, pg: PgServer
) -> None:
    reset_ledger(pg)
    proxy = launch(policy(limits=", records_per_day: 120") + QUIET)
    with connect(proxy, "plain") as conn:
        first = conn.execute("SELECT id, email FROM people WHERE id <= 50").fetchall()
        second = conn.execute("SELECT id, email FROM people WHERE id > 50 AND id <= 100").fetchall()
        assert len(first) == len(second) == 50
        # 100 shown: 20 left; a page of 50 new ones is refused whole
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as caught:
            conn.execute("SELECT id, email FROM people WHERE id > 100 AND id <= 150")
        assert "records_per_day" in str(caught.value)
        # re-reading is free, and a mix fits when the new part does
        assert len(conn.execute("SELECT id FROM people WHERE id <= 50").fetchall()) == 50
        mix = conn.execute("SELECT id FROM people WHERE id > 80 AND id <= 120").fetchall()
        assert len(mix) == 40  # 20 seen + 20 new = the budget exactly
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            conn.execute("SELECT id FROM people WHERE id = 121")
        # a join names both records; a case of a person already seen is still new
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            conn.execute(
                "SELECT p.id, c.subject FROM people p JOIN cases c ON c.person_id = p.id "
                "WHERE p.id <= 10"
            )
        # statements showing no record are never held back
        assert conn.execute("SELECT 1").fetchone() == (1,)
    exhausted = wait_for(proxy, "records.exhausted", 3)
    assert exhausted[0]["window"] == "day"
    assert exhausted[0]["budget"] == 120
    assert_documented(proxy, documented(), {"records.exhausted"})


def test_truncate_delivers_exactly_up_to_the_budget(launch: Launcher, pg: PgServer) -> None:
    reset_ledger(pg)
    proxy = launch(policy(limits=", records_per_day: 70", on_exceed="truncate") + QUIET)
    with connect(proxy, "plain") as conn:
        assert len(conn.execute("SELECT id FROM people WHERE id <= 50").fetchall()) == 50
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        cur = conn.execute(
            "SELECT id FROM people WHERE id <= 20 OR (id > 1000 AND id <= 1030) ORDER BY id"
        )
        rows = [r[0] for r in cur.fetchall()]
        # 20 seen (free), then new ones until the budget of 70 is used: 20 of the 30
        assert rows == [*range(1, 21), *range(1001, 1021)]
        assert cur.statusmessage == "SELECT 40"
        assert any("records_per_day" in n for n in notices), notices


def test_grouped_results_name_single_records_and_count_groups(
    launch: Launcher, pg: PgServer
) -> None:
    reset_ledger(pg)
    proxy = launch(policy(limits=", records_per_day: 5") + QUIET)
    with connect(proxy, "plain") as conn:
        # a group of one record is that record: counted once, free again
        for _ in range(3):
            assert conn.execute(
                "SELECT email, count(*) FROM people WHERE id = 3 GROUP BY email"
            ).fetchall()
        # a count over many records names none: one new unnamed record each time
        for _ in range(4):
            assert conn.execute("SELECT count(*) FROM people").fetchone() == (PEOPLE,)
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            conn.execute("SELECT count(*) FROM people")


# --- decoys ---------------------------------------------------------------------------


def _locked_events(proxy: Proxy, user: str, statement: str = "FROM people") -> None:
    touched = wait_for(proxy, "decoy.touched", user=user)
    assert touched[0]["level"] == "critical"
    assert touched[0]["table"] == "public.people"
    assert touched[0]["role"] == "agents"
    assert statement in touched[0]["fingerprint"]  # the statement's shape, never a value
    wait_for(proxy, "user.locked", user=user)


def _assert_no_pii(texts: list[str]) -> None:
    values = raw_values()
    for text in texts:
        assert not any(v in text for v in values), text


def test_decoy_through_psycopg_refuses_ends_the_session_and_locks(
    launch: Launcher, pg: PgServer
) -> None:
    reset_ledger(pg)
    proxy = launch(policy(decoys=True) + QUIET)
    other = launch(policy(decoys=True) + QUIET)  # another pgwarden on the same ledger
    elsewhere = connect(other, "plain")
    assert elsewhere.execute("SELECT id FROM people WHERE id = 1").fetchall() == [(1,)]
    with connect(proxy, "plain") as conn:
        assert len(conn.execute("SELECT id, email FROM people WHERE id < 40").fetchall()) == 39
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT id, email FROM people WHERE id BETWEEN 760 AND 800").fetchall()
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT 1")  # the session is over
    _assert_no_pii([str(caught.value)])
    assert "locked" in str(caught.value)
    _locked_events(proxy, "plain")
    # locked: a new login is refused, here and in another pgwarden on the same ledger
    with pytest.raises(psycopg.OperationalError, match="locked"):
        connect(proxy, "plain")
    assert_documented(proxy, documented(), {"decoy.touched", "user.locked", "conn.refused"})
    refused_eventually(other, "plain")
    # and the session open there ends within seconds (the lock is re-read every 5 s)
    assert _ended_eventually(elsewhere), "the other process's session went on"
    # ... and after a restart
    proxy.stop()
    again = launch(policy(decoys=True) + QUIET)
    with pytest.raises(psycopg.OperationalError, match="locked"):
        connect(again, "plain")
    # other users are not affected
    with connect(again, "mixed") as conn:
        assert conn.execute("SELECT count(*) FROM cases").fetchone() == (3000,)
    # unlock: the user works again
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "quota", "unlock", "plain", "-c", str(again.config_path)],
        capture_output=True,
        text=True,
        env={**again_env(), PASSWORD_ENV: SVC_PASSWORD},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with connect(again, "plain") as conn:
        assert conn.execute("SELECT id FROM people WHERE id = 5").fetchall() == [(5,)]


def refused_eventually(proxy: Proxy, user: str) -> None:
    """The lock reaches the ledger in the background: another process sees it soon."""
    deadline = time.monotonic() + 10
    while True:
        try:
            connect(proxy, user).close()
        except psycopg.OperationalError as exc:
            message = str(exc)
            break
        assert time.monotonic() < deadline, "the lock did not reach the other process"
        time.sleep(0.1)
    assert "locked" in message


def _ended_eventually(conn: psycopg.Connection[tuple[Any, ...]]) -> bool:
    """The session gets the lock (FATAL 42501) and is closed, within the refresh time."""
    deadline = time.monotonic() + 12
    message = ""
    with conn:
        while time.monotonic() < deadline and not message:
            try:
                conn.execute("SELECT id FROM people WHERE id = 2").fetchall()
            except psycopg.Error as exc:
                message = str(exc)
            time.sleep(0.2)
        if "locked" not in message:
            return False
        try:
            conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return True  # closed by the server: not just one statement refused
    return False


def again_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def test_decoy_through_the_extended_protocol_and_a_cursor(launch: Launcher, pg: PgServer) -> None:
    reset_ledger(pg)
    proxy = launch(policy(decoys=True) + QUIET)
    with connect(proxy, "pager") as conn, pytest.raises(psycopg.Error, match="locked"):
        conn.execute(
            "SELECT id, email FROM people WHERE id > %s AND id < %s", (5000, 5002)
        ).fetchall()
    _locked_events(proxy, "pager")
    reset_ledger(pg)
    proxy2 = launch(policy(decoys=True) + QUIET)
    received: list[tuple[Any, ...]] = []
    conn = psycopg.connect(proxy2.dsn("walker", USERS["walker"], dbname=DB))  # in a transaction
    cur = conn.cursor(name="walk")
    with pytest.raises(psycopg.Error, match="locked"):
        _fetch_all(cur, "SELECT id, email FROM people WHERE id > 760 ORDER BY id", received)
    with contextlib.suppress(psycopg.Error):
        cur.close()
    conn.close()
    # the batch holding the decoy (771-780) delivers nothing; the one before it was whole
    assert [r[0] for r in received] == list(range(761, 771))
    _locked_events(proxy2, "walker", "FETCH FORWARD")


def _fetch_all(cur: psycopg.ServerCursor[Any], sql: str, into: list[tuple[Any, ...]]) -> None:
    cur.execute(sql)
    while batch := cur.fetchmany(10):
        into.extend(batch)


def test_decoy_through_asyncpg(launch: Launcher, pg: PgServer) -> None:
    reset_ledger(pg)
    proxy = launch(policy(decoys=True) + QUIET)

    async def scenario() -> str:
        conn = await asyncpg.connect(proxy.dsn("mixed", USERS["mixed"], dbname=DB))
        try:
            assert len(await conn.fetch("SELECT id FROM people WHERE id < $1", 30)) == 29
            try:
                await conn.fetch("SELECT id, email FROM people WHERE id = ANY($1)", [4, 5001])
            except (asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError) as exc:
                return str(exc)
            raise AssertionError("the decoy was delivered")
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    message = asyncio.run(scenario())
    assert "locked" in message
    _assert_no_pii([message])
    _locked_events(proxy, "mixed")


def test_decoy_tables_refuse_forms_that_cannot_be_checked(launch: Launcher, pg: PgServer) -> None:
    reset_ledger(pg)
    proxy = launch(policy(decoys=True) + QUIET)
    with connect(proxy, "plain") as conn:
        for sql in (
            "SELECT DISTINCT country FROM people",
            "SELECT id FROM (SELECT id FROM people) AS p",
            "WITH p AS (SELECT id FROM people) SELECT id FROM p",
            "SELECT id FROM people UNION SELECT id FROM cases",
        ):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
                conn.execute(sql)
            assert "decoy" not in str(caught.value).lower()  # the message does not tell
        # a filter-only read of the table is fine
        got = conn.execute(
            "SELECT count(*) FROM cases WHERE person_id IN (SELECT id FROM people WHERE id < 10)"
        ).fetchone()
        assert got is not None
        assert got[0] > 0


# --- enumeration alerts ---------------------------------------------------------------


def test_walking_ids_and_offset_paging_raise_alerts_honest_work_does_not(
    launch: Launcher, pg: PgServer
) -> None:
    reset_ledger(pg)
    proxy = launch(policy())  # default alerts: id_run 200, offset_pages 10, lookups 100
    with connect(proxy, "walker") as conn:
        last = 0
        for _ in range(5):  # keyset pages of 50 ordered ids: a run of 200 by page 4
            page = conn.execute(
                "SELECT id, email FROM people WHERE id > %s ORDER BY id LIMIT 50", (last,)
            ).fetchall()
            last = page[-1][0]
    with connect(proxy, "pager") as conn:
        for n in range(12):  # OFFSET pages of every 7th id: no run of ids
            conn.execute(
                f"SELECT id, full_name FROM people WHERE id % 7 = 0 ORDER BY id LIMIT 50 OFFSET {n * 50}"  # noqa: S608, E501 - a number
            ).fetchall()
    with connect(proxy, "honest") as conn:  # look-ups, re-reads, a list of cases
        for person in random.Random(3).sample(range(1, PEOPLE + 1), 40):
            conn.execute(
                "SELECT id, email FROM people WHERE email = %s", (f"person{person}@example.org",)
            ).fetchall()
            conn.execute("SELECT id, subject FROM cases WHERE person_id = %s", (person,)).fetchall()
        for _ in range(3):
            conn.execute("SELECT id, subject FROM cases ORDER BY id DESC LIMIT 20").fetchall()
            conn.execute("SELECT id, full_name FROM people WHERE id IN (5, 9, 12)").fetchall()
    walk = wait_for(proxy, "enumeration.alert", user="walker")
    assert walk[0]["kind"] == "id_run"
    assert walk[0]["table"] == "public.people"
    assert walk[0]["level"] == "warning"
    assert walk[0]["count"] >= 200
    pages = wait_for(proxy, "enumeration.alert", user="pager")
    assert {e["kind"] for e in pages} == {"offset_paging"}
    wait_for(proxy, "conn.closed", user="honest")  # the honest session's lines are all in
    alerts = [e for e in proxy.events() if e.get("event") == "enumeration.alert"]
    assert [e for e in alerts if e.get("user") == "honest"] == []
    assert len(alerts) == 2  # one alert per kind and window, not one per statement
    assert_documented(proxy, documented(), {"enumeration.alert"})
    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'pgwarden_enumeration_alerts_total{kind="id_run"} 1.0' in metrics
    assert 'pgwarden_enumeration_alerts_total{kind="offset_paging"} 1.0' in metrics
    assert 'pgwarden_enumeration_alerts_total{kind="lookups"} 0.0' in metrics


def test_an_alert_with_action_lock_ends_the_walk(launch: Launcher, pg: PgServer) -> None:
    reset_ledger(pg)
    proxy = launch(policy() + "    alerts: {id_run: 100, action: lock}\n")
    received: list[int] = []
    with connect(proxy, "walker") as conn, pytest.raises(psycopg.Error, match="locked"):
        _walk(conn, received)
    assert len(received) == 50  # the second page crossed 100: refused, nothing of it delivered
    locked = wait_for(proxy, "user.locked", user="walker")
    assert locked[0]["reason"] == "enumeration"
    assert locked[0]["kind"] == "id_run"
    assert_documented(proxy, documented(), {"user.locked", "enumeration.alert"})
    with pytest.raises(psycopg.OperationalError, match="locked"):
        connect(proxy, "walker")


def _walk(conn: psycopg.Connection[tuple[Any, ...]], into: list[int]) -> None:
    for _ in range(5):
        page = conn.execute(
            "SELECT id FROM people WHERE id > %s ORDER BY id LIMIT 50", (into[-1] if into else 0,)
        ).fetchall()
        into.extend(r[0] for r in page)


def test_quota_show_reports_records_lock_and_alerts(launch: Launcher, pg: PgServer) -> None:
    reset_ledger(pg)
    proxy = launch(
        policy(limits=", records_per_day: 1000") + "    alerts: {id_run: 100, action: lock}\n"
    )
    with connect(proxy, "walker") as conn, pytest.raises(psycopg.Error):
        _walk(conn, [])
    wait_for(proxy, "user.locked", user="walker")
    time.sleep(0.3)  # the ledger writes happen in the background
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "quota", "show", "walker", "-c", str(proxy.config_path)],
        capture_output=True,
        text=True,
        env={**again_env(), PASSWORD_ENV: SVC_PASSWORD},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "records shown: day 50/1000" in done.stdout, done.stdout
    assert "locked: since" in done.stdout
    assert "enumeration" in done.stdout
    assert "alert:" in done.stdout
    assert "id_run" in done.stdout
