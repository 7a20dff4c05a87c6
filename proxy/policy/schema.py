"""Compare a loaded policy with the columns a database reports (`check --schema`).

Strategy: the caller reads information_schema.columns (the command line owns
the connection and the event loop); this module is a pure function from the
policy, its positions and those (schema, table, column) rows to error and
warning lines, each with the line:col of the entry it is about.

Rules:
* A classified table or column that does not exist is an error: the policy
  would protect nothing, and a typo (`emial`) would leave the real column bare.
* A role table pattern that matches no table is a warning: harmless, but
  probably a typo or a table not created yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from proxy.policy.marked import MarkedDocument, YamlPath, dotted, where
from proxy.policy.model import Policy, pattern_matches

ColumnRow = tuple[str, str, str]


def compare_schema(
    policy: Policy, doc: MarkedDocument, rows: Iterable[ColumnRow]
) -> tuple[list[str], list[str]]:
    """(errors, warnings) for `policy` against the database's (schema, table, column) rows."""
    tables: dict[str, set[str]] = {}
    for schema, table, column in rows:
        tables.setdefault(f"{schema}.{table}", set()).add(column)
    return _missing_classified(policy, doc, tables), _unmatched_patterns(policy, doc, tables)


def _line(source: Path, doc: MarkedDocument, path: YamlPath, message: str) -> str:
    return f"{where(source, doc.position(path, key=True))}: {dotted(path)}: {message}"


def _missing_classified(
    policy: Policy, doc: MarkedDocument, tables: dict[str, set[str]]
) -> list[str]:
    errors: list[str] = []
    for table, columns in policy.classify.items():
        if table not in tables:
            errors.append(_line(policy.source, doc, ("classify", table), "no such table"))
            continue
        for column in columns:
            if column not in tables[table]:
                path: YamlPath = ("classify", table, column)
                errors.append(_line(policy.source, doc, path, f"no such column in {table}"))
    return errors


def _unmatched_patterns(
    policy: Policy, doc: MarkedDocument, tables: dict[str, set[str]]
) -> list[str]:
    warnings: list[str] = []
    for role in policy.roles.values():
        for i, pattern in enumerate(role.tables):
            if not any(pattern_matches(pattern, table) for table in tables):
                path: YamlPath = ("roles", role.name, "tables", i)
                at = where(policy.source, doc.position(path))
                warnings.append(f"{at}: warning: {dotted(path)}: {pattern} matches no table")
    return warnings
