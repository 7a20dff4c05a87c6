"""`pgwarden check`: the command as a user runs it, on files and against a database.

Each case runs `python -m proxy check` in a subprocess and reads its stdout and
exit code, so the argument parsing, the printing and the exit codes are what a
CI job would see. The `--schema` cases read the test PostgreSQL's shop database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TEST_POLICY

from proxy.pgserver import PgServer, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "policies" / "example.yaml"


def check(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_a_good_policy_prints_ok_and_exits_0(tmp_path: Path) -> None:
    path = write(tmp_path, TEST_POLICY)
    result = check(path)
    assert (result.returncode, result.stdout) == (
        0,
        f"{path}: ok (3 roles, 6 classified columns)\n",
    )
    assert result.stderr == ""


def test_the_shipped_example_passes() -> None:
    result = check("policies/example.yaml")
    assert result.returncode == 0
    assert result.stdout == "policies/example.yaml: ok (3 roles, 6 classified columns)\n"


HEAD = """\
version: 1
classify:
  public.customers: {email: email}
roles:
  support:
    members: [alice]
    statements: [select]
"""


T = "    tables: [public.customers]\n"
UNRESTRICTED = HEAD.replace("[alice]", "[alice]\n    unrestricted: true")
TWICE = "version: 1\nroles: {a: {members: [x], unrestricted: true}, b: {members: [x], "
TWICE += "unrestricted: true}}\n"


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        ("version: 2\nroles: {}\n", "1:10: version: unsupported version"),
        (HEAD + T + "    colour: red\n", "9:5: roles.support.colour: unknown key"),
        (HEAD + '    tables: ["public.cust?mers"]\n', "8:14: roles.support.tables[0]: "),
        (
            HEAD + T + "    columns: {phone: allow}\n",
            '9:15: roles.support.columns.phone: tag "phone"',
        ),
        (
            HEAD + T + "    columns: {email: {mask: md5}}\n",
            "9:29: roles.support.columns.email.mask: ",
        ),
        (
            HEAD + T + "    limits: {rows_per_query: -5}\n",
            "9:30: roles.support.limits.rows_per_query: ",
        ),
        (HEAD, "6:5: roles.support: a restricted role with no tables could do nothing"),
        (UNRESTRICTED, "8:5: roles.support.statements: contradicts unrestricted: true"),
        (TWICE, '2:62: roles.b.members[0]: user "x" is already a member of role "a"'),
        ("version: 1\nroles: {}\nroles: {}\n", "3:1: duplicate key 'roles'"),
    ],
)
def test_each_mistake_exits_1_with_its_position(tmp_path: Path, text: str, prefix: str) -> None:
    path = write(tmp_path, text)
    result = check(path)
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert line.startswith(f"{path}:{prefix}")


def test_every_error_is_printed_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 0\nroles: {r: {members: []}}\ncolour: x\n")
    result = check(path)
    assert result.returncode == 1
    assert [line.split(": ", 2)[1] for line in result.stdout.splitlines()] == [
        "colour",
        "version",
        "roles.r.members",
        "roles.r",
        "roles.r",
    ]


def test_a_missing_file_exits_1(tmp_path: Path) -> None:
    result = check(tmp_path / "nope.yaml")
    assert result.returncode == 1
    assert result.stdout == f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n"


# --- --schema ---------------------------------------------------------------------


def test_the_example_matches_the_shop_schema(pg: PgServer) -> None:
    result = check(EXAMPLE, "--schema", pg.dsn("postgres", "postgres", "shop"))
    assert (result.returncode, result.stdout) == (
        0,
        f"{EXAMPLE}: ok (3 roles, 6 classified columns)\n",
    )


def test_schema_mistakes_are_reported_with_their_positions(tmp_path: Path, pg: PgServer) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        classify:
          public.customers:
            full_name: name
            emial: email
          public.custmers:
            phone: phone
        roles:
          support:
            members: [alice]
            statements: [select]
            tables: [public.customers, archive.*]
            columns: {email: {mask: email}}
        """,
    )
    dsn = pg.dsn("postgres", None, "shop")  # the password comes from PGPASSWORD
    result = check(path, "--schema", dsn, env={"PGPASSWORD": "postgres"})
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}:12:32: warning: roles.support.tables[1]: archive.* matches no table",
        f"{path}:5:5: classify.public.customers.emial: no such column in public.customers",
        f"{path}:6:3: classify.public.custmers: no such table",
    ]


def test_a_snapshot_file_serves_as_the_schema(tmp_path: Path) -> None:
    snapshot = EXAMPLE.parent / "shop.schema.json"
    assert check(EXAMPLE, "--schema", str(snapshot)).returncode == 0
    path = write(tmp_path, HEAD.replace("public.customers: {email", "public.custmers: {email") + T)
    result = check(path, "--schema", str(snapshot))
    assert result.returncode == 1
    assert "public.custmers" in result.stdout
    missing = check(EXAMPLE, "--schema", str(tmp_path / "none.json"))
    assert missing.returncode == 2
    assert "cannot read the schema snapshot" in missing.stderr


def test_warnings_alone_keep_exit_0(tmp_path: Path, pg: PgServer) -> None:
    path = write(tmp_path, HEAD + "    tables: [public.customers, nosuch.*]\n")
    result = check(path, "--schema", pg.dsn("postgres", "postgres", "shop"))
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"{path}:8:32: warning: roles.support.tables[1]: nosuch.* matches no table",
        f"{path}: ok (1 roles, 1 classified columns)",
    ]


def test_an_unreachable_database_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, TEST_POLICY)
    result = check(path, "--schema", f"postgresql://postgres:secret@127.0.0.1:{free_port()}/shop")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("pgwarden check: cannot read the schema from the database: ")
    assert "secret" not in result.stderr


def test_a_wrong_password_exits_2(tmp_path: Path, pg: PgServer) -> None:
    path = write(tmp_path, TEST_POLICY)
    result = check(path, "--schema", pg.dsn("postgres", "wrong", "shop"))
    assert result.returncode == 2
    assert "password authentication failed" in result.stderr
