"""Command line: `pgwarden serve | passwd | demo | check | explain | test | quota`.

Each command is a small function that loads what it needs and hands over to
the module that owns the work. Exit codes: 0 ok, 1 a reported failure (bad
policy, failed test), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.errors import ConfigError


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
    return run(settings)


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


def _schema_rows(dsn: str) -> list[tuple[str, str, str]] | None:
    """The database's columns, or None after saying why they cannot be read."""
    import asyncpg

    try:
        return asyncio.run(_read_columns(dsn))
    except (
        OSError,
        TimeoutError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
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


def _not_yet(args: argparse.Namespace) -> int:
    print(f"pgwarden {args.command}: not available in this version", file=sys.stderr)
    return 2


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

    d = sub.add_parser("demo", help="throwaway PostgreSQL with the shop database + pgwarden")
    d.add_argument("--state", default="state/demo", help="folder for the demo's data")
    d.add_argument("--fresh", action="store_true", help="rebuild the demo database")
    d.add_argument("--listen", default="127.0.0.1:6432")
    d.set_defaults(func=_demo)

    c = sub.add_parser("check", help="validate a policy file")
    c.add_argument("policy", help="POLICY.yaml")
    c.add_argument("--schema", metavar="DSN", help="also check names against this database")
    c.set_defaults(func=_check)

    for name in ("explain", "test", "quota"):
        n = sub.add_parser(name, help="arrives with the policy and quota work")
        n.add_argument("rest", nargs=argparse.REMAINDER)
        n.set_defaults(func=_not_yet)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pgwarden: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
