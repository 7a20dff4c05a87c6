"""Driver programs of the matrix (node-postgres, pgjdbc): run once per role, judged here.

Strategy: a driver in another language runs the whole scenario in one process per
role (tests/compat/node/scenario.js, tests/compat/java/Compat.java): one process
start instead of one per cell. It takes the scenario's statements and the customer
from PGW_* variables (`scenario_env`) and prints one JSON line per feature:
`{"feature", "facts", "received"}`, or with `"crash"` when the program itself failed.
`facts` is what the driver did (rows, SQLSTATEs, counts); `received` is every value
it received (rows, error fields, notices, notification payloads), for the leak check.
The programs judge nothing: the checks below, shared by both drivers' test modules,
do, and the test modules add each driver's own facts.

Rules:

* An outcome in facts is `{"ok": true, "value": ...}` or `{"ok": false, "error":
  {"code", "message", "hint"}}` (message and hint as the server or pgwarden sent them).
* Every check runs the leak check first, on the facts and on `received`: a failing
  assertion must not print a value support was not to see, and nothing here prints
  a received value otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Proxy

from proxy.pgserver import PgServer

from .conftest import Pii
from .scenario import (
    LISTEN_CHANNEL,
    LONG_SQL,
    LOOKUP_SQL,
    PREPARED_RUNS,
    PREPARED_SQL,
    REFUSED,
    ROW_CAP_LIMIT,
    ROW_CAP_SQL,
    TICKETS_SQL,
    Role,
    with_params,
)

RUN_TIMEOUT_S = 180
CANCELLED = ("57014", "canceling statement due to user request")  # not a statement_timeout
SHOP_TABLES = ["customers", "orders", "payment_cards", "support_tickets"]
CUSTOMER_COLUMNS = ["id", "full_name", "email", "phone", "street"]


@dataclass(frozen=True)
class Line:
    """What a driver program reported for one feature."""

    feature: str
    facts: Mapping[str, Any]
    received: Sequence[Any]
    crash: str | None

    def __repr__(self) -> str:  # never the values
        return f"Line({self.feature!r}, {len(self.received)} received values)"


class Run:
    """The lines of one program run (one role), checked for leaks before any use."""

    def __init__(self, client: str, role: Role, pii: Pii, lines: Mapping[str, Line]) -> None:
        self.client, self.role, self.pii, self._lines = client, role, pii, lines

    def __getitem__(self, feature: str) -> Mapping[str, Any]:
        """The facts of feature, after the leak check; fails if the program crashed there."""
        line = self._lines.get(feature)
        if line is None:
            pytest.fail(f"{self.client} reported nothing for {feature}", pytrace=False)
        what = f"{self.client} {feature} as {self.role}"
        self.pii.check(self.role, [line.received, line.facts, line.crash], what)
        if line.crash is not None:
            pytest.fail(f"{what}: the scenario crashed:\n{line.crash}", pytrace=False)
        return line.facts

    def __repr__(self) -> str:
        return f"Run({self.client!r}, {self.role!r}, {sorted(self._lines)})"


def scenario_env(proxy: Proxy, pg: PgServer, role: Role, pii: Pii, marker: str) -> dict[str, str]:
    """PGW_* for a driver program: where to connect and the scenario (marker: $1 or ?).

    PGW_ADMIN_* is a direct superuser connection to shop: the cancel scenario watches
    pg_stat_activity there to cancel once the long query runs (no sleeps, no retries).
    """
    sql, _ = REFUSED[role]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "NODE_"))}
    env.update(
        PGW_HOST=proxy.host,
        PGW_PORT=str(proxy.port),
        PGW_USER=role.user,
        PGW_PASSWORD=role.password,
        PGW_DSN=proxy.dsn(role.user, role.password, sslmode="disable"),
        PGW_LOOKUP_EMAIL=pii.customer.email,
        PGW_CUSTOMER_ID=str(pii.customer.id),
        PGW_LOOKUP_SQL=with_params(LOOKUP_SQL, marker),
        PGW_TICKETS_SQL=with_params(TICKETS_SQL, marker),
        PGW_REFUSED_SQL=sql,
        PGW_ROW_CAP_SQL=ROW_CAP_SQL,
        PGW_PREPARED_SQL=with_params(PREPARED_SQL, marker),
        PGW_PREPARED_RUNS=str(PREPARED_RUNS),
        PGW_LONG_SQL=LONG_SQL,
        PGW_CHANNEL=LISTEN_CHANNEL,
        PGW_ADMIN_DSN=pg.dsn(dbname="shop"),
        PGW_ADMIN_HOST=pg.host,
        PGW_ADMIN_PORT=str(pg.port),
        PGW_ADMIN_USER="postgres",
        PGW_ADMIN_PASSWORD=pg.superuser_password,
    )
    return env


def run_program(
    client: str,
    role: Role,
    pii: Pii,
    *,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
) -> Run:
    """Run a driver program to the end and parse its JSON lines."""
    try:
        done = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            env=dict(env),
            cwd=cwd,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{client} as {role} did not finish in {RUN_TIMEOUT_S}s", pytrace=False)
    lines: dict[str, Line] = {}
    for text in done.stdout.splitlines():
        try:
            data = json.loads(text)
        except ValueError:
            pytest.fail(f"{client} printed a line that is not JSON ({len(text)} chars)")
        lines[str(data["feature"])] = Line(
            str(data["feature"]), data.get("facts", {}), data.get("received", []), data.get("crash")
        )
    run = Run(client, role, pii, lines)
    if done.returncode != 0:
        pii.check(role, [done.stdout, done.stderr], f"{client} output")
        pytest.fail(
            f"{client} as {role} exited with {done.returncode}:\n{done.stderr[-3000:]}",
            pytrace=False,
        )
    return run


def cached_runs(
    proxy: Proxy,
    pg: PgServer,
    pii: Pii,
    client: str,
    *,
    command: Sequence[str],
    marker: str,
    cwd: Path,
) -> Callable[[Role], Run]:
    """role -> the program's run as that role: one process per role, run on first use."""
    runs: dict[Role, Run] = {}

    def run(role: Role) -> Run:
        if role not in runs:
            env = scenario_env(proxy, pg, role, pii, marker)
            runs[role] = run_program(client, role, pii, command=command, env=env, cwd=cwd)
        return runs[role]

    return run


