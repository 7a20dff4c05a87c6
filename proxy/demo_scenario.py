"""`pgwarden demo --scenario insider`: the incident pgwarden exists for, replayed through it.

Strategy: a support agent (alice, role support in policies/example.yaml) does what
the insider did, step by step, against a real stack: the demo state folder's
PostgreSQL with the shop database (proxy/demo.py `open_state`, reused when
built) and `pgwarden serve` as a subprocess, so its JSON log can be read back.
First honest work (her own tickets; a caller outside them found after stating a
reason, break-glass), then the whole table at once (a count, SELECT *, one big
SELECT, COPY, packing aggregates, a cursor), then slices: OFFSET pages through
what her row filter leaves her, then the glass broken with a made-up reason and
pages through the whole table until a page meets a planted customer (a decoy):
nothing delivered, her session ended, her account locked; the last act's login is
refused. After each step the new log events are read, so the output pairs what
alice received with what pgwarden logged. The steps page "until refused" or
"until the end" instead of assuming numbers, so the story still holds when the
table or the policy's limits change.

Rules:

* Deterministic: alice's quotas, records and lock, and her break-glass quota
  (`alice#break_glass`), are cleared first with the real ops command (`pgwarden
  quota reset`, logged as quota.reset) and the output says so; the data is
  deterministic (demo_shop.sql: the callers are read from it, the decoys are
  fixed ids). Two runs print the same numbers.
* Beside `make demo`: pgwarden runs with its own config (insider.yaml: a free
  port, no metrics listener) and log (insider.log) in the state folder; a
  PostgreSQL already running for the folder is used and left running.
* Output is plain text, or the same as one JSON object with --json. It holds
  what alice typed (the callers' own e-mail and phone among it), what she
  received (masked) and pgwarden's log events, which never carry a value (but
  the break-glass reason, logged as typed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from proxy.policy.model import BREAK_GLASS_BUCKET

INSIDER = "alice"
GLASS_USER = INSIDER + BREAK_GLASS_BUCKET  # the ledger user of her break-glass quota
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
WARNINGS = (
    "limit.exceeded",
    "quota.exhausted",
    "records.exhausted",
    "enumeration.alert",
    "break_glass.opened",
    "decoy.touched",
    "user.locked",
    "conn.refused",
)
SHOWN_EVENTS = ("statement", *WARNINGS, "break_glass.closed", "auth.failed")
ACTS = {
    "honest": "Act 1: honest support work",
    "bulk": "Act 2: the whole table at once",
    "slices": "Act 3: slices, and the glass broken",
    "lockout": "Act 4: locked out",
}
HONEST_REASON = "CS-0042 fraud call"
INSIDER_REASON = "CS-0042 follow-up"  # the insider reuses a ticket she once had


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
    """What honest callers tell alice: a ticket number, an e-mail, a phone number.

    The ticket and the e-mail's customer are in alice's queue (open tickets assigned
    to her); the phone's customer is not.
    """

    ticket_no: str
    email: str
    phone: str
    table_rows: int


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
    """An event that closes one attempt: a statement (the one that showed a decoy
    included, logged with error 42501), or a login pgwarden refused."""
    return event["event"] in ("statement", "conn.refused")


def _shown(event: dict[str, Any]) -> bool:
    if event["event"] == "conn.closed":  # only when pgwarden ended or refused the session
        return str(event.get("reason", "")).startswith("pgwarden:")
    return event["event"] in SHOWN_EVENTS


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

    def execute(self, sql: str) -> Outcome:
        """A statement sent in a simple Query on the main connection (a SET, as psql does)."""
        outcome = self.client.execute("main", sql)
        self._record(Attempt("main", sql, (), outcome))
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
        f"A customer calls about ticket {caller.ticket_no}, assigned to alice; she opens it",
        "Names are shown, e-mail and phone masked, the ticket body redacted (NULL).",
    ):
        run.sql(
            "SELECT t.ticket_no, t.subject, t.status, t.body, c.id, c.full_name, c.email,"
            " c.phone FROM support_tickets t JOIN customers c ON c.id = t.customer_id"
            " WHERE t.ticket_no = $1",
            caller.ticket_no,
        )
    with run.step(
        "honest",
        "Another caller of her queue gives their e-mail; alice finds the account, its"
        " tickets, and asks for the street",
        "lookup: equality finds the customer by the raw address; the answer is masked."
        " The street is denied to support, and the session goes on.",
    ):
        found = run.sql(_select(" WHERE email = $1"), caller.email)
        customer_id = int(found.rows[0][0]) if found.rows else 0
        run.sql(
            "SELECT ticket_no, subject, status, created_at FROM support_tickets"
            " WHERE customer_id = $1 ORDER BY created_at",
            customer_id,
        )
        run.sql("SELECT street FROM customers WHERE id = $1", customer_id)
    with run.step(
        "honest",
        "A fraud call: the caller's phone number is in none of alice's open tickets",
        "Her row filter: customers outside her open tickets do not exist for her.",
    ):
        run.sql(_select(" WHERE phone = $1"), caller.phone)
    with run.step(
        "honest",
        "She states why she needs more, finds the caller, and closes the window",
        "Break-glass: for 15 minutes the filter is lifted (the masks are not), every"
        " statement is logged with the reason, from a small quota of its own.",
    ):
        run.execute(f"SET pgwarden.reason = '{HONEST_REASON}'")
        run.sql(_select(" WHERE phone = $1"), caller.phone)
        run.execute("RESET pgwarden.reason")


def _bulk(run: Run, limits: Limits, table_rows: int) -> None:
    cap = limits.rows_per_query or 0
    with run.step(
        "bulk",
        "How many customers are there?",
        f"The table holds {table_rows:,}; for alice only the customers of her open tickets exist.",
    ):
        run.sql("SELECT count(*) FROM customers")
    with run.step(
        "bulk",
        "Export, first try: everything",
        "SELECT * would include the street, which support may not see.",
    ):
        run.sql("SELECT * FROM customers")
    with run.step(
        "bulk",
        "Only the columns she may see, all her customers in one statement",
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


def _slices(run: Run, limits: Limits, glass: Limits) -> None:
    cap = limits.rows_per_query or 0
    with run.step(
        "slices",
        f"Pages of {cap} with LIMIT/OFFSET, until the end",
        "Under the cap each page is allowed, but the pages end with her own queue.",
    ):
        _pages(run, cap)
    glass_cap = glass.rows_per_query or cap
    with run.step(
        "slices",
        f"She breaks the glass with a made-up reason and pages through the whole table,"
        f" {glass_cap} at a time",
        f"The break-glass cap is {glass_cap} rows per statement, its quota"
        f" {glass.rows_per_hour or 0:,} an hour; and a planted customer (a decoy) waits"
        " near the start of the table.",
    ):
        if run.execute(f"SET pgwarden.reason = '{INSIDER_REASON}'").error is None:
            _pages(run, glass_cap)


def _pages(run: Run, size: int) -> None:
    """OFFSET pages of `size` from the start, until an empty page or a refusal."""
    offset = 0
    for _ in range(MAX_PAGES):
        page = run.sql(_page(size, offset))
        if page.error is not None or not page.rows:
            return
        offset += len(page.rows)


def _lockout(run: Run, caller: Caller) -> None:
    with run.step(
        "lockout",
        "She logs in again, to serve the next honest caller",
        "Locked: every login is refused, in every pgwarden on the ledger, until security"
        f" runs `pgwarden quota unlock {INSIDER}`.",
    ):
        if run.connect("again"):
            run.sql(_select(" WHERE email = $1"), caller.email, connection="again")


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
    """Start pgwarden, reset alice's quotas and lock, play the story, stop; the report."""
    listen = f"127.0.0.1:{free_port()}"
    config = write_config(state.folder, state.pg, "insider.yaml", listen, None)
    reset = _last_json_line(_ops_command("quota", "reset", INSIDER, "-c", str(config)))
    glass_reset = _last_json_line(_ops_command("quota", "reset", GLASS_USER, "-c", str(config)))
    limits, glass = _insider_limits()
    header = _header(state, listen, (limits, glass), (reset, glass_reset))
    if not as_json:
        print(render_header(header), flush=True)
    warden = Warden(config, state.folder / "insider.log")
    try:
        warden.start()
        port = int(listen.rpartition(":")[2])
        steps = _play(warden, port, (limits, glass), _caller(state), as_json=as_json)
    finally:
        warden.stop()
    ledger = json.loads(_ops_command("quota", "show", INSIDER, "-c", str(config), "--json"))[0]
    glass_ledger = _ops_command("quota", "show", GLASS_USER, "-c", str(config), "--json")
    summary = _summary(steps, header, ledger, json.loads(glass_ledger)[0])
    if not as_json:
        print(render_summary(summary, state.folder / "pgwarden.yaml"), flush=True)
    return {**header, "steps": [_step_json(s) for s in steps], "summary": summary}


