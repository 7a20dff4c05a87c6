"""Row filters (`row_filter`): a support agent sees exactly the customers of their open tickets.

The tests use their own database, `rowfilter`, on the session's PostgreSQL (the demo
shop has no ticket assignee): six customers, tickets assigned to alice and carol.
alice has open tickets for customers 1 and 2 and a closed one for 3; carol has open
tickets for 4 and 5; customer 6 has none. Engine-level cases walk the attack
surface (aggregates, joins from an unfiltered table, subqueries, EXISTS, look-ups,
error oracles, COPY, cursors); end-to-end cases go through a real pgwarden with
psycopg (simple and extended protocol, a server-side cursor) and asyncpg.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from conftest import HASH_KEY, PASSWORDS, SVC_USER, Proxy, client_rows, engine_for, fresh_database

from proxy.analysis.engine import Engine
from proxy.pgserver import PgServer
from proxy.policy import PolicyError, parse_policy

Launcher = Callable[..., Proxy]
DB = "rowfilter"

SCHEMA = """
CREATE TABLE customers (
    id integer PRIMARY KEY, full_name text NOT NULL, email text NOT NULL, phone text NOT NULL
);
CREATE TABLE support_tickets (
    id integer PRIMARY KEY, customer_id integer NOT NULL REFERENCES customers,
    ticket_no text NOT NULL, body text, status text NOT NULL, assignee text NOT NULL
);
CREATE TABLE orders (id integer PRIMARY KEY, customer_id integer NOT NULL, total numeric);
INSERT INTO customers VALUES
  (1, 'Ann One', 'ann@example.com', '+1 555 000 0001'),
  (2, 'Ben Two', 'ben@example.com', '+1 555 000 0002'),
  (3, 'Cid Three', 'cid@example.com', '+1 555 000 0003'),
  (4, 'Dee Four', 'dee@example.com', '+1 555 000 0004'),
  (5, 'Eli Five', 'eli@example.com', '+1 555 000 0005'),
  (6, 'Fay Six', 'fay@example.com', '+1 555 000 0006');
INSERT INTO support_tickets VALUES
  (1, 1, 'T-1', 'call Ann', 'open', 'alice'),
  (2, 2, 'T-2', 'call Ben', 'pending', 'alice'),
  (3, 3, 'T-3', 'call Cid', 'closed', 'alice'),
  (4, 4, 'T-4', 'call Dee', 'open', 'carol'),
  (5, 5, 'T-5', 'call Eli', 'open', 'carol');
INSERT INTO orders SELECT i, 1 + i % 6, i * 10 FROM generate_series(1, 30) AS i;
"""

POLICY = """\
version: 1
classify:
  public.customers: {full_name: name, email: email, phone: phone}
  public.support_tickets: {body: free_text}
roles:
  agent:
    members: [alice, carol]
    statements: [select, copy_out]
    tables: [public.customers, public.support_tickets, public.orders]
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
    limits: {rows_per_query: 50}
  analyst:
    members: [bob, dora]
    statements: [select]
    tables: [public.*]
    columns: {"*": {mask: hash, per_user: true}}
"""

ALICE = [1, 2]
CAROL = [4, 5]


@pytest.fixture(scope="module")
def rowfilter_db(pg: PgServer) -> str:
    return fresh_database(pg, DB, SCHEMA)


@pytest.fixture(scope="module")
def engine(rowfilter_db: str) -> Engine:
    return engine_for(rowfilter_db, POLICY)


def run_as(engine: Engine, dsn: str, user: str, sql: str) -> list[tuple[object, ...]]:
    """What `user` (role agent) gets: the engine's rewrite, run as the service account."""
    verdict = engine.evaluate("agent", sql, user=user)
    assert verdict.allowed, verdict.message
    assert verdict.sql is not None
    with psycopg.connect(dsn, autocommit=True) as conn:
        return client_rows(conn.execute(verdict.sql.encode()))


def ids(rows: list[tuple[object, ...]]) -> list[object]:
    return sorted(r[0] for r in rows)


# --- the engine over the attack surface ------------------------------------------------


