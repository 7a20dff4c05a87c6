"""The real-PostgreSQL harness: start/stop, accounts, TLS, root handling, demo data."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import psycopg
import pytest
from conftest import (
    MD5_PASSWORD,
    MD5_USER,
    SHOP_CUSTOMERS,
    SVC_PASSWORD,
    SVC_USER,
    TlsEndpoint,
)
from psycopg import errors
from tlsutil import Pki

from proxy.demo import shop_sql
from proxy.pgserver import PG_SYSTEM_USER, PgServer, PgServerError, ssl_supported


def _expected_uid() -> int:
    return pwd.getpwnam(PG_SYSTEM_USER).pw_uid if os.geteuid() == 0 else os.getuid()


def _postmaster(data_dir: Path) -> list[str]:
    return (data_dir / "postmaster.pid").read_text().splitlines()


def _stored_password(pg: PgServer, role: str) -> str:
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))
        return str(row.fetchone()[0])


def test_service_account_logs_in_with_scram(pg: PgServer) -> None:
    with psycopg.connect(pg.dsn(SVC_USER, SVC_PASSWORD, "shop")) as conn:
        row = conn.execute("SELECT current_user, count(*) FROM customers").fetchone()
    assert row == (SVC_USER, SHOP_CUSTOMERS)
    assert _stored_password(pg, SVC_USER).startswith("SCRAM-SHA-256$4096:")


def test_wrong_password_is_refused(pg: PgServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(SVC_USER, "not-the-password", "shop"))


def test_md5_account_logs_in(pg: PgServer) -> None:
    with psycopg.connect(pg.dsn(MD5_USER, MD5_PASSWORD, "shop")) as conn:
        row = conn.execute("SELECT current_user, count(*) FROM orders").fetchone()
    assert row == (MD5_USER, 2 * SHOP_CUSTOMERS)
    assert _stored_password(pg, MD5_USER).startswith("md5")


def test_service_account_has_dml_and_its_ledger_schema_only(pg: PgServer) -> None:
    with psycopg.connect(pg.dsn(SVC_USER, SVC_PASSWORD, "shop")) as conn:
        with conn.transaction(force_rollback=True):
            cur = conn.execute("UPDATE orders SET total = total WHERE id = 1")
            assert cur.rowcount == 1
            conn.execute("CREATE TABLE pgwarden.ledger_probe (n int)")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE public.sneaky (n int)")


def test_env_runs_the_wheels_psql(pg: PgServer) -> None:
    out = subprocess.run(
        [str(pg.bin_dir / "psql"), "-XAtc", "SELECT current_user || '@' || current_database()"],
        env=pg.env(SVC_USER, SVC_PASSWORD, "shop"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == f"{SVC_USER}@shop"


def test_psql_raises_on_sql_errors(pg: PgServer) -> None:
    with pytest.raises(PgServerError, match="no_such_table"):
        pg.psql("SELECT * FROM no_such_table")


def test_shop_data_is_deterministic(pg: PgServer) -> None:
    pg.psql("CREATE DATABASE shop_copy")
    try:
        pg.psql(shop_sql(SHOP_CUSTOMERS), dbname="shop_copy")
        digest = "SELECT md5(string_agg(t::text, ',' ORDER BY t.id)) FROM {} AS t"
        for table in ("customers", "support_tickets", "orders", "payment_cards"):
            query = digest.format(table)
            assert pg.psql(query, dbname="shop") == pg.psql(query, dbname="shop_copy")
    finally:
        pg.psql("DROP DATABASE shop_copy")
    first = pg.psql("SELECT full_name, email, phone FROM customers WHERE id = 1", dbname="shop")
    assert first.strip() == "Hiro Nguyen|hiro.nguyen1@example.org|+1-555-1000003"
    tickets = pg.psql("SELECT count(DISTINCT ticket_no) FROM support_tickets", dbname="shop")
    assert int(tickets) == SHOP_CUSTOMERS * 3 // 2


def test_tls_verify_full(pg_tls: TlsEndpoint) -> None:
    dsn = pg_tls.dsn(SVC_USER, SVC_PASSWORD)
    with psycopg.connect(dsn, sslmode="verify-full", sslrootcert=str(pg_tls.ca_cert)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (SHOP_CUSTOMERS,)


def test_tls_with_another_ca_is_refused(pg_tls: TlsEndpoint, pki: Pki) -> None:
    dsn = pg_tls.dsn(SVC_USER, SVC_PASSWORD)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn, sslmode="verify-full", sslrootcert=str(pki.other_ca_cert))


def test_tls_endpoint_still_takes_plaintext(pg_tls: TlsEndpoint) -> None:
    with psycopg.connect(pg_tls.dsn(SVC_USER, SVC_PASSWORD), sslmode="disable") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_native_ssl_needs_an_ssl_build(tmp_path: Path, pki: Pki) -> None:
    server = PgServer(tmp_path / "data", ssl_cert=pki.server_cert, ssl_key=pki.server_key)
    if not ssl_supported():
        with pytest.raises(PgServerError, match="no SSL support"):
            server.start()
        assert not (tmp_path / "data").exists()  # refused before initdb
        return
    with (
        server,
        psycopg.connect(server.dsn(), sslmode="verify-full", sslrootcert=str(pki.ca_cert)) as conn,
    ):
        assert conn.pgconn.ssl_in_use


def test_server_runs_unprivileged(pg: PgServer) -> None:
    assert pg.data_dir.stat().st_uid == _expected_uid()
    pid = int(_postmaster(pg.data_dir)[0])
    if Path("/proc").is_dir():
        assert Path(f"/proc/{pid}").stat().st_uid == _expected_uid()


def test_lifecycle_restart_adopt_and_long_paths(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 90) / "data"  # too long for a unix socket inside it
    server = PgServer(data_dir)
    server.start()
    try:
        server.start()  # already running: a no-op
        server.psql("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
        socket_dir = _postmaster(data_dir)[4]
        assert not socket_dir.startswith(str(data_dir))
        with psycopg.connect(
            host=socket_dir, port=server.port, user="postgres", password="postgres"
        ) as conn:
            assert conn.execute("SELECT n FROM kept").fetchone() == (42,)
        other = PgServer(data_dir)  # a second handle adopts the running server's port
        other.start()
        assert other.port == server.port
    finally:
        server.stop()
        server.stop()
    assert not server.is_running()
    assert not Path(socket_dir).exists()
    with PgServer(data_dir) as again:  # no initdb: the data survived
        assert again.psql("SELECT n FROM kept").strip() == "42"
