"""Break-glass (`break_glass`): a stated reason widens a restricted role for a while.

The tests use their own database, `breakglass`, on the session's PostgreSQL: the six
customers and the assigned tickets of tests/test_row_filter.py. Role `agent` sees the
customers of its user's open tickets; after `SET pgwarden.reason = '...'` its
break_glass rules apply (no row filter, the same masks, a small quota of its own)
for duration_s. Role `analyst` has no break_glass. Engine and gate cases (the gate
with a clock the test drives, for expiry) come first; end-to-end cases go through a
real pgwarden with psycopg (simple and extended protocol) and asyncpg.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import HASH_KEY, SVC_USER, Proxy, engine_for, fresh_database
from test_log_events import documented
from test_row_filter import SCHEMA

from proxy.analysis.engine import Engine
from proxy.errors import PgWardenError
from proxy.pgserver import PgServer
from proxy.policy import PolicyError, parse_policy
from proxy.policy.model import Limits, policy_changes
from proxy.session.gate import Allow, PolicyGate, Prepared, Principal, Refuse

DB = "breakglass"
# SCHEMA: the row-filter tests' database (six customers, tickets of alice and carol)
RAW = [
    *(f"{n}@example.com" for n in ("ann", "ben", "cid", "dee", "eli", "fay")),
    *(f"+1 555 000 000{i}" for i in range(1, 7)),
]
POLICY = """\
version: 1
classify:
  public.customers: {full_name: name, email: email, phone: phone}
  public.support_tickets: {body: free_text}
roles:
  agent:
    members: [alice, carol, dave, erin]
    statements: [select]
    tables: [public.customers, public.support_tickets]
    columns:
      name: allow
      email: {mask: email, lookup: equality}
      phone: {mask: last4, lookup: equality}
      free_text: redact
    row_filter:
      public.customers: >-
        id IN (SELECT customer_id FROM public.support_tickets
               WHERE assignee = :user AND status <> 'closed')
      public.support_tickets: "assignee = :user"
    limits: {rows_per_query: 50, rows_per_hour: 1000, rows_per_day: 2000}
    break_glass:
      duration_s: 600
      limits: {rows_per_query: 10, rows_per_hour: 12}
  analyst:
    members: [bob]
    statements: [select]
    tables: [public.customers]
    columns: {"*": hash}
