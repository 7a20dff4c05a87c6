"""The policy engine as a pure function: SQL in, verdict and rewritten SQL out.

Fixture pairs in the style of sqlglot's tests: readable SQL -> verdict, run against a
schema snapshot read from the real test database. The rewritten text is then run on
PostgreSQL directly (as the service account) to check what the masks produce; the
end-to-end path through pgwarden and real clients is tests/security/.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import HASH_KEY, SVC_PASSWORD, SVC_USER, TEST_POLICY
from pglast import ast

from proxy.analysis.catalog import Snapshot
from proxy.analysis.engine import Engine
from proxy.analysis.masks import hash_value, hmac_pads, mask_sql
from proxy.analysis.rewrite_errors import Refusal
from proxy.analysis.roles import RoleView
from proxy.analysis.verify import Verifier
from proxy.net.catalog import read_snapshot
from proxy.pgserver import PgServer
from proxy.policy import parse_policy
from proxy.policy.model import ColumnRule

KEY = HASH_KEY.encode()


async def _snapshot(dsn: str) -> Snapshot:
    conn = await asyncpg.connect(dsn)
    try:
        return await read_snapshot(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def snapshot(pg: PgServer) -> Snapshot:
    return asyncio.run(_snapshot(pg.dsn(SVC_USER, SVC_PASSWORD, dbname="shop")))


@pytest.fixture(scope="module")
def engine(snapshot: Snapshot) -> Engine:
    policy = parse_policy(TEST_POLICY.encode(), source=Path("policy.yaml"))
    return Engine(policy, snapshot, KEY)


@pytest.fixture(scope="module")
def db(pg: PgServer) -> Iterator[Any]:
    """Runs SQL on the shop database as the service account, synchronously."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(pg.dsn(SVC_USER, SVC_PASSWORD, dbname="shop")))

    def fetch(sql: str, *args: object) -> list[tuple[Any, ...]]:
        """The rows as a client of pgwarden gets them: without the hidden record keys."""
        rows = loop.run_until_complete(conn.fetch(sql, *args))
        return [tuple(v for k, v in r.items() if not k.startswith("__pgw_rk")) for r in rows]

    yield fetch
    loop.run_until_complete(conn.close())
    loop.close()


ALLOWED = [
    ("support", "SELECT id, full_name, email, phone FROM customers WHERE email = 'x@example.com'"),
    ("support", "SELECT id FROM customers WHERE phone IN ('+1-555-0000003', $1)"),
    ("support", "SELECT c.id FROM customers AS c WHERE c.email = $1 OR c.phone = $2"),
    (
        "support",
        "SELECT t.ticket_no, t.body FROM support_tickets t "
        "JOIN customers c ON c.id = t.customer_id",
    ),
    ("support", "SELECT status, count(*) FROM support_tickets GROUP BY status"),
    (
        "support",
        "SELECT c.id, array_agg(t.ticket_no) FROM customers c JOIN support_tickets t "
        "ON t.customer_id = c.id GROUP BY c.id",
    ),
    ("support", "SELECT string_agg(status, ',') FROM orders o JOIN support_tickets s ON true"),
    ("support", "SELECT count(*) FROM customers"),
    ("support", "SELECT row_to_json(t) FROM support_tickets t WHERE t.id = 1"),
    ("support", "SELECT row_to_json(o) FROM orders o JOIN customers c ON c.id = o.customer_id"),
    ("support", "WITH recent AS (SELECT * FROM orders) SELECT count(*) FROM recent"),
    (
        "support",
        "SELECT * FROM orders o "
        "WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id)",
    ),
    ("support", "SELECT 1; SELECT 2"),
    ("support", "BEGIN"),
    ("support", "SET application_name = 'desk'"),
    ("support", "SHOW server_version"),
    ("support", "RESET ALL"),
    ("support", "DECLARE cur CURSOR FOR SELECT id, email FROM customers"),
    ("support", "FETCH 10 FROM cur"),
    ("support", "SELECT c.relname FROM pg_catalog.pg_class c WHERE pg_table_is_visible(c.oid)"),
    ("support", "SELECT table_name FROM information_schema.columns"),
    ("support", "SELECT /* a /* nested */ comment */ id FROM customers"),
    ("support", 'SELECT U&"e\\006dail" FROM customers'),
    ("analyst", "SELECT count(DISTINCT email) FROM customers"),
    ("analyst", "SELECT pan FROM payment_cards"),
    ("dba", "SELECT * FROM payment_cards"),
    ("dba", "DO $$ BEGIN END $$"),
]

