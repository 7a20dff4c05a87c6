"""Attacks on the policy, end to end: every case of cases.py through pgwarden.

Strategy: each case runs as role support, and the analyst subset as role analyst,
with psycopg 3 (simple Query protocol) and with asyncpg (extended protocol), on one
connection per (role, client) for the whole module. For every run:

1. nothing the role must not see raw came back, anywhere (rows, error fields,
   notices): Forbidden.assert_no_leak;
2. the outcome is the one the case expects (cases.py explains OK, ANY, REFUSED,
   DENIED, BLOCKED); a refusal of pgwarden's own carries a contract SQLSTATE, a
   HINT, and for a policy refusal nothing of the statement string ran;
3. for oracle cases as support: if pgwarden let the statement through, its answer
   equals the same statement's answer over a masked replica of the data;
4. the session goes on: it is idle and answers SELECT 1 exactly as it did when it
   was new (today a restricted role's SELECT 1 is refused; the sanity case
   select-1 is what requires it to run).

Failure messages name the case, the role and the client, and describe outcomes by
SQLSTATE, counts and positions, never by value.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import PASSWORDS, Proxy

from .cases import BLOCKED, CASES, DENIED, OK, REFUSED, Case
from .clients import (
    CLIENTS,
    PGWARDEN_SQLSTATES,
    AsyncRunner,
    Outcome,
    Session,
    SessionPool,
    difference,
    probe,
)
from .conftest import ROLE_USERS, SEC_PASSWORDS, Forbidden, ShopValues

ROW_CAP = 50  # support's rows_per_query in TEST_POLICY
POLICY_SQLSTATES = ("42501", "42601")  # refusals that must come before anything runs


def _params(role: str) -> list[object]:
    return [
        pytest.param(role, case, client, id=f"{role}-{case.param_id}-{client}")
        for case in CASES
        for client in CLIENTS
        if case.expectation(role, client) is not None
    ]


@pytest.fixture(scope="module")
def pool(sec_proxy: Proxy, runner: AsyncRunner, other_schema: str) -> Iterator[SessionPool]:
    """One session per (role, client) through this suite's pgwarden."""
    dsns = {role: sec_proxy.dsn(user, SEC_PASSWORDS[user]) for role, user in ROLE_USERS.items()}
    sessions = SessionPool(dsns, runner)
    try:
        yield sessions
    finally:
        sessions.close()


@pytest.fixture(scope="module")
def oracle(oracle_dsn: str, runner: AsyncRunner) -> Iterator[SessionPool]:
    """Direct sessions on the masked replica (see conftest)."""
    sessions = SessionPool({"oracle": oracle_dsn}, runner)
    try:
        yield sessions
    finally:
        sessions.close()


def check_expectation(outcome: Outcome, expect: str, label: str) -> None:
    """The outcome is what `expect` (cases.py) allows; pgwarden's errors keep the contract."""
    error = outcome.error
    if error is not None and error.by_pgwarden:
        if error.sqlstate not in PGWARDEN_SQLSTATES:
            pytest.fail(f"{label}: pgwarden answered {error.summary()}, not a contract SQLSTATE")
        if error.sqlstate in POLICY_SQLSTATES:
            if not error.hint:
                pytest.fail(f"{label}: pgwarden's refusal {error.summary()} has no HINT")
            if outcome.partial:
                pytest.fail(f"{label}: refused with {error.sqlstate} after part of it ran")
    if expect == OK:
        if error is not None:
            pytest.fail(f"{label}: expected it to run, got {error.summary()}")
        return
    if not expect.startswith(REFUSED):
        return  # ANY
    if error is None:
        pytest.fail(f"{label}: expected a refusal, but it ran ({outcome.summary()})")
    if error.sqlstate is None:
        pytest.fail(f"{label}: expected an ErrorResponse, got {error.summary()}")
    if expect == DENIED and not (error.by_pgwarden and error.sqlstate == "42501"):
        pytest.fail(f"{label}: expected pgwarden's 42501 policy refusal, got {error.summary()}")
    if expect == BLOCKED and not (error.by_pgwarden and error.sqlstate in POLICY_SQLSTATES):
        pytest.fail(f"{label}: expected pgwarden to refuse it (42501/42601), got {error.summary()}")


def check_session_goes_on(pool: SessionPool, role: str, session: Session, label: str) -> None:
    if not session.idle():
        pytest.fail(f"{label}: the session is not idle afterwards (left in a transaction)")
    after = probe(session)
    before = pool.baseline[role, session.client]
    if after != before:
        pytest.fail(f"{label}: afterwards SELECT 1 answers {after}, a new session {before}")


def run_case(
    *,
    case: Case,
    role: str,
    client: str,
    pool: SessionPool,
    oracle: SessionPool,
    forbidden: Forbidden,
    values: ShopValues,
) -> None:
    expect = case.expectation(role, client)
    assert expect is not None
    label = f"{case.param_id} as {role} via {client}"
    sql = case.render(values.values)
    session = pool.get(role, client)
    try:
        outcome = session.run(sql)
        forbidden.assert_no_leak(outcome.texts, label)
        check_expectation(outcome, expect, label)
        refused_by_pgwarden = outcome.error is not None and outcome.error.by_pgwarden
        if case.oracle and role == "support" and not refused_by_pgwarden:
            reference = oracle.get("oracle", client).run(sql)
            problem = difference(outcome, reference)
            if problem:
                pytest.fail(f"{label}: not the answer over masked data: {problem}")
        check_session_goes_on(pool, role, session, label)
    finally:
        session.settle()