@pytest.mark.parametrize(("user", "expected"), [("alice", ALICE), ("carol", CAROL)])
def test_an_agent_sees_exactly_the_customers_of_their_open_tickets(
    engine: Engine, rowfilter_db: str, user: str, expected: list[int]
) -> None:
    assert ids(run_as(engine, rowfilter_db, user, "SELECT id FROM customers")) == expected
    star = run_as(engine, rowfilter_db, user, "SELECT * FROM customers ORDER BY id")
    assert [r[0] for r in star] == expected
    assert all(str(r[2]).endswith("@example.com") and "***" in str(r[2]) for r in star)


@pytest.mark.parametrize(
    ("sql", "alice"),
    [
        ("SELECT count(*) FROM customers", [2]),
        ("SELECT count(*) FROM customers WHERE id = 6", [0]),
        ("SELECT max(id) FROM customers", [2]),
        # a join from a filtered table to an unfiltered one
        (
            "SELECT DISTINCT o.customer_id FROM orders o JOIN customers c ON c.id = o.customer_id",
            ALICE,
        ),
        # subqueries, EXISTS, IN, a scalar subquery, a WITH query, a set operation
        (
            "SELECT id FROM orders WHERE customer_id IN (SELECT id FROM customers) AND id < 7",
            [1, 6],
        ),
        ("SELECT 1 FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = 6)", []),
        ("SELECT (SELECT count(*) FROM customers)", [2]),
        ("WITH x AS (SELECT id FROM customers) SELECT id FROM x", ALICE),
        ("SELECT id FROM customers UNION SELECT 6", [*ALICE, 6]),
        (
            "SELECT id FROM customers c "
            "WHERE NOT EXISTS (SELECT 1 FROM customers d WHERE d.id < c.id)",
            [1],
        ),
        # look-ups: a filtered-out customer is not found, pushed down or as a semi-join
        ("SELECT id FROM customers WHERE email = 'fay@example.com'", []),
        ("SELECT id FROM customers WHERE email = 'ann@example.com'", [1]),
        ("SELECT id FROM customers WHERE email = 'cid@example.com' OR id = 2", [2]),
        (
            "SELECT c.id FROM support_tickets t LEFT JOIN customers c ON c.id = t.customer_id "
            "AND c.email = 'cid@example.com' WHERE c.id IS NOT NULL",
            [],
        ),
        ("SELECT id FROM customers WHERE phone IN ('+1 555 000 0006', '+1 555 000 0002')", [2]),
        # the ticket filter: alice's tickets only, closed ones included
        ("SELECT id FROM support_tickets", [1, 2, 3]),
        ("SELECT count(*) FROM support_tickets t JOIN customers c ON c.id = t.customer_id", [2]),
    ],
)
def test_no_filtered_row_leaks(
    engine: Engine, rowfilter_db: str, sql: str, alice: list[int]
) -> None:
    assert ids(run_as(engine, rowfilter_db, "alice", sql)) == alice


@pytest.mark.parametrize(
    "condition",
    [
        "1 / ({c}id - 6) > -100",  # divides by zero on customer 6 only
        "CASE WHEN {c}full_name = 'Fay Six' THEN 1 / ({c}id - {c}id) ELSE 1 END = 1",
        "CAST(CASE WHEN {c}id = 3 THEN 'x' ELSE '1' END AS integer) = 1",
    ],
)
def test_errors_never_see_filtered_rows(engine: Engine, rowfilter_db: str, condition: str) -> None:
    # The derived table is fenced (OFFSET 0): PostgreSQL cannot evaluate the client's
    # condition before the filter, so no error can tell that customer 6 or 3 exists.
    alone = condition.format(c="")
    rows = run_as(engine, rowfilter_db, "alice", "SELECT id FROM customers WHERE " + alone)  # noqa: S608 - test conditions
    assert ids(rows) == ALICE
    on_c = condition.format(c="c.")
    joined = "SELECT c.id FROM orders o JOIN customers c ON c.id = o.customer_id WHERE " + on_c  # noqa: S608 - test conditions
    assert set(ids(run_as(engine, rowfilter_db, "alice", joined))) == set(ALICE)