REFUSED = [
    ("support", "SELECT street FROM customers", "42501", 'column "street"'),
    ("support", "SELECT * FROM customers", "42501", 'column "street"'),
    ("support", "SELECT c.* FROM customers c", "42501", 'column "street"'),
    ("support", "SELECT c FROM customers c", "42501", 'column "street"'),
    ("support", "SELECT 1 FROM customers NATURAL JOIN (SELECT 'x' AS street) s", "42501", "street"),
    (
        "support",
        "SELECT 1 FROM customers JOIN (SELECT 'x' AS street) s USING (street)",
        "42501",
        "street",
    ),
    ("support", "SELECT row_to_json(c) FROM customers c", "42501", 'column "street"'),
    ("support", "SELECT (c).street FROM customers c", "42501", 'column "street"'),
    ("support", "SELECT customers FROM customers", "42501", 'column "street"'),
    ("support", "SELECT id FROM customers ORDER BY street", "42501", 'column "street"'),
    ("support", "SELECT * FROM customers AS c(a, b, c, d, e)", "42501", 'column "street"'),
    ("support", "SELECT pan FROM payment_cards", "42501", "public.payment_cards"),
    (
        "support",
        "SELECT id FROM orders UNION SELECT customer_id FROM payment_cards",
        "42501",
        "payment_cards",
    ),
    ("support", "DELETE FROM orders", "42501", "DELETE"),
    ("support", "WITH x AS (DELETE FROM orders RETURNING id) SELECT * FROM x", "42501", "DELETE"),
    ("support", "WITH x AS (UPDATE orders SET total = 0 RETURNING 1) SELECT 1", "42501", "UPDATE"),
    ("support", "UPDATE customers SET email = 'x'", "42501", "UPDATE"),
    ("support", "SELECT set_config('search_path', 'x', false)", "42501", "set_config"),
    ("support", "SELECT pg_sleep(1)", "42501", "pg_sleep"),
    ("support", "SELECT pg_read_file('/etc/passwd')", "42501", "pg_read_file"),
    ("support", "SELECT query_to_xml('select 1', true, true, '')", "42501", "query_to_xml"),
    ("support", "SELECT * FROM pg_stats", "42501", "pg_stats"),
    ("support", "SELECT * FROM pg_catalog.pg_statistic", "42501", "pg_statistic"),
    ("support", "SELECT query FROM pg_stat_activity", "42501", "pg_stat_activity"),
    ("support", "SET search_path = pg_temp, public", "42501", "search_path"),
    ("support", "SET ROLE postgres", "42501", "role"),
    ("support", "SET SESSION AUTHORIZATION postgres", "42501", "session_authorization"),
    ("support", "SET standard_conforming_strings = off", "42501", "standard_conforming_strings"),
    ("support", "SELECT 1; SELECT street FROM customers", "42501", "street"),
    ("support", "DO $$ BEGIN END $$", "42501", "DO"),
    ("support", "EXPLAIN SELECT 1", "42501", "EXPLAIN"),
    ("support", "PREPARE p AS SELECT 1", "42501", "PREPARE"),
    ("support", "COPY customers TO STDOUT", "42501", "COPY"),
    ("support", "COPY orders TO '/tmp/x'", "42501", "server file"),
    ("support", "CREATE TEMP TABLE customers (id int)", "42501", "CREATE"),
    ("support", "WITH customers AS (SELECT 1) SELECT * FROM customers", "42501", "name of a table"),
    ("support", "SELECT * FROM pg_temp.customers", "42501", "pg_temp.customers"),
    ("support", "SELECT * FROM nosuch", "42501", "unknown"),
    ("support", "SELECT __pgw_x FROM orders", "42501", "reserved"),
    ("support", "SELECT email FROM customers FOR UPDATE", "42501", "FOR UPDATE"),
    ("support", "SELECT id INTO newtable FROM orders", "42501", "SELECT INTO"),
    ("support", "SELEC 1", "42601", "could not be parsed"),
    ("support", "SELECT (" * 2000 + "1" + ")" * 2000, "42601", ""),
    ("analyst", "UPDATE orders SET total = 0", "42501", "UPDATE"),
    ("support", "SELECT string_agg(email, ',') FROM customers", "42501", "string_agg"),
    ("support", "SELECT array_agg(t) FROM support_tickets t", "42501", "array_agg"),
    (
        "support",
        "SELECT jsonb_agg(x.e) FROM (SELECT email AS e FROM customers) x",
        "42501",
        "jsonb_agg",
    ),
    ("support", "SELECT ARRAY(SELECT phone FROM customers)", "42501", "ARRAY(subquery)"),
    ("analyst", "SELECT json_agg(pan) FROM payment_cards", "42501", "json_agg"),
]


