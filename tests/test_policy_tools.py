"""`pgwarden schema | explain | test`: the policy tools, run as the command line runs them.

Every test starts `python -m proxy ...` as a subprocess with a clean environment (no
PG* or PGWARDEN_* variables unless the test sets them) and checks its exit code and
output. Offline tests use policies/shop.schema.json; the --schema DSN tests read the
session's PostgreSQL (fixture pg) as the service account.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from conftest import SVC_PASSWORD, SVC_USER

from proxy.analysis.catalog import Snapshot
from proxy.net.server import HASH_KEY_ENV
from proxy.pgserver import PgServer
from proxy.policytools import HASH_KEY_ENV as TOOLS_HASH_KEY_ENV
from proxy.policytools import PLACEHOLDER_NOTE

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "example.yaml"
SCHEMA = ROOT / "policies" / "shop.schema.json"
TESTS = ROOT / "policies" / "example.tests.yaml"
LOOKUP = "SELECT id, email FROM customers WHERE email = 'jane@example.com'"
STREET = "SELECT street FROM customers"


def pgwarden(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGWARDEN_"))}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def explain(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return pgwarden("explain", "-p", str(POLICY), "--schema", str(SCHEMA), *args, env=env)


def write_tests(folder: Path, body: str) -> Path:
    path = folder / "t.tests.yaml"
    path.write_text(f"policy: {POLICY}\nschema: {SCHEMA}\n{body}")
    return path


# --- pgwarden test -------------------------------------------------------------------


def test_the_example_tests_pass() -> None:
    done = pgwarden("test", "policies/example.tests.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    passed, failed = done.stdout.splitlines()[-1].split(", ")
    assert int(passed.split()[0]) >= 40
    assert failed == "0 failed"


def test_a_failing_case_names_file_and_line(tmp_path: Path) -> None:
    path = write_tests(
        tmp_path,
        "cases:\n"
        "  - {role: support, sql: 'SELECT id FROM customers', expect: allow}\n"
        "  - name: street\n"
        "    role: support\n"
        "    sql: SELECT street FROM customers\n"
        "    expect: allow\n"
        "  - {role: support, sql: 'SELECT 1; DELETE FROM orders', expect: refuse,"
        " sqlstate: '42601'}\n"
        "  - {role: support, sql: 'SELECT email FROM customers', expect: allow,"
        " rewritten_contains: [LEFT, no such text]}\n"
        "  - {role: dba, sql: 'SELECT street FROM customers', expect: refuse}\n",
    )
    done = pgwarden("test", str(path))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{path}:5: case street: expected allow, got refuse (42501 ")
    assert lines[1].startswith(f"{path}:9: case #3: expected refuse with 42601, got 42501 (")
    assert lines[2].startswith(f'{path}:10: case #4: rewritten SQL lacks "no such text": ')
    assert lines[3].startswith(f"{path}:11: case #5: expected refuse, got allow (SELECT street")
    assert lines[-1] == "1 passed, 4 failed"


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        ("cases:\n  - {role: support, sql: x, expect: allow, bogus: 1}\n", ":4:", "bogus"),
        ("cases:\n  - {role: nobody, sql: x, expect: allow}\n", ":4:", 'unknown role "nobody"'),
        ("cases:\n  - {role: support, sql: x, expect: deny}\n", ":4:", "allow or refuse"),
        ("cases:\n  - {role: support, sql: x, expect: refuse, sqlstate: 42501}\n", ":4:", "quoted"),
        ("cases:\n  - {role: support, expect: allow}\n", ":4:", "sql: is required"),
        ("cases:\n  - {role: support, sql: [x, expect: allow}\n", ":4:", "invalid YAML"),
        ("cases: []\n", ":3:", "non-empty list"),
        ("extra: 1\ncases:\n  - {role: support, sql: x, expect: allow}\n", ":3:1:", "extra"),
    ],
)
def test_a_malformed_file_is_exit_2_with_line_and_column(
    tmp_path: Path, body: str, where: str, message: str
) -> None:
    path = write_tests(tmp_path, body)
    done = pgwarden("test", str(path))
    assert done.returncode == 2, done.stdout
    first = done.stderr.splitlines()[0]
    assert first.startswith(str(path) + where), first
    assert message in first
    assert first.split(":")[2].isdigit()  # file:line:col


def test_a_tests_file_with_a_bad_policy_reports_the_policy(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\nroles: {}\nextra: 1\n")
    path = tmp_path / "t.tests.yaml"
    path.write_text(
        f"policy: p.yaml\nschema: {SCHEMA}\ncases:\n  - {{role: a, sql: x, expect: allow}}\n"
    )
    done = pgwarden("test", str(path))
    assert done.returncode == 2
    assert f"{tmp_path / 'p.yaml'}:3:1:" in done.stderr


# --- pgwarden explain ------------------------------------------------------------------


def test_explain_an_allowed_statement() -> None:
    done = explain("--role", "support", LOOKUP)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("verdict: allow (role support)\n")
    assert "kinds: select\n" in out
    assert "tables: public.customers\n" in out
    assert "masked: public.customers\n" in out
    assert "  - 1 equality look-up(s) pushed to the raw column\n" in out
    assert "row cap: 50 (reject)\n" in out
    assert "placeholder" not in out  # support hashes nothing
    sql = out.split("\nsql:\n", 1)[1]
    assert "position('@' IN" in sql  # the e-mail mask
    assert "'jane@example.com'" in sql


def test_explain_a_refused_statement() -> None:
    done = explain("--role", "support", STREET)
    assert done.returncode == 1, done.stderr
    out = done.stdout
    # support's row filter names the user (the role's first member), explain says whom
    head = "verdict: refuse (role support)\nuser: alice\nsqlstate: 42501\nmessage: pgwarden: "
    assert out.startswith(head)
    assert "hint: Columns of public.customers your role may use: " in out
    assert "street" in out.split("reasons:", 1)[1]
    assert "\nsql:" not in out


def test_explain_json() -> None:
    allowed = explain("--role", "analyst", "--json", "SELECT email FROM customers")
    assert allowed.returncode == 0
    data = json.loads(allowed.stdout)
    assert data["verdict"] == "allow"
    assert data["sqlstate"] is None
    assert data["masked"] == ["public.customers"]
    assert "SHA256" in data["sql"]
    assert data["row_cap"] == {"rows": 100000, "on_exceed": "reject"}
    assert set(data) >= {"kinds", "tables", "reasons", "message", "hint"}

    refused = explain("--role", "support", "--json", "SELECT pan FROM payment_cards")
    assert refused.returncode == 1
    data = json.loads(refused.stdout)
    assert (data["verdict"], data["sqlstate"], data["sql"]) == ("refuse", "42501", None)
    assert "payment_cards" in data["message"]


def test_explain_shows_no_cap_for_a_catalog_only_statement() -> None:
    done = explain("--role", "support", "SELECT relname FROM pg_class")
    assert "row cap: none (the statement reads only the catalog)\n" in done.stdout
    data = json.loads(explain("--role", "support", "--json", "SELECT relname FROM pg_class").stdout)
    assert data["row_cap"] is None
    capped = json.loads(explain("--role", "support", "--json", "SELECT id FROM orders").stdout)
    assert capped["row_cap"] == {"rows": 50, "on_exceed": "reject"}


def test_explain_unrestricted_and_parse_errors() -> None:
    dba = explain("--role", "dba", "--json", STREET)
    data = json.loads(dba.stdout)
    assert (dba.returncode, data["sql"], data["row_cap"]) == (0, STREET, None)
    bad = explain("--role", "support", "SELEC 1")
    assert bad.returncode == 1
    assert "sqlstate: 42601\n" in bad.stdout


def test_explain_says_when_the_hash_key_is_a_placeholder() -> None:
    sql = "SELECT email FROM customers"
    placeholder = explain("--role", "analyst", sql)
    assert PLACEHOLDER_NOTE + "\n" in placeholder.stdout
    keyed = explain("--role", "analyst", sql, env={HASH_KEY_ENV: "k"})
    assert keyed.returncode == 0
    assert "placeholder" not in keyed.stdout
    assert keyed.stdout.split("sql:")[1] != placeholder.stdout.split("sql:")[1]
    assert TOOLS_HASH_KEY_ENV == HASH_KEY_ENV


def test_explain_unknown_role_lists_the_roles() -> None:
    done = explain("--role", "nobody", "SELECT 1")
    assert done.returncode == 2
    assert 'unknown role "nobody"' in done.stderr
    assert "(roles: analyst, dba, support)" in done.stderr


def test_explain_defaults_to_the_schema_of_the_tests_file(tmp_path: Path) -> None:
    default = pgwarden("explain", "-p", str(POLICY), "--role", "support", "SELECT 1")
    assert default.returncode == 0, default.stderr
    alone = tmp_path / "policy.yaml"
    alone.write_text(POLICY.read_text())
    done = pgwarden("explain", "-p", str(alone), "--role", "support", "SELECT 1")
    assert done.returncode == 2
    assert "no schema: pass --schema" in done.stderr


def test_explain_with_a_bad_policy_or_snapshot_is_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "bad.json"
    broken.write_text("{}")
    done = explain("--role", "support", "SELECT 1", "--schema", str(broken))
    assert done.returncode == 2
    assert "not a schema snapshot" in done.stderr
    bad_policy = tmp_path / "p.yaml"
    bad_policy.write_text("version: 2\n")
    done = pgwarden("explain", "-p", str(bad_policy), "--role", "x", "--schema", str(SCHEMA), "1")
    assert done.returncode == 2
    assert f"{bad_policy}:1:" in done.stderr


# --- against the database ----------------------------------------------------------------


def test_explain_reads_a_live_schema(pg: PgServer) -> None:
    dsn = pg.dsn(SVC_USER, SVC_PASSWORD, "shop")
    done = pgwarden("explain", "-p", str(POLICY), "--role", "support", "--schema", dsn, LOOKUP)
    assert done.returncode == 0, done.stderr
    assert "masked: public.customers" in done.stdout
    # the password from the environment when the DSN has none
    no_password = pg.dsn(SVC_USER, None, "shop")
    env = {"PGWARDEN_UPSTREAM_PASSWORD": SVC_PASSWORD}
    args = ("explain", "-p", str(POLICY), "--role", "support", "--schema", no_password, STREET)
    assert pgwarden(*args, env=env).returncode == 1
    wrong = pgwarden(*args, env={"PGWARDEN_UPSTREAM_PASSWORD": "wrong"})
    assert wrong.returncode == 2
    assert "cannot read the schema from the database" in wrong.stderr


def test_schema_round_trips(pg: PgServer, tmp_path: Path) -> None:
    dsn = pg.dsn(SVC_USER, SVC_PASSWORD, "shop")
    done = pgwarden("schema", dsn)
    assert done.returncode == 0, done.stderr
    live = Snapshot.from_json(done.stdout)
    customers = live.resolve(None, "customers")
    assert customers is not None
    assert customers.oid > 0
    assert [c.name for c in customers.columns] == ["id", "full_name", "email", "phone", "street"]
    assert live.resolve(None, "pg_class") is not None

    out = tmp_path / "shop.json"
    assert pgwarden("schema", "--portable", "-o", str(out), dsn).returncode == 0
    portable = Snapshot.from_json(out.read_text())
    assert {r.oid for r in portable.relations.values()} == {0}
    assert portable.relations.keys() == live.relations.keys()
    assert portable.resolve("public", "customers") == dataclasses.replace(customers, oid=0)


def test_the_committed_snapshot_matches_the_shop_schema(pg: PgServer, tmp_path: Path) -> None:
    out = tmp_path / "shop.json"
    dsn = pg.dsn(SVC_USER, SVC_PASSWORD, "shop")
    assert pgwarden("schema", "--portable", "-o", str(out), dsn).returncode == 0
    live = Snapshot.from_json(out.read_text())
    committed = Snapshot.from_json(SCHEMA.read_text())
    for name in ("customers", "orders", "payment_cards", "support_tickets"):
        assert committed.relations[("public", name)] == live.relations[("public", name)]