def test_copy_and_cursors_are_filtered(engine: Engine, rowfilter_db: str) -> None:
    copy = engine.evaluate("agent", "COPY customers (id, email) TO STDOUT", user="carol")
    declared = engine.evaluate(
        "agent", "DECLARE c CURSOR FOR SELECT id FROM customers", user="carol"
    )
    assert copy.allowed
    assert declared.allowed
    assert copy.sql is not None
    assert declared.sql is not None
    with psycopg.connect(rowfilter_db) as conn, conn.cursor() as cur:
        with cur.copy(copy.sql.encode()) as out:
            text = b"".join(bytes(chunk) for chunk in out).decode()
        assert [line.split("\t")[0] for line in text.splitlines()] == ["4", "5"]
        cur.execute(declared.sql.encode())
        assert ids(client_rows(cur.execute(b"FETCH ALL FROM c"))) == CAROL


def test_the_filter_follows_the_user(engine: Engine) -> None:
    alice = engine.evaluate("agent", "SELECT id FROM customers", user="alice")
    carol = engine.evaluate("agent", "SELECT id FROM customers", user="carol")
    assert alice.sql is not None
    assert carol.sql is not None
    assert "'alice'" in alice.sql
    assert "'carol'" in carol.sql
    assert alice.filtered == ("public.customers",)
    nobody = engine.evaluate("agent", "SELECT id FROM customers")
    assert not nobody.allowed
    assert "needs a user" in nobody.message
    # templates are per user too: the same shape with other literals
    first = engine.evaluate("agent", "SELECT id FROM customers WHERE id = 1", user="alice")
    again = engine.evaluate("agent", "SELECT id FROM customers WHERE id = 2", user="carol")
    assert again.sql is not None
    assert "'carol'" in again.sql
    assert "'alice'" not in again.sql
    assert first.sql is not None
    assert "'alice'" in first.sql


def test_user_names_are_quoted_never_spliced(rowfilter_db: str, engine: Engine) -> None:
    policy = parse_policy(
        POLICY.replace("members: [alice, carol]", 'members: [alice, "o\'hara"]').encode(),
        source=Path("p.yaml"),
    )
    quoted = Engine(policy, engine.snapshot, HASH_KEY.encode())
    verdict = quoted.evaluate("agent", "SELECT id FROM customers", user="o'hara")
    assert verdict.allowed
    assert verdict.sql is not None
    assert "'o''hara'" in verdict.sql


def test_writes_to_a_filtered_table_are_refused(engine: Engine) -> None:
    policy = parse_policy(
        POLICY.replace("statements: [select, copy_out]", "statements: [all]").encode(),
        source=Path("p.yaml"),
    )
    writer = Engine(policy, engine.snapshot, HASH_KEY.encode())
    for sql in ("UPDATE orders SET total = 0", "DELETE FROM orders WHERE id = 1"):
        verdict = writer.evaluate("agent", sql.replace("orders", "support_tickets"), user="alice")
        assert not verdict.allowed, sql
        assert "row filter" in verdict.message or "protected" in verdict.message


@pytest.mark.parametrize(
    ("row_filter", "message"),
    [
        (
            "id IN (SELECT customer_id FROM public.support_tickets WHERE",
            "not a valid SQL condition",
        ),
        ("SELECT 1", "must be a condition"),
        ("assignee = :someone", "unknown placeholder"),
        ("id = $1", "parameters"),
    ],
)
def test_filters_are_parsed_at_load(row_filter: str, message: str) -> None:
    text = POLICY.replace(
        'public.support_tickets: "assignee = :user"', f"public.support_tickets: {row_filter!r}"
    )
    text = text.replace(f"{row_filter!r}", '"' + row_filter.replace('"', '\\"') + '"')
    with pytest.raises(PolicyError) as caught:
        parse_policy(text.encode(), source=Path("p.yaml"))
    assert any(
        "row_filter.public.support_tickets" in e and message in e for e in caught.value.errors
    )
    assert all(e.startswith("p.yaml:") for e in caught.value.errors)


def test_a_filter_on_a_table_the_role_lacks_is_an_error() -> None:
    text = POLICY.replace('public.support_tickets: "assignee = :user"', 'public.payments: "true"')
    with pytest.raises(PolicyError, match="not one of the role's tables"):
        parse_policy(text.encode(), source=Path("p.yaml"))


