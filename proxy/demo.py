"""`pgwarden demo`: a throwaway PostgreSQL with the shop database, pgwarden in front of it.

Strategy: everything lives in one state folder (default state/demo) so a second run
starts in seconds: the PostgreSQL data directory (<state>/pg), the service account's
random password (svc.password), the hash-mask key (hash.key), the users file and the
generated pgwarden.yaml. The shop database (68,000 synthetic customers, as many as
the incident leaked) is built once and marked done with a file; --fresh deletes the
folder and starts over. The demo staff log in with fixed, printed passwords: this is
a local toy, and a banner with ready psql commands is the point of it.

Whatever happens (Ctrl-C during setup, pgwarden exiting, an error), the finally
clause stops the PostgreSQL server we started.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
from pathlib import Path

import yaml

from proxy.errors import ConfigError
from proxy.pgserver import PgServer

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


def main(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C; returns pgwarden's exit code."""
    state = Path(args.state).absolute()
    policy = repo_root() / "policies" / "example.yaml"
    if args.fresh:
        _wipe(state)
    state.mkdir(parents=True, exist_ok=True)
    pg = PgServer(state / "pg")
    try:
        pg.start()
        config = _prepare(state, pg, policy, args.listen)
        _print_banner(pg, args.listen, config)
        return _serve(config)
    finally:
        pg.stop()


def _serve(config: Path) -> int:
    # Imported here: the tests import shop_sql from this module without the server stack.
    from proxy.net.server import run  # noqa: PLC0415
    from proxy.settings import load_settings  # noqa: PLC0415

    return int(run(load_settings(config)))


def _wipe(state: Path) -> None:
    if (state / "pg").is_dir():
        PgServer(state / "pg").stop()
    shutil.rmtree(state, ignore_errors=True)


def _prepare(state: Path, pg: PgServer, policy: Path, listen: str) -> Path:
    """Build what is missing in the state folder; return the pgwarden.yaml path."""
    svc_password = _secret(state / "svc.password")
    if not (state / "shop.done").exists():
        _build_shop(pg)
        (state / "shop.done").write_text("built\n")
    pg.create_service_account(SERVICE_ACCOUNT, svc_password, "shop")
    os.environ["PGWARDEN_UPSTREAM_PASSWORD"] = svc_password
    users = _write_users(state / "users.txt")
    return _write_config(state, pg, policy, users, listen)


def _build_shop(pg: PgServer) -> None:
    print(f"building the shop database ({DEMO_CUSTOMERS:,} synthetic customers)...", flush=True)
    pg.psql("DROP DATABASE IF EXISTS shop WITH (FORCE);\nCREATE DATABASE shop;\n")
    pg.psql(shop_sql(DEMO_CUSTOMERS), dbname="shop", timeout=900)


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


def _write_config(state: Path, pg: PgServer, policy: Path, users: Path, listen: str) -> Path:
    hash_key = state / "hash.key"
    _secret(hash_key)  # the analyst role's hash mask needs a key
    config = {
        "listen": listen,
        "upstream": {
            "dsn": f"postgresql://{SERVICE_ACCOUNT}@{pg.host}:{pg.port}/shop",
            "tls": "disable",
        },
        "auth": {"users_file": str(users)},
        "policy": str(policy),
        "hash_key_file": str(hash_key),
        "metrics_listen": METRICS_LISTEN,
        "log": {"format": "json", "level": "info"},
    }
    path = state / "pgwarden.yaml"
    _write_private(path, yaml.safe_dump(config, sort_keys=False))
    return path


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def _print_banner(pg: PgServer, listen: str, config: Path) -> None:
    host, _, port = listen.rpartition(":")
    psql = shlex.quote(str(pg.bin_dir / "psql"))
    lines = [
        "",
        f"pgwarden demo: PostgreSQL on {pg.host}:{pg.port}, pgwarden on {listen}",
        f"  config {config}",
        "",
        "Connect as:",
    ]
    for user, (password, role) in DEMO_USERS.items():
        conninfo = f"host={host} port={port} dbname=shop user={user}"
        lines.append(f"  {user:<6} ({role})")
        lines.append(f'    PGPASSWORD={password} {psql} "{conninfo}"')
    lines += [
        "",
        "Try (as dora): SELECT * FROM customers WHERE id = 1;   SELECT count(*) FROM customers;",
        "Restricted roles (support, analyst) log in, but their statements are refused until",
        "the policy engine lands: pgwarden fails closed rather than show raw values.",
        "Ctrl-C stops pgwarden and PostgreSQL.",
        "",
    ]
    print("\n".join(lines), flush=True)