@pytest.mark.parametrize(("role", "sql"), ALLOWED, ids=[f"{r}:{s[:40]}" for r, s in ALLOWED])
def test_allowed(engine: Engine, role: str, sql: str) -> None:
    result = engine.evaluate(role, sql)
    assert result.allowed, result.message


@pytest.mark.parametrize(
    ("role", "sql", "sqlstate", "mentions"),
    REFUSED,
    ids=[f"{r}:{s[:40]}" for r, s, _, _ in REFUSED],
)
def test_refused(engine: Engine, role: str, sql: str, sqlstate: str, mentions: str) -> None:
    result = engine.evaluate(role, sql)
    assert not result.allowed
    assert result.sqlstate == sqlstate
    assert result.message.startswith("pgwarden: ")
    assert mentions in result.message


def test_refusals_never_echo_a_literal(engine: Engine) -> None:
    for sql in [
        "SELECT street FROM customers WHERE email = 'secret-literal-1'",
        "SELECT pg_sleep(1), 'secret-literal-1'",
        "SELEC 'secret-literal-1'",
    ]:
        result = engine.evaluate("support", sql)
        assert "secret-literal-1" not in result.message + result.hint


def test_the_client_text_never_reaches_the_database(engine: Engine) -> None:
    result = engine.evaluate("support", "SELECT /* note */ id FROM orders")
    assert result.sql is not None
    assert "note" not in result.sql
    assert "public.orders" in result.sql  # relations are written schema-qualified


def test_unrestricted_text_is_forwarded_unchanged(engine: Engine) -> None:
    result = engine.evaluate("dba", "SELECT 1")
    assert result.allowed
    assert result.sql is None


def test_masks_as_postgresql_computes_them(engine: Engine, db: Any) -> None:
    raw = db("SELECT id, full_name, email, phone FROM customers WHERE id = 7")[0]
    result = engine.evaluate(
        "support", "SELECT id, full_name, email, phone FROM customers WHERE id = 7"
    )
    assert result.sql is not None
    masked = db(result.sql)[0]
    local, domain = raw[2].split("@")
    assert masked == (7, raw[1], f"{local[0]}***@{domain}", "***" + raw[3][-4:])


EMAIL_EDGES = [
    "john@example.com", "@example.com", "a@b@c", "no-at-sign", "a", "", "@", "a@", "@@",
    "\u00e9l\u00e8ve@\u00e9cole.fr", "\U0001f600x@y", "line\nbreak@x", " x@y", "ab",
]  # fmt: skip