"""
USERS = {u: f"{u}-pw" for u in ("alice", "bob", "carol", "dave", "erin")}
ALL = [1, 2, 3, 4, 5, 6]
REASON = "CS-0042 fraud call"
GLASS = (  # the agent's break_glass section, as written in POLICY
    "    break_glass:\n      duration_s: 600\n"
    "      limits: {rows_per_query: 10, rows_per_hour: 12}\n"
)


@pytest.fixture(scope="module")
def bg_db(pg: PgServer) -> str:
    return fresh_database(pg, DB, SCHEMA)


@pytest.fixture(scope="module")
def engine(bg_db: str) -> Engine:
    return engine_for(bg_db, POLICY)


def ids(rows: list[tuple[Any, ...]] | list[asyncpg.Record]) -> list[int]:
    return sorted(int(r[0]) for r in rows)


def no_raw_values(*texts: object) -> None:
    for text in texts:
        for value in RAW:
            assert value not in str(text), value


# --- the policy --------------------------------------------------------------------


def test_defaults_and_limits() -> None:
    policy = parse_policy(POLICY.encode(), source=Path("p.yaml"))
    glass = policy.roles["agent"].break_glass
    assert glass is not None
    assert glass.duration_s == 600
    assert dict(glass.row_filter) == {}  # every filter lifted
    # keys left out take the defaults: a break-glass window is never uncapped
    assert glass.limits == Limits(rows_per_query=10, rows_per_hour=12, rows_per_day=200)
    widened = policy.roles["agent"].under_break_glass()
    assert widened.columns == policy.roles["agent"].columns
    assert not widened.per_user
    bare = parse_policy(
        POLICY.replace(
            "      duration_s: 600\n      limits: {rows_per_query: 10, rows_per_hour: 12}\n",
            "      {}\n",
        ).encode(),
        source=Path("p.yaml"),
    )
    default = bare.roles["agent"].break_glass
    assert default is not None
    assert (default.duration_s, default.limits.rows_per_query, default.limits.rows_per_hour) == (
        900,
        20,
        100,
    )
    assert policy.roles["analyst"].break_glass is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{duration_s: 30}", "break_glass.duration_s: must be a whole number of seconds"),
        ("{duration_s: 90000}", "from 60 to 86400"),
        ("{duration_s: '600'}", "break_glass.duration_s"),
        ("{minutes: 5}", "break_glass.minutes: unknown key"),
        ("{limits: {records_per_day: 5}}", "not available under break_glass"),
        ("{limits: {rows_per_hour: 0}}", "break_glass.limits.rows_per_hour: must be a positive"),
        ("{row_filter: {public.orders: 'true'}}", "not one of the role's tables"),
        ("{row_filter: {public.customers: 'id ='}}", "not a valid SQL condition"),
        ("[600]", "roles.agent.break_glass: must be a mapping"),
    ],
)
def test_invalid_break_glass_names_file_line_and_key(section: str, message: str) -> None:
    text = POLICY.replace(GLASS, f"    break_glass: {section}\n")
    with pytest.raises(PolicyError) as caught:
        parse_policy(text.encode(), source=Path("p.yaml"))
    assert any(message in e for e in caught.value.errors), caught.value.errors
    assert all(e.startswith("p.yaml:") for e in caught.value.errors)


def test_unrestricted_roles_cannot_have_it() -> None:
    text = POLICY + "  dba:\n    members: [dora]\n    unrestricted: true\n    break_glass: {}\n"
    with pytest.raises(PolicyError, match="contradicts unrestricted"):
        parse_policy(text.encode(), source=Path("p.yaml"))


def test_reload_reports_break_glass_changes() -> None:
    old = parse_policy(POLICY.encode(), source=Path("p.yaml"))
    shorter = POLICY.replace("duration_s: 600", "duration_s: 300")
    new = parse_policy(shorter.encode(), source=Path("p"))
    assert policy_changes(old, new) == {"agent": {"break_glass": "changed"}}


# --- the engine --------------------------------------------------------------------


def test_break_glass_has_its_own_verdicts(engine: Engine) -> None:
    sql = "SELECT id, email FROM customers"
    normal = engine.evaluate("agent", sql, user="alice")
    wide = engine.evaluate("agent", sql, user="alice", break_glass=True)
    assert normal.sql is not None
    assert wide.sql is not None
    assert "'alice'" in normal.sql
    assert "assignee" not in wide.sql  # the filter is lifted ...
    assert "***" in wide.sql  # ... the masks are not
    assert normal.filtered == ("public.customers",)
    assert wide.filtered == ()
    assert (normal.cap, wide.cap) == (50, 10)
    again = engine.evaluate("agent", sql, user="alice")  # the cache never mixes them
    assert again.sql == normal.sql
    # the same for literal templates (psql users type literals)
    lit = engine.evaluate("agent", "SELECT id FROM customers WHERE id = 6", user="carol")
    wide_lit = engine.evaluate(
        "agent", "SELECT id FROM customers WHERE id = 5", user="carol", break_glass=True
    )
    assert lit.sql is not None
    assert wide_lit.sql is not None
    assert "assignee" in lit.sql
    assert "assignee" not in wide_lit.sql


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (f"SET pgwarden.reason = '{REASON}'", REASON),
        (f"set session pgwarden.reason to '{REASON}'", REASON),
        ("SET pgwarden.reason = 'it''s CS-1'", "it's CS-1"),
        ("SET pgwarden.reason = ''", ""),
        ("RESET pgwarden.reason", ""),
        ("SET pgwarden.reason TO DEFAULT", ""),
    ],
)
def test_reasons_are_recognised(engine: Engine, sql: str, reason: str) -> None:
    verdict = engine.evaluate("agent", sql, user="alice")
    assert verdict.allowed, verdict.message
    assert verdict.reason == reason
    assert verdict.kinds == ("session",)
    assert verdict.sql is not None
    assert "pgwarden.reason" in verdict.sql  # forwarded: PostgreSQL answers the SET


@pytest.mark.parametrize(
    ("sql", "sqlstate", "message"),
    [
        ("SET pgwarden.reason = '   '", "22023", "printable text of 1 to 200"),
        ("SET pgwarden.reason = '" + "x" * 201 + "'", "22023", "printable text of 1 to 200"),
        ("SET pgwarden.reason = E'CS-1\\nAnn One'", "22023", "on one line"),
        ("SET pgwarden.reason = 42", "22023", "one quoted text"),
        ("SET pgwarden.reason = 'a', 'b'", "22023", "one quoted text"),
        ("SET LOCAL pgwarden.reason = 'CS-1'", "42501", "SET LOCAL"),
        ("SET pgwarden.reason = 'CS-1'; SELECT 1", "42501", "must be sent alone"),
        ("SET pgwarden.other = 'x'", "42501", "may not be changed"),
    ],
)
def test_bad_reasons_are_refused(engine: Engine, sql: str, sqlstate: str, message: str) -> None:
    verdict = engine.evaluate("agent", sql, user="alice")
    assert not verdict.allowed
    assert (verdict.sqlstate, message in verdict.message) == (sqlstate, True), verdict.message
    assert "CS-1" not in verdict.message  # the reason is never echoed
    assert "Ann" not in verdict.message


def test_a_role_without_break_glass_is_refused(engine: Engine) -> None:
    verdict = engine.evaluate("analyst", f"SET pgwarden.reason = '{REASON}'", user="bob")
    assert not verdict.allowed
    assert verdict.sqlstate == "42501"
    assert 'role "analyst" has no break-glass' in verdict.message
    assert not engine.evaluate("analyst", "SELECT 1", user="bob", break_glass=True).allowed


# --- the gate, with a clock the test drives -------------------------------------------


class _Records:
    def ready(self, user: str) -> bool:
        return True

    def locked(self, user: str) -> object | None:
        return None


class _Source:
    """What a PolicyGate reads, with quotas in memory."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.used: dict[str, int] = {}
        self.records = _Records()

    def schema_miss(self) -> None:
        return None

    def quota_left(self, user: str, limits: Limits) -> int | PgWardenError:
        assert limits.rows_per_hour is not None
        return limits.rows_per_hour - self.used.get(user, 0)

    def charge(self, user: str, rows: int) -> None:
        self.used[user] = self.used.get(user, 0) + rows


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gate(engine: Engine) -> tuple[PolicyGate, _Source, _Clock]:
    source, clock = _Source(engine), _Clock()
    gate = PolicyGate(Principal("alice", "agent", unrestricted=False), source, clock)  # type: ignore[arg-type]
    return gate, source, clock