@pytest.mark.parametrize(("role", "case", "client"), _params("support") + _params("analyst"))
def test_attack(  # noqa: PLR0917 - pytest passes fixtures by name
    role: str,
    case: Case,
    client: str,
    pool: SessionPool,
    oracle: SessionPool,
    forbidden: dict[str, Forbidden],
    shop_values: ShopValues,
) -> None:
    run_case(
        case=case,
        role=role,
        client=client,
        pool=pool,
        oracle=oracle,
        forbidden=forbidden[role],
        values=shop_values,
    )


# --- the analyst's hashes -------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_analyst_sees_stable_16_hex_hashes(
    client: str, pool: SessionPool, forbidden: dict[str, Forbidden]
) -> None:
    """Every classified column hashed: 16 lowercase hex, stable, distinct per value."""
    session = pool.get("analyst", client)
    sql = (
        "SELECT id, full_name, email, phone, street FROM customers WHERE id IN (7, 12) ORDER BY id"
    )
    first, second = session.run(sql), session.run(sql)
    for outcome in (first, second):
        forbidden["analyst"].assert_no_leak(outcome.texts, f"hash check via {client}")
        check_expectation(outcome, OK, f"hashed customers via {client}")
    assert [row[0] for row in first.rows] == [7, 12]
    hashes = [value for row in first.rows for value in row[1:]]
    assert all(isinstance(h, str) and len(h) == 16 for h in hashes)
    assert all(set(h) <= set("0123456789abcdef") for h in hashes)
    assert len(set(hashes)) == len(hashes), "distinct values hashed alike"
    assert first.rows == second.rows, "the hash is not stable across statements"


@pytest.mark.parametrize("client", CLIENTS)
def test_analyst_joins_and_counts_on_hashes(client: str, pool: SessionPool) -> None:
    """Keyed and stable: count(DISTINCT) and self-joins on a hashed column still work."""
    session = pool.get("analyst", client)
    outcome = session.run(
        "SELECT count(DISTINCT a.email), count(*) FROM customers a"
        " JOIN customers b USING (id) WHERE a.email = b.email"
    )
    check_expectation(outcome, OK, f"joins on hashes via {client}")
    assert outcome.rows == [(200, 200)]


@pytest.mark.parametrize("client", CLIENTS)
def test_analyst_has_no_equality_lookup(
    client: str, pool: SessionPool, shop_values: ShopValues
) -> None:
    """No lookup for analyst: a raw value in WHERE compares with the hash, finds nothing."""
    session = pool.get("analyst", client)
    lookups = {
        "email": "SELECT id FROM customers WHERE email = $1",
        "phone": "SELECT id FROM customers WHERE phone = $1",
        "name": "SELECT id FROM customers WHERE full_name = $1",
    }
    for value, sql in lookups.items():
        outcome = session.run(sql, shop_values.values[value])
        check_expectation(outcome, OK, f"{value} lookup as analyst via {client}")
        if outcome.rows:
            pytest.fail(f"analyst found {len(outcome.rows)} rows by raw {value} via {client}")


# --- the table itself -----------------------------------------------------------------------


def test_case_table_is_rich_enough() -> None:
    families: dict[str, int] = {}
    for case in CASES:
        families[case.family] = families.get(case.family, 0) + 1
    assert len(CASES) >= 160
    assert sum(case.analyst is not None for case in CASES) >= 40
    assert min(families.values()) >= 8, families


def test_oracle_cases_are_valid_on_the_masked_replica(
    oracle: SessionPool, shop_values: ShopValues
) -> None:
    """The table's own check: what support must run does run there, within the row cap.

    Otherwise an OK case would fail for a reason that has nothing to do with pgwarden.
    """
    session = oracle.get("oracle", "psycopg")
    for case in CASES:
        if case.expect != OK and not case.oracle:
            continue
        if "sec_fixture" in case.sql or "pg_" in case.sql:
            continue  # not in the replica, or catalog contents that differ there
        outcome = session.run(case.render(shop_values.values))
        session.settle()
        if case.expect == OK:
            assert outcome.error is None, f"{case.param_id}: {outcome.summary()}"
        if case.expect.startswith(REFUSED):
            assert outcome.error is not None, f"{case.param_id} runs on the replica"
        for result in outcome.results:
            assert result is None or len(result) <= ROW_CAP, f"{case.param_id}: over the cap"


# --- the harness itself -----------------------------------------------------------------------


