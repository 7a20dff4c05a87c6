"""`pgwarden demo --scenario insider` end to end: the story it prints is what happened.

Strategy: the real command runs twice on one state folder with 1,000 customers
(the hidden --customers option; the story needs no more: alice's queue is about
84 customers, the first decoy is customer 73): first with --json, whose steps are
held to the story (honest look-ups succeed masked, a caller outside her tickets is
found only after a stated reason, bulk attempts are refused, her pages end with her
queue, broken-glass paging meets a decoy and locks her out) and to pgwarden's own
log file; then as text on the reused folder, which must tell the same numbers (the
scenario resets alice's quota and lock first). Nothing is mocked: embedded
PostgreSQL, `pgwarden serve`, asyncpg.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.demo_scenario import TRANSIENT

CUSTOMERS = 1_000
DECOY = 73  # the first planted customer (proxy/demo_shop.sql, policies/example.yaml)
RUN_TIMEOUT_S = 300  # a hang guard, not a budget: a run takes seconds
EMAIL = re.compile(r"[a-z]+\.[a-z]+\d+@")  # a raw demo e-mail (masked ones start x***@)
MASKED_EMAIL = re.compile(r"^[a-z]\*\*\*@[a-z.]+$")
MASKED_PHONE = re.compile(r"^\*\*\*\d{4}$")

Report = dict[str, Any]


@dataclass(frozen=True)
class Runs:
    report: Report  # the --json run
    text: str  # the text run that followed on the same state folder
    log: str  # pgwarden's JSON log of the first run


def _scenario(state: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "proxy", "demo", "--scenario", "insider", "--state", str(state)]
    done = subprocess.run(
        [*cmd, "--customers", str(CUSTOMERS), *extra],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    state = tmp_path_factory.mktemp("insider") / "state"
    report = json.loads(_scenario(state, "--json"))  # stdout is one JSON object
    log = (state / "insider.log").read_text()
    return Runs(report, _scenario(state), log)


def _steps(report: Report, act: str) -> list[Report]:
    steps = [s for s in report["steps"] if s["act"] == act]
    assert steps, f"no step in act {act}"
    return steps


def _attempts(report: Report, act: str) -> list[Report]:
    """The act's attempts, less the tries the scenario repeated after a passing fault."""
    return [a for s in _steps(report, act) for a in s["attempts"] if _state(a) not in TRANSIENT]


def _state(attempt: Report) -> str | None:
    return None if attempt["error"] is None else str(attempt["error"]["sqlstate"])


def _column(attempt: Report, name: str) -> list[str]:
    index = attempt["columns"].index(name)
    return [row[index] for row in attempt["sample"]]


def _events(report: Report, act: str) -> list[Report]:
    return [e for s in _steps(report, act) for e in s["log"]]


def test_honest_look_ups_succeed_masked(runs: Runs) -> None:
    honest = _attempts(runs.report, "honest")
    found = [a for a in honest if a["error"] is None]
    assert [_state(a) for a in honest if a not in found] == ["42501"]  # the street, denied
    assert "street" in next(a["sql"] for a in honest if a not in found)
    with_customers = [a for a in found if "email" in a["columns"] or "phone = $1" in a["sql"]]
    # by ticket, by e-mail, by phone (not hers: nobody), by phone again after a reason
    assert [a["rows"] for a in with_customers] == [1, 1, 0, 1]
    for attempt in (a for a in with_customers if a["rows"]):
        assert all(MASKED_EMAIL.match(v) for v in _column(attempt, "email"))
        assert all(MASKED_PHONE.match(v) for v in _column(attempt, "phone"))
    ticket = with_customers[0]
    assert _column(ticket, "body") == ["NULL"]  # free text redacted
    tickets = next(a for a in found if a["sql"].startswith("SELECT ticket_no"))
    assert tickets["rows"] >= 1  # her own tickets of that customer


