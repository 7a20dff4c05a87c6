"""Command line: `pgwarden serve | passwd | demo | check | schema | explain | test | replay |
quota`.

Each command is a small function that loads what it needs and hands over to
the module that owns the work. Exit codes: 0 ok, 1 a reported failure (bad
policy, failed test), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from proxy import __version__
from proxy.errors import ConfigError

_T = TypeVar("_T")

if TYPE_CHECKING:
    from proxy.analysis.catalog import Snapshot


def _serve(args: argparse.Namespace) -> int:
    from proxy.net.server import run
    from proxy.settings import load_settings

    settings = load_settings(
        Path(args.config),
        listen=args.listen,
        upstream_dsn=args.upstream,
        policy=args.policy,
        workers=args.workers,
    )
    return run(settings, tuple(sys.argv[1:]))


def _passwd(args: argparse.Namespace) -> int:
    from proxy.auth import passwd_main

    return passwd_main(args.user, sys.stdin, sys.stdout)


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import main as demo_main

    return demo_main(args)


_COLUMNS_SQL = """
    SELECT table_schema, table_name, column_name FROM information_schema.columns
    WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
      AND table_schema NOT LIKE 'pg!_%' ESCAPE '!'
"""


def _check(args: argparse.Namespace) -> int:
    """Validate a policy; with --schema also compare it with a database's columns."""
    from proxy.policy.loader import PolicyError, load_marked
    from proxy.policy.schema import compare_schema

    try:
        policy, doc = load_marked(Path(args.policy))
    except PolicyError as exc:
        print(*exc.errors, sep="\n")
        return 1
    if args.schema:
        rows = _schema_rows(args.schema)
        if rows is None:
            return 2
        errors, warnings = compare_schema(policy, doc, rows)
        found = _filter_errors(policy, doc, args.schema)
        if found is None:
            return 2
        errors += found
        print(*warnings, *errors, sep="\n", end="\n" if warnings or errors else "")
        if errors:
            return 1
    counts = f"{len(policy.roles)} roles, {policy.classified_columns()} classified columns"
    print(f"{args.policy}: ok ({counts})")
    return 0


def _filter_errors(policy: Policy, doc: MarkedDocument, source: str) -> list[str] | None:
    """Row filters resolved against the schema (a snapshot is read only when there are
    filters), or None after saying why the schema cannot be read."""
    from proxy.policytools import ToolError, filter_errors, load_snapshot

    if not any(role.row_filter for role in policy.roles.values()):
        return []
    try:
        snapshot = load_snapshot(source, _live_snapshot)
    except ToolError as exc:
        print(*exc.lines, sep="\n", file=sys.stderr)
        return None
    return filter_errors(policy, doc, snapshot)


class _DatabaseError(Exception):
    """A database a command reads could not be reached or read."""


def _from_database(read: Coroutine[Any, Any, _T]) -> _T:
    """Run one read against a database; its failures become _DatabaseError."""
    import asyncpg

    try:
        return asyncio.run(read)
    except (
        OSError,
        TimeoutError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        raise _DatabaseError(str(exc)) from None


def _schema_rows(source: str) -> list[tuple[str, str, str]] | None:
    """The columns of a database (DSN) or of a snapshot file (`pgwarden schema -o`), or
    None after saying why they cannot be read."""
    from proxy.policytools import ToolError, is_dsn, load_snapshot

    if not is_dsn(source):
        try:
            snapshot = load_snapshot(source, _live_snapshot)
        except ToolError as exc:
            print(*exc.lines, sep="\n", file=sys.stderr)
            return None
        return [(r.schema, r.name, c.name) for r in snapshot.user_relations() for c in r.columns]
    try:
        return _from_database(_read_columns(source))
    except _DatabaseError as exc:
        print(f"pgwarden check: cannot read the schema from the database: {exc}", file=sys.stderr)
        return None


async def _read_columns(dsn: str) -> list[tuple[str, str, str]]:
    """(schema, table, column) for every non-system column the DSN's user can see."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(_COLUMNS_SQL)
    finally:
        await conn.close()
    return [(r["table_schema"], r["table_name"], r["column_name"]) for r in rows]


Command = Callable[[argparse.Namespace], int]


def _tool(command: Command) -> Command:
    """Run a policy-tool command; its ToolError lines go to stderr with exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from proxy.policytools import ToolError

        try:
            return command(args)
        except ToolError as exc:
            print(*exc.lines, sep="\n", file=sys.stderr)
            return 2

    return run


@_tool
def _schema(args: argparse.Namespace) -> int:
    """Print (or write) the schema snapshot of a database as JSON."""
    from proxy.policytools import portable, snapshot_json

    snapshot = _live_snapshot(args.dsn)
    text = snapshot_json(portable(snapshot) if args.portable else snapshot)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"pgwarden schema: cannot write {args.output}: {exc.strerror}")
    return 0