def _allowed(verdict: Allow | Refuse) -> Allow:
    assert isinstance(verdict, Allow), verdict
    return verdict


def test_the_window_opens_widens_and_expires(engine: Engine) -> None:
    gate, source, clock = _gate(engine)
    sql = "SELECT id FROM customers"
    before = _allowed(gate.check_statement(sql, extended=False))
    assert before.sql is not None
    assert "assignee" in before.sql
    assert before.audit is not None
    assert before.audit.break_glass == ()
    opened = _allowed(gate.check_statement(f"SET pgwarden.reason = '{REASON}'", extended=False))
    [(event, fields)] = opened.events
    assert event == "break_glass.opened"
    assert fields["reason"] == REASON
    assert fields["duration_s"] == 600
    assert {"user", "role", "until"} <= set(fields)
    assert opened.audit is not None
    assert dict(opened.audit.break_glass) == {"break_glass": True, "break_glass_reason": REASON}
    clock.now += 599
    wide = _allowed(gate.check_statement(sql, extended=True))
    assert wide.sql is not None
    assert "assignee" not in wide.sql
    assert wide.audit is not None
    assert dict(wide.audit.break_glass)["break_glass_reason"] == REASON
    assert (wide.cap, wide.bucket, wide.counted) == (10, "alice#break_glass", True)
    gate.charge(6, wide.bucket)
    assert source.used == {"alice#break_glass": 6}  # the normal quota is untouched
    prepared = Prepared(wide.policy_version, sql, wide.sql)
    assert gate.check_bind(prepared, counted=True) == 6  # 12 per hour, 6 used
    clock.now += 1  # duration_s has passed
    assert isinstance(gate.check_bind(prepared, counted=True), PgWardenError)
    after = _allowed(gate.check_statement(sql, extended=False))
    assert after.sql is not None
    assert "assignee" in after.sql
    assert after.audit is not None
    assert after.audit.break_glass == ()
    assert (after.cap, after.bucket) == (50, "")
    [(event, fields)] = after.events
    assert (event, fields["why"], fields["reason"]) == ("break_glass.closed", "expired", REASON)
    assert gate.window is None