def test_the_caller_outside_her_tickets_is_found_only_after_a_reason(runs: Runs) -> None:
    honest = _attempts(runs.report, "honest")
    by_phone = [a for a in honest if "phone = $1" in a["sql"]]
    assert [a["rows"] for a in by_phone] == [0, 1]
    assert by_phone[0]["args"] == by_phone[1]["args"]
    sets = [a["sql"] for a in honest if "pgwarden.reason" in a["sql"]]
    assert sets == ["SET pgwarden.reason = 'CS-0042 fraud call'", "RESET pgwarden.reason"]
    events = _events(runs.report, "honest")
    opened = [e for e in events if e["event"] == "break_glass.opened"]
    assert [(e["reason"], e["level"]) for e in opened] == [("CS-0042 fraud call", "warning")]
    glass = [e for e in events if e.get("break_glass_reason") == "CS-0042 fraud call"]
    assert any(e["event"] == "statement" and e["rows"] == 1 for e in glass)
    assert [e["why"] for e in events if e["event"] == "break_glass.closed"] == ["reset"]


def test_the_caller_look_ups_find_by_the_raw_value_but_never_return_it(runs: Runs) -> None:
    by_email = next(a for a in _attempts(runs.report, "honest") if "email = $1" in a["sql"])
    raw = by_email["args"][0]
    assert EMAIL.match(raw)
    assert raw.split("@")[1] == _column(by_email, "email")[0].split("@")[1]
    sample_text = json.dumps([a["sample"] for s in runs.report["steps"] for a in s["attempts"]])
    assert not EMAIL.search(sample_text)
    assert not EMAIL.search(runs.log)  # pgwarden logs fingerprints, never a value


def _her_customers(report: Report) -> int:
    count = next(a for a in _attempts(report, "bulk") if a["sql"].startswith("SELECT count(*)"))
    return int(count["sample"][0][0])


def test_bulk_attempts_are_refused_and_only_her_customers_exist(runs: Runs) -> None:
    cap = runs.report["limits"]["rows_per_query"]
    assert cap < _her_customers(runs.report) < CUSTOMERS // 5  # her open tickets' customers
    bulk = _attempts(runs.report, "bulk")
    reads = [a for a in bulk if a["sql"].startswith(("SELECT", "COPY"))][1:]  # after count
    assert len(reads) >= 5  # SELECT *, everything, COPY, string_agg, json_agg
    assert all(a["error"] is not None and a["rows"] == 0 for a in reads)
    assert {_state(a) for a in reads} == {"42501", "54000"}
    fetches = [a for a in bulk if a["sql"].startswith("FETCH")]
    assert sum(a["rows"] for a in fetches) <= cap  # the cursor stays within one cap
    assert _state(fetches[-1]) == "54000"


def test_her_pages_end_with_her_queue(runs: Runs) -> None:
    cap = runs.report["limits"]["rows_per_query"]
    own = _steps(runs.report, "slices")[0]["attempts"]
    assert all(a["error"] is None and a["rows"] <= cap for a in own)
    assert own[-1]["rows"] == 0
    assert sum(a["rows"] for a in own) == _her_customers(runs.report)


def test_broken_glass_paging_meets_a_decoy_and_locks_her(runs: Runs) -> None:
    glass_cap = runs.report["break_glass_limits"]["rows_per_query"]
    attempts = _steps(runs.report, "slices")[1]["attempts"]
    assert attempts[0]["sql"].startswith("SET pgwarden.reason = ")
    assert attempts[0]["error"] is None
    pages, last = attempts[1:-1], attempts[-1]
    assert pages
    assert all(a["rows"] == glass_cap for a in pages)
    assert all(a["error"] is None for a in pages)
    assert f"OFFSET {len(pages) * glass_cap}" in last["sql"]  # the page of decoy 73
    assert len(pages) * glass_cap < DECOY <= (len(pages) + 1) * glass_cap
    assert last["rows"] == 0  # nothing of that page, and the session ended
    assert last["error"] is not None
    events = _events(runs.report, "slices")
    touched = [e for e in events if e["event"] in ("decoy.touched", "user.locked")]
    assert [(e["event"], e["level"], e["table"]) for e in touched] == [
        ("decoy.touched", "critical", "public.customers"),
        ("user.locked", "critical", "public.customers"),
    ]
    assert [e["reason"] for e in events if e["event"] == "break_glass.opened"] == [
        "CS-0042 follow-up"
    ]


