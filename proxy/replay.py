"""`pgwarden replay`: the statements of an audit log, judged again under a draft policy.

Strategy: the `statement` events of pgwarden's JSON log say who ran what shape of
statement (its fingerprint: every literal and parameter written `?`), by which
protocol, and what the policy answered. Each `?` becomes a parameter `$1..$n`, and
the engine the proxy runs (proxy/analysis/engine.py) evaluates the text for the
user's role in the draft policy, as a prepared statement: exactly how pgwarden
analyses a statement whose values it does not know (a simple Query's literals in
value positions are analysed that way too, proxy/analysis/template.py). What
changes is reported per role and table and per fingerprint.

Rules:
* Never guess. A fingerprint that cannot be turned back into a statement (it was
  `<unparsable>`, was cut at FINGERPRINT_MAX characters, or a `?` stands where a
  parameter cannot: the jsonb `?` operator) is counted and listed as unreplayable.
* The effective verdict is compared: what the user got from the policy. A role in
  shadow mode (recorded or draft) gets everything, like an unrestricted one; a user
  in no role of the draft is refused (at login).
* Refusals that were not the policy's verdict on the statement are not compared:
  the schema not loaded yet (57P03), a Bind refused because a reload happened since
  the Parse. A quota refusal (53400) or an unreachable ledger (08006) came after the
  policy allowed the statement: it counts as allowed.
* The protocol matters only for a text of several statements (a prepared statement
  must hold one); a log without `protocol` leaves such texts unreplayable.
* Exit codes: 0 nothing changes, 1 something changes (like diff), 2 a usage error.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.analysis.engine import Engine
from proxy.analysis.fingerprint import replay_text
from proxy.policy.model import Policy

NEWLY_REFUSED = "newly refused"
NEWLY_ALLOWED = "newly allowed"
NEWLY_CAPPED = "newly capped"
CHANGES = (NEWLY_REFUSED, NEWLY_ALLOWED, NEWLY_CAPPED)
NO_TABLE = "-"

_NOT_EVALUATED = frozenset({"57P03"})  # refused before the policy looked at it
_ALLOWED_BY_POLICY = frozenset({"53400", "08006"})  # allowed, then stopped by a quota
_RELOAD_MARKS = (  # Bind refusals after a reload (proxy/session/gate.py)
    "is no longer in role",
    "changed since this statement was prepared",
    "no longer in shadow mode",
)
_PARSE_STATE = "42601"  # refused for its syntax: the same under every restricted role


@dataclass(frozen=True, slots=True)
class Record:
    """One recorded statement event, as replay reads it."""

    user: str
    role: str
    fingerprint: str
    allowed: bool  # what the policy answered (see the rules above)
    tables: tuple[str, ...] = ()
    protocol: str | None = None  # simple | extended; None in logs from before it was logged
    rows: int = 0
    failed: bool = False  # the database or a cap failed it (error field)
    sqlstate: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Draft:
    """The draft policy's effective verdict on one recorded statement."""

    allowed: bool
    role: str | None
    reason: str = ""
    sqlstate: str = ""
    cap: int | None = None
    tables: tuple[str, ...] = ()