def test_reset_closes_and_a_new_reason_starts_a_new_window(engine: Engine) -> None:
    gate, _, clock = _gate(engine)
    first = _allowed(gate.check_statement("SET pgwarden.reason = 'CS-1'", extended=True))
    prepared = Prepared(first.policy_version, "SELECT 1", "SELECT 1")
    clock.now += 300
    again = _allowed(gate.check_statement("SET pgwarden.reason = 'CS-2'", extended=False))
    assert [e for e, _ in again.events] == ["break_glass.closed", "break_glass.opened"]
    assert gate.window is not None
    assert gate.window.until == clock.now + 600
    refused = gate.check_bind(prepared, counted=False)  # prepared in the first window
    assert isinstance(refused, PgWardenError)
    assert "break-glass opened or ended" in refused.message
    reset = _allowed(gate.check_statement("RESET pgwarden.reason", extended=False))
    assert [(e, f["why"]) for e, f in reset.events] == [("break_glass.closed", "reset")]
    assert reset.audit is not None
    assert dict(reset.audit.break_glass)["break_glass_reason"] == "CS-2"
    assert gate.window is None


def test_a_reload_that_removes_break_glass_closes_the_window(engine: Engine) -> None:
    gate, source, _ = _gate(engine)
    _allowed(gate.check_statement("SET pgwarden.reason = 'CS-1'", extended=False))
    stripped = POLICY.replace(GLASS, "")
    assert "break_glass" not in stripped
    policy = parse_policy(stripped.encode(), source=Path("p.yaml"))
    source.engine = Engine(policy, engine.snapshot, HASH_KEY.encode())
    after = _allowed(gate.check_statement("SELECT id FROM customers", extended=False))
    assert after.sql is not None
    assert "assignee" in after.sql
    assert [(e, f["why"]) for e, f in after.events] == [("break_glass.closed", "policy")]


# --- end to end through pgwarden ------------------------------------------------------


