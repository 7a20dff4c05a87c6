"""Policy tools: `pgwarden explain`, `pgwarden test` and the snapshot file format.

Strategy: both tools build the same `Engine` the proxy runs (proxy/analysis/engine.py)
from a policy file, a schema snapshot and a hash key, and report its `Evaluation`.
A snapshot is a JSON file (`pgwarden schema --portable -o FILE`) or a live database;
reading a database needs an event loop, so the command line passes a
`SnapshotReader` in and this module stays free of asyncio and network code.

Rules:
* Exit codes: 0 allowed / every case passed, 1 refused / a case failed, 2 a usage or
  configuration error (raised here as `ToolError`, one message per line).
* A tests file is read as marked YAML (safe_load semantics, positions kept) and
  validated whole before any case runs: unknown keys, wrong types and unknown roles
  are `file:line:col: key: message` errors, never skipped cases.
* The hash key is env PGWARDEN_HASH_KEY; a policy that hashes without one gets a fixed
  placeholder key, and explain says so for a role that hashes: the verdicts are the
  same, the hashes are not the ones the proxy would show.
* `rewritten_contains` is matched against the exact text pgwarden would send (the
  `sql` of `explain --json`), not the pretty-printed layout of `explain`.
* Snapshot files are written one relation per line, sorted, so they diff well; with
  `portable` the OIDs are left out (nothing offline needs them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from proxy.analysis.catalog import Snapshot
from proxy.analysis.engine import Engine, Evaluation
from proxy.analysis.records import HIDDEN_PREFIX, RecordSpec
from proxy.analysis.rewrite_errors import Refusal
from proxy.analysis.roles import RoleView
from proxy.analysis.row_filter import FilterError, bind_filter
from proxy.analysis.verify import pretty
from proxy.policy.loader import (
    MarkedDocument,
    Policy,
    PolicyError,
    YamlError,
    YamlPath,
    compose_marked,
    dotted,
    load_policy,
    where,
)
from proxy.policy.model import Role

HASH_KEY_ENV = "PGWARDEN_HASH_KEY"  # the variable proxy/net/server.py reads
PLACEHOLDER_HASH_KEY = b"pgwarden-explain-placeholder-key"
PLACEHOLDER_NOTE = "hash key: placeholder (set PGWARDEN_HASH_KEY to see real hashes)"
DSN_PREFIXES = ("postgresql://", "postgres://")

SnapshotReader = Callable[[str], Snapshot]  # DSN -> the live snapshot


class ToolError(Exception):
    """A usage or configuration error (exit 2); `lines` are printed as they are."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


# --- snapshots ------------------------------------------------------------------------


def is_dsn(text: str) -> bool:
    return text.startswith(DSN_PREFIXES)


def load_snapshot(source: str, read_live: SnapshotReader, *, base: Path | None = None) -> Snapshot:
    """The snapshot named by `source`: a DSN read live, else a JSON file (relative to base)."""
    if is_dsn(source):
        return read_live(source)
    path = Path(source) if base is None else base / source
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ToolError(f"{path}: cannot read the schema snapshot: {exc.strerror or exc}") from None
    try:
        return Snapshot.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ToolError(f"{path}: not a schema snapshot ({type(exc).__name__}: {exc})") from None


def portable(snapshot: Snapshot) -> Snapshot:
    """The same snapshot with every OID zeroed (stable across databases)."""
    relations = [dataclasses.replace(r, oid=0) for r in snapshot.relations.values()]
    return Snapshot.of(relations, snapshot.search_path, snapshot.user_functions)


def snapshot_json(snapshot: Snapshot) -> str:
    """Deterministic JSON that Snapshot.from_json reads: one relation per line, sorted."""
    return snapshot.to_json()


def default_schema(policy_path: Path) -> tuple[str, Path] | None:
    """`schema:` of the tests file beside the policy (POLICY.tests.yaml) and its folder."""
    tests = policy_path.with_name(policy_path.stem + ".tests.yaml")
    try:
        data = compose_marked(tests.read_text(encoding="utf-8")).data
    except (OSError, UnicodeDecodeError, YamlError):
        return None
    schema = data.get("schema") if isinstance(data, dict) else None
    return (schema, tests.parent) if isinstance(schema, str) and schema else None