def test_the_email_mask_is_the_regular_expression_it_replaces(db: Any) -> None:
    """The mask's CASE form gives exactly REGEXP_REPLACE(c, '^(.)[^@]*', '\\1***')."""
    rule = ColumnRule(action="mask", mask="email")
    mask = mask_sql(rule, "v", "text", None)
    values = db("SELECT email FROM customers") + [(v,) for v in [*EMAIL_EDGES, None]]
    was = "REGEXP_REPLACE(CAST(v AS TEXT), '^(.)[^@]*', '\\1***')"
    sql = f"SELECT {mask}, {was} FROM unnest($1::text[]) AS t(v)"  # noqa: S608 - our own SQL
    rows = db(sql, [v for (v,) in values])
    assert len(rows) == len(values) > 100
    assert [now for now, _ in rows] == [was for _, was in rows]


@pytest.mark.parametrize(
    ("sql", "raw"),
    [
        ("SELECT id FROM customers WHERE email = ANY($1)", "SELECT 2"),
        (
            "SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id "
            "AND c.email = ANY($1)",
            "SELECT count(*) FROM orders WHERE customer_id IN (4, 5)",
        ),
    ],
)
def test_lookup_by_any_of_an_array_parameter(engine: Engine, db: Any, sql: str, raw: str) -> None:
    emails = [r[0] for r in db("SELECT email FROM customers WHERE id IN (4, 5)")]
    result = engine.evaluate("support", sql)
    assert result.sql is not None
    assert result.lookups == 1
    assert len(db(result.sql, emails)) == db(raw)[0][0]


def test_lookup_finds_by_the_raw_value_and_shows_the_mask(engine: Engine, db: Any) -> None:
    email, phone = db("SELECT email, phone FROM customers WHERE id = 11")[0]
    sql = "SELECT id, email FROM customers WHERE email = $1 OR phone IN ($2, 'none')"
    result = engine.evaluate("support", sql)
    assert result.sql is not None
    assert result.lookups == 2
    rows = db(result.sql, email, phone)
    assert rows == [(11, email[0] + "***@" + email.split("@")[1])]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM customers WHERE email = 'x@example.com'",
        "SELECT id FROM customers WHERE email = 'x@example.com' OR phone = '1' OR id = 2",
        "SELECT o.id FROM orders o LEFT JOIN customers c ON c.id = o.customer_id "
        "WHERE c.email = 'x@example.com'",
    ],
)
def test_lookup_uses_the_index(engine: Engine, db: Any, sql: str) -> None:
    result = engine.evaluate("support", sql)
    assert result.sql is not None
    db("SET enable_seqscan = off")  # 200 rows: the planner would rightly prefer a scan
    try:
        plan = "\n".join(r[0] for r in db("EXPLAIN " + result.sql))
    finally:
        db("RESET enable_seqscan")
    assert "Seq Scan" not in plan, plan
    assert "customers_email_key" in plan, plan


def test_redact_keeps_the_type(engine: Engine, db: Any) -> None:
    result = engine.evaluate("support", "SELECT body FROM support_tickets LIMIT 1")
    assert result.sql is not None
    assert db(result.sql) == [(None,)]


def test_hash_is_keyed_hmac(engine: Engine, db: Any) -> None:
    email = db("SELECT email FROM customers WHERE id = 3")[0][0]
    result = engine.evaluate("analyst", "SELECT email FROM customers WHERE id = 3")
    assert result.sql is not None
    assert db(result.sql) == [(hash_value(email, KEY),)]
    inner, outer = hmac_pads(KEY)
    assert KEY.hex() not in result.sql  # only the pads travel, never the key itself
    assert inner in result.sql
    assert outer in result.sql


def test_cache_hits_and_bounds(snapshot: Snapshot) -> None:
    policy = parse_policy(TEST_POLICY.encode(), source=Path("policy.yaml"))
    small = Engine(policy, snapshot, KEY, cache_size=2)
    for sql in ["SELECT 1", "SELECT 1", "SELECT 2", "SELECT 3", "SELECT 1"]:
        small.evaluate("support", sql)
    assert (small.hits, small.misses) == (1, 4)