def _play(
    warden: Warden, port: int, limits: tuple[Limits, Limits], caller: Caller, *, as_json: bool
) -> list[Step]:
    password = DEMO_USERS[INSIDER][0]
    client = DemoClient("127.0.0.1", port, INSIDER, password)
    run = Run(client, warden, (lambda _step: None) if as_json else _print_step)
    try:
        if client.connect("main")["main"] is not None:
            raise ScenarioError(f"{INSIDER} could not log in; see {warden.log_path}")
        _honest(run, caller)
        _bulk(run, limits[0], caller.table_rows)
        _slices(run, *limits)
        _lockout(run, caller)
    finally:
        client.close()
    return run.steps


def _print_step(step: Step) -> None:
    print(render_step(step), flush=True)


def _insider_limits() -> tuple[Limits, Limits]:
    """The role's limits, and its break-glass limits."""
    role = load_policy(demo_policy()).role_of(INSIDER)
    if role is None or role.limits is None or not role.limits.rows_per_query:
        raise ScenarioError(f"policies/example.yaml gives {INSIDER} no role with a row cap")
    if role.break_glass is None:
        raise ScenarioError(f"policies/example.yaml gives {INSIDER}'s role no break_glass")
    return role.limits, role.break_glass.limits


_CALLERS_SQL = """
SELECT (SELECT ticket_no FROM support_tickets WHERE :mine AND status = 'open'
        ORDER BY id LIMIT 1 OFFSET 3),
       (SELECT c.email FROM customers c
        WHERE c.id IN (SELECT customer_id FROM support_tickets WHERE :mine)
        ORDER BY c.id DESC LIMIT 1 OFFSET 7),
       (SELECT c.phone FROM customers c
        WHERE c.id NOT IN (SELECT customer_id FROM support_tickets WHERE :mine)
          AND EXISTS (SELECT FROM support_tickets t WHERE t.customer_id = c.id)
        ORDER BY c.id LIMIT 1 OFFSET 99),
       (SELECT count(*) FROM customers)
"""