# --- engine set-up --------------------------------------------------------------------


def hash_key_for(policy: Policy) -> tuple[bytes | None, bool]:
    """(key, is_placeholder): env PGWARDEN_HASH_KEY, else a placeholder if the policy hashes."""
    key = os.environ.get(HASH_KEY_ENV)
    if key:
        return key.encode(), False
    if policy.uses_hash():
        return PLACEHOLDER_HASH_KEY, True
    return None, False


def read_policy(path: Path) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as exc:
        raise ToolError(*exc.errors) from None


def require_role(policy: Policy, role: str) -> Role:
    found = policy.roles.get(role)
    if found is None:
        known = ", ".join(sorted(policy.roles)) or "none"
        raise ToolError(f'pgwarden: unknown role "{role}" in {policy.source} (roles: {known})')
    return found


def default_user(role: Role, user: str | None) -> str:
    """The user a per-user role's statements are explained for: `user`, else its first member."""
    if user:
        return user
    return sorted(role.members)[0] if role.per_user and role.members else ""


def filter_errors(policy: Policy, doc: MarkedDocument, snapshot: Snapshot) -> list[str]:
    """`pgwarden check --schema`: every row filter resolved against the snapshot.

    Each relation and column of a filter must exist, bind inside the filter, and each
    relation it reads must be one the role may read.
    """
    errors: list[str] = []
    for role in policy.roles.values():
        view = RoleView(policy, role, None, user="", snapshot=snapshot)
        filters: list[tuple[YamlPath, Mapping[str, str]]] = [
            (("roles", role.name, "row_filter"), role.row_filter)
        ]
        if role.break_glass is not None:  # the break-glass filters, checked the same way
            filters.append(
                (("roles", role.name, "break_glass", "row_filter"), role.break_glass.row_filter)
            )
        for path, section in filters:
            for table, text in section.items():
                at: YamlPath = (*path, table)
                problem = _filter_problem(view, table, text, snapshot)
                if problem is not None:
                    errors.append(
                        f"{where(policy.source, doc.position(at))}: {dotted(at)}: {problem}"
                    )
    return errors


def _filter_problem(view: RoleView, table: str, text: str, snapshot: Snapshot) -> str | None:
    schema, _, name = table.partition(".")
    relation = snapshot.resolve(schema, name)
    if relation is None:
        return f"no such table {table}"
    try:
        bound = bind_filter(text, relation, snapshot, user="", role=view.name)
        for read in bound.relations:
            view.authorise(read)
    except FilterError as error:
        return str(error)
    except Refusal as refusal:
        why = refusal.message.removeprefix("pgwarden: ")
        return f"the filter reads what the role may not: {why}"
    return None


def row_cap(role: Role) -> dict[str, Any] | None:
    limits = role.limits
    if limits is None or limits.rows_per_query is None:
        return None
    return {"rows": limits.rows_per_query, "on_exceed": limits.on_exceed}


# --- explain --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Explanation:
    """An evaluation with what explain shows around it."""

    role: Role
    sql: str
    evaluation: Evaluation
    placeholder_key: bool  # the role hashes and the key is the placeholder
    user: str = ""  # the user a per-user role's statement was rewritten for
    break_glass: bool = False  # evaluated under the role's break_glass rules

    @property
    def sent(self) -> str:
        """The text that would reach the database."""
        return self.evaluation.sql if self.evaluation.sql is not None else self.sql

    @property
    def exit_code(self) -> int:
        return 0 if self.evaluation.allowed else 1

    @property
    def row_cap(self) -> dict[str, Any] | None:
        """The role's cap, unless this statement is not capped (it reads only the catalog)."""
        cap = row_cap(self.role.under_break_glass() if self.break_glass else self.role)
        if cap is not None and self.evaluation.allowed and self.evaluation.cap is None:
            return None
        return cap