def test_forbidden_fields_name_every_protected_column(engine: Engine, snapshot: Snapshot) -> None:
    customers = snapshot.resolve("public", "customers")
    assert customers is not None
    attnums = {c.name: c.attnum for c in customers.columns}
    fields = engine.forbidden_fields("support")
    assert {(customers.oid, attnums[c]) for c in ("email", "phone", "street")} <= fields
    assert (customers.oid, attnums["full_name"]) not in fields  # allowed for support
    assert (customers.oid, attnums["id"]) not in fields


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email FROM public.customers",
        "SELECT * FROM (SELECT email AS x FROM public.customers) c",
        "SELECT * FROM (SELECT id FROM public.customers WHERE email > 'x') c",
        "SELECT * FROM (SELECT id FROM public.customers WHERE NOT email = 'x') c",
        "SELECT * FROM (SELECT id FROM public.customers WHERE street = 'x') c",
        "SELECT 1 FROM public.orders WHERE customer_id IN "
        "(SELECT id FROM public.customers WHERE email > 'x')",
        "SELECT 1 FROM public.orders WHERE customer_id IN "
        "(SELECT id FROM public.customers WHERE street = 'x')",
        "SELECT * FROM (SELECT regexp_replace(CAST(email AS TEXT), '^(.)', '\\1') AS e "
        "FROM public.customers) c",
        "SELECT * FROM public.customers c JOIN public.orders o ON true",
        "SELECT * FROM orders",
    ],
)
def test_the_verifier_rejects_unmasked_reads(snapshot: Snapshot, sql: str) -> None:
    # The second opinion on its own: whatever the rewrite produced, these never pass.
    policy = parse_policy(TEST_POLICY.encode(), source=Path("policy.yaml"))
    with pytest.raises(Refusal):
        Verifier(RoleView(policy, policy.roles["support"], KEY), snapshot).check_text(sql)


def test_an_analysis_bug_fails_closed(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: object, root: object) -> object:
        raise KeyError("secret-literal-2")

    monkeypatch.setattr("proxy.analysis.engine.Rewriter.run", broken)
    result = engine.evaluate("support", "SELECT id FROM orders WHERE id = 12345")
    assert not result.allowed
    assert result.internal == "KeyError"
    assert "secret-literal-2" not in result.message + result.hint


def test_a_builtin_name_shadowed_by_a_user_function_must_be_qualified(snapshot: Snapshot) -> None:
    # public.lower(integer) would win over pg_catalog.lower(text) for lower(1).
    shadowed = Snapshot.of(snapshot.relations.values(), user_functions=["lower"])
    policy = parse_policy(TEST_POLICY.encode(), source=Path("policy.yaml"))
    engine = Engine(policy, shadowed, KEY)
    refused = engine.evaluate("support", "SELECT lower(full_name) FROM customers")
    assert not refused.allowed
    assert "pg_catalog.lower" in refused.hint
    assert engine.evaluate("support", "SELECT pg_catalog.lower(full_name) FROM customers").allowed


def test_snapshot_json_round_trips(snapshot: Snapshot) -> None:
    again = Snapshot.from_json(snapshot.to_json())
    assert again.relations == snapshot.relations
    assert again.user_functions == snapshot.user_functions
    assert again.search_path == snapshot.search_path


def test_the_verifier_holds_the_statement_kind(snapshot: Snapshot) -> None:
    policy = parse_policy(TEST_POLICY.encode(), source=Path("policy.yaml"))
    verifier = Verifier(RoleView(policy, policy.roles["support"], KEY), snapshot)
    verifier.check_text("SELECT id FROM public.orders", ast.SelectStmt)
    with pytest.raises(Refusal, match="turned a SelectStmt into a DeleteStmt"):
        verifier.check_text("DELETE FROM public.orders", ast.SelectStmt)


CLERK_POLICY = TEST_POLICY.replace(
    "  dba:\n",
    """  clerk:
    members: [clerk1]
    statements: [select, insert, update, delete, copy_out, copy_in, utility]
    tables: [public.customers, public.orders, public.support_tickets]
    columns:
      name: allow
      email: {mask: email, lookup: equality}
      phone: last4
      address: deny
      free_text: redact
  dba:
""",
)