@_tool
def _explain(args: argparse.Namespace) -> int:
    """The engine's verdict on one statement for one role, with the SQL it would send."""
    from proxy.policytools import (
        default_schema,
        explain,
        explain_json,
        explain_text,
        load_snapshot,
        read_policy,
        require_role,
    )

    policy_path = Path(args.policy)
    policy = read_policy(policy_path)
    require_role(policy, args.role)
    source, base = args.schema, None
    if source is None:
        found = default_schema(policy_path)
        if found is None:
            tests = policy_path.with_name(policy_path.stem + ".tests.yaml")
            _fail(
                "pgwarden explain: no schema: pass --schema DSN_OR_JSON_FILE, "
                f"or put `schema:` in {tests}"
            )
        source, base = found
    snapshot = load_snapshot(source, _live_snapshot, base=base)
    result = explain(policy, snapshot, args.role, args.sql, args.user, break_glass=args.break_glass)
    sys.stdout.write((explain_json(result) + "\n") if args.json else explain_text(result))
    return result.exit_code


@_tool
def _replay(args: argparse.Namespace) -> int:
    """An audit log's statements judged under a draft policy: what would change."""
    from proxy.analysis.engine import Engine
    from proxy.policytools import hash_key_for, load_snapshot, read_policy
    from proxy.replay import replay, report_json, report_text

    policy_path = Path(args.policy)
    policy = read_policy(policy_path)
    source, base = _schema_source(args.schema, policy_path, "replay")
    try:
        text = sys.stdin.read() if args.log == "-" else Path(args.log).read_text("utf-8", "replace")
    except OSError as exc:
        _fail(f"pgwarden replay: cannot read {args.log}: {exc.strerror or exc}")
    if '"event": "statement"' not in text and '"event":"statement"' not in text:
        _fail(
            f"pgwarden replay: no statement events in {args.log} "
            "(pgwarden logs them with log.format: json and log.level: info or debug)"
        )
    snapshot = load_snapshot(source, _live_snapshot, base=base)
    engine = Engine(policy, snapshot, hash_key_for(policy)[0])
    report = replay(text.splitlines(), policy, engine)
    out = report_json(report) + "\n" if args.json else report_text(report, args.log, args.policy)
    sys.stdout.write(out)
    return report.exit_code


def _schema_source(schema: str | None, policy_path: Path, tool: str) -> tuple[str, Path | None]:
    """--schema, else `schema:` of POLICY.tests.yaml beside the policy (relative to it)."""
    from proxy.policytools import default_schema

    if schema is not None:
        return schema, None
    found = default_schema(policy_path)
    if found is None:
        tests = policy_path.with_name(policy_path.stem + ".tests.yaml")
        _fail(
            f"pgwarden {tool}: no schema: pass --schema DSN_OR_JSON_FILE, "
            f"or put `schema:` in {tests}"
        )
    return found


@_tool
def _test(args: argparse.Namespace) -> int:
    from proxy.policytools import run_tests

    return run_tests(Path(args.file), _live_snapshot, sys.stdout)


def _fail(*lines: str) -> NoReturn:
    from proxy.policytools import ToolError

    raise ToolError(*lines)


def _live_snapshot(dsn: str) -> Snapshot:
    """The snapshot read from a database; the password from the DSN or the environment."""
    try:
        return _from_database(_read_snapshot(dsn))
    except _DatabaseError as exc:
        _fail(f"pgwarden: cannot read the schema from the database: {exc}")


