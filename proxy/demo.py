"""`pgwarden demo`: a throwaway PostgreSQL with the shop database, pgwarden in front of it.

Strategy: everything lives in one state folder (default state/demo) so a second run
starts in seconds: the PostgreSQL data directory (<state>/pg), the service account's
random password (svc.password, and svc.pgpass, the libpq passfile the configs name),
the hash-mask key (hash.key), the users file and the generated pgwarden.yaml. The shop
database (68,000 synthetic customers, as many as the incident leaked) is built once
and marked done with a file holding its customer count (a different count rebuilds
it); --fresh deletes the folder and starts over. The demo staff log in with fixed,
printed passwords: this is a local toy, and a banner with ready psql commands is the
point of it.

`--scenario insider` (proxy/demo_scenario.py) uses the same state folder; this
module gives it the folder (`open_state`), a config of its own (`write_config`)
and `DemoClient`, blocking asyncpg connections as one demo user. The client lives
here because the demo is the one place outside proxy/net allowed an event loop
(tests/test_layering.py): it only drives a real client, no protocol code.

Whatever happens (Ctrl-C during setup, pgwarden exiting, an error), the finally
clause stops the PostgreSQL server we started.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import secrets
import shlex
import shutil
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import yaml

from proxy.errors import ConfigError
from proxy.pgserver import PgServer

_T = TypeVar("_T")

DEMO_CUSTOMERS = 68_000
SERVICE_ACCOUNT = "pgwarden_svc"
METRICS_LISTEN = "127.0.0.1:9187"
# user -> (password, role in policies/example.yaml)
DEMO_USERS = {
    "alice": ("alice-demo", "support"),
    "carol": ("carol-demo", "support"),
    "bob": ("bob-demo", "analyst"),
    "dora": ("dora-demo", "dba"),
}
# The banner's example: customer 1634 of the deterministic shop data (proxy/demo_shop.sql),
# whose open ticket TKT-0101808 is assigned to alice (support sees only such customers).
EXAMPLE_QUERY = (
    "SELECT id, full_name, email, phone FROM customers"
    " WHERE email = 'ines.muller1634@inbox.example';"
)
_SHOP_SQL = Path(__file__).with_name("demo_shop.sql")


def shop_sql(customers: int) -> str:
    """Schema and deterministic data of the shop database, for `customers` customers."""
    if customers < 1:
        raise ValueError("customers must be at least 1")
    setting = f"SELECT set_config('pgwarden.demo_customers', '{int(customers)}', false);\n"
    return setting + _SHOP_SQL.read_text()


def repo_root() -> Path:
    """The checkout this module runs from (the demo uses its policies/ folder)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "policies" / "example.yaml").is_file():
        raise ConfigError(
            "demo", f"policies/example.yaml not found under {root}; run from a checkout"
        )
    return root


def demo_policy() -> Path:
    return repo_root() / "policies" / "example.yaml"