def _caller(state: DemoState) -> Caller:
    """Who calls: read directly from PostgreSQL, as the callers know their own data.

    The ticket is one of alice's open ones, the e-mail a customer of another of her
    non-closed tickets; the phone a customer of no ticket of hers (nor a decoy: those
    have no tickets at all).
    """
    mine = f"assignee = '{INSIDER}' AND status <> 'closed'"
    out = state.pg.psql(_CALLERS_SQL.replace(":mine", mine), dbname="shop")
    ticket_no, email, phone, count = out.strip().split("|")
    if not (ticket_no and email and phone):
        raise ScenarioError(f"the shop database has no ticket assigned to {INSIDER}")
    return Caller(ticket_no, email, phone, int(count))


def _header(
    state: DemoState,
    listen: str,
    limits: tuple[Limits, Limits],
    resets: tuple[dict[str, Any], dict[str, Any]],
) -> dict[str, Any]:
    count = state.pg.psql("SELECT count(*) FROM customers", dbname="shop").strip()
    reset, glass_reset = resets
    return {
        "scenario": "insider",
        "user": INSIDER,
        "role": DEMO_USERS[INSIDER][1],
        "limits": asdict(limits[0]),
        "break_glass_limits": asdict(limits[1]),
        "postgresql": f"{state.pg.host}:{state.pg.port}",
        "pgwarden": listen,
        "log": str(state.folder / "insider.log"),
        "table_rows": int(count),
        "quota_reset": reset,
        "break_glass_quota_reset": glass_reset,
    }