async def _read_snapshot(dsn: str) -> Snapshot:
    import asyncpg

    from proxy.net.catalog import read_snapshot
    from proxy.settings import PASSWORD_ENV

    password = None if urlsplit(dsn).password else os.environ.get(PASSWORD_ENV)
    conn = await asyncpg.connect(
        dsn,
        password=password,
        timeout=10,
        server_settings={"application_name": "pgwarden schema"},
    )
    try:
        return await read_snapshot(conn)
    finally:
        await conn.close()


# --- quota: read or clear the ledger (docs/quota.md) -------------------------------

# --- trace: attribute leaked per-user hashes (proxy/trace.py) -----------------------


@_tool
def _trace(args: argparse.Namespace) -> int:
    """Which candidate user's per-user hash key produced the hashes in VALUES_FILE."""
    import time

    from proxy.policytools import read_policy
    from proxy.trace import attribute, candidates, hashes_in, per_user_columns, report

    dsn, password, key, policy_path = _trace_sources(args)
    policy = read_policy(policy_path)
    columns = per_user_columns(policy)
    if not columns:
        _fail(f"pgwarden trace: {policy_path} hashes no column per user (per_user: true)")
    users = [u for u in (args.users or "").split(",") if u] or candidates(policy)
    try:
        leaked = hashes_in(Path(args.values_file).read_text(encoding="utf-8", errors="replace"))
    except OSError as exc:
        _fail(f"pgwarden trace: cannot read {args.values_file}: {exc.strerror}")
    try:
        values = _from_database(_read_values(dsn, password, columns))
    except _DatabaseError as exc:
        _fail(f"pgwarden trace: cannot read the hashed columns: {exc}")
    started = time.monotonic()
    results = attribute(leaked, values, users, key)
    elapsed = time.monotonic() - started
    raw = sum(len(v) for v in values.values())
    print(
        f"{args.values_file}: {len(leaked)} hashed values; {raw} raw values of "
        f"{len(columns)} column(s) x {len(users)} user(s) in {elapsed:.1f} s"
    )
    print(*report(results, len(leaked)), sep="\n")
    return 0 if results and results[0].matched else 1


def _trace_sources(args: argparse.Namespace) -> tuple[str, str | None, bytes, Path]:
    """(dsn, password, hash key, policy path) from --config, or --dsn and the environment."""
    from proxy.policytools import HASH_KEY_ENV

    if args.config:
        from proxy.net.server import read_hash_key
        from proxy.settings import load_settings

        settings = load_settings(Path(args.config))
        key = read_hash_key(settings)
        if not key:
            _fail("pgwarden trace: no hash key (hash_key_file or env PGWARDEN_HASH_KEY)")
        policy = Path(args.policy) if args.policy else settings.policy
        return settings.upstream.dsn, settings.upstream.password, key, policy
    from proxy.settings import PASSWORD_ENV

    env_key = os.environ.get(HASH_KEY_ENV)
    if not env_key:
        _fail(f"pgwarden trace: set {HASH_KEY_ENV} to the key pgwarden serves with")
    if not args.policy:
        _fail("pgwarden trace: --policy is required with --dsn")
    password = None if urlsplit(args.dsn).password else os.environ.get(PASSWORD_ENV)
    return args.dsn, password, env_key.encode(), Path(args.policy)


async def _read_values(
    dsn: str, password: str | None, columns: list[str]
) -> dict[str, list[bytes]]:
    """The distinct non-NULL values of each `schema.table.column`, as UTF-8 text."""
    import asyncpg

    from proxy.analysis.masks import quote_ident

    conn = await asyncpg.connect(
        dsn, password=password, timeout=10, server_settings={"application_name": "pgwarden trace"}
    )
    out: dict[str, list[bytes]] = {}
    try:
        for name in columns:
            schema, table, column = name.split(".")
            col = quote_ident(column)
            sql = (
                f"SELECT DISTINCT CAST({col} AS text) AS v FROM "  # noqa: S608 - quoted names
                f"{quote_ident(schema)}.{quote_ident(table)} WHERE {col} IS NOT NULL"
            )
            out[name] = [row["v"].encode() for row in await conn.fetch(sql)]
    finally:
        await conn.close()
    return out


if TYPE_CHECKING:
    from proxy.net.ledger import Ledger
    from proxy.policy import Policy
    from proxy.policy.marked import MarkedDocument
    from proxy.quota import Usage
    from proxy.settings import Settings