DETECTOR_PROBES = {
    # what an unrestricted role reads raw: the detector must flag each of these
    "raw email": "SELECT email FROM customers WHERE id = 7",
    "upper-case email": "SELECT upper(email) FROM customers WHERE id = 7",
    "reversed street": "SELECT reverse(street) FROM customers WHERE id = 7",
    "hex email": "SELECT encode(convert_to(email, 'UTF8'), 'hex') FROM customers WHERE id = 7",
    "base64 phone": "SELECT encode(convert_to(phone, 'UTF8'), 'base64') FROM customers"
    " WHERE id = 7",
    "md5 of a body": "SELECT md5(body) FROM support_tickets WHERE id = 1",
    "spaced pan": "SELECT regexp_replace(pan, '(....)', '\\1 ', 'g') FROM payment_cards"
    " WHERE id = 1",
    "phone digits": "SELECT translate(phone, '+-', '') FROM customers WHERE id = 7",
    "email in an error": "SELECT email::int FROM customers WHERE id = 7",
    "body in a notice": "DO $$ BEGIN RAISE NOTICE 'n %', (SELECT body FROM support_tickets"
    " WHERE id = 1); END $$",
    "card in an array": "SELECT array_agg(pan) FROM payment_cards WHERE id <= 2",
}


@pytest.mark.parametrize("probe_name", list(DETECTOR_PROBES))
@pytest.mark.parametrize("client", CLIENTS)
def test_leak_detector_sees_raw_values(
    probe_name: str,
    client: str,
    sec_proxy: Proxy,
    runner: AsyncRunner,
    forbidden: dict[str, Forbidden],
) -> None:
    """Run as dora (unrestricted, pass-through): the detector must flag what comes back."""
    dsn = sec_proxy.dsn("dora", PASSWORDS["dora"])
    sessions = SessionPool({"dba": dsn}, runner)
    try:
        outcome = sessions.get("dba", client).run(DETECTOR_PROBES[probe_name])
    finally:
        sessions.close()
    found = forbidden["support"].leaks(outcome.texts)
    assert found, f"{probe_name} via {client} not flagged"


@pytest.mark.parametrize("client", CLIENTS)
def test_leak_detector_accepts_masked_values(
    client: str, sec_proxy: Proxy, runner: AsyncRunner, forbidden: dict[str, Forbidden]
) -> None:
    """The masks as PRODUCT.md defines them, computed by dora: nothing to flag for support."""
    dsn = sec_proxy.dsn("dora", PASSWORDS["dora"])
    sessions = SessionPool({"dba": dsn}, runner)
    try:
        outcome = sessions.get("dba", client).run(
            "SELECT c.id, full_name, left(email, 1) || '***@' || split_part(email, '@', 2),"
            " '***' || right(phone, 4), ticket_no, subject, status, created_at"
            " FROM customers c JOIN support_tickets t ON t.customer_id = c.id"
        )
    finally:
        sessions.close()
    assert outcome.error is None
    assert len(outcome.rows) == 300
    for_support, for_analyst = (forbidden[r].leaks(outcome.texts) for r in ("support", "analyst"))
    assert for_support == []
    assert for_analyst, "analyst may not see full names"


def test_leak_detector_sees_copy_data(
    sec_proxy: Proxy, runner: AsyncRunner, forbidden: dict[str, Forbidden]
) -> None:
    """psycopg reads COPY TO STDOUT data (asyncpg's fetch drops it: there a COPY that
    pgwarden lets through shows up as a statement that ran where a refusal was due)."""
    sessions = SessionPool({"dba": sec_proxy.dsn("dora", PASSWORDS["dora"])}, runner)
    try:
        outcome = sessions.get("dba", "psycopg").run(
            "COPY (SELECT phone FROM customers WHERE id <= 3) TO STDOUT"
        )
    finally:
        sessions.close()
    found = forbidden["support"].leaks(outcome.texts)
    assert {line.partition(" appeared")[0] for line in found} == {
        f"customers.phone of row id {i} (14 characters)" for i in (1, 2, 3)
    }


@pytest.mark.parametrize("client", CLIENTS)
def test_oracle_tells_raw_from_masked(
    client: str,
    sec_proxy: Proxy,
    runner: AsyncRunner,
    oracle: SessionPool,
    shop_values: ShopValues,
) -> None:
    """The replica comparison catches a LIKE evaluated on raw values (dora's are raw)."""
    sql = "SELECT id FROM customers WHERE email LIKE $1 || '%'"
    prefix = shop_values.values["email4"]
    sessions = SessionPool({"dba": sec_proxy.dsn("dora", PASSWORDS["dora"])}, runner)
    try:
        raw = sessions.get("dba", client).run(sql, prefix)
    finally:
        sessions.close()
    masked = oracle.get("oracle", client).run(sql, prefix)
    assert raw.rows, "customer 7 matches its own prefix"
    assert difference(raw, masked) is not None


def test_the_log_of_the_whole_run_holds_no_protected_value(
    sec_proxy: Proxy, forbidden: dict[str, Forbidden]
) -> None:
    # Runs after the cases above (file order): every statement, refusal and error of
    # the run has been logged by now, with the raw values the attacks typed in.
    text = "\n".join(sec_proxy.log_lines()).lower()
    assert '"event":"statement"' in text
    leaked = [s.describe() for s in forbidden["analyst"].secrets if s.value.lower() in text]
    assert not leaked, leaked[:10]