def explain(
    policy: Policy,
    snapshot: Snapshot,
    role: str,
    sql: str,
    user: str | None = None,
    *,
    break_glass: bool = False,
) -> Explanation:
    """Evaluate `sql` for `role` (and `user`, for a per-user role) as the proxy would.

    `break_glass`: as in a session whose user stated a reason (the role's break_glass rules).
    """
    found = require_role(policy, role)
    if break_glass and found.break_glass is None:
        raise ToolError(f'pgwarden: role "{role}" has no break_glass in {policy.source}')
    key, placeholder = hash_key_for(policy)
    effective = found.under_break_glass() if break_glass else found
    who = default_user(effective, user)
    evaluation = Engine(policy, snapshot, key).evaluate(
        role, sql, user=who, break_glass=break_glass
    )
    hashes = any(rule.mask == "hash" for rule in found.columns.values())
    shown = who if effective.per_user else ""
    return Explanation(found, sql, evaluation, placeholder and hashes, shown, break_glass)


def explain_json(x: Explanation) -> str:
    ev = x.evaluation
    out = {
        "verdict": "allow" if ev.allowed else "refuse",
        "role": x.role.name,
        "sqlstate": ev.sqlstate or None,
        "message": ev.message or None,
        "hint": ev.hint or None,
        "kinds": list(ev.kinds),
        "tables": list(ev.tables),
        "masked": list(ev.masked),
        "lookups": ev.lookups,
        "reasons": list(ev.reasons),
        "sql": x.sent if ev.allowed else None,
        "row_cap": x.row_cap,
        "hash_key": "placeholder" if x.placeholder_key else None,
    }
    if ev.records is not None:  # only for statements whose rows show classified records
        out["records"] = {
            "keyed": list(ev.records.tables),
            "grouped": ev.records.grouped,
            "unkeyed": ev.records.unkeyed,
        }
    if ev.filtered:  # only for roles with row filters (the keys above are a fixed contract)
        out["filtered"] = list(ev.filtered)
    if x.user:
        out["user"] = x.user
    if x.break_glass:
        out["break_glass"] = True
    return json.dumps(out, ensure_ascii=False)


def explain_text(x: Explanation) -> str:
    ev = x.evaluation
    lines = [f"verdict: {'allow' if ev.allowed else 'refuse'} (role {x.role.name})"]
    if x.user:
        lines.append(f"user: {x.user}")
    if x.break_glass:
        lines.append("break-glass: yes (the role's break_glass rules apply)")
    if not ev.allowed:
        lines.append(f"sqlstate: {ev.sqlstate}")
        lines.append(f"message: {ev.message}")
        if ev.hint:
            lines.append(f"hint: {ev.hint}")
    lines.append(f"kinds: {_listing(ev.kinds)}")
    lines.append(f"tables: {_listing(ev.tables)}")
    lines.append(f"masked: {_listing(ev.masked)}")
    if ev.filtered:
        lines.append(f"filtered: {_listing(ev.filtered)}")
    lines.append("reasons:")
    lines += [f"  - {reason}" for reason in ev.reasons]
    cap = x.row_cap
    if cap:
        lines.append(f"row cap: {cap['rows']} ({cap['on_exceed']})")
    elif row_cap(x.role):
        lines.append("row cap: none (the statement reads only the catalog)")
    else:
        lines.append("row cap: none")
    if ev.records is not None:
        lines.append(f"records: {records_text(ev.records)}")
    if x.placeholder_key:
        lines.append(PLACEHOLDER_NOTE)
    if ev.allowed:
        unchanged = " (unchanged)" if ev.sql is None else ""
        lines.append(f"sql{unchanged}:")
        lines += ["  " + line for line in pretty(x.sent).splitlines()]
    return "\n".join(lines) + "\n"