_QUOTA_HEADER = (
    "user",
    "role",
    "rows last hour",
    "rows last 24 h",
    "rows_per_hour",
    "rows_per_day",
    "remaining",
)


def _quota_show(args: argparse.Namespace) -> int:
    """Usage per user (last hour, last 24 h) beside the quota of the user's role."""
    from proxy.policy import load_policy
    from proxy.quota import NO_USAGE
    from proxy.settings import load_settings

    settings = load_settings(Path(args.config))
    policy = load_policy(settings.policy)

    async def read(ledger: Ledger) -> tuple[list[tuple[str, Usage]], dict[str, Any]]:
        if args.user is None:
            return await ledger.all_usage(), {}
        usage = await ledger.usage(args.user)
        return [(args.user, usage)], await _records_of(ledger, args.user)

    found = _with_ledger(settings, read)
    if found is None:
        return 2
    usages, records = found
    if args.user is not None and usages[0][1] == NO_USAGE and policy.role_of(args.user) is None:
        print(
            f"pgwarden quota: {args.user!r} has no role in the policy and no usage in the ledger",
            file=sys.stderr,
        )
        return 1
    rows = [_quota_row(policy, user, usage) | records for user, usage in usages]
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
        if records:
            _print_records(policy, args.user, records)
    return 0


async def _records_of(ledger: Ledger, user: str) -> dict[str, Any]:
    """Records shown per window, the lock and the last alerts of `user` (quota show USER)."""
    import time
    from datetime import UTC, datetime

    def iso(at: float) -> str:
        return datetime.fromtimestamp(at, UTC).isoformat()

    lock = await ledger.lock_of(user)
    alerts = await ledger.alerts_of(user, 5)
    return {
        "records": await ledger.seen_counts(user, time.time()),
        "locked": None
        if lock is None
        else {"at": iso(lock[0]), "reason": lock[1], "details": json_loads(lock[2])},
        "alerts": [
            {"at": iso(at), "kind": kind, "table": table, "count": count, "threshold": threshold}
            for at, kind, table, count, threshold in alerts
        ],
    }


def json_loads(text: str) -> Any:
    import json

    return json.loads(text)


def _print_records(policy: Policy, user: str, found: dict[str, Any]) -> None:
    role = policy.role_of(user)
    limits = None if role is None or role.unrestricted else role.limits
    shown = []
    for window, count in found["records"].items():
        budget = getattr(limits, f"records_per_{window}", None) if limits else None
        shown.append(f"{window} {count}" + (f"/{budget}" if budget else ""))
    print(f"records shown: {', '.join(shown)}")
    lock = found["locked"]
    if lock is None:
        print("locked: no")
    else:
        what = ", ".join(f"{k} {v}" for k, v in lock["details"].items() if v)
        print(f"locked: since {lock['at']} ({lock['reason']}{': ' + what if what else ''})")
    for alert in found["alerts"]:
        print(
            f"alert: {alert['at']} {alert['kind']} on {alert['table']} "
            f"({alert['count']} >= {alert['threshold']})"
        )


def _quota_row(policy: Policy, user: str, usage: Usage) -> dict[str, Any]:
    from proxy.policy.model import BREAK_GLASS_BUCKET
    from proxy.quota import remaining

    role = policy.role_of(user)
    limits = None if role is None or role.unrestricted else role.limits
    owner, marker, _ = user.rpartition(BREAK_GLASS_BUCKET)
    if role is None and marker:  # USER#break_glass: that user's break-glass quota
        role = policy.role_of(owner)
        limits = None if role is None or role.break_glass is None else role.break_glass.limits
    return {
        "user": user,
        "role": None if role is None else role.name,
        "rows_last_hour": usage.hour,
        "rows_last_day": usage.day,
        "rows_per_hour": None if limits is None else limits.rows_per_hour,
        "rows_per_day": None if limits is None else limits.rows_per_day,
        "remaining": remaining(limits, usage),
        "hour_frees_at": None if usage.hour_frees_at is None else usage.hour_frees_at.isoformat(),
        "day_frees_at": None if usage.day_frees_at is None else usage.day_frees_at.isoformat(),
    }


_QUOTA_KEYS = (
    "user",
    "role",
    "rows_last_hour",
    "rows_last_day",
    "rows_per_hour",
    "rows_per_day",
    "remaining",
)


