"""Literal templates (proxy/analysis/template.py): one analysis per statement shape.

Strategy: pure, no database. `shape_of` is checked on which literals it turns
into parameters (value positions only) and which it leaves alone. Then the
property that makes templates safe: over every case of the attack table and a
set of everyday statements, an engine that uses templates gives the same
verdict, row cap, tables and quota counting as an engine that analyses each
text on its own, and when it sends a rewrite, the same rewrite up to how the
literals are spelled.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from security.cases import CASES

from proxy.analysis.catalog import Snapshot
from proxy.analysis.engine import Engine, Evaluation
from proxy.analysis.template import filler_of, shape_of
from proxy.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
POLICY = load_policy(ROOT / "policies" / "example.yaml")
SNAPSHOT = Snapshot.from_json((ROOT / "policies" / "shop.schema.json").read_text())
KEY = b"template-test-key"

# Raw-looking values for the attack table's placeholders (no database here).
VALUES = {
    "email": "ann.lee@example.com",
    "email2": "bo.kim@example.org",
    "email4": "ann.",
    "email_local": "ann.lee",
    "phone": "+1-555-0107",
    "phone2": "+1-555-0112",
    "phone7": "55-0107",
    "name": "Ann Lee",
    "street": "1 Main Street",
    "pan": "4111111111111111",
}

EVERYDAY = [
    "SELECT id, full_name, email, phone FROM customers WHERE email = 'a@example.com'",
    "SELECT id, full_name FROM customers WHERE phone = '+1-555-0100' OR email = 'b@x.org'",
    "SELECT ticket_no, subject, status FROM support_tickets WHERE customer_id = 42",
    "SELECT t.ticket_no FROM support_tickets t JOIN customers c ON c.id = t.customer_id "
    "WHERE c.email = 'c@example.com' AND t.status <> 'closed' ORDER BY t.ticket_no",
    "SELECT id, total FROM orders WHERE customer_id IN (1, 2, 3) AND total > 10.5",
    "SELECT id FROM customers WHERE full_name LIKE 'Ann%' ORDER BY id LIMIT 10",
    "SELECT count(*) FROM customers WHERE email = 'd@example.com'",
    "SELECT id FROM customers WHERE id = -3 AND email = 'e@example.com'",
    "SELECT 'é' AS x, id FROM customers WHERE full_name = 'Zoë Ünal'",
    "SELECT id FROM customers WHERE email = 'x' UNION SELECT customer_id FROM orders WHERE id = 5",
]


@pytest.mark.parametrize(
    ("sql", "template", "literals"),
    [
        ("SELECT a FROM t WHERE e = 'x'", "SELECT a FROM t WHERE e = $1", ("'x'",)),
        ("SELECT a FROM t WHERE 'x' = e", "SELECT a FROM t WHERE $1 = e", ("'x'",)),
        (
            "SELECT a FROM t WHERE i IN (1, 2) AND f >= 2.5 AND s LIKE E'a%'",
            "SELECT a FROM t WHERE i IN ($1, $2) AND f >= $3 AND s LIKE $4",
            ("1", "2", "2.5", "E'a%'"),
        ),
        (
            "SELECT a FROM t WHERE n = -3 AND e = 'x'",
            "SELECT a FROM t WHERE n = -3 AND e = $1",
            ("'x'",),
        ),
        ("SELECT 'é' FROM t WHERE b = 'ü'", "SELECT 'é' FROM t WHERE b = $1", ("'ü'",)),
        (
            "SELECT a FROM t WHERE e = $$x$$ LIMIT 5",
            "SELECT a FROM t WHERE e = $1 LIMIT 5",
            ("$$x$$",),
        ),
    ],
)
def test_value_literals_become_parameters(
    sql: str, template: str, literals: tuple[str, ...]
) -> None:
    shape = shape_of(sql)
    assert shape is not None
    assert (shape.template, shape.literals) == (template, literals)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",  # no value position
        "SELECT a FROM t LIMIT 5",  # LIMIT decides the row cap's rewrite: not a value
        "SELECT a FROM t WHERE a = 'customers'::regclass",  # a cast: the value may name things
        "SELECT a FROM t WHERE a = lower('X')",  # a function argument
        "SELECT set_config('jit', 'off', false)",
        "SELECT a FROM t WHERE a = NULL",  # NULL and booleans stay as they are
        "SELECT a FROM t WHERE a = true",
        "SELECT a FROM t WHERE a = $1 AND b = 'x'",  # already has parameters
        "SELECT a FROM t WHERE e = 'x'; SELECT 2",  # several statements
        "DECLARE c CURSOR FOR SELECT a FROM t WHERE e = 'x'",  # not a SELECT
        "SET statement_timeout = '5s'",
        "SELECT a FROM t WHERE 1 = 1",  # no column on the other side
        "SELECT a FROM t WHERE i IN (1, lower('x'))",  # not a list of constants
        "SELECT a FROM",  # does not parse
    ],
)
def test_other_literals_are_left_alone(sql: str) -> None:
    assert shape_of(sql) is None


def test_a_rewrite_is_split_around_its_parameters_only() -> None:
    filler = filler_of(
        "SELECT a FROM (SELECT a FROM t WHERE e = $2) s WHERE x = $1 AND y = '$1'", 2
    )
    assert filler is not None
    assert filler.fill(("'A'", "'B'")) == (
        "SELECT a FROM (SELECT a FROM t WHERE e = 'B') s WHERE x = 'A' AND y = '$1'"
    )
    assert filler_of("SELECT a FROM t WHERE e = $3", 2) is None  # a parameter it cannot fill


def statements() -> list[tuple[str, str]]:
    out = [(role, sql) for role in ("support", "analyst") for sql in EVERYDAY]
    out.extend(
        (role, case.render(VALUES))
        for case in CASES
        for role in ("support", "analyst")
        if case.expectation(role, "psycopg") is not None
    )
    return out


def same_up_to_literals(templated: Evaluation, alone: Evaluation) -> bool:
    """The verdicts agree on everything that matters; the texts may quote literals apart."""
    return (
        templated.allowed,
        templated.cap,
        templated.classified,
        templated.tables,
        templated.masked,
        templated.truncate,
        templated.sqlstate,
    ) == (
        alone.allowed,
        alone.cap,
        alone.classified,
        alone.tables,
        alone.masked,
        alone.truncate,
        alone.sqlstate,
    )


def who(role: str) -> str:
    """A member of `role`: its row filters name the user (example.yaml's support role)."""
    return sorted(POLICY.roles[role].members)[0]


def test_templates_never_change_a_verdict() -> None:
    templated = Engine(POLICY, SNAPSHOT, KEY)
    used = 0
    for role, sql in statements():
        alone = Engine(POLICY, SNAPSHOT, KEY)._evaluate(role, sql, extended=False, user=who(role))
        for _ in range(2):  # the first builds the template, the second reuses it
            verdict = templated.evaluate(role, sql, user=who(role))
            templated._cache.clear()  # every text goes through the template path again
            assert same_up_to_literals(verdict, alone), (role, sql, verdict, alone)
        used += shape_of(sql) is not None
    assert used > 100  # the property was exercised, not vacuous
    assert templated._templates  # and templates were built


def test_a_template_is_reused_for_new_literals() -> None:
    engine = Engine(POLICY, SNAPSHOT, KEY)
    first = engine.evaluate(
        "support", "SELECT id, email FROM customers WHERE email = 'a@x.org'", user="alice"
    )
    misses = engine.misses
    second = engine.evaluate(
        "support", "SELECT id, email FROM customers WHERE email = 'b@y.org'", user="alice"
    )
    assert engine.misses == misses  # no new analysis
    assert first.sql is not None
    assert second.sql == first.sql.replace("'a@x.org'", "'b@y.org'")