@pytest.fixture(scope="module")
def clerk(snapshot: Snapshot) -> Engine:
    return Engine(parse_policy(CLERK_POLICY.encode(), source=Path("clerk.yaml")), snapshot, KEY)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO customers (full_name, email, phone, street) VALUES ('a', 'b', 'c', 'd')",
        "UPDATE orders SET total = total WHERE id = 0",
        "DELETE FROM orders WHERE id = 0",
        "UPDATE orders o SET total = o.total FROM customers c WHERE c.id = o.customer_id "
        "AND c.email = 'x'",
        "INSERT INTO orders (customer_id, total, created_at) "
        "SELECT id, 1, now() FROM customers WHERE email = 'nobody@example.com'",
        "COPY orders FROM STDIN",
        "COPY (SELECT id, email FROM customers WHERE id < 3) TO STDOUT",
        "LISTEN desk",
        "NOTIFY desk",
    ],
)
def test_other_statement_kinds_when_granted(clerk: Engine, sql: str) -> None:
    result = clerk.evaluate("clerk", sql)
    assert result.allowed, result.message


@pytest.mark.parametrize(
    ("sql", "mentions"),
    [
        ("INSERT INTO customers (full_name) VALUES ('a') RETURNING email", "RETURNING"),
        ("UPDATE customers SET full_name = 'x' WHERE email LIKE 'a%'", "UPDATE"),
        ("DELETE FROM customers WHERE id = 1", "DELETE"),
        ("COPY customers TO STDOUT", "street"),
        ("COPY customers TO PROGRAM 'cat'", "program"),
        ("COPY orders FROM '/etc/passwd'", "server file"),
        ("COPY orders FROM STDIN WHERE total > 0", "WHERE"),
    ],
)
def test_other_statement_kinds_keep_the_masks(clerk: Engine, sql: str, mentions: str) -> None:
    result = clerk.evaluate("clerk", sql)
    assert not result.allowed
    assert mentions in result.message


def test_copy_out_of_a_table_is_masked(clerk: Engine, db: Any) -> None:
    result = clerk.evaluate("clerk", "COPY customers (id, email) TO STDOUT")
    assert result.sql is not None
    assert result.sql.startswith("COPY (SELECT")
    select = result.sql.removeprefix("COPY (").rsplit(") TO STDOUT", 1)[0]
    rows = db(select + " ORDER BY 1 LIMIT 2")
    raw = db("SELECT id, email FROM customers ORDER BY 1 LIMIT 2")
    assert rows == [(i, e[0] + "***@" + e.split("@")[1]) for i, e in raw]


def test_fetch_counts_against_quotas_and_caps_come_with_the_verdict(engine: Engine) -> None:
    fetch = engine.evaluate("support", "FETCH 10 FROM c")
    assert fetch.classified  # a cursor's query is not known here: its rows always count
    assert engine.evaluate("support", "SELECT id FROM customers").classified
    orders = engine.evaluate("support", "SELECT id FROM orders")
    assert not orders.classified
    assert orders.cap == 50
    assert orders.sql is not None
    assert orders.sql.endswith("LIMIT 51")


def test_cursors_carry_their_name_for_the_relay(engine: Engine) -> None:
    declare = engine.evaluate("support", "DECLARE c CURSOR FOR SELECT id FROM orders")
    assert declare.cursor == ("c", True)
    assert declare.sql is not None
    assert declare.sql.endswith("LIMIT 51")  # the relay sums FETCHes: cap+1 shows a crossing
    assert engine.evaluate("support", "FETCH 10 FROM c").cursor == ("c", False)
    inline = engine.evaluate("support", "BEGIN; DECLARE d CURSOR FOR SELECT id FROM orders")
    assert inline.cursor is None  # not tracked inside a longer Query: cut at the cap instead
    assert inline.sql is not None
    assert inline.sql.endswith("LIMIT 50")
