"""Render docs/compatibility.md from the compat suite's results.

Strategy: tests/compat/conftest.py records every compat test as (client, feature,
role, outcome, reason, notes, refused) and writes build/compat-results.json at the
end of a session. This module turns that list into one table (features down,
clients across, one mark per role in each cell) and a list of every refusal by
design, known limitation and note. The page holds nothing that changes between two
runs that pass (no time, no durations), so test_matrix.py can compare the page
committed in docs/ with the one a complete run renders.

Usage (after a complete run of tests/compat):

    .venv/bin/python tests/compat/matrix.py            # print the page
    .venv/bin/python tests/compat/matrix.py --write    # write docs/compatibility.md

This module imports nothing from the test suite: it runs on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_PATH = REPO_ROOT / "build" / "compat-results.json"
DOC_PATH = REPO_ROOT / "docs" / "compatibility.md"

# Known clients and features, in the page's order; others follow alphabetically.
CLIENTS: dict[str, str] = {
    "psql": "psql",
    "psycopg": "psycopg 3",
    "psycopg-async": "psycopg 3 async",
    "asyncpg": "asyncpg",
    "psycopg2": "psycopg2",
    "pg8000": "pg8000",
    "node-postgres": "node-postgres",
    "pgjdbc": "pgjdbc",
    "pgbench": "pgbench",
    "pg_dump": "pg_dump",
}
FEATURES: dict[str, str] = {
    "login": "log in (SCRAM-SHA-256 to pgwarden), the driver's start-up queries",
    "lookup_by_email": "find a customer by raw e-mail; support sees it masked",
    "list_tickets": "that customer's tickets; support sees the body as NULL",
    "refused_sqlstate": "a refused statement: support 42501 (a denied column); dba a server error",
    "row_cap": "more than 50 customer rows: support 54000 and no row; dba all rows",
    "prepared_reuse": "one prepared statement executed 100 times",
    "transaction_rollback": "an error inside a transaction, ROLLBACK, the session goes on",
    "cancel": "a long query cancelled through the driver's cancel API (57014)",
    "listen_notify": "LISTEN/NOTIFY: dba receives the notification; support is refused",
    "metadata": "the driver's catalog and metadata calls",
    "pipeline": "pipeline mode / several statements in flight",
    "server_cursor": "a server-side cursor or portal read in batches",
    "binary": "binary result (and parameter) format",
    "single_row": "rows streamed as they come (libpq single-row mode): over the cap, still no row",
    "async": "the driver's asynchronous interface",
    "schema_dump": "pg_dump --schema-only: dba gets the schema; support is refused",
    "custom_script": "a custom pgbench script with the scenario's statements, in each -M mode",
    "dbapi": "the driver's DB-API module (what SQLAlchemy's dialect uses)",
    "pool": "a connection pool handing out sessions",
    "prepare_threshold": "pgjdbc switching to named server-side statements after prepareThreshold",
}
ROLES = ("support", "dba")
MARKS = {
    "passed": "✅",
    "refused": "⛔",
    "xfailed": "⚠️",
    "skipped": "⏭",
    "failed": "❌",
    "error": "❌",
}
_RANK = {"passed": 0, "refused": 1, "xfailed": 2, "skipped": 3, "failed": 4, "error": 5}


@dataclass
class Cell:
    """Every test of one (client, feature, role), folded into one outcome."""

    outcome: str = "passed"
    tests: int = 0
    remarks: list[str] = field(default_factory=list)

    def add(self, result: Mapping[str, Any]) -> None:
        self.tests += 1
        outcome = str(result["outcome"])
        if outcome == "passed" and result.get("refused"):
            outcome = "refused"
        if _RANK[outcome] > _RANK[self.outcome]:
            self.outcome = outcome
        for remark in _remarks(result, outcome):
            if remark not in self.remarks:
                self.remarks.append(remark)


def _remarks(result: Mapping[str, Any], outcome: str) -> Iterable[str]:
    if outcome == "refused":
        yield f"refused by design, {result['refused']}"
    elif outcome in ("xfailed", "skipped") and result.get("reason"):
        yield f"{'known limitation' if outcome == 'xfailed' else 'skipped'}: {result['reason']}"
    elif outcome in ("failed", "error"):
        yield f"failing: {result['nodeid']}"
    yield from result.get("notes", [])


def _ordered(known: Sequence[str], seen: Iterable[str]) -> list[str]:
    present = set(seen)
    return [k for k in known if k in present] + sorted(present - set(known))


def cells(results: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], Cell]:
    """(client, feature, role) -> its folded cell."""
    out: dict[tuple[str, str, str], Cell] = {}
    for result in results:
        key = (str(result["client"]), str(result["feature"]), str(result["role"]))
        out.setdefault(key, Cell()).add(result)
    return out


def _cell_text(grid: Mapping[tuple[str, str, str], Cell], client: str, feature: str) -> str:
    """support's mark, then dba's (· for a role not run); one mark for a role-less test."""
    roleless = grid.get((client, feature, "-"))
    if roleless is not None:
        return MARKS[roleless.outcome]
    found = [grid.get((client, feature, role)) for role in ROLES]
    if not any(found):
        return "·"
    return " ".join(MARKS[cell.outcome] if cell else "·" for cell in found)


def render(results: Sequence[Mapping[str, Any]]) -> str:
    """The page: legend, the table, then every remark by client."""
    grid = cells(results)
    clients = _ordered(list(CLIENTS), (c for c, _, _ in grid))
    features = _ordered(list(FEATURES), (f for _, f, _ in grid))
    lines = [
        "# Compatibility matrix",
        "",
        "<!-- Generated by tests/compat/matrix.py from a complete run of tests/compat;",
        "     do not edit by hand: tests/compat/test_matrix.py fails when it is stale. -->",
        "",
        "Every client below runs the same scenario (tests/compat/scenario.py) through one",
        "pgwarden with the test policy, once per role: **support** (restricted: e-mail and",
        "phone masked, street denied, ticket bodies redacted, 50 rows per statement) and",
        "**dba** (unrestricted: indistinguishable from a direct connection). Each test",
        "also checks that support never received a raw e-mail, phone, street, ticket body",
        "or card number, in any form (text, binary, reversed, hex, base64, md5, digits).",
        "",
        "Each cell shows support, then dba: ✅ passes; ⛔ refused by design, and the test",
        "asserts the refusal; ⚠️ known limitation; ⏭ skipped; ❌ fails; · not part of",
        "this client's scenario.",
        "",
        "| feature | " + " | ".join(CLIENTS.get(c, c) for c in clients) + " |",
        "|---|" + "---|" * len(clients),
    ]
    for feature in features:
        row = [_cell_text(grid, c, feature) for c in clients]
        lines.append(f"| `{feature}` | " + " | ".join(row) + " |")
    lines += ["", f"{len(results)} tests in {len(grid)} cells.", "", "## Features", ""]
    lines += [f"* `{f}`: {FEATURES.get(f, 'driver-specific')}" for f in features]
    lines += _remark_lines(grid, clients, features)
    return "\n".join(lines) + "\n"


def _remark_lines(
    grid: Mapping[tuple[str, str, str], Cell], clients: Sequence[str], features: Sequence[str]
) -> list[str]:
    """One line per remark of a cell; a remark every role of the cell has, once."""
    lines: list[str] = []
    for client in clients:
        for feature in features:
            by_role = {
                r: grid[client, feature, r] for r in (*ROLES, "-") if (client, feature, r) in grid
            }
            shared = (
                set.intersection(*(set(c.remarks) for c in by_role.values())) if by_role else set()
            )
            name = f"* {CLIENTS.get(client, client)}, `{feature}`"
            done: set[str] = set()
            for role, cell in by_role.items():
                for remark in cell.remarks:
                    if remark in shared and len(by_role) > 1:
                        if remark not in done:
                            lines.append(f"{name}: {remark}")
                            done.add(remark)
                    else:
                        who = "" if role == "-" else f", {role}"
                        lines.append(f"{name}{who}: {remark}")
    header = ["", "## Refusals by design, known limitations and notes", ""]
    return header + (lines or ["None."])


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    args = parser.parse_args(argv)
    document = load(args.results)
    if not document.get("complete"):
        print(
            f"warning: {args.results} is from a partial run ({document.get('incomplete_because')})",
            file=sys.stderr,
        )
    page = render(document["results"])
    if args.write:
        DOC_PATH.write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