def records_text(spec: RecordSpec) -> str:
    """How the relay accounts the rows' records (docs/policy.md, "Records")."""
    parts = []
    if spec.tables:
        per = "per group of one record" if spec.grouped else "per row"
        columns = ", ".join(f"{HIDDEN_PREFIX}{i}" for i in range(spec.hidden))
        parts.append(
            f"{', '.join(spec.tables)} by primary key, {per} (hidden {columns}, "
            "removed before the client)"
        )
    if spec.unkeyed:
        parts.append("each row counts as one new record (its records cannot be keyed)")
    return "; ".join(parts)


def _listing(items: Sequence[str]) -> str:
    return ", ".join(items) or "none"


# --- tests files ----------------------------------------------------------------------

_TOP_KEYS = ("policy", "schema", "cases")
_CASE_KEYS = (
    "name",
    "role",
    "user",
    "break_glass",
    "sql",
    "expect",
    "sqlstate",
    "rewritten_contains",
)
_EXPECT = ("allow", "refuse")


@dataclass(frozen=True, slots=True)
class Case:
    index: int
    line: int
    role: str
    sql: str
    expect: str
    name: str | None = None
    sqlstate: str | None = None
    contains: tuple[str, ...] = ()
    user: str | None = None  # for a per-user role (default: its first member)
    break_glass: bool = False  # under the role's break_glass rules

    @property
    def label(self) -> str:
        return self.name if self.name else f"#{self.index + 1}"


@dataclass(frozen=True, slots=True)
class TestsFile:
    path: Path
    policy: Policy
    schema: str
    cases: tuple[Case, ...]


class _Reader:
    """Validates a tests document, collecting `file:line:col: key: message` errors."""

    def __init__(self, path: Path, doc: MarkedDocument) -> None:
        self.path = path
        self.doc = doc
        self.errors: list[str] = []

    def error(self, at: YamlPath, message: str, *, key: bool = False) -> None:
        label = f"{dotted(at)}: " if at else ""
        self.errors.append(f"{where(self.path, self.doc.position(at, key=key))}: {label}{message}")

    def mapping(self, at: YamlPath, value: object, keys: Sequence[str]) -> dict[str, object]:
        if not isinstance(value, dict):
            self.error(at, "must be a mapping")
            return {}
        for unknown in (k for k in value if k not in keys):
            self.error((*at, unknown), f"unknown key (known: {', '.join(keys)})", key=True)
        return value

    def text(self, at: YamlPath, value: object, *, required: bool = True) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            what = "is required" if value is None else "must be a non-empty string"
            self.error(at, what)
            return None
        return value

    def top(self) -> tuple[str | None, str | None, list[object]]:
        data = self.mapping((), self.doc.data, _TOP_KEYS)
        policy = self.text(("policy",), data.get("policy"))
        schema = self.text(("schema",), data.get("schema"))
        cases = data.get("cases")
        if not isinstance(cases, list) or not cases:
            self.error(("cases",), "must be a non-empty list of cases")
            return policy, schema, []
        return policy, schema, cases

    def case(self, index: int, value: object, policy: Policy | None) -> Case | None:
        at: YamlPath = ("cases", index)
        if not isinstance(value, dict):
            self.error(at, "must be a mapping (role, sql, expect, ...)")
            return None
        data = self.mapping(at, value, _CASE_KEYS)
        before = len(self.errors)
        role = self.text((*at, "role"), data.get("role"))
        if role is not None and policy is not None and role not in policy.roles:
            known = ", ".join(sorted(policy.roles))
            self.error((*at, "role"), f'unknown role "{role}" (roles: {known})')
        sql = self.text((*at, "sql"), data.get("sql"))
        expect = data.get("expect")
        if expect not in _EXPECT:
            self.error((*at, "expect"), "must be allow or refuse")
        name = self.text((*at, "name"), data.get("name"), required=False)
        user = self.text((*at, "user"), data.get("user"), required=False)
        sqlstate = self._sqlstate(at, data.get("sqlstate"), expect)
        contains = self._contains(at, data.get("rewritten_contains"), expect)
        glass = self._break_glass(
            (*at, "break_glass"), data.get("break_glass", False), role, policy
        )
        if len(self.errors) > before or role is None or sql is None:
            return None
        line = self.doc.position(at)
        return Case(
            index,
            line[0] if line else 0,
            role,
            sql,
            str(expect),
            name,
            sqlstate,
            contains,
            user,
            glass,
        )

    def _break_glass(
        self, at: YamlPath, value: object, role: str | None, policy: Policy | None
    ) -> bool:
        if not isinstance(value, bool):
            self.error(at, "must be true or false")
            return False
        found = policy.roles.get(role) if policy is not None and role is not None else None
        if value and found is not None and found.break_glass is None:
            self.error(at, f'role "{role}" has no break_glass')
        return value

    def _sqlstate(self, at: YamlPath, value: object, expect: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or len(value) != 5 or not value.isalnum():
            self.error((*at, "sqlstate"), 'must be a quoted five-character SQLSTATE ("42501")')
            return None
        if expect == "allow":
            self.error((*at, "sqlstate"), "only for expect: refuse")
        return value.upper()

    def _contains(self, at: YamlPath, value: object, expect: object) -> tuple[str, ...]:
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(i, str) and i for i in items):
            self.error((*at, "rewritten_contains"), "must be a string or a list of strings")
            return ()
        if expect == "refuse":
            self.error((*at, "rewritten_contains"), "only for expect: allow")
        return tuple(str(i) for i in items)