def _last_json_line(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise ScenarioError("pgwarden quota reset logged nothing")
    event: dict[str, Any] = json.loads(lines[-1])
    return event


# --- numbers at the end ---------------------------------------------------------------------


def _customers_received(attempts: list[Attempt]) -> int:
    """Distinct customers alice received: rows of statements that show a customer's name."""
    ids: set[str] = set()
    for attempt in attempts:
        columns = attempt.outcome.columns
        if "full_name" in columns and "id" in columns:
            at = columns.index("id")
            ids.update(row[at] for row in attempt.outcome.rows)
    return len(ids)


def _summary(
    steps: list[Step], header: dict[str, Any], ledger: dict[str, Any], glass: dict[str, Any]
) -> dict[str, Any]:
    attempts = [a for s in steps for a in s.attempts]
    refused = Counter(a.outcome.error.sqlstate for a in attempts if a.outcome.error is not None)
    warnings = Counter(e["event"] for s in steps for e in s.events if e["event"] in WARNINGS)
    limits = header["limits"]
    return {
        "customers_received": _customers_received(attempts),
        "rows_received": sum(len(a.outcome.rows) for a in attempts),
        "table_rows": header["table_rows"],
        "rows_per_query": limits["rows_per_query"],
        "rows_per_hour": limits["rows_per_hour"],
        "rows_per_day": limits["rows_per_day"],
        "records_per_day": limits["records_per_day"],
        "attempts": len(attempts),
        "refused_total": sum(refused.values()),
        "refused": dict(sorted(refused.items())),
        "log_warnings": dict(sorted(warnings.items())),
        "ledger_rows_last_hour": ledger["rows_last_hour"],
        "ledger_remaining": ledger["remaining"],
        "ledger_break_glass_rows_last_hour": glass["rows_last_hour"],
        "break_glass_rows_per_hour": header["break_glass_limits"]["rows_per_hour"],
        "ledger_records_day": ledger.get("records", {}).get("day"),
        "locked": ledger.get("locked"),
    }


# --- rendering ------------------------------------------------------------------------------


def render_header(header: dict[str, Any]) -> str:
    limits, glass = header["limits"], header["break_glass_limits"]
    reset = header["quota_reset"]
    glass_buckets = header["break_glass_quota_reset"].get("buckets", 0)
    return "\n".join(
        [
            "pgwarden demo --scenario insider",
            "",
            "The incident: a support employee used legitimate access to copy about 68,000",
            "customer records and sold them. Here alice, role support in",
            "policies/example.yaml, does what that employee did, through pgwarden.",
            "",
            "  her role:  only the customers of her own open tickets; names shown, e-mail and"
            " phone",
            "             masked, street denied, ticket bodies redacted;",
            f"             {limits['rows_per_query']:,} rows per statement,"
            f" {limits['rows_per_hour']:,} per hour, {limits['rows_per_day']:,} per day"
            f" (on_exceed: {limits['on_exceed']}),",
            f"             {limits['records_per_day']:,} distinct records a day",
            f"  break-glass: SET pgwarden.reason lifts the filter for a while;"
            f" {glass['rows_per_query']:,} rows per statement,",
            f"             {glass['rows_per_hour']:,} per hour, logged with the reason",
            "  decoys:    planted customers; whoever is shown one is locked out",
            f"  the stack: PostgreSQL on {header['postgresql']} ({header['table_rows']:,}"
            f" customers), pgwarden on {header['pgwarden']}",
            f"  the log:   {header['log']} (pgwarden's JSON log)",
            f"  quota:     `pgwarden quota reset {header['user']}` cleared"
            f" {_plural(reset.get('buckets', 0), 'minute bucket')},"
            f" {_plural(reset.get('records', 0), 'record')}"
            f"{' and a lock' if reset.get('unlocked') else ''} before the run,",
            f"             and {_plural(glass_buckets, 'bucket')} of {GLASS_USER}"
            f" (logged as {reset.get('event')} by {reset.get('operator')}),",
            "             so every run tells the same story",
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


_EVENT_KEYS = (
    "cap",
    "rows_seen",
    "on_exceed",
    "tables",
    "table",
    "kind",
    "count",
    "threshold",
    "window",
    "budget",
    "duration_s",
    "why",
    "reason",
    "fingerprint",
)


def _render_event(event: dict[str, Any]) -> str:
    name = event["event"]
    if name == "statement":
        fields = [f"verdict={event.get('verdict')}"]
        fields += [f"{k}={event[k]}" for k in ("sqlstate", "error") if k in event]
        fields.append(f"rows={event.get('rows')}")
        text = f"{'statement':<18} {' '.join(fields)}  {event.get('fingerprint', '')}"
        if "break_glass_reason" in event:
            text += f"\n        break-glass reason: {event['break_glass_reason']}"
        return text + (f"\n        reason: {event['reason']}" if "reason" in event else "")
    fields = [f"{k}={_flat(event[k])}" for k in _EVENT_KEYS if k in event]
    level = "  (critical)" if event.get("level") == "critical" else ""
    return f"{name:<18} {' '.join(fields)}{level}"


def _flat(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def render_summary(summary: dict[str, Any], demo_config: Path) -> str:
    refused = ", ".join(f"{state} x{n}" for state, n in summary["refused"].items())
    warnings = ", ".join(f"{name} x{n}" for name, n in summary["log_warnings"].items())
    share = summary["customers_received"] / summary["table_rows"]
    lines = [
        "",
        "== What it added up to ==",
        "",
        f"  customers alice received before she was stopped: {summary['customers_received']:,}"
        f" (masked), of the {summary['table_rows']:,} in the table ({share:.1%})",
        f"  rows in all: {summary['rows_received']:,}; the ledger holds"
        f" {summary['ledger_rows_last_hour']:,} for the last hour"
        f" (of {summary['rows_per_hour']:,}),"
        f" {summary['ledger_break_glass_rows_last_hour']:,} on her break-glass quota (of"
        f" {summary['break_glass_rows_per_hour']:,}), {summary['ledger_records_day']:,} distinct"
        f" records today (of {summary['records_per_day']:,})",
        f"  attempts: {summary['attempts']}, refused: {summary['refused_total']} ({refused})",
        f"  pgwarden's warnings: {warnings} (each one an alert an on-call engineer can see)",
    ]
    lock = summary["locked"]
    if lock is not None:
        lines += [
            f"  {INSIDER} is locked since {lock['at']} ({lock['reason']}), in `make demo` too,"
            " until security lifts it:",
            f"    pgwarden quota show {INSIDER} -c {demo_config}",
            f"    pgwarden quota unlock {INSIDER} -c {demo_config}",
        ]
    else:
        lines.append(f"  {INSIDER} is not locked: pgwarden quota show {INSIDER} -c {demo_config}")
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