def test_she_stays_locked_out(runs: Runs) -> None:
    lockout = _attempts(runs.report, "lockout")
    assert [(a["sql"], _state(a)) for a in lockout] == [("(opens a connection)", "28000")]
    assert "is locked" in lockout[0]["error"]["message"]
    assert "pgwarden quota unlock" in lockout[0]["error"]["hint"]
    events = _events(runs.report, "lockout")
    assert [e["reason"] for e in events if e["event"] == "conn.refused"] == ["locked"]
    locked = runs.report["summary"]["locked"]
    assert locked is not None
    assert locked["reason"] == "decoy"


def test_rows_received_stay_within_the_quotas_and_match_the_ledger(runs: Runs) -> None:
    summary = runs.report["summary"]
    attempts = [a for s in runs.report["steps"] for a in s["attempts"]]
    assert summary["rows_received"] == sum(a["rows"] for a in attempts)
    ledger = summary["ledger_rows_last_hour"] + summary["ledger_break_glass_rows_last_hour"]
    assert ledger == summary["rows_received"]
    assert summary["ledger_rows_last_hour"] <= summary["rows_per_hour"]
    assert summary["ledger_break_glass_rows_last_hour"] <= summary["break_glass_rows_per_hour"]
    assert summary["ledger_records_day"] <= summary["records_per_day"]
    assert _her_customers(runs.report) < summary["customers_received"] < summary["rows_received"]
    assert summary["table_rows"] == CUSTOMERS
    assert runs.report["quota_reset"]["event"] == "quota.reset"
    assert runs.report["break_glass_quota_reset"]["user"] == "alice#break_glass"


def test_the_log_shows_every_refusal(runs: Runs) -> None:
    events = [e for s in runs.report["steps"] for e in s["log"]]
    statements = [e for e in events if e["event"] == "statement"]
    attempts = [a for s in runs.report["steps"] for a in s["attempts"]]
    sent = [a for a in attempts if a["sql"] != "(opens a connection)"]
    decoy = [e for e in events if e["event"] == "decoy.touched"]
    assert len(decoy) == 1
    assert len(statements) == len(sent)  # the decoy's statement too (error 42501)
    logged = sorted(e.get("sqlstate") or e.get("error") or "ok" for e in statements)
    # the client saw the decoy's refusal as a closed connection (08003): the log says 42501
    assert logged == sorted("42501" if _state(a) == "08003" else _state(a) or "ok" for a in sent)
    assert sum(e["rows"] for e in statements) == runs.report["summary"]["rows_received"]
    assert {e["user"] for e in statements} == {"alice"}
    assert not [e for e in statements if "$" in e["fingerprint"] or "'" in e["fingerprint"]]
    names = [e["event"] for e in events]
    assert names.count("limit.exceeded") == runs.report["summary"]["log_warnings"]["limit.exceeded"]
    assert names.count("break_glass.opened") == 2


def test_the_text_run_tells_the_same_story_with_the_quota_reset(runs: Runs) -> None:
    summary = runs.report["summary"]
    text = runs.text
    # the first run's charges and lock, cleared
    assert re.search(r"`pgwarden quota reset alice` cleared [1-9]\d* minute bucket", text)
    assert "and a lock before the run" in text
    for act in ("Act 1: honest", "Act 2: the whole table", "Act 3: slices", "Act 4: locked out"):
        assert act in text
    ending = text[text.index("== What it added up to ==") :]
    received = f"before she was stopped: {summary['customers_received']:,} (masked)"
    assert received in ending, ending
    assert f"of the {CUSTOMERS:,} in the table" in text
    assert "decoy.touched" in text
    assert '<- ERROR 28000: pgwarden: user "alice" is locked' in text
    assert "pgwarden logged:" in text
    assert "\x1b[" not in text  # plain text, no terminal escapes