@dataclass
class Report:
    """What replay found; `changed` decides the exit code."""

    statements: int = 0
    unchanged: int = 0
    counts: Counter[str] = field(default_factory=Counter)  # by change
    unreplayable: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # by why
    by_table: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    # (change, role, draft role, fingerprint, protocol) -> count, users, reason, sqlstate
    changes: dict[tuple[str, str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    unreplayed: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    @property
    def changed(self) -> int:
        return sum(self.counts[c] for c in CHANGES)

    @property
    def exit_code(self) -> int:
        return 1 if self.changed else 0


# --- reading the log -------------------------------------------------------------------


def read_records(lines: Iterable[str], skipped: Counter[str]) -> list[Record]:
    """The statement events of a JSON log; events not compared are counted in `skipped`."""
    records = []
    for line in lines:
        event = _json(line)
        if event is None or event.get("event") != "statement":
            continue
        record = _record(event, skipped)
        if record is not None:
            records.append(record)
    return records


def _json(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _record(event: dict[str, Any], skipped: Counter[str]) -> Record | None:
    user, role, shape = event.get("user"), event.get("role"), event.get("fingerprint")
    if not isinstance(user, str) or not isinstance(role, str) or not isinstance(shape, str):
        skipped["no user, role or fingerprint"] += 1
        return None
    sqlstate = str(event.get("sqlstate") or "")
    reason = str(event.get("reason") or "")
    refused = event.get("verdict") == "refuse"
    if refused and sqlstate in _NOT_EVALUATED:
        skipped["refused before the policy was consulted (57P03)"] += 1
        return None
    if refused and any(mark in reason for mark in _RELOAD_MARKS):
        skipped["refused at a Bind after a reload"] += 1
        return None
    tables = event.get("tables")
    protocol = event.get("protocol")
    return Record(
        user,
        role,
        shape,
        allowed=not refused or sqlstate in _ALLOWED_BY_POLICY,
        tables=tuple(t for t in tables if isinstance(t, str)) if isinstance(tables, list) else (),
        protocol=protocol if protocol in ("simple", "extended") else None,
        rows=event["rows"] if isinstance(event.get("rows"), int) else 0,
        failed=bool(event.get("error")),
        sqlstate=sqlstate,
        reason=reason,
    )


# --- fingerprints back into statements ---------------------------------------------------


# --- judging ----------------------------------------------------------------------------


class Replayer:
    """Judges records under one draft policy; the engine's own cache spares repeats."""

    def __init__(self, policy: Policy, engine: Engine) -> None:
        self.policy = policy
        self.engine = engine
        self._texts: dict[str, tuple[str, int] | str] = {}

    def judge(self, record: Record) -> Draft | str:
        """The draft's effective verdict, or why the record cannot be replayed."""
        role = self.policy.role_of(record.user)
        if role is None:
            reason = f'user "{record.user}" is in no role of the draft policy; refused at login'
            return Draft(False, None, reason, "28000")
        if role.unrestricted or role.mode == "shadow":
            return Draft(True, role.name)  # passes through (shadow: only logged)
        found = self._texts.get(record.fingerprint)
        if found is None:
            found = self._texts[record.fingerprint] = replay_text(record.fingerprint)
        if isinstance(found, str):
            if not record.allowed and record.sqlstate == _PARSE_STATE:
                return Draft(False, role.name, record.reason, _PARSE_STATE)  # syntax: unchanged
            return found
        text, statements = found
        if record.protocol is None and statements > 1:
            return "several statements, and the log does not say by which protocol"
        extended = record.protocol != "simple"
        ev = self.engine.evaluate(role.name, text, extended=extended, user=record.user)
        return Draft(ev.allowed, role.name, ev.message, ev.sqlstate, ev.cap, ev.tables)


def replay(lines: Iterable[str], policy: Policy, engine: Engine) -> Report:
    """Every statement event of `lines` judged under `policy` (whose engine is `engine`)."""
    report = Report()
    replayer = Replayer(policy, engine)
    for record in read_records(lines, report.skipped):
        report.statements += 1
        draft = replayer.judge(record)
        if isinstance(draft, str):
            report.unreplayable += 1
            report.unreplayed[(record.role, record.fingerprint, draft)] += 1
            continue
        change = _change(record, draft)
        if change is None:
            report.unchanged += 1
            continue
        _count(report, record, draft, change)
    return report


def _change(record: Record, draft: Draft) -> str | None:
    if record.allowed != draft.allowed:
        return NEWLY_ALLOWED if draft.allowed else NEWLY_REFUSED
    over = draft.cap is not None and record.rows > draft.cap
    if record.allowed and not record.failed and over:
        return NEWLY_CAPPED
    return None


def _count(report: Report, record: Record, draft: Draft, change: str) -> None:
    report.counts[change] += 1
    for table in sorted(set(record.tables) | set(draft.tables)) or [NO_TABLE]:
        report.by_table.setdefault((record.role, table), Counter())[change] += 1
    key = (change, record.role, draft.role or "", record.fingerprint, record.protocol or "")
    entry = report.changes.get(key)
    if entry is None:
        if change == NEWLY_ALLOWED:
            reason, sqlstate = record.reason, record.sqlstate  # what no longer applies
        elif change == NEWLY_CAPPED:
            reason, sqlstate = f"returned more rows than the draft's cap of {draft.cap}", ""
        else:
            reason, sqlstate = draft.reason, draft.sqlstate
        entry = {"count": 0, "users": set(), "reason": reason, "sqlstate": sqlstate}
        report.changes[key] = entry
    entry["count"] += 1
    entry["users"].add(record.user)


# --- output ------------------------------------------------------------------------------


def report_json(report: Report) -> str:
    out = {
        "statements": report.statements,
        "unchanged": report.unchanged,
        "newly_refused": report.counts[NEWLY_REFUSED],
        "newly_allowed": report.counts[NEWLY_ALLOWED],
        "newly_capped": report.counts[NEWLY_CAPPED],
        "unreplayable": report.unreplayable,
        "skipped": dict(sorted(report.skipped.items())),
        "by_role_table": [
            {"role": role, "table": table, **_change_counts(counts)}
            for (role, table), counts in sorted(report.by_table.items())
        ],
        "changes": [
            {
                "change": change,
                "role": role,
                "draft_role": draft_role or None,
                "fingerprint": shape,
                "protocol": protocol or None,
                "count": entry["count"],
                "users": sorted(entry["users"]),
                "reason": entry["reason"] or None,
                "sqlstate": entry["sqlstate"] or None,
            }
            for (change, role, draft_role, shape, protocol), entry in _ordered(report)
        ],
        "unreplayable_statements": [
            {"role": role, "fingerprint": shape, "why": why, "count": count}
            for (role, shape, why), count in sorted(report.unreplayed.items())
        ],
    }
    return json.dumps(out, ensure_ascii=False)


def _change_counts(counts: Counter[str]) -> dict[str, int]:
    return {change.replace(" ", "_"): counts[change] for change in CHANGES}


def _ordered(report: Report) -> list[tuple[tuple[str, str, str, str, str], dict[str, Any]]]:
    """Changes by kind, then the most frequent first."""
    rank = {change: i for i, change in enumerate(CHANGES)}
    return sorted(
        report.changes.items(), key=lambda kv: (rank[kv[0][0]], -kv[1]["count"], kv[0][1:])
    )


def report_text(report: Report, source: str, policy: str) -> str:
    lines = [
        f"{report.statements} statements of {source} replayed under {policy}: "
        f"{report.changed} would change",
        f"  unchanged {report.unchanged}, newly refused {report.counts[NEWLY_REFUSED]}, "
        f"newly allowed {report.counts[NEWLY_ALLOWED]}, "
        f"newly capped {report.counts[NEWLY_CAPPED]}, unreplayable {report.unreplayable}",
    ]
    lines += [f"  skipped {count}: {why}" for why, count in sorted(report.skipped.items())]
    if report.by_table:
        lines += ["", "by role and table:", *_table(report)]
    for change in CHANGES:
        entries = [(k, e) for k, e in _ordered(report) if k[0] == change]
        if entries:
            lines += ["", f"{change} ({report.counts[change]}):"]
        for (_, role, draft_role, shape, protocol), entry in entries:
            moved = f" -> {draft_role}" if draft_role != role else ""
            moved = " -> no role" if not draft_role else moved
            users = ", ".join(sorted(entry["users"]))
            lines.append(f"  {entry['count']:>5}  {role}{moved} ({users}; {protocol or '?'})")
            lines.append(f"         {shape}")
            code = f"{entry['sqlstate']} " if entry["sqlstate"] else ""
            if entry["reason"]:
                lines.append(f"         {code}{entry['reason']}")
    if report.unreplayed:
        lines += ["", f"unreplayable ({report.unreplayable}):"]
        for (role, shape, why), count in sorted(report.unreplayed.items()):
            lines += [f"  {count:>5}  {role}: {why}", f"         {shape}"]
    return "\n".join(lines) + "\n"


def _table(report: Report) -> list[str]:
    header = ("role", "table", *CHANGES)
    rows = [header] + [
        (role, table, *(str(counts[c]) for c in CHANGES))
        for (role, table), counts in sorted(report.by_table.items())
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  "
        + "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
