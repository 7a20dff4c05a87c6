"""`pgwarden demo --scenario insider`: the incident pgwarden exists for, replayed through it.

Strategy: a support agent (alice, role support in policies/example.yaml) does what
the insider did, step by step, against a real stack: the demo state folder's
PostgreSQL with the shop database (proxy/demo.py `open_state`, reused when
built) and `pgwarden serve` as a subprocess, so its JSON log can be read back.
First honest look-ups, then the whole table at once (SELECT *, one big SELECT,
COPY, packing aggregates, a cursor), then slices under the cap (OFFSET pages,
parallel connections, keyset pages, smaller and smaller pages) until the
hourly quota locks her out. After each step the new log events are read, so the
output pairs what alice received with what pgwarden logged. The steps page
"until refused" instead of assuming numbers, so the story still holds when the
table or the policy's limits change.

Rules:

* Deterministic: alice's quota is cleared first with the real ops command
  (`pgwarden quota reset alice`, logged as quota.reset) and the output says so;
  the data is deterministic (demo_shop.sql), and concurrent statements only run
  while the quota has room for all of them. Two runs print the same numbers.
* Beside `make demo`: pgwarden runs with its own config (insider.yaml: a free
  port, no metrics listener) and log (insider.log) in the state folder; a
  PostgreSQL already running for the folder is used and left running.
* Output is plain text, or the same as one JSON object with --json. It holds
  what alice typed (the caller's own e-mail and phone among it), what she
  received (masked) and pgwarden's log events, which never carry a value.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proxy.demo import (
    DEMO_USERS,
    DemoClient,
    DemoState,
    Outcome,
    close_state,
    demo_policy,
    open_state,
    write_config,
)
from proxy.errors import ConfigError
from proxy.pgserver import free_port
from proxy.policy import Limits, load_policy

INSIDER = "alice"
MIN_CUSTOMERS = 1_000  # the pages and parallel readers need that many rows
MAX_PAGES = 200  # a bound on every "until refused" loop, should pgwarden never refuse
START_TIMEOUT_S = 60.0
LOG_WAIT_S = 10.0
SAMPLE_ROWS = 3
READY = {"startup", "schema.loaded"}  # pgwarden may listen before its first schema read
# pgwarden's answers for a passing fault (ledger unreachable, schema not loaded): the
# statement is tried again, up to TRIES times, RETRY_S apart; the output shows each try.
TRANSIENT = ("08006", "57P03")
TRIES, RETRY_S = 5, 1.0
# Log events shown per step; conn.closed only when pgwarden refused the login.
WARNINGS = ("limit.exceeded", "quota.exhausted")
SHOWN_EVENTS = ("statement", *WARNINGS, "conn.refused", "auth.failed")
ACTS = {
    "honest": "Act 1: honest support work",
    "bulk": "Act 2: the whole table at once",
    "slices": "Act 3: slices under the cap",
    "lockout": "Act 4: locked out",
}


class ScenarioError(RuntimeError):
    """The scenario's stack could not be started or read."""


# --- what happened --------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One thing alice sent (a statement, or a new connection) and what came back."""

    connection: str
    sql: str
    args: tuple[str, ...]
    outcome: Outcome


@dataclass
class Step:
    """A numbered step of the story: its attempts and the log events they caused."""

    number: int
    act: str
    title: str
    note: str
    opens_act: bool  # the first step of its act
    attempts: list[Attempt] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Caller:
    """What honest callers tell alice: a ticket number, an e-mail, a phone number."""

    ticket_no: str
    email: str
    phone: str


# --- pgwarden as a subprocess -----------------------------------------------------------