def main(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or the scenario asked for); returns the exit code."""
    customers = args.customers or DEMO_CUSTOMERS
    if args.scenario is not None:
        from proxy.demo_scenario import main as scenario_main  # noqa: PLC0415 - see _serve

        return scenario_main(args, customers)
    if args.json:
        raise ConfigError("demo", "--json goes with --scenario")
    state = open_state(Path(args.state).absolute(), fresh=args.fresh, customers=customers)
    try:
        config = write_config(state.folder, state.pg, "pgwarden.yaml", args.listen, METRICS_LISTEN)
        _print_banner(state.pg, args.listen, config)
        return _serve(config)
    finally:
        state.pg.stop()  # even one that a crashed run left behind


def _serve(config: Path) -> int:
    # Imported here: the tests import shop_sql from this module without the server stack.
    from proxy.net.server import run  # noqa: PLC0415
    from proxy.settings import load_settings  # noqa: PLC0415

    return int(run(load_settings(config)))


def _wipe(state: Path) -> None:
    if (state / "pg").is_dir():
        PgServer(state / "pg").stop()
    shutil.rmtree(state, ignore_errors=True)


@dataclass(frozen=True)
class DemoState:
    """A state folder whose PostgreSQL runs with the shop database built."""

    folder: Path
    pg: PgServer
    started_pg: bool  # False: it was running already (`make demo` elsewhere): leave it


def open_state(folder: Path, *, fresh: bool, customers: int) -> DemoState:
    """Start (or join) the state folder's PostgreSQL and build what is missing."""
    demo_policy()  # fail before starting anything when run outside a checkout
    if fresh:
        _wipe(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pg = PgServer(folder / "pg")
    was_running = pg.is_running()
    try:
        pg.start()
        prepare_state(folder, pg, customers)
    except BaseException:
        if not was_running:
            pg.stop()
        raise
    return DemoState(folder, pg, started_pg=not was_running)


def close_state(state: DemoState) -> None:
    """Stop PostgreSQL if open_state started it."""
    if state.started_pg:
        state.pg.stop()


def prepare_state(state: Path, pg: PgServer, customers: int) -> None:
    """The shop database, the service account and the users file, built when missing."""
    svc_password = _secret(state / "svc.password")
    done = state / "shop.done"
    if _built_count(done) != customers:
        _build_shop(pg, customers)
        done.write_text(f"{customers}\n")
    pg.create_service_account(SERVICE_ACCOUNT, svc_password, "shop")
    # A libpq passfile (any port: PostgreSQL gets a free one at each start), so that
    # `pgwarden quota ... -c state/demo/pgwarden.yaml` works from any terminal.
    _write_private(state / "svc.pgpass", f"{pg.host}:*:shop:{SERVICE_ACCOUNT}:{svc_password}\n")
    _write_users(state / "users.txt")


def _built_count(done: Path) -> int | None:
    """The customer count the shop database was built with, None when not built."""
    text = done.read_text().strip() if done.exists() else ""
    return int(text) if text.isdigit() else None


def _build_shop(pg: PgServer, customers: int) -> None:
    # stderr: progress, so that stdout stays the banner, or the scenario's JSON
    print(f"building the shop database ({customers:,} synthetic customers)...", file=sys.stderr)
    pg.psql("DROP DATABASE IF EXISTS shop WITH (FORCE);\nCREATE DATABASE shop;\n")
    pg.psql(shop_sql(customers), dbname="shop", timeout=900)


def _secret(path: Path) -> str:
    """A random secret kept in a 0600 file, made on first use."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    _write_private(path, value + "\n")
    return value


def _write_users(path: Path) -> Path:
    from proxy.auth import make_secret  # noqa: PLC0415 - see _serve

    lines = [f'"{user}" "{make_secret(pw)}"\n' for user, (pw, _role) in DEMO_USERS.items()]
    _write_private(path, "".join(lines))
    return path


def write_config(
    state: Path, pg: PgServer, name: str, listen: str, metrics_listen: str | None
) -> Path:
    """A pgwarden.yaml (state/name) for the state folder's database; its path."""
    hash_key = state / "hash.key"
    _secret(hash_key)  # the analyst role's hash mask needs a key
    config = {
        "listen": listen,
        "upstream": {
            "dsn": f"postgresql://{SERVICE_ACCOUNT}@{pg.host}:{pg.port}/shop",
            "tls": "disable",
            "passfile": str(state / "svc.pgpass"),
        },
        "auth": {"users_file": str(state / "users.txt")},
        "policy": str(demo_policy()),
        "hash_key_file": str(hash_key),
        "metrics_listen": metrics_listen,
        "log": {"format": "json", "level": "info"},
    }
    path = state / name
    _write_private(path, yaml.safe_dump(config, sort_keys=False))
    return path


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def psql_command(listen: str, user: str) -> str:
    """The shell line that logs `user` in through pgwarden with the wheel's psql."""
    from proxy.pgserver import bin_dir  # noqa: PLC0415 - see _serve

    host, _, port = listen.rpartition(":")
    password = DEMO_USERS[user][0]
    conninfo = f"host={host} port={port} dbname=shop user={user} sslmode=disable"
    return f"PGPASSWORD={password} {shlex.quote(str(bin_dir() / 'psql'))} {shlex.quote(conninfo)}"


def _support_limits() -> str:
    """The support role's row limits, as the policy file sets them."""
    from proxy.policy import load_policy  # noqa: PLC0415 - see _serve

    limits = load_policy(demo_policy()).roles["support"].limits
    if limits is None:
        return "no row limits"
    return f"{limits.rows_per_query} rows per statement, {limits.rows_per_hour} per hour"


def _print_banner(pg: PgServer, listen: str, config: Path) -> None:
    lines = [
        "",
        f"pgwarden demo: PostgreSQL on {pg.host}:{pg.port}, pgwarden on {listen}",
        f"  config {config}",
        "",
        "Connect as:",
    ]
    for user, (_password, role) in DEMO_USERS.items():
        lines.append(f"  {user:<6} ({role})")
        lines.append(f"    {psql_command(listen, user)}")
    lines += [
        "",
        "Try, as alice (support: only the customers of her own open tickets; e-mails and",
        f"phones masked, streets refused, {_support_limits()}):",
        f"  {EXAMPLE_QUERY}",
        "  SELECT full_name, street FROM customers WHERE id = 1;      -- refused: 42501",
        "  SELECT id, email FROM customers;                           -- refused: 54000",
        "  SET pgwarden.reason = 'CS-0042 fraud call';  -- break-glass: 15 min without the filter",
        "as bob (analyst: classified values hashed), and as dora (dba: unrestricted, logged):",
        "  SELECT id, full_name, email FROM customers ORDER BY id LIMIT 3;",
        "The insider scenario, scripted: pgwarden demo --scenario insider (make demo-insider).",
        "Ctrl-C stops pgwarden and PostgreSQL.",
        "",
    ]
    print("\n".join(lines), flush=True)


# --- a scripted client (the insider scenario) -----------------------------------------


@dataclass(frozen=True)
class SqlError:
    """An ErrorResponse as the client received it."""

    sqlstate: str
    message: str
    hint: str | None


@dataclass(frozen=True)
class Outcome:
    """What one statement gave the client: rows (as text), or an error."""

    columns: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    error: SqlError | None = None


class DemoClient:
    """Blocking asyncpg connections, by name, as one user; server errors come back as values.

    A private event loop runs each call to completion, so a script reads top to
    bottom; `connect` and `query_many` run their parts concurrently.
    """

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        self._host, self._port, self._user, self._password = host, port, user, password
        self._loop = asyncio.new_event_loop()
        self._conns: dict[str, asyncpg.Connection] = {}

    def connect(self, *names: str) -> dict[str, SqlError | None]:
        """Open a connection per name, all at once; None for each that logged in."""
        return dict(zip(names, self._run(_gather(*(self._open(n) for n in names))), strict=True))

    def query(self, name: str, sql: str, *args: object) -> Outcome:
        """One statement on connection `name` (extended protocol, as most drivers)."""
        return self._run(self._fetch(name, sql, args))

    def execute(self, name: str, sql: str) -> Outcome:
        """One statement in a simple Query (as psql sends it); no rows come back."""
        return self._run(self._execute(name, sql))

    def query_many(self, jobs: Sequence[tuple[str, str]]) -> list[Outcome]:
        """(connection, sql) pairs, run at the same time; outcomes in order."""
        return self._run(_gather(*(self._fetch(name, sql, ()) for name, sql in jobs)))

    def copy_out(self, name: str, sql: str) -> Outcome:
        """COPY (sql) TO STDOUT on connection `name`; the rows as lines of text."""
        return self._run(self._copy(name, sql))

    def disconnect(self, *names: str) -> None:
        """Close these connections (Terminate, as a client exiting does)."""
        for name in names:
            self._run(self._conns.pop(name).close(timeout=5))

    def close(self) -> None:
        """Close every connection and the loop; at once if a call was interrupted (Ctrl-C)."""
        try:
            self.disconnect(*self._conns)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            for conn in self._conns.values():
                conn.terminate()
        finally:
            self._conns.clear()
            self._loop.close()

    def _run(self, work: Coroutine[Any, Any, _T]) -> _T:
        return self._loop.run_until_complete(work)

    async def _open(self, name: str) -> SqlError | None:
        try:
            conn = await asyncpg.connect(
                host=self._host,
                port=self._port,
                user=self._user,
                password=self._password,
                database="shop",
                ssl=False,
                timeout=30,
                command_timeout=60,
                # no statement cache: one prepared before a break-glass window is refused in it
                statement_cache_size=0,
            )
        except asyncpg.PostgresError as exc:
            return _error(exc)
        self._conns[name] = conn
        return None

    async def _fetch(self, name: str, sql: str, args: Sequence[object]) -> Outcome:
        try:
            records = await self._conns[name].fetch(sql, *args)
        except asyncpg.PostgresError as exc:
            return Outcome(error=_error(exc))
        except asyncpg.InterfaceError as exc:  # the connection is gone
            return Outcome(error=SqlError("08003", str(exc), None))
        columns = tuple(records[0].keys()) if records else ()
        return Outcome(columns, tuple(tuple(_text(v) for v in r.values()) for r in records))

    async def _execute(self, name: str, sql: str) -> Outcome:
        try:
            await self._conns[name].execute(sql)
        except asyncpg.PostgresError as exc:
            return Outcome(error=_error(exc))
        except asyncpg.InterfaceError as exc:
            return Outcome(error=SqlError("08003", str(exc), None))
        return Outcome()

    async def _copy(self, name: str, sql: str) -> Outcome:
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        try:
            await self._conns[name].copy_from_query(sql, output=sink)
        except asyncpg.PostgresError as exc:
            return Outcome(error=_error(exc))
        lines = b"".join(chunks).decode().splitlines()
        return Outcome(("line",), tuple((line,) for line in lines))


async def _gather(*work: Coroutine[Any, Any, _T]) -> list[_T]:
    return list(await asyncio.gather(*work))


def _error(exc: asyncpg.PostgresError) -> SqlError:
    if exc.message is None:  # asyncpg's own: the server ended the session (08003)
        return SqlError(str(exc.sqlstate), "the server closed the connection", exc.hint)
    return SqlError(str(exc.sqlstate), str(exc.message), exc.hint)


def _text(value: object) -> str:
    """A result value as text; NULL for null, so that a redacted column shows."""
    if value is None:
        return "NULL"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="minutes")
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)
