"""`pgwarden demo --scenario insider` end to end: the story it prints is what happened.

Strategy: the real command runs twice on one state folder with 1,000 customers
(the hidden --customers option; the story needs no more): first with --json, whose
steps are held to the story (honest look-ups succeed masked, bulk attempts are
refused, the quota locks alice out) and to pgwarden's own log file; then as text
on the reused folder, which must tell the same numbers (the scenario resets
alice's quota first). Nothing is mocked: embedded PostgreSQL, `pgwarden serve`,
asyncpg.
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


def test_honest_look_ups_succeed_masked(runs: Runs) -> None:
    honest = _attempts(runs.report, "honest")
    found = [a for a in honest if a["error"] is None]
    assert [_state(a) for a in honest if a not in found] == ["42501"]  # the street, denied
    assert "street" in next(a["sql"] for a in honest if a not in found)
    with_customers = [a for a in found if "email" in a["columns"]]
    assert len(with_customers) == 3  # by ticket, by e-mail, by phone: one customer each
    for attempt in with_customers:
        assert attempt["rows"] == 1
        assert all(MASKED_EMAIL.match(v) for v in _column(attempt, "email"))
        assert all(MASKED_PHONE.match(v) for v in _column(attempt, "phone"))
    ticket = with_customers[0]
    assert _column(ticket, "body") == ["NULL"]  # free text redacted


def test_the_caller_look_ups_find_by_the_raw_value_but_never_return_it(runs: Runs) -> None:
    by_email = next(a for a in _attempts(runs.report, "honest") if "email = $1" in a["sql"])
    raw = by_email["args"][0]
    assert EMAIL.match(raw)
    assert raw.split("@")[1] == _column(by_email, "email")[0].split("@")[1]
    sample_text = json.dumps([a["sample"] for s in runs.report["steps"] for a in s["attempts"]])
    assert not EMAIL.search(sample_text)
    assert not EMAIL.search(runs.log)  # pgwarden logs fingerprints, never a value


def test_bulk_attempts_are_refused(runs: Runs) -> None:
    cap = runs.report["limits"]["rows_per_query"]
    bulk = _attempts(runs.report, "bulk")
    reads = [a for a in bulk if a["sql"].startswith(("SELECT", "COPY"))]
    assert len(reads) >= 5  # SELECT *, everything, COPY, string_agg, json_agg
    assert all(a["error"] is not None and a["rows"] == 0 for a in reads)
    assert {_state(a) for a in reads} == {"42501", "54000"}
    fetches = [a for a in bulk if a["sql"].startswith("FETCH")]
    assert sum(a["rows"] for a in fetches) <= cap  # the cursor stays within one cap
    assert _state(fetches[-1]) == "54000"


def test_slices_stay_under_the_cap_and_end_in_the_quota(runs: Runs) -> None:
    cap = runs.report["limits"]["rows_per_query"]
    slices = _attempts(runs.report, "slices")
    assert all(a["rows"] <= cap for a in slices)
    assert [_state(a) for a in slices].count("53300") == 1  # the fifth connection
    parallel = next(s for s in runs.report["steps"] if "connections at once" in s["title"])
    assert sum(a["rows"] for a in parallel["attempts"]) == 3 * cap
    assert _state(slices[-1]) == "53400"
    lockout = _attempts(runs.report, "lockout")
    assert [_state(a) for a in lockout] == ["53400"]
    assert "quota" in lockout[0]["error"]["hint"]


def test_rows_received_stay_within_the_quota_and_match_the_ledger(runs: Runs) -> None:
    summary = runs.report["summary"]
    attempts = [a for s in runs.report["steps"] for a in s["attempts"]]
    assert summary["rows_received"] == sum(a["rows"] for a in attempts)
    assert summary["rows_received"] <= summary["rows_per_hour"]
    assert summary["ledger_rows_last_hour"] == summary["rows_received"]
    assert summary["ledger_remaining"] == 0
    assert summary["table_rows"] == CUSTOMERS
    assert runs.report["quota_reset"]["event"] == "quota.reset"


def test_the_log_shows_every_refusal(runs: Runs) -> None:
    events = [e for s in runs.report["steps"] for e in s["log"]]
    statements = [e for e in events if e["event"] == "statement"]
    attempts = [a for s in runs.report["steps"] for a in s["attempts"]]
    sent = [a for a in attempts if a["sql"] != "(opens a connection)"]
    assert len(statements) == len(sent)
    logged = sorted(e.get("sqlstate") or e.get("error") or "ok" for e in statements)
    assert logged == sorted(_state(a) or "ok" for a in sent)
    assert sum(e["rows"] for e in statements) == runs.report["summary"]["rows_received"]
    assert {e["user"] for e in statements} == {"alice"}
    assert not [e for e in statements if "$" in e["fingerprint"] or "'" in e["fingerprint"]]
    names = [e["event"] for e in events]
    assert names.count("limit.exceeded") == runs.report["summary"]["log_warnings"]["limit.exceeded"]
    assert "quota.exhausted" in names
    refused_login = [e for e in events if e["event"] == "conn.closed"]
    assert len(refused_login) == 1
    assert "too many connections" in refused_login[0]["reason"]


def test_the_text_run_tells_the_same_story_with_the_quota_reset(runs: Runs) -> None:
    summary = runs.report["summary"]
    text = runs.text
    # the first run's charges, cleared
    assert re.search(r"`pgwarden quota reset alice` cleared [1-9]\d* minute bucket", text)
    for act in ("Act 1: honest", "Act 2: the whole table", "Act 3: slices", "Act 4: locked out"):
        assert act in text
    ending = text[text.index("== What it added up to ==") :]
    assert f"rows alice received: {summary['rows_received']:,} in all (masked)" in ending, ending
    assert f"against the {CUSTOMERS:,} customers" in text
    assert "<- ERROR 53400: pgwarden: " in text
    assert "pgwarden logged:" in text
    assert "\x1b[" not in text  # plain text, no terminal escapes