def _print_table(rows: list[dict[str, Any]]) -> None:
    """Aligned columns: names left, numbers right, "-" for none."""
    cells: list[tuple[str, ...]] = [_QUOTA_HEADER]
    cells += [tuple("-" if r[k] is None else str(r[k]) for k in _QUOTA_KEYS) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_QUOTA_KEYS))]
    for line in cells:
        text = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(text).rstrip())


def _quota_reset(args: argparse.Namespace) -> int:
    """Clear a user's usage; logged (quota.reset) with the operator's OS user."""
    from proxy import audit
    from proxy.settings import load_settings

    settings = load_settings(Path(args.config))

    async def clear(ledger: Ledger) -> tuple[int, int, bool]:
        buckets = await ledger.reset(args.user)
        return buckets, await ledger.reset_seen(args.user), await ledger.unlock(args.user)

    done = _with_ledger(settings, clear)
    if done is None:
        return 2
    buckets, records, unlocked = done
    # An ops action is always logged, even where the configured level is quieter.
    level = settings.log_level if settings.log_level in ("debug", "info") else "warning"
    audit.configure(settings.log_format, level)
    log = audit.get_logger()
    log.warning(
        "quota.reset",
        user=args.user,
        operator=_operator(),
        buckets=buckets,
        records=records,
        unlocked=unlocked,
    )
    return 0


def _quota_unlock(args: argparse.Namespace) -> int:
    """Lift a user's lock (a decoy touched, a locking alert); records and usage stay."""
    from proxy import audit
    from proxy.settings import load_settings

    settings = load_settings(Path(args.config))

    async def unlock(ledger: Ledger) -> bool:
        return await ledger.unlock(args.user)

    unlocked = _with_ledger(settings, unlock)
    if unlocked is None:
        return 2
    if not unlocked:
        print(f"pgwarden quota: {args.user!r} is not locked", file=sys.stderr)
        return 1
    level = settings.log_level if settings.log_level in ("debug", "info") else "warning"
    audit.configure(settings.log_format, level)
    audit.get_logger().warning("user.unlocked", user=args.user, operator=_operator())
    return 0


def _operator() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid:{os.getuid()}"