def read_tests(path: Path) -> TestsFile:
    """Read and validate a tests file (and the policy it names); raises ToolError."""
    try:
        doc = compose_marked(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ToolError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ToolError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except YamlError as exc:
        raise ToolError(f"{where(path, exc.position)}: {exc.message}") from None
    reader = _Reader(path, doc)
    policy_name, schema, raw_cases = reader.top()
    policy = None
    if policy_name is not None:
        try:
            policy = load_policy(path.parent / policy_name)
        except PolicyError as exc:
            reader.errors += exc.errors
    cases = [reader.case(i, value, policy) for i, value in enumerate(raw_cases)]
    if reader.errors or policy is None or schema is None:
        raise ToolError(*reader.errors)
    return TestsFile(path, policy, schema, tuple(c for c in cases if c is not None))


def check_case(engine: Engine, case: Case) -> str | None:
    """Why `case` fails, or None when it passes."""
    role = engine.policy.roles[case.role]
    user = default_user(role.under_break_glass() if case.break_glass else role, case.user)
    ev = engine.evaluate(case.role, case.sql, user=user, break_glass=case.break_glass)
    got = "allow" if ev.allowed else "refuse"
    if got != case.expect:
        detail = f"{ev.sqlstate} {ev.message}" if not ev.allowed else _short(ev.sql or case.sql)
        return f"expected {case.expect}, got {got} ({detail})"
    if case.sqlstate is not None and ev.sqlstate != case.sqlstate:
        return f"expected refuse with {case.sqlstate}, got {ev.sqlstate} ({ev.message})"
    sent = ev.sql if ev.sql is not None else case.sql
    missing = [part for part in case.contains if part not in sent]
    if missing:
        return f"rewritten SQL lacks {json.dumps(missing[0])}: {_short(sent)}"
    return None


def run_tests(path: Path, read_live: SnapshotReader, out: TextIO) -> int:
    """Run every case of a tests file; print failures and a summary; 0 or 1."""
    tests = read_tests(path)
    snapshot = load_snapshot(tests.schema, read_live, base=path.parent)
    key, placeholder = hash_key_for(tests.policy)
    engine = Engine(tests.policy, snapshot, key)
    failed = 0
    for case in tests.cases:
        why = check_case(engine, case)
        if why is not None:
            failed += 1
            print(f"{path}:{case.line}: case {case.label}: {why}", file=out)
    if placeholder and failed:
        print(PLACEHOLDER_NOTE, file=out)
    print(f"{len(tests.cases) - failed} passed, {failed} failed", file=out)
    return 1 if failed else 0


def _short(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