class Warden:
    """`pgwarden serve -c config` with its JSON log in a file, read back as events."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config, self.log_path = config, log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start; wait until it listens with the schema read (else alice would get 57P03)."""
        cmd = [sys.executable, "-m", "proxy", "serve", "-c", str(self.config)]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._wait(lambda events: {e["event"] for e in events} >= READY, START_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM (pgwarden writes its last quota charges), then SIGKILL after 30 s."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def events(self) -> list[dict[str, Any]]:
        """Every JSON event logged so far (other lines skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and "event" in event:
                    out.append(event)
        return out

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        """The events once `done` holds for them (or after LOG_WAIT_S)."""
        with contextlib.suppress(ScenarioError):
            return self._wait(done, LOG_WAIT_S)
        return self.events()

    def _wait(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if done(events):
                return events
            if self._process is None or self._process.poll() is not None:
                raise ScenarioError(f"pgwarden exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise ScenarioError(f"pgwarden did not log in time; see {self.log_path}")
            time.sleep(0.02)


def _counted(event: dict[str, Any]) -> bool:
    """An event that closes one attempt: a statement, or a login pgwarden refused."""
    if event["event"] == "statement":
        return True
    return event["event"] == "conn.closed" and str(event.get("reason", "")).startswith("pgwarden:")


def _shown(event: dict[str, Any]) -> bool:
    return event["event"] in SHOWN_EVENTS or (event["event"] == "conn.closed" and _counted(event))


def _ops_command(*args: str) -> str:
    """Run a pgwarden command (quota show / reset); its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise ScenarioError(f"pgwarden {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout


# --- the run: steps, their attempts, their log ------------------------------------------


class Run:
    """Alice's connections, the steps so far, and where pgwarden's log was read up to."""

    def __init__(self, client: DemoClient, warden: Warden, on_step: Callable[[Step], None]) -> None:
        self.client, self.warden, self.on_step = client, warden, on_step
        self.steps: list[Step] = []
        self._expected = 0  # attempts that each end in one counted log event
        self._seen = 0  # events already given to a step

    @contextlib.contextmanager
    def step(self, act: str, title: str, note: str) -> Iterator[None]:
        """A step: attempts made inside it are its own; its log events come after."""
        opens_act = not self.steps or self.steps[-1].act != act
        current = Step(len(self.steps) + 1, act, title, note, opens_act)
        self.steps.append(current)
        yield
        events = self.warden.wait_for(lambda e: sum(map(_counted, e)) >= self._expected)
        current.events = [e for e in events[self._seen :] if _shown(e)]
        self._seen = len(events)
        self.on_step(current)

    def sql(self, sql: str, *args: object, connection: str = "main") -> Outcome:
        """One statement on one of alice's connections, recorded in the current step."""
        for _ in range(TRIES):
            outcome = self.client.query(connection, sql, *args)
            self._record(Attempt(connection, sql, tuple(map(str, args)), outcome))
            if outcome.error is None or outcome.error.sqlstate not in TRANSIENT:
                break
            time.sleep(RETRY_S)
        return outcome

    def copy(self, sql: str) -> Outcome:
        outcome = self.client.copy_out("main", sql)
        self._record(Attempt("main", f"COPY ({sql}) TO STDOUT", (), outcome))
        return outcome

    def parallel(self, jobs: list[tuple[str, str]]) -> list[Outcome]:
        """Statements on several connections at the same time."""
        outcomes = self.client.query_many(jobs)
        for (name, sql), outcome in zip(jobs, outcomes, strict=True):
            self._record(Attempt(name, sql, (), outcome))
        return outcomes

    def connect(self, *names: str) -> list[str]:
        """Open connections at once (the first attempts of a step); those that logged in."""
        opened = []
        for name, error in self.client.connect(*names).items():
            if error is None:
                opened.append(name)
            else:
                self._record(Attempt(name, "(opens a connection)", (), Outcome(error=error)))
        return opened

    def _record(self, attempt: Attempt) -> None:
        self.steps[-1].attempts.append(attempt)
        self._expected += 1


# --- the story ---------------------------------------------------------------------------


def _honest(run: Run, caller: Caller) -> None:
    with run.step(
        "honest",
        f"A customer calls about ticket {caller.ticket_no}; alice opens it",
        "Names are shown, e-mail and phone masked, the ticket body redacted (NULL).",
    ):
        run.sql(
            "SELECT t.ticket_no, t.subject, t.status, t.body, c.full_name, c.email, c.phone"
            " FROM support_tickets t JOIN customers c ON c.id = t.customer_id"
            " WHERE t.ticket_no = $1",
            caller.ticket_no,
        )
    with run.step(
        "honest",
        "Another caller gives their e-mail address; alice finds the account and its tickets",
        "lookup: equality finds the customer by the raw address; the answer is masked.",
    ):
        found = run.sql(_select(" WHERE email = $1"), caller.email)
        customer_id = int(found.rows[0][0]) if found.rows else 0
        run.sql(
            "SELECT ticket_no, subject, status, created_at FROM support_tickets"
            " WHERE customer_id = $1 ORDER BY created_at",
            customer_id,
        )
    with run.step(
        "honest",
        "A third caller is found by phone; alice asks for the street to check a delivery",
        "The phone look-up works; the street is denied to support, and the session goes on.",
    ):
        found = run.sql(_select(" WHERE phone = $1"), caller.phone)
        customer_id = int(found.rows[0][0]) if found.rows else 0
        run.sql("SELECT street FROM customers WHERE id = $1", customer_id)


def _bulk(run: Run, limits: Limits) -> None:
    cap = limits.rows_per_query or 0
    with run.step(
        "bulk",
        "Export, first try: everything",
        "SELECT * would include the street, which support may not see.",
    ):
        run.sql("SELECT * FROM customers")
    with run.step(
        "bulk",
        "Only the columns she may see, the whole table in one statement",
        f"Over the row cap ({cap} per statement, reject): no row at all is delivered.",
    ):
        run.sql(_select())
    with run.step("bulk", "COPY to a file", "COPY ... TO is not a statement kind of support."):
        run.copy(_select())
    with run.step(
        "bulk",
        "Pack the table into one row: string_agg, json_agg",
        "Aggregates that pack protected columns of many rows into one are refused.",
    ):
        run.sql("SELECT string_agg(email || ' ' || phone, ',') FROM customers")
        run.sql(
            "SELECT json_agg(json_build_object('name', full_name, 'email', email)) FROM customers"
        )
    _cursor(run, cap)


def _cursor(run: Run, cap: int) -> None:
    batch = max(1, cap * 4 // 5)
    with run.step(
        "bulk",
        f"A server-side cursor, fetched {batch} rows at a time",
        f"The cap holds per cursor, summed over its FETCHes: the FETCH that crosses {cap}"
        " is refused.",
    ):
        run.sql("BEGIN")
        run.sql("DECLARE export CURSOR FOR " + _select(" ORDER BY id"))
        for _ in range(3):
            if run.sql(f"FETCH {batch} FROM export").error is not None:
                break
        run.sql("ROLLBACK")


def _select(tail: str = "") -> str:
    """The customers columns support may read, then `tail` (our constants and numbers)."""
    return f"SELECT id, full_name, email, phone FROM customers{tail}"  # noqa: S608 - no input


def _page(size: int, offset: int) -> str:
    return _select(f" ORDER BY id LIMIT {size} OFFSET {offset}")


def _slices(run: Run, limits: Limits) -> None:
    cap = limits.rows_per_query or 0
    with run.step(
        "slices",
        f"Pages of {cap} with LIMIT/OFFSET",
        "Under the cap each page is allowed, and every row counts against her hourly quota.",
    ):
        for n in range(3):
            run.sql(_page(cap, n * cap))
    _parallel(run, cap, offset=3 * cap)
    with run.step(
        "slices",
        f"Keyset pages of {cap} (WHERE id > last seen), until refused",
        "The quota is per user, shared by all her connections: it runs out.",
    ):
        last = 6 * cap
        for _ in range(MAX_PAGES):
            page = run.sql(_select(f" WHERE id > $1 ORDER BY id LIMIT {cap}"), last)
            if page.error is not None or not page.rows:
                break
            last = int(page.rows[-1][0])
    _smaller_pages(run, cap, offset=last)


def _parallel(run: Run, cap: int, offset: int) -> None:
    names = [f"p{n}" for n in range(1, 5)]
    with run.step(
        "slices",
        "Four more connections at once, one page each",
        "pgwarden allows 4 connections per user by default (one is open already); the rows"
        " of all of them count against the same quota.",
    ):
        opened = run.connect(*names)
        run.parallel([(name, _page(cap, offset + n * cap)) for n, name in enumerate(opened)])
    run.client.disconnect(*opened)


def _smaller_pages(run: Run, cap: int, offset: int) -> None:
    with run.step(
        "slices",
        "Smaller and smaller pages, to take what is left",
        "A page bigger than what is left of the quota is refused whole; at 0 everything is.",
    ):
        size = max(1, cap // 2)
        for _ in range(MAX_PAGES):
            page = run.sql(_page(size, offset))
            offset += len(page.rows)
            if page.error is None and page.rows:
                continue
            if page.error is None or size == 1:
                break  # the end of the table, or not even one row allowed
            size //= 2


def _lockout(run: Run, caller: Caller) -> None:
    with run.step(
        "lockout",
        "The next honest caller",
        "Locked out of customer data until the hour frees up; the HINT says when.",
    ):
        run.sql(_select(" WHERE email = $1"), caller.email)


# --- the whole scenario --------------------------------------------------------------------


def main(args: argparse.Namespace, customers: int) -> int:
    """Run the insider scenario (args.state, .fresh, .json); 0 when it ran."""
    if customers < MIN_CUSTOMERS:
        raise ConfigError("demo", f"the insider scenario needs at least {MIN_CUSTOMERS} customers")
    state = open_state(Path(args.state).absolute(), fresh=args.fresh, customers=customers)
    try:
        report = _run(state, as_json=args.json)
    except ScenarioError as exc:
        print(f"pgwarden demo: {exc}", file=sys.stderr)
        return 1
    finally:
        close_state(state)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _run(state: DemoState, *, as_json: bool) -> dict[str, Any]:
    """Start pgwarden, reset the quota, play the story, stop; the report."""
    listen = f"127.0.0.1:{free_port()}"
    config = write_config(state.folder, state.pg, "insider.yaml", listen, None)
    reset = _last_json_line(_ops_command("quota", "reset", INSIDER, "-c", str(config)))
    limits = _insider_limits()
    header = _header(state, listen, limits, reset)
    if not as_json:
        print(render_header(header), flush=True)
    warden = Warden(config, state.folder / "insider.log")
    try:
        warden.start()
        port = int(listen.rpartition(":")[2])
        steps = _play(warden, port, limits, _caller(state), as_json=as_json)
    finally:
        warden.stop()
    ledger = json.loads(_ops_command("quota", "show", INSIDER, "-c", str(config), "--json"))[0]
    summary = _summary(steps, limits, header["table_rows"], ledger)
    if not as_json:
        print(render_summary(summary, state.folder / "pgwarden.yaml"), flush=True)
    return {**header, "steps": [_step_json(s) for s in steps], "summary": summary}


def _play(
    warden: Warden, port: int, limits: Limits, caller: Caller, *, as_json: bool
) -> list[Step]:
    password = DEMO_USERS[INSIDER][0]
    client = DemoClient("127.0.0.1", port, INSIDER, password)
    run = Run(client, warden, (lambda _step: None) if as_json else _print_step)
    try:
        if client.connect("main")["main"] is not None:
            raise ScenarioError(f"{INSIDER} could not log in; see {warden.log_path}")
        _honest(run, caller)
        _bulk(run, limits)
        _slices(run, limits)
        _lockout(run, caller)
    finally:
        client.close()
    return run.steps


def _print_step(step: Step) -> None:
    print(render_step(step), flush=True)


def _insider_limits() -> Limits:
    role = load_policy(demo_policy()).role_of(INSIDER)
    if role is None or role.limits is None or not role.limits.rows_per_query:
        raise ScenarioError(f"policies/example.yaml gives {INSIDER} no role with a row cap")
    return role.limits


def _caller(state: DemoState) -> Caller:
    """Who calls: read directly from PostgreSQL, as the callers know their own data."""
    out = state.pg.psql(
        "SELECT (SELECT ticket_no FROM support_tickets ORDER BY id LIMIT 1 OFFSET 41),"
        " (SELECT email FROM customers ORDER BY id DESC LIMIT 1 OFFSET 17),"
        " (SELECT phone FROM customers ORDER BY id LIMIT 1 OFFSET 99)",
        dbname="shop",
    )
    ticket_no, email, phone = out.strip().split("|")
    return Caller(ticket_no, email, phone)


def _header(state: DemoState, listen: str, limits: Limits, reset: dict[str, Any]) -> dict[str, Any]:
    count = state.pg.psql("SELECT count(*) FROM customers", dbname="shop").strip()
    return {
        "scenario": "insider",
        "user": INSIDER,
        "role": DEMO_USERS[INSIDER][1],
        "limits": asdict(limits),
        "postgresql": f"{state.pg.host}:{state.pg.port}",
        "pgwarden": listen,
        "log": str(state.folder / "insider.log"),
        "table_rows": int(count),
        "quota_reset": reset,
    }


def _last_json_line(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise ScenarioError("pgwarden quota reset logged nothing")
    event: dict[str, Any] = json.loads(lines[-1])
    return event


# --- numbers at the end ---------------------------------------------------------------------


def _summary(
    steps: list[Step], limits: Limits, table_rows: int, ledger: dict[str, Any]
) -> dict[str, Any]:
    attempts = [a for s in steps for a in s.attempts]
    refused = Counter(a.outcome.error.sqlstate for a in attempts if a.outcome.error is not None)
    warnings = Counter(e["event"] for s in steps for e in s.events if e["event"] in WARNINGS)
    per_day = limits.rows_per_day
    return {
        "rows_received": sum(len(a.outcome.rows) for a in attempts),
        "table_rows": table_rows,
        "rows_per_query": limits.rows_per_query,
        "rows_per_hour": limits.rows_per_hour,
        "rows_per_day": per_day,
        "attempts": len(attempts),
        "refused_total": sum(refused.values()),
        "refused": dict(sorted(refused.items())),
        "log_warnings": dict(sorted(warnings.items())),
        "ledger_rows_last_hour": ledger["rows_last_hour"],
        "ledger_remaining": ledger["remaining"],
        "days_for_a_full_copy": math.ceil(table_rows / per_day) if per_day else None,
    }


# --- rendering ------------------------------------------------------------------------------


def render_header(header: dict[str, Any]) -> str:
    limits = header["limits"]
    reset = header["quota_reset"]
    return "\n".join(
        [
            "pgwarden demo --scenario insider",
            "",
            "The incident: a support employee used legitimate access to copy about 68,000",
            "customer records and sold them. Here alice, role support in",
            "policies/example.yaml, does what that employee did, through pgwarden.",
            "",
            "  her role:  names shown, e-mail and phone masked, street denied, ticket bodies"
            " redacted;",
            f"             {limits['rows_per_query']:,} rows per statement,"
            f" {limits['rows_per_hour']:,} per hour, {limits['rows_per_day']:,} per day"
            f" (on_exceed: {limits['on_exceed']})",
            f"  the stack: PostgreSQL on {header['postgresql']} ({header['table_rows']:,}"
            f" customers), pgwarden on {header['pgwarden']}",
            f"  the log:   {header['log']} (pgwarden's JSON log)",
            f"  quota:     `pgwarden quota reset {header['user']}` cleared"
            f" {_plural(reset.get('buckets', 0), 'minute bucket')} before the run",
            f"             (logged as {reset.get('event')} by {reset.get('operator')}),"
            " so every run tells the same story",
        ]
    )


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def render_step(step: Step) -> str:
    lines = ["", f"== {ACTS[step.act]} =="] if step.opens_act else []
    lines += ["", f"[{step.number}] {step.title}", f"    {step.note}"]
    shown_sample = False
    for attempt in step.attempts:
        lines += _render_attempt(attempt, sample=not shown_sample)
        shown_sample = shown_sample or bool(attempt.outcome.rows)
    lines.append("    pgwarden logged:")
    lines += [f"      {_render_event(e)}" for e in step.events] or ["      (nothing)"]
    return "\n".join(lines)


def _render_attempt(attempt: Attempt, *, sample: bool) -> list[str]:
    who = INSIDER if attempt.connection == "main" else f"{INSIDER}[{attempt.connection}]"
    args = "".join(f"   ${n} = '{a}'" for n, a in enumerate(attempt.args, 1))
    lines = [f"    {who}> {attempt.sql}{args}"]
    outcome = attempt.outcome
    if outcome.error is not None:
        lines.append(f"      <- ERROR {outcome.error.sqlstate}: {outcome.error.message}")
        if outcome.error.hint:
            lines.append(f"         HINT: {outcome.error.hint}")
        return lines
    reads = attempt.sql.startswith(("SELECT", "FETCH", "COPY"))
    lines.append(f"      <- {_plural(len(outcome.rows), 'row')}" if reads else "      <- ok")
    if sample and outcome.rows:
        lines.append(f"         {' | '.join(outcome.columns)}")
        lines += [f"         {' | '.join(row)}" for row in outcome.rows[:SAMPLE_ROWS]]
        if len(outcome.rows) > SAMPLE_ROWS:
            lines.append("         ...")
    return lines


def _render_event(event: dict[str, Any]) -> str:
    name = event["event"]
    if name == "statement":
        fields = [f"verdict={event.get('verdict')}"]
        fields += [f"{k}={event[k]}" for k in ("sqlstate", "error") if k in event]
        fields.append(f"rows={event.get('rows')}")
        text = f"statement        {' '.join(fields)}  {event.get('fingerprint', '')}"
        return text + (f"\n        reason: {event['reason']}" if "reason" in event else "")
    keys = ("cap", "rows_seen", "on_exceed", "tables", "reason")
    fields = [f"{k}={_flat(event[k])}" for k in keys if k in event]
    return f"{name:<16} {' '.join(fields)}"


def _flat(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def render_summary(summary: dict[str, Any], demo_config: Path) -> str:
    refused = ", ".join(f"{state} x{n}" for state, n in summary["refused"].items())
    warnings = ", ".join(f"{name} x{n}" for name, n in summary["log_warnings"].items())
    share = summary["rows_received"] / summary["table_rows"]
    lines = [
        "",
        "== What it added up to ==",
        "",
        f"  rows alice received: {summary['rows_received']:,} in all (masked), against the"
        f" {summary['table_rows']:,} customers in the table ({share:.1%})",
        f"  her quota: {summary['rows_per_hour']:,} rows per hour, {summary['rows_per_day']:,}"
        f" per day; the ledger holds {summary['ledger_rows_last_hour']:,} for the last hour,"
        f" {summary['ledger_remaining']} left",
        f"  attempts: {summary['attempts']}, refused: {summary['refused_total']} ({refused})",
        f"  pgwarden's warnings: {warnings} (each one an alert an on-call engineer can see)",
    ]
    days = summary["days_for_a_full_copy"]
    if days is not None:
        lines.append(
            f"  a full copy at {summary['rows_per_day']:,} rows a day would take"
            f" {_plural(days, 'day')}, with refusals and warnings in the log every day"
        )
    lines += [
        f"  {INSIDER} stays locked out until the hour frees up, in `make demo` too; while it"
        " runs, the ledger:",
        f"    pgwarden quota show {INSIDER} -c {demo_config}    (quota reset clears it)",
    ]
    return "\n".join([*lines, ""])


def _step_json(step: Step) -> dict[str, Any]:
    return {
        "number": step.number,
        "act": step.act,
        "title": step.title,
        "note": step.note,
        "attempts": [_attempt_json(a) for a in step.attempts],
        "log": step.events,
    }


def _attempt_json(attempt: Attempt) -> dict[str, Any]:
    outcome = attempt.outcome
    return {
        "connection": attempt.connection,
        "sql": attempt.sql,
        "args": list(attempt.args),
        "rows": len(outcome.rows),
        "columns": list(outcome.columns),
        "sample": [list(r) for r in outcome.rows[:SAMPLE_ROWS]],
        "error": None if outcome.error is None else asdict(outcome.error),
    }