def _with_ledger(
    settings: Settings, work: Callable[[Ledger], Coroutine[Any, Any, _T]]
) -> _T | None:
    """Open the ledger, run `work`, close; None after printing why the ledger failed."""
    from proxy.net.ledger import Ledger
    from proxy.quota import LedgerUnavailable

    async def run() -> _T:
        async with Ledger(settings) as ledger:
            return await work(ledger)

    try:
        return asyncio.run(run())
    except LedgerUnavailable as exc:
        print(f"pgwarden quota: the quota ledger is unavailable: {exc.reason}", file=sys.stderr)
        return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgwarden",
        description="A PostgreSQL wire-protocol proxy that enforces data-access policy.",
    )
    p.add_argument("--version", action="version", version=f"pgwarden {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("-c", "--config", required=True, help="pgwarden.yaml")
    s.add_argument("--listen", help="HOST:PORT, overrides listen")
    s.add_argument("--upstream", help="DSN, overrides upstream.dsn")
    s.add_argument("--policy", help="policy file, overrides policy")
    s.add_argument("--workers", type=int, help="worker processes sharing the port")
    s.set_defaults(func=_serve)

    pw = sub.add_parser("passwd", help="read a password on stdin, print a users-file line")
    pw.add_argument("user")
    pw.set_defaults(func=_passwd)

    _demo_parser(sub.add_parser("demo", help="the shop database in PostgreSQL + pgwarden"))

    c = sub.add_parser("check", help="validate a policy file")
    c.add_argument("policy", help="POLICY.yaml")
    c.add_argument(
        "--schema",
        metavar="DSN_OR_JSON_FILE",
        help="also check names against this database, or a snapshot file (pgwarden schema)",
    )
    c.set_defaults(func=_check)

    sc = sub.add_parser("schema", help="print a database's schema snapshot as JSON")
    sc.add_argument("dsn", metavar="DSN", help="postgresql://USER[:PASSWORD]@HOST:PORT/DB")
    sc.add_argument("-o", "--output", metavar="FILE", help="write the JSON here, not stdout")
    sc.add_argument(
        "--portable", action="store_true", help="leave out OIDs (a stable file for explain/test)"
    )
    sc.set_defaults(func=_schema)

    e = sub.add_parser("explain", help="the verdict and rewritten SQL for one statement")
    e.add_argument("-p", "--policy", required=True, help="POLICY.yaml")
    e.add_argument("--role", required=True, help="a role of the policy")
    e.add_argument(
        "--schema",
        metavar="DSN_OR_JSON_FILE",
        help="a postgresql:// DSN, or a snapshot from `pgwarden schema` "
        "(default: `schema:` of POLICY.tests.yaml beside the policy)",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument(
        "--user",
        help="the user, for a role with :user row filters or per-user hashes "
        "(default: its first member)",
    )
    e.add_argument(
        "--break-glass",
        action="store_true",
        help="under the role's break_glass rules (as after SET pgwarden.reason)",
    )
    e.add_argument("sql", metavar="SQL")
    e.set_defaults(func=_explain)

    _trace_parser(sub.add_parser("trace", help="whose per-user hash key made a file's hashes"))

    t = sub.add_parser("test", help="run policy unit tests (role + SQL -> expected verdict)")
    t.add_argument("file", metavar="FILE.tests.yaml")
    t.set_defaults(func=_test)

    _replay_parser(
        sub.add_parser("replay", help="judge an audit log's statements under a draft policy")
    )

    _quota_parser(sub.add_parser("quota", help="read or clear the per-user quota ledger"))
    return p


def _quota_parser(q: argparse.ArgumentParser) -> None:
    qsub = q.add_subparsers(dest="quota_command", required=True)
    qs = qsub.add_parser("show", help="rows read per user in the last hour and 24 h")
    qs.add_argument("user", nargs="?", help="one user (default: everyone with usage)")
    qs.add_argument("-c", "--config", required=True, help="pgwarden.yaml")
    qs.add_argument("--json", action="store_true", help="print a JSON array")
    qs.set_defaults(func=_quota_show)
    qr = qsub.add_parser(
        "reset", help="clear a user's usage and records, and unlock (logged with your OS user)"
    )
    qr.add_argument("user")
    qr.add_argument("-c", "--config", required=True, help="pgwarden.yaml")
    qr.set_defaults(func=_quota_reset)
    qu = qsub.add_parser("unlock", help="lift a user's lock (logged with your OS user)")
    qu.add_argument("user")
    qu.add_argument("-c", "--config", required=True, help="pgwarden.yaml")
    qu.set_defaults(func=_quota_unlock)


def _trace_parser(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("values_file", metavar="VALUES_FILE", help="text holding 16-hex-digit hashes")
    tr.add_argument("-p", "--policy", help="POLICY.yaml (default: policy of --config)")
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--dsn", help="read raw values here (hash key: env PGWARDEN_HASH_KEY)")
    source.add_argument("-c", "--config", help="pgwarden.yaml: its upstream, policy and hash key")
    tr.add_argument("--users", help="candidate users, comma-separated (default: per-user roles)")
    tr.set_defaults(func=_trace)


def _replay_parser(r: argparse.ArgumentParser) -> None:
    r.add_argument("log", metavar="AUDIT.log", help="pgwarden's JSON log (- for stdin)")
    r.add_argument("-p", "--policy", required=True, help="the draft POLICY.yaml")
    r.add_argument(
        "--schema",
        metavar="DSN_OR_JSON_FILE",
        help="a postgresql:// DSN, or a snapshot from `pgwarden schema` "
        "(default: `schema:` of POLICY.tests.yaml beside the policy)",
    )
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_replay)


def _demo_parser(d: argparse.ArgumentParser) -> None:
    d.add_argument("--state", default="state/demo", help="folder for the demo's data")
    d.add_argument("--fresh", action="store_true", help="rebuild the demo database")
    d.add_argument("--listen", default="127.0.0.1:6432")
    d.add_argument(
        "--scenario",
        choices=["insider"],
        help="play a scripted scenario against the demo database and exit",
    )
    d.add_argument("--json", action="store_true", help="with --scenario: print one JSON object")
    d.add_argument("--customers", type=int, help=argparse.SUPPRESS)  # smaller data for tests
    d.set_defaults(func=_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pgwarden: {exc.message}", file=sys.stderr)
        return 2

    except KeyboardInterrupt:
        return 130
