"""Everyday support work through pgwarden, with exact expected answers.

Strategy: a support agent (role support, user sec_alice) does what the job needs:
finds a caller by e-mail or phone, reads their tickets and orders, counts, pages,
filters by date, uses transactions, cursors, prepared statements and psql's \\d.
Each answer is compared with the raw data read directly as the service account and
masked here in the test, so the tests state the masking rules of TEST_POLICY:

    email  first character of the local part, '***', '@', the domain
    phone  '***' and the last four characters
    body   NULL
    street never returned (not asked for here)

Every query runs with psycopg (simple protocol) and with asyncpg (extended), and
every answer also passes the leak check. Lookups find rows by the raw value while
the row that comes back carries the masked one.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from conftest import Proxy

from proxy.pgserver import quote_literal

from .clients import (
    CLIENTS,
    AsyncRunner,
    Session,
    SessionPool,
    canonical,
    psycopg_query,
    rows_difference,
)
from .conftest import EVERYDAY_USER, SEC_PASSWORDS, Forbidden, psql_path

CALLER, OTHER = 7, 12  # customer ids; 7 has no card, both have orders
UTC = dt.UTC


def mask_email(raw: str) -> str:
    local, _, domain = raw.partition("@")
    return f"{local[0]}***@{domain}"


def mask_last4(raw: str) -> str:
    return "***" + raw[-4:]


@dataclass(frozen=True)
class Customer:
    id: int
    full_name: str
    email: str
    phone: str

    def __repr__(self) -> str:  # never the values
        return f"Customer({self.id})"

    @property
    def masked(self) -> tuple[int, str, str, str]:
        """(id, full_name, email, phone) as support sees them."""
        return (self.id, self.full_name, mask_email(self.email), mask_last4(self.phone))


@pytest.fixture(scope="module")
def customers(shop_direct: psycopg.Connection[Any]) -> dict[int, Customer]:
    rows = shop_direct.execute("SELECT id, full_name, email, phone FROM customers").fetchall()
    return {int(r[0]): Customer(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows}


@pytest.fixture(scope="module")
def sessions(sec_proxy: Proxy, runner: AsyncRunner) -> Iterator[SessionPool]:
    pool = SessionPool(
        {"agent": sec_proxy.dsn(EVERYDAY_USER, SEC_PASSWORDS[EVERYDAY_USER])}, runner
    )
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=CLIENTS)
def agent(request: pytest.FixtureRequest, sessions: SessionPool) -> Iterator[Session]:
    session = sessions.get("agent", request.param)
    try:
        yield session
    finally:
        session.settle()


@pytest.fixture
def support(forbidden: dict[str, Forbidden]) -> Forbidden:
    return forbidden["support"]


class Agent:
    """Runs one statement, checks for leaks, and fails with its SQLSTATE if refused."""

    def __init__(self, session: Session, support: Forbidden) -> None:
        self.session = session
        self.support = support

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        outcome = self.session.run(sql, *params)
        self.support.assert_no_leak(outcome.texts, f"everyday query via {self.session.client}")
        if outcome.error is not None:
            pytest.fail(f"refused via {self.session.client}: {outcome.error.summary()}")
        return [tuple(canonical(v) for v in row) for row in outcome.rows]


@pytest.fixture
def run(agent: Session, support: Forbidden) -> Agent:
    return Agent(agent, support)


def expect_rows(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]], what: str) -> None:
    problem = rows_difference(got, want)
    if problem:
        pytest.fail(f"{what}: {problem}")


def direct(conn: psycopg.Connection[Any], sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """The raw answer, straight from the database as the service account."""
    return [tuple(row) for row in conn.execute(psycopg_query(sql, params), params or None)]


# --- finding the caller ---------------------------------------------------------------------


def test_lookup_by_email(run: Agent, customers: dict[int, Customer]) -> None:
    caller = customers[CALLER]
    got = run.rows(
        "SELECT id, full_name, email, phone FROM customers"  # noqa: S608 - a quoted literal
        f" WHERE email = {quote_literal(caller.email)}"
    )
    expect_rows(got, [caller.masked], "customer by e-mail")


def test_lookup_by_phone(run: Agent, customers: dict[int, Customer]) -> None:
    caller = customers[CALLER]
    got = run.rows(
        "SELECT id, full_name, email, phone FROM customers"  # noqa: S608 - a quoted literal
        f" WHERE phone = {quote_literal(caller.phone)}"
    )
    expect_rows(got, [caller.masked], "customer by phone")


def test_lookup_email_in_list(run: Agent, customers: dict[int, Customer]) -> None:
    listed = ", ".join(
        quote_literal(v)
        for v in (customers[OTHER].email, "nobody@example.com", customers[CALLER].email)
    )
    got = run.rows(
        f"SELECT id, full_name, email, phone FROM customers WHERE email IN ({listed}) ORDER BY id"  # noqa: S608 - quoted literals
    )
    expect_rows(got, [customers[CALLER].masked, customers[OTHER].masked], "e-mail IN (...)")


def test_lookup_email_parameter(run: Agent, customers: dict[int, Customer]) -> None:
    sql = "SELECT id, full_name, email, phone FROM customers WHERE email = $1"
    expect_rows(run.rows(sql, customers[CALLER].email), [customers[CALLER].masked], "email = $1")


def test_lookup_phone_parameter(run: Agent, customers: dict[int, Customer]) -> None:
    sql = "SELECT id, full_name, email, phone FROM customers WHERE phone = $1"
    expect_rows(run.rows(sql, customers[OTHER].phone), [customers[OTHER].masked], "phone = $1")


def test_lookup_two_parameters_in_list(run: Agent, customers: dict[int, Customer]) -> None:
    sql = "SELECT id, email FROM customers WHERE email IN ($1, $2) ORDER BY id"
    got = run.rows(sql, customers[OTHER].email, customers[CALLER].email)
    want = [(c.id, mask_email(c.email)) for c in (customers[CALLER], customers[OTHER])]
    expect_rows(got, want, "email IN ($1, $2)")


def test_lookup_email_or_phone(run: Agent, customers: dict[int, Customer]) -> None:
    caller, other = customers[CALLER], customers[OTHER]
    got = run.rows(
        "SELECT id, full_name, email, phone FROM customers"  # noqa: S608 - quoted literals
        f" WHERE email = {quote_literal(caller.email)}"
        f" OR phone = {quote_literal(other.phone)} ORDER BY id"
    )
    expect_rows(got, [caller.masked, other.masked], "email = ... OR phone = ...")


def test_lookup_email_and_phone(run: Agent, customers: dict[int, Customer]) -> None:
    caller, other = customers[CALLER], customers[OTHER]
    sql = "SELECT id, email, phone FROM customers WHERE email = $1 AND phone = $2"
    both = (caller.id, mask_email(caller.email), mask_last4(caller.phone))
    expect_rows(run.rows(sql, caller.email, caller.phone), [both], "matching email AND phone")
    expect_rows(run.rows(sql, caller.email, other.phone), [], "email AND someone else's phone")


def test_lookup_of_unknown_email_finds_nothing(run: Agent) -> None:
    got = run.rows("SELECT id FROM customers WHERE email = 'nobody@example.com'")
    expect_rows(got, [], "unknown e-mail")


def test_lookup_by_masked_value_finds_nothing(run: Agent, customers: dict[int, Customer]) -> None:
    """The lookup is on the raw value: typing the masked one back finds nobody."""
    got = run.rows("SELECT id FROM customers WHERE email = $1", mask_email(customers[CALLER].email))
    expect_rows(got, [], "lookup by the masked e-mail")


def test_name_search(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    sql = "SELECT id, full_name FROM customers WHERE full_name ILIKE 'alice%' ORDER BY id LIMIT 5"
    want = direct(shop_direct, sql)
    assert want, "the shop data has customers called Alice"
    expect_rows(run.rows(sql), want, "full_name ILIKE")


# --- tickets and orders ------------------------------------------------------------------------


def test_tickets_of_a_customer(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    raw = direct(
        shop_direct,
        "SELECT ticket_no, subject, status FROM support_tickets WHERE customer_id = $1"
        " ORDER BY ticket_no",
        CALLER,
    )
    assert raw, "customer 7 has tickets"
    got = run.rows(
        "SELECT ticket_no, subject, status, body FROM support_tickets WHERE customer_id = $1"
        " ORDER BY ticket_no",
        CALLER,
    )
    expect_rows(got, [(*row, None) for row in raw], "tickets, body redacted to NULL")


def test_tickets_by_caller_email(
    run: Agent, shop_direct: psycopg.Connection[Any], customers: dict[int, Customer]
) -> None:
    tickets = "SELECT t.ticket_no, t.status FROM support_tickets t"
    joined = " JOIN customers c ON c.id = t.customer_id WHERE c.email = $1 ORDER BY t.ticket_no"
    want = direct(shop_direct, tickets + joined, customers[CALLER].email)
    assert want
    expect_rows(run.rows(tickets + joined, customers[CALLER].email), want, "tickets by e-mail")


def test_ticket_by_number_with_caller(
    run: Agent, shop_direct: psycopg.Connection[Any], customers: dict[int, Customer]
) -> None:
    raw = direct(
        shop_direct,
        "SELECT ticket_no, status, customer_id FROM support_tickets"
        " WHERE ticket_no = 'TKT-0000005'",
    )
    assert len(raw) == 1
    caller = customers[int(raw[0][2])]
    got = run.rows(
        "SELECT t.ticket_no, t.status, c.full_name, c.email, c.phone, t.body"
        " FROM support_tickets t JOIN customers c ON c.id = t.customer_id"
        " WHERE t.ticket_no = 'TKT-0000005'"
    )
    want = (*raw[0][:2], caller.full_name, mask_email(caller.email), mask_last4(caller.phone), None)
    expect_rows(got, [want], "ticket with its caller")


def test_orders_of_a_customer(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    sql = "SELECT id, total, created_at FROM orders WHERE customer_id = $1 ORDER BY id"
    want = direct(shop_direct, sql, CALLER)
    assert want, "customer 7 has orders"
    expect_rows(run.rows(sql, CALLER), want, "orders of a customer")


def test_order_totals_per_customer(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    sql = (
        "SELECT customer_id, count(*), sum(total) FROM orders WHERE customer_id IN (7, 12)"
        " GROUP BY customer_id ORDER BY customer_id"
    )
    want = direct(shop_direct, sql)
    assert len(want) == 2
    expect_rows(run.rows(sql), want, "order totals")


def test_ticket_counts_per_status(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    sql = "SELECT status, count(*) FROM support_tickets GROUP BY status ORDER BY status"
    want = direct(shop_direct, sql)
    assert [row[0] for row in want] == ["closed", "open", "pending", "solved"]
    expect_rows(run.rows(sql), want, "tickets per status")


def test_customer_overview(
    run: Agent, shop_direct: psycopg.Connection[Any], customers: dict[int, Customer]
) -> None:
    counts = (
        "SELECT (SELECT count(*) FROM support_tickets t WHERE t.customer_id = c.id),"
        " (SELECT count(*) FROM orders o WHERE o.customer_id = c.id)"
        " FROM customers c WHERE c.id = $1"
    )
    (tickets, orders) = direct(shop_direct, counts, CALLER)[0]
    got = run.rows(
        "SELECT c.id, c.full_name, c.email, c.phone,"
        " (SELECT count(*) FROM support_tickets t WHERE t.customer_id = c.id),"
        " (SELECT count(*) FROM orders o WHERE o.customer_id = c.id)"
        " FROM customers c WHERE c.email = $1",
        customers[CALLER].email,
    )
    expect_rows(got, [(*customers[CALLER].masked, tickets, orders)], "customer overview")


def test_customers_tickets_orders_join(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    sql = (
        "SELECT c.id, c.full_name, t.ticket_no, o.id, o.total FROM customers c"
        " JOIN support_tickets t ON t.customer_id = c.id"
        " JOIN orders o ON o.customer_id = c.id"
        " WHERE c.id = $1 ORDER BY t.ticket_no, o.id"
    )
    want = direct(shop_direct, sql, CALLER)
    assert want
    expect_rows(run.rows(sql, CALLER), want, "customers-tickets-orders join")


# --- paging, dates, functions ------------------------------------------------------------------


def test_newest_customers_page(run: Agent, customers: dict[int, Customer]) -> None:
    got = run.rows("SELECT id, full_name, email, phone FROM customers ORDER BY id DESC LIMIT 5")
    newest = sorted(customers, reverse=True)[:5]
    expect_rows(got, [customers[i].masked for i in newest], "ORDER BY id DESC LIMIT 5")


def test_customer_page_by_id_range(run: Agent, customers: dict[int, Customer]) -> None:
    got = run.rows(
        "SELECT id, full_name, email, phone FROM customers"
        " WHERE id BETWEEN 10 AND 19 ORDER BY id LIMIT 10 OFFSET 2"
    )
    expect_rows(got, [customers[i].masked for i in range(12, 20)], "a page of customers")


def test_tickets_of_one_day(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    sql = (
        "SELECT ticket_no, subject, status, created_at FROM support_tickets"
        " WHERE created_at >= '2024-01-03' AND created_at < '2024-01-04' ORDER BY ticket_no"
    )
    want = direct(shop_direct, sql)
    assert 0 < len(want) <= 50
    expect_rows(run.rows(sql), want, "tickets of 3 January 2024")


def test_tickets_between_parameter_dates(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    sql = (
        "SELECT ticket_no, status FROM support_tickets"
        " WHERE created_at >= $1 AND created_at < $2 ORDER BY created_at"
    )
    start, end = dt.datetime(2024, 1, 2, 6, tzinfo=UTC), dt.datetime(2024, 1, 2, 18, tzinfo=UTC)
    want = direct(shop_direct, sql, start, end)
    assert want
    expect_rows(run.rows(sql, start, end), want, "tickets between two timestamps")


def test_orders_before_a_date(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    sql = "SELECT count(*), sum(total), min(created_at) FROM orders WHERE created_at < '2024-01-02'"
    expect_rows(run.rows(sql), direct(shop_direct, sql), "orders before a date")


def test_functions_see_masked_values(run: Agent, customers: dict[int, Customer]) -> None:
    caller = customers[CALLER]
    got = run.rows(
        "SELECT lower(email), upper(full_name), length(phone), coalesce(email, '')"
        " FROM customers WHERE id = $1",
        CALLER,
    )
    masked = mask_email(caller.email)
    want = (masked.lower(), caller.full_name.upper(), len(mask_last4(caller.phone)), masked)
    expect_rows(got, [want], "functions over masked columns")


def test_count_customers(run: Agent) -> None:
    expect_rows(run.rows("SELECT count(*) FROM customers"), [(200,)], "count(*)")


# --- session work --------------------------------------------------------------------------------


def test_transaction_commit(agent: Session, run: Agent, customers: dict[int, Customer]) -> None:
    run.rows("BEGIN")
    assert not agent.idle()
    got = run.rows("SELECT id, email FROM customers WHERE id = $1", CALLER)
    run.rows("COMMIT")
    assert agent.idle()
    expect_rows(got, [(CALLER, mask_email(customers[CALLER].email))], "inside BEGIN/COMMIT")


def test_transaction_rollback_and_savepoint(agent: Session, run: Agent) -> None:
    run.rows("BEGIN")
    run.rows("SAVEPOINT before_lookup")
    expect_rows(run.rows("SELECT count(*) FROM orders"), [(400,)], "in a savepoint")
    run.rows("ROLLBACK TO SAVEPOINT before_lookup")
    run.rows("RELEASE SAVEPOINT before_lookup")
    run.rows("ROLLBACK")
    assert agent.idle()


def test_cursor_declare_and_fetch(
    agent: Session, run: Agent, customers: dict[int, Customer]
) -> None:
    run.rows("BEGIN")
    run.rows("DECLARE page CURSOR FOR SELECT id, email FROM customers WHERE id <= 10 ORDER BY id")
    first, second = run.rows("FETCH 5 FROM page"), run.rows("FETCH 5 FROM page")
    run.rows("CLOSE page")
    run.rows("COMMIT")
    want = [(i, mask_email(customers[i].email)) for i in range(1, 11)]
    expect_rows(first + second, want, "DECLARE/FETCH")
    assert agent.idle()


def test_set_application_name(run: Agent) -> None:
    run.rows("SET application_name = 'support-desk'")
    expect_rows(run.rows("SHOW application_name"), [("support-desk",)], "SHOW after SET")
    run.rows("RESET application_name")


def test_session_settings(run: Agent) -> None:
    run.rows("SET extra_float_digits = 3")
    run.rows("SET statement_timeout = '5s'")
    expect_rows(run.rows("SHOW statement_timeout"), [("5s",)], "statement_timeout")
    run.rows("RESET statement_timeout")
    run.rows("RESET extra_float_digits")


def test_show_server_version(run: Agent, shop_direct: psycopg.Connection[Any]) -> None:
    want = direct(shop_direct, "SHOW server_version")
    expect_rows(run.rows("SHOW server_version"), want, "SHOW server_version")


def test_prepared_statement_reused(
    agent: Session, support: Forbidden, customers: dict[int, Customer]
) -> None:
    """One prepared statement, 20 executions (asyncpg conn.prepare; psycopg prepare=True)."""
    sql = "SELECT id, full_name, email, phone FROM customers WHERE id = $1"
    outcomes = agent.run_prepared(sql, [(i,) for i in range(1, 21)])
    assert len(outcomes) == 20
    for n, outcome in enumerate(outcomes, start=1):
        support.assert_no_leak(outcome.texts, f"prepared execution {n} via {agent.client}")
        if outcome.error is not None:
            pytest.fail(f"execution {n} via {agent.client}: {outcome.error.summary()}")
        rows = [tuple(canonical(v) for v in row) for row in outcome.rows]
        expect_rows(rows, [customers[n].masked], f"prepared execution {n}")


# --- psql ----------------------------------------------------------------------------------


def run_psql(sec_proxy: Proxy, command: str) -> subprocess.CompletedProcess[str]:
    env = sec_proxy.env(EVERYDAY_USER, SEC_PASSWORDS[EVERYDAY_USER], PGSSLMODE="disable")
    return subprocess.run(
        [str(psql_path()), "-X", "-c", command],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def check_psql(done: subprocess.CompletedProcess[str], support: Forbidden, what: str) -> None:
    support.assert_no_leak([("psql stdout", done.stdout), ("psql stderr", done.stderr)], what)
    assert done.returncode == 0, f"{what}: psql exited {done.returncode}: {done.stderr[-500:]}"


def test_psql_describe_customers(sec_proxy: Proxy, support: Forbidden) -> None:
    done = run_psql(sec_proxy, r"\d customers")
    check_psql(done, support, r"psql \d customers")
    assert 'Table "public.customers"' in done.stdout
    for column in ("id", "full_name", "email", "phone", "street"):
        lines = [line.split("|")[0].strip() for line in done.stdout.splitlines() if "|" in line]
        assert column in lines, f"column {column} missing from \\d customers"


def test_psql_list_tables(sec_proxy: Proxy, support: Forbidden) -> None:
    done = run_psql(sec_proxy, r"\dt")
    check_psql(done, support, r"psql \dt")
    for table in ("customers", "support_tickets", "orders"):
        assert f" {table} " in done.stdout, f"{table} missing from \\dt"


def test_psql_list_functions(sec_proxy: Proxy, support: Forbidden) -> None:
    done = run_psql(sec_proxy, r"\df")
    check_psql(done, support, r"psql \df")
    assert "List of functions" in done.stdout