def test_a_filter_that_does_not_match_the_schema_refuses(engine: Engine) -> None:
    policy = parse_policy(
        POLICY.replace('assignee = :user"', 'owner = :user"').encode(), source=Path("p.yaml")
    )
    broken = Engine(policy, engine.snapshot, HASH_KEY.encode())
    verdict = broken.evaluate("agent", "SELECT ticket_no FROM support_tickets", user="alice")
    assert not verdict.allowed
    assert "row filter" in verdict.message
    assert '"owner"' in verdict.message
    assert broken.evaluate("agent", "SELECT id FROM orders", user="alice").allowed


def test_check_resolves_filters_against_the_schema(rowfilter_db: str, tmp_path: Path) -> None:
    from proxy.cli import main  # noqa: PLC0415 - the command line, as a user runs it

    good = tmp_path / "good.yaml"
    good.write_text(POLICY)
    assert main(["check", str(good), "--schema", rowfilter_db]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        POLICY.replace('assignee = :user"', 'owner = :user"').replace(
            "WHERE assignee", "WHERE assigned_to"
        )
    )
    assert main(["check", str(bad), "--schema", rowfilter_db]) == 1


# --- end to end through pgwarden ---------------------------------------------------------


@pytest.fixture(scope="module")
def filtered_proxy(
    rowfilter_db: str, pg: PgServer, pki: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    from conftest import ProxyLauncher  # noqa: PLC0415

    launcher = ProxyLauncher(pg, pki, tmp_path_factory.mktemp("rowfilter"))  # type: ignore[arg-type]
    try:
        upstream = {"dsn": f"postgresql://{SVC_USER}@{pg.host}:{pg.port}/{DB}", "tls": "disable"}
        yield launcher(policy_text=POLICY, upstream=upstream)
    finally:
        launcher.stop_all()


def connect(proxy: Proxy, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(user, PASSWORDS[user], dbname=DB), autocommit=True)


@pytest.mark.parametrize(("user", "expected"), [("alice", ALICE), ("carol", CAROL)])
def test_psycopg_simple_and_extended_protocol(
    filtered_proxy: Proxy, user: str, expected: list[int]
) -> None:
    with connect(filtered_proxy, user) as conn:
        with psycopg.ClientCursor(conn) as simple:  # simple Query protocol
            assert ids(simple.execute("SELECT id FROM customers").fetchall()) == expected
            count = simple.execute("SELECT count(*) FROM customers").fetchone()
            assert count is not None
            assert count[0] == 2
        extended = conn.execute(
            "SELECT id FROM customers WHERE id = ANY(%s)", ([1, 2, 3, 4, 5, 6],)
        )
        assert ids(extended.fetchall()) == expected
        prepared = "SELECT id FROM customers WHERE email = %s"
        for email in ("ann@example.com", "dee@example.com", "fay@example.com"):
            found = ids(conn.execute(prepared, (email,), prepare=True).fetchall())
            mine = {"alice": "ann", "carol": "dee"}[user]
            assert found == (
                [expected[0] if user == "alice" else 4] if email.startswith(mine) else []
            )
        # an error oracle on a filtered-out row (customer 6) stays silent
        assert (
            ids(conn.execute("SELECT id FROM customers WHERE 1 / (id - 6) > -100").fetchall())
            == expected
        )


def test_server_side_cursor(filtered_proxy: Proxy) -> None:
    with (
        connect(filtered_proxy, "carol") as conn,
        conn.transaction(),
        conn.cursor(name="rf") as cur,
    ):
        cur.itersize = 1
        cur.execute("SELECT id, email FROM customers ORDER BY id")
        rows = list(cur)
    assert [r[0] for r in rows] == CAROL
    assert [r[1] for r in rows] == ["d***@example.com", "e***@example.com"]


def test_asyncpg(filtered_proxy: Proxy) -> None:
    async def go() -> tuple[list[int], int, list[int]]:
        conn = await asyncpg.connect(filtered_proxy.dsn("alice", PASSWORDS["alice"], dbname=DB))
        try:
            rows = await conn.fetch("SELECT id FROM customers WHERE id = ANY($1::int[])", [3, 6, 1])
            count = await conn.fetchval("SELECT count(*) FROM support_tickets")
            async with conn.transaction():
                cursor = [
                    r["id"] async for r in conn.cursor("SELECT id FROM customers", prefetch=1)
                ]
            return sorted(r["id"] for r in rows), count, sorted(cursor)
        finally:
            await conn.close()

    assert asyncio.run(go()) == ([1], 3, ALICE)