# --- the checks both drivers share ---------------------------------------------------


def error_of(outcome: Mapping[str, Any], sqlstate: str) -> Mapping[str, Any]:
    """The error of a failed outcome, which must carry sqlstate."""
    assert outcome["ok"] is False, f"expected SQLSTATE {sqlstate}, the statement succeeded"
    error: Mapping[str, Any] = outcome["error"]
    assert error["code"] == sqlstate, error
    return error


def value_of(outcome: Mapping[str, Any]) -> Any:
    """The value of a successful outcome."""
    assert outcome["ok"] is True, outcome.get("error")
    return outcome["value"]


def assert_pgwarden_refusal(outcome: Mapping[str, Any], sqlstate: str = "42501") -> None:
    """Refused by pgwarden itself: its SQLSTATE, a message naming it and a hint."""
    error = error_of(outcome, sqlstate)
    assert str(error["message"]).startswith("pgwarden: "), error
    assert error["hint"], error


def masked_email(email: str) -> str:
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}"


def expected_customer(row: Sequence[Any], role: Role) -> list[Any]:
    """A (id, full_name, email[, phone]) row of the database as role must see it."""
    if not role.restricted:
        return list(row)
    out = [row[0], row[1], masked_email(str(row[2]))]
    return out + (["***" + str(row[3])[-4:]] if len(row) > 3 else [])


def check_login(facts: Mapping[str, Any]) -> None:
    assert str(facts["version"]).startswith("PostgreSQL ")
    assert int(facts["server_version_num"]) >= 180000
    assert facts["database"] == "shop"


def check_lookup(rows: Sequence[Sequence[Any]], role: Role, pii: Pii) -> None:
    c = pii.customer
    assert [list(r) for r in rows] == [
        expected_customer((c.id, c.full_name, c.email, c.phone), role)
    ]


def check_tickets(rows: Sequence[Sequence[Any]], role: Role, pii: Pii) -> None:
    c = pii.customer
    assert [r[0] for r in rows] == list(c.ticket_nos)
    bodies = [r[2] for r in rows]
    assert bodies == ([None] * len(rows) if role.restricted else list(c.bodies))


def check_refused(facts: Mapping[str, Any], role: Role) -> None:
    _, sqlstate = REFUSED[role]
    if role.restricted:
        assert_pgwarden_refusal(facts["refused"], sqlstate)
    else:
        error_of(facts["refused"], sqlstate)
    assert facts["usable_after"] is True


def check_row_cap(facts: Mapping[str, Any], role: Role, customers: int) -> None:
    if role.restricted:
        assert_pgwarden_refusal(facts["all"], "54000")
    else:
        assert value_of(facts["all"]) == customers
    assert facts["usable_after"] is True


def check_prepared(rows: Sequence[Sequence[Any]], role: Role, truth: Mapping[int, Any]) -> None:
    """PREPARED_RUNS executions with ids 1..PREPARED_RUNS, as role must see them."""
    assert [r[0] for r in rows] == list(range(1, PREPARED_RUNS + 1))
    assert [list(r) for r in rows] == [expected_customer(truth[r[0]], role) for r in rows]


def check_rollback(facts: Mapping[str, Any], role: Role) -> None:
    error_of(facts["failed"], "22012")
    error_of(facts["aborted"], "25P02")  # the transaction is aborted until ROLLBACK
    assert facts["usable_after"] is True
    if role.restricted:
        assert_pgwarden_refusal(facts["write"])  # support may not create a table
    else:
        error_of(value_of(facts["write"]), "42P01")  # the temp table was rolled back
    assert facts["usable_at_end"] is True


def check_cancel(facts: Mapping[str, Any]) -> None:
    assert facts["running"] is True, "the long query never showed up as active upstream"
    error = error_of(facts["result"], CANCELLED[0])
    assert error["message"] == CANCELLED[1]
    assert facts["usable_after"] is True


def check_listen(facts: Mapping[str, Any], role: Role) -> None:
    if role.restricted:
        assert_pgwarden_refusal(facts["listen"])
    else:
        value_of(facts["listen"])
    assert facts["usable_after"] is True


def check_batched_cap(facts: Mapping[str, Any], role: Role, customers: int) -> None:
    """A read in batches of more rows than the cap: support 54000 by the cap at the latest."""
    if role.restricted:
        assert_pgwarden_refusal(facts["big"], "54000")
        assert facts["big_delivered"] <= ROW_CAP_LIMIT
    else:
        assert value_of(facts["big"]) == customers
        assert facts["big_delivered"] == customers
    assert facts["usable_after"] is True