@pytest.fixture(scope="module")
def bg_proxy(
    bg_db: str, pg: PgServer, pki: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    from conftest import ProxyLauncher  # noqa: PLC0415

    launcher = ProxyLauncher(pg, pki, tmp_path_factory.mktemp("breakglass"))  # type: ignore[arg-type]
    try:
        upstream = {"dsn": f"postgresql://{SVC_USER}@{pg.host}:{pg.port}/{DB}", "tls": "disable"}
        yield launcher(policy_text=POLICY, upstream=upstream, users=USERS)
    finally:
        launcher.stop_all()


def connect(proxy: Proxy, user: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(proxy.dsn(user, USERS[user], dbname=DB), autocommit=True)


def events_of(proxy: Proxy, user: str, event: str) -> list[dict[str, Any]]:
    return [e for e in proxy.events() if e.get("event") == event and e.get("user") == user]


def wait_for(proxy: Proxy, user: str, event: str, count: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while len(found := events_of(proxy, user, event)) < count:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    return found


def test_psycopg_without_a_reason_the_filter_holds_with_one_it_widens(bg_proxy: Proxy) -> None:
    with connect(bg_proxy, "alice") as conn:
        with psycopg.ClientCursor(conn) as simple:
            assert ids(simple.execute("SELECT id FROM customers").fetchall()) == [1, 2]
            # a SET the role may not make changes nothing
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                simple.execute("SET pgwarden.reason = 'CS-1'; SELECT 1")
            assert ids(simple.execute("SELECT id FROM customers").fetchall()) == [1, 2]
            simple.execute(f"SET pgwarden.reason = '{REASON}'")  # simple Query protocol
            rows = simple.execute("SELECT id, full_name, email, phone FROM customers").fetchall()
            assert ids(rows) == ALL
        assert [r[2] for r in sorted(rows)][:2] == ["a***@example.com", "b***@example.com"]
        assert all(str(r[3]).startswith("***") for r in rows)
        shown = conn.execute("SHOW pgwarden.reason").fetchone()  # PostgreSQL holds it too
        assert shown == (REASON,)
        extended = conn.execute("SELECT id FROM customers WHERE id = ANY(%s)", ([3, 6],))
        assert ids(extended.fetchall()) == [3, 6]
        found = conn.execute("SELECT id FROM customers WHERE email = %s", ("fay@example.com",))
        assert ids(found.fetchall()) == [6]  # a look-up of anyone
        conn.execute("RESET pgwarden.reason")  # extended protocol
        assert ids(conn.execute("SELECT id FROM customers").fetchall()) == [1, 2]
        no_raw_values(rows)
    [opened] = wait_for(bg_proxy, "alice", "break_glass.opened")
    assert opened["level"] == "warning"
    assert (opened["reason"], opened["role"], opened["duration_s"]) == (REASON, "agent", 600)
    [closed] = wait_for(bg_proxy, "alice", "break_glass.closed")
    assert (closed["level"], closed["why"]) == ("info", "reset")
    statements = events_of(bg_proxy, "alice", "statement")
    marked = [e.get("break_glass_reason") for e in statements]
    first = marked.index(REASON)
    assert statements[first]["fingerprint"] == "SET pgwarden . reason = ?"
    window = statements[first : first + 6]  # SET, SELECT, SHOW, two look-ups, RESET
    assert [e.get("break_glass_reason") for e in window] == [REASON] * 6
    assert all(e["break_glass"] is True for e in window)
    assert all("break_glass" not in e for e in statements[:first] + statements[first + 6 :])
    no_raw_values(*(e["fingerprint"] for e in statements))


def test_asyncpg_and_the_session_end(bg_proxy: Proxy) -> None:
    async def go() -> tuple[list[int], list[int], list[int]]:
        conn = await asyncpg.connect(bg_proxy.dsn("carol", USERS["carol"], dbname=DB))
        try:
            before = await conn.fetch("SELECT id FROM customers")
            await conn.execute("SET pgwarden.reason = 'CS-0077 chargeback'")  # simple Query
            await conn.fetch("SET pgwarden.reason = 'CS-0077 chargeback'")  # Parse, Bind
            during = await conn.fetch("SELECT id, email FROM customers WHERE id > $1", 0)
            tickets = await conn.fetch("SELECT id FROM support_tickets")
            no_raw_values(during)
            return ids(before), ids(during), ids(tickets)
        finally:
            await conn.close()

    assert asyncio.run(go()) == ([4, 5], ALL, [1, 2, 3, 4, 5])
    closed = wait_for(bg_proxy, "carol", "break_glass.closed", 2)  # the second SET reopened it
    assert [(e["why"], e["reason"]) for e in closed] == [
        ("reopened", "CS-0077 chargeback"),
        ("session_end", "CS-0077 chargeback"),
    ]
    # a new connection starts without break-glass
    with connect(bg_proxy, "carol") as conn:
        assert ids(conn.execute("SELECT id FROM customers").fetchall()) == [4, 5]


def test_the_break_glass_quota_is_separate_and_small(bg_proxy: Proxy, bg_db: str) -> None:
    with connect(bg_proxy, "dave") as conn:
        assert conn.execute("SELECT id FROM customers").fetchall() == []  # no tickets
        conn.execute("SET pgwarden.reason = 'CS-0100 audit'")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as capped:
            conn.execute("SELECT id FROM customers CROSS JOIN generate_series(1, 2)").fetchall()
        assert "10 rows" in str(capped.value)  # the break-glass rows_per_query
        assert ids(conn.execute("SELECT id FROM customers").fetchall()) == ALL  # 6 of 12
        assert ids(conn.execute("SELECT id FROM customers").fetchall()) == ALL  # 12 of 12
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as exhausted:
            conn.execute("SELECT id FROM customers WHERE id = 1").fetchall()
        no_raw_values(capped.value, exhausted.value)
        conn.execute("RESET pgwarden.reason")
        # the normal quota (1000 an hour) was never charged
        assert conn.execute("SELECT id FROM customers").fetchall() == []
    with psycopg.connect(bg_db, autocommit=True) as ledger:
        deadline = time.monotonic() + 10
        while True:
            used = dict(
                ledger.execute(
                    "SELECT usr, sum(rows)::int FROM pgwarden.quota_usage "
                    "WHERE usr LIKE 'dave%%' GROUP BY usr"
                ).fetchall()
            )
            if used or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert used == {"dave#break_glass": 12}


def test_refusals(bg_proxy: Proxy) -> None:
    with (
        connect(bg_proxy, "bob") as conn,  # analyst: no break_glass
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="has no break-glass"),
    ):
        conn.execute(f"SET pgwarden.reason = '{REASON}'")
    with connect(bg_proxy, "erin") as conn:
        for bad in ("' '", "'" + "y" * 201 + "'"):
            with pytest.raises(psycopg.errors.InvalidParameterValue) as caught:
                conn.execute(f"SET pgwarden.reason = {bad}")
            assert "yyy" not in str(caught.value)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="SET LOCAL"):
            conn.execute("SET LOCAL pgwarden.reason = 'CS-1'")
        assert conn.execute("SELECT id FROM customers").fetchall() == []  # still filtered
    assert not events_of(bg_proxy, "erin", "break_glass.opened")
    assert not events_of(bg_proxy, "bob", "break_glass.opened")


def test_the_events_are_documented(bg_proxy: Proxy) -> None:
    with connect(bg_proxy, "erin") as conn:
        conn.execute("SET pgwarden.reason = 'CS-0200 docs'")
        conn.execute("SELECT id FROM customers WHERE id = 1").fetchall()
    wait_for(bg_proxy, "erin", "break_glass.closed")
    doc = documented()  # the table of docs/logging.md, as tests/test_log_events.py reads it
    for event in ("break_glass.opened", "break_glass.closed"):
        level, fields = doc[event]
        for record in [e for e in bg_proxy.events() if e.get("event") == event]:
            assert record["level"] == level, record
            assert fields <= set(record), (event, fields - set(record))


def test_metrics_count_the_windows(bg_proxy: Proxy) -> None:
    import urllib.request  # noqa: PLC0415

    url = f"http://{bg_proxy.host}:{bg_proxy.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text: str = reply.read().decode()
    counts: Mapping[str, float] = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("pgwarden_break_glass_opened_total")
    }
    assert counts.get('pgwarden_break_glass_opened_total{role="agent"}', 0) >= 1
