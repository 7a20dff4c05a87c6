"""Command line: `pgwarden serve | passwd | demo | check | schema | explain | test | quota`.

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
        print(*warnings, *errors, sep="\n", end="\n" if warnings or errors else "")
        if errors:
            return 1
    counts = f"{len(policy.roles)} roles, {policy.classified_columns()} classified columns"
    print(f"{args.policy}: ok ({counts})")
    return 0


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
    result = explain(policy, snapshot, args.role, args.sql)
    sys.stdout.write((explain_json(result) + "\n") if args.json else explain_text(result))
    return result.exit_code


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

if TYPE_CHECKING:
    from proxy.net.ledger import Ledger
    from proxy.policy import Policy
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

    async def read(ledger: Ledger) -> list[tuple[str, Usage]]:
        if args.user is None:
            return await ledger.all_usage()
        return [(args.user, await ledger.usage(args.user))]

    found = _with_ledger(settings, read)
    if found is None:
        return 2
    if args.user is not None and found[0][1] == NO_USAGE and policy.role_of(args.user) is None:
        print(
            f"pgwarden quota: {args.user!r} has no role in the policy and no usage in the ledger",
            file=sys.stderr,
        )
        return 1
    rows = [_quota_row(policy, user, usage) for user, usage in found]
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


def _quota_row(policy: Policy, user: str, usage: Usage) -> dict[str, Any]:
    from proxy.quota import remaining

    role = policy.role_of(user)
    limits = None if role is None or role.unrestricted else role.limits
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

    async def clear(ledger: Ledger) -> int:
        return await ledger.reset(args.user)

    buckets = _with_ledger(settings, clear)
    if buckets is None:
        return 2
    # An ops action is always logged, even where the configured level is quieter.
    level = settings.log_level if settings.log_level in ("debug", "info") else "warning"
    audit.configure(settings.log_format, level)
    log = audit.get_logger()
    log.warning("quota.reset", user=args.user, operator=_operator(), buckets=buckets)
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
    e.add_argument("sql", metavar="SQL")
    e.set_defaults(func=_explain)

    t = sub.add_parser("test", help="run policy unit tests (role + SQL -> expected verdict)")
    t.add_argument("file", metavar="FILE.tests.yaml")
    t.set_defaults(func=_test)

    q = sub.add_parser("quota", help="read or clear the per-user quota ledger")
    qsub = q.add_subparsers(dest="quota_command", required=True)
    qs = qsub.add_parser("show", help="rows read per user in the last hour and 24 h")
    qs.add_argument("user", nargs="?", help="one user (default: everyone with usage)")
    qs.add_argument("-c", "--config", required=True, help="pgwarden.yaml")
    qs.add_argument("--json", action="store_true", help="print a JSON array")
    qs.set_defaults(func=_quota_show)
    qr = qsub.add_parser("reset", help="clear a user's usage (logged with your OS user)")
    qr.add_argument("user")
    qr.add_argument("-c", "--config", required=True, help="pgwarden.yaml")
    qr.set_defaults(func=_quota_reset)
    return p


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
