"""End to end: TLS on both sides, client authentication, startup parameters, passwd.

Everything runs through a real pgwarden subprocess against the session's real
PostgreSQL, with real clients: psycopg (libpq, with SSL) for TLS, asyncpg where
a test needs the SQLSTATE and every field of a login error (libpq reports a
failed login as text only), and a raw socket where a test must see exactly what
pgwarden answers to a startup packet and that it then closes the connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import (
    MD5_PASSWORD,
    MD5_USER,
    PASSWORDS,
    SVC_PASSWORD,
    SVC_USER,
    TRUST_USER,
    Proxy,
    TlsEndpoint,
)
from tlsutil import Pki, TlsFront

from proxy.pgserver import PgServer
from proxy.wire import backend as be
from proxy.wire import frontend as fe

Launcher = Callable[..., Proxy]
CONNECT_TIMEOUT = 10


def connect(
    proxy: Proxy, user: str, password: str | None = None, **params: Any
) -> psycopg.Connection[Any]:
    """A psycopg connection through pgwarden; params are libpq connection parameters."""
    pw = PASSWORDS[user] if password is None else password
    return psycopg.connect(
        proxy.dsn(user, pw), connect_timeout=CONNECT_TIMEOUT, autocommit=True, **params
    )


def scalar(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def works(proxy: Proxy, user: str = "dora", **params: Any) -> None:
    with connect(proxy, user, **params) as conn:
        assert scalar(conn, "SELECT 41 + 1") == 42


# --- asyncpg: login errors with their SQLSTATE and all their fields -----------------------


async def _asyncpg_login(
    proxy: Proxy, user: str, password: str, database: str, settings: Mapping[str, str]
) -> dict[str, Any]:
    conn = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=user,
        password=password,
        database=database,
        ssl=False,  # with ssl=prefer asyncpg retries 28000 in plaintext: one attempt is clearer
        timeout=CONNECT_TIMEOUT,
        server_settings=dict(settings),
    )
    try:
        return {name: await conn.fetchval(f"SHOW {name}") for name in settings}
    finally:
        await conn.close()


def asyncpg_login(
    proxy: Proxy,
    user: str,
    password: str | None = None,
    *,
    database: str = "shop",
    settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Log in with asyncpg; return SHOW for each server setting sent at startup."""
    pw = PASSWORDS.get(user, "") if password is None else password
    return asyncio.run(_asyncpg_login(proxy, user, pw, database, settings or {}))


def login_error(proxy: Proxy, user: str, password: str | None = None, **kw: Any) -> dict[str, Any]:
    """The fields of the error that refuses this asyncpg login."""
    with pytest.raises(asyncpg.PostgresError) as info:
        asyncpg_login(proxy, user, password, **kw)
    fields = info.value.as_dict()
    assert fields.get("severity") == "FATAL", fields
    return fields


# --- raw socket: the reply to a startup packet ------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def recv_message(sock: socket.socket) -> bytes:
    head = recv_exact(sock, 5)
    (length,) = struct.unpack("!I", head[1:])
    return head + recv_exact(sock, length - 4)


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def startup_reply(proxy: Proxy, params: list[tuple[str, str]]) -> tuple[bytes, bool]:
    """Send a StartupMessage; return pgwarden's first reply and whether it then closed."""
    with socket.create_connection((proxy.host, proxy.port), timeout=CONNECT_TIMEOUT) as sock:
        sock.sendall(fe.encode_startup(params))
        reply = recv_message(sock)
        while reply[0] == be.NEGOTIATE_PROTOCOL:
            reply = recv_message(sock)
        return reply, reply[0] == be.ERROR_RESPONSE and closed_by_peer(sock)


def refused_startup(proxy: Proxy, params: list[tuple[str, str]], sqlstate: str) -> dict[str, str]:
    reply, closed = startup_reply(proxy, params)
    assert reply[0] == be.ERROR_RESPONSE, reply
    fields = be.decode_error_fields(reply)
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate), fields
    assert fields["M"].startswith("pgwarden: "), fields
    assert closed, "pgwarden kept the connection open after a FATAL error"
    return fields


BASE_STARTUP = [("user", "dora"), ("database", "shop")]


# --- client TLS ---------------------------------------------------------------------------


def test_sslmode_require_uses_tls(proxy: Proxy) -> None:
    with connect(proxy, "dora", sslmode="require") as conn:
        assert conn.info.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 1") == 1


def test_sslmode_disable_is_plaintext_when_tls_is_optional(proxy: Proxy) -> None:
    with connect(proxy, "dora", sslmode="disable") as conn:
        assert not conn.info.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 1") == 1


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_verify_full_with_the_right_ca(proxy: Proxy, pki: Pki, host: str) -> None:
    with psycopg.connect(
        host=host,
        port=proxy.port,
        user="dora",
        password=PASSWORDS["dora"],
        dbname="shop",
        sslmode="verify-full",
        sslrootcert=str(pki.ca_cert),
        connect_timeout=CONNECT_TIMEOUT,
    ) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 2") == 2


def test_verify_full_with_another_ca_fails(proxy: Proxy, pki: Pki) -> None:
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(proxy, "bob", sslmode="verify-full", sslrootcert=str(pki.other_ca_cert))
    works(proxy)  # the failed handshake cost pgwarden nothing


def test_tls_required_refuses_plaintext_and_serves_tls(pgwarden: Launcher) -> None:
    proxy = pgwarden(tls={"required": True})
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, "alice", sslmode="disable")
    text = str(info.value)
    assert "FATAL" in text
    assert "TLS is required" in text
    fields = refused_startup(proxy, BASE_STARTUP, "28000")
    assert "TLS" in fields["M"]
    with connect(proxy, "dora", sslmode="require") as conn:
        assert conn.info.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 3") == 3
    assert proxy.process.poll() is None


def test_without_a_certificate_tls_is_declined(pgwarden: Launcher) -> None:
    proxy = pgwarden(tls={"cert_file": None, "key_file": None})
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        connect(proxy, "dora", sslmode="require")
    with connect(proxy, "dora", sslmode="prefer") as conn:
        assert not conn.info.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 4") == 4


def test_plaintext_bytes_after_ssl_request_are_refused(proxy: Proxy) -> None:
    # A man in the middle could otherwise inject a startup packet that the server
    # would read as if it had come through TLS (CVE-2021-23222's server-side twin).
    with socket.create_connection((proxy.host, proxy.port), timeout=CONNECT_TIMEOUT) as sock:
        sock.sendall(fe.encode_ssl_request() + fe.encode_startup(BASE_STARTUP))
        reply = recv_message(sock)  # an ErrorResponse, never the 'S' that starts TLS
        assert reply[0] == be.ERROR_RESPONSE, reply
        assert be.decode_error_fields(reply)["C"] == "08P01"
        assert closed_by_peer(sock)


def test_ssl_request_inside_tls_is_a_protocol_violation(proxy: Proxy, pki: Pki) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    with socket.create_connection((proxy.host, proxy.port), timeout=CONNECT_TIMEOUT) as sock:
        sock.sendall(fe.encode_ssl_request())
        assert recv_exact(sock, 1) == b"S"
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(fe.encode_ssl_request())
            reply = recv_message(tls)
            assert be.decode_error_fields(reply)["C"] == "08P01"
            assert closed_by_peer(tls)


# --- upstream TLS -------------------------------------------------------------------------


def logged(proxy: Proxy, prefix: str, at_least: int = 1) -> list[dict[str, Any]]:
    """Events whose name starts with prefix, polled until at_least are there (5 s at most).

    pgwarden writes a refusal to the client before it logs it, so a test that has
    just read the refusal may be a moment ahead of the log.
    """
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in proxy.events() if str(e.get("event", "")).startswith(prefix)]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def upstream_error_events(proxy: Proxy) -> list[dict[str, Any]]:
    return logged(proxy, "upstream.error")


def assert_upstream_unavailable(proxy: Proxy, user: str = "dora") -> dict[str, Any]:
    fields = login_error(proxy, user)
    assert fields["sqlstate"] == "08006", fields
    assert fields["message"] == "pgwarden: upstream database unavailable", fields
    assert proxy.process.poll() is None, proxy.log_tail()
    return fields


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_upstream_verify_full(pgwarden: Launcher, pg_tls: TlsEndpoint, host: str) -> None:
    dsn = f"postgresql://{SVC_USER}@{host}:{pg_tls.port}/shop"
    proxy = pgwarden(upstream={"dsn": dsn, "tls": "verify-full", "ca_file": str(pg_tls.ca_cert)})
    with connect(proxy, "dora") as conn:
        assert scalar(conn, "SELECT current_user") == SVC_USER
        assert scalar(conn, "SELECT count(*) FROM customers") > 0
    assert not [e for e in proxy.events() if e.get("event") == "upstream.error"]


@pytest.mark.parametrize("mode", ["require", "prefer"])
def test_upstream_require_or_prefer_with_tls(
    pgwarden: Launcher, pg_tls: TlsEndpoint, mode: str
) -> None:
    proxy = pgwarden(upstream={"dsn": pg_tls.dsn(), "tls": mode})
    works(proxy)


def test_upstream_prefer_falls_back_to_plaintext(pgwarden: Launcher) -> None:
    works(pgwarden(upstream={"tls": "prefer"}))  # the conftest upstream is the plain `pg`


@pytest.fixture
def tls_front_on_another_address(pg: PgServer, pki: Pki) -> Iterator[TlsFront]:
    """A TLS front on 127.0.0.2, an address the server certificate does not name."""
    front = TlsFront((pg.host, pg.port), pki.server_cert, pki.server_key)
    front.host = "127.0.0.2"
    with front:
        yield front


def test_upstream_verify_full_checks_the_host_name(
    pgwarden: Launcher, pki: Pki, tls_front_on_another_address: TlsFront
) -> None:
    front = tls_front_on_another_address
    dsn = f"postgresql://{SVC_USER}@{front.host}:{front.port}/shop"
    mismatched = pgwarden(upstream={"dsn": dsn, "tls": "verify-full", "ca_file": str(pki.ca_cert)})
    assert_upstream_unavailable(mismatched)
    assert "127.0.0.2" in str(upstream_error_events(mismatched)[0].get("error"))
    # require with a CA file verifies the chain only, as libpq's sslmode=verify-ca
    works(pgwarden(upstream={"dsn": dsn, "tls": "require", "ca_file": str(pki.ca_cert)}))


def test_upstream_require_with_a_ca_file_verifies_the_chain(
    pgwarden: Launcher, pg_tls: TlsEndpoint, pki: Pki
) -> None:
    proxy = pgwarden(
        upstream={"dsn": pg_tls.dsn(), "tls": "require", "ca_file": str(pki.other_ca_cert)}
    )
    assert_upstream_unavailable(proxy)


def test_upstream_verify_full_with_the_wrong_ca(
    pgwarden: Launcher, pg_tls: TlsEndpoint, pki: Pki
) -> None:
    proxy = pgwarden(
        upstream={"dsn": pg_tls.dsn(), "tls": "verify-full", "ca_file": str(pki.other_ca_cert)}
    )
    assert_upstream_unavailable(proxy)
    assert_upstream_unavailable(proxy)  # still serving, still failing closed
    events = upstream_error_events(proxy)
    assert events
    assert "certificate" in str(events[0].get("error", "")).lower(), events[0]


def test_upstream_require_against_a_server_without_tls(pgwarden: Launcher, pg: PgServer) -> None:
    if pg.ssl_cert is not None:
        pytest.skip("this PostgreSQL speaks TLS natively")
    proxy = pgwarden(upstream={"tls": "require"})  # the conftest upstream is the plain `pg`
    assert_upstream_unavailable(proxy)
    assert "TLS" in str(upstream_error_events(proxy)[0].get("error")), proxy.log_tail()


# --- client authentication ----------------------------------------------------------------


def test_wrong_password(proxy: Proxy) -> None:
    fields = login_error(proxy, "alice", "not-alices-password")
    assert fields["sqlstate"] == "28P01"
    assert fields["message"] == 'password authentication failed for user "alice"'


def test_unknown_user_is_indistinguishable_from_a_wrong_password(proxy: Proxy) -> None:
    known = login_error(proxy, "carol", "guess-1")
    unknown = login_error(proxy, "mallory", "guess-1")
    assert unknown["sqlstate"] == "28P01"

    def shape(fields: dict[str, Any], user: str) -> dict[str, Any]:
        return {
            k: v.replace(user, "<user>") if isinstance(v, str) else v for k, v in fields.items()
        }

    assert shape(unknown, "mallory") == shape(known, "carol")


def test_user_without_a_role_is_refused_after_a_correct_password(proxy: Proxy) -> None:
    fields = login_error(proxy, "eve")
    assert fields["sqlstate"] == "28000"
    assert fields["message"].startswith("pgwarden: ")
    assert "eve" in fields["message"]


def test_auth_events_are_logged(pgwarden: Launcher) -> None:
    proxy = pgwarden()
    login_error(proxy, "alice", "wrong")
    with connect(proxy, "alice"):
        pass
    events = logged(proxy, "auth.", at_least=2)
    assert [(e["event"], e.get("user")) for e in events] == [
        ("auth.failed", "alice"),
        ("auth.ok", "alice"),
    ]


def test_upstream_login_with_an_md5_service_account(pgwarden: Launcher, pg: PgServer) -> None:
    proxy = pgwarden(
        upstream={"dsn": f"postgresql://{MD5_USER}@{pg.host}:{pg.port}/shop"},
        extra_env={"PGWARDEN_UPSTREAM_PASSWORD": MD5_PASSWORD},
    )
    with connect(proxy, "dora") as conn:
        assert scalar(conn, "SELECT current_user") == MD5_USER


def test_upstream_login_with_a_trusted_service_account(pgwarden: Launcher, pg: PgServer) -> None:
    proxy = pgwarden(
        upstream={"dsn": f"postgresql://{TRUST_USER}@{pg.host}:{pg.port}/shop"},
        extra_env={"PGWARDEN_UPSTREAM_PASSWORD": ""},
    )
    with connect(proxy, "dora") as conn:
        assert scalar(conn, "SELECT current_user") == TRUST_USER


def test_wrong_upstream_password(pgwarden: Launcher) -> None:
    wrong = "svc-wrong-Zq81x"
    proxy = pgwarden(
        extra_env={"PGWARDEN_UPSTREAM_PASSWORD": wrong}, limits={"max_connections_per_user": 1}
    )
    for _ in range(3):  # each failure gives the user's connection slot back
        assert_upstream_unavailable(proxy)
    events = upstream_error_events(proxy)
    assert events, proxy.log_tail()
    assert "28P01" in str(events[0].get("error")), events[0]
    proxy.stop()
    logs = proxy.log_path.read_text() + proxy.stderr_path.read_text()
    for secret in (wrong, SVC_PASSWORD, PASSWORDS["dora"]):
        assert secret not in logs


# --- startup parameters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("options", "-c search_path=evil"),
        ("replication", "database"),
        ("replication", "true"),
        ("search_path", "evil"),
        ("session_authorization", "postgres"),
        ("role", "postgres"),
        ("no_such_setting", "1"),
        ("client_encoding", "LATIN1"),
        ("client_encoding", "SJIS"),
    ],
)
def test_startup_parameter_refused(proxy: Proxy, name: str, value: str) -> None:
    fields = refused_startup(proxy, [*BASE_STARTUP, (name, value)], "42501")
    assert name in fields["M"] or value in fields["M"], fields
    assert "application_name" in fields.get("H", ""), fields  # the hint says what is allowed


def test_options_refused_through_libpq(proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="options"):
        connect(proxy, "dora", options="-c search_path=evil")
    with pytest.raises(psycopg.OperationalError, match="LATIN1"):
        connect(proxy, "dora", client_encoding="LATIN1")


def test_formatting_parameters_accepted_through_asyncpg(proxy: Proxy) -> None:
    settings = {
        "application_name": "pgwarden-tls-auth-test",
        "DateStyle": "SQL, DMY",
        "TimeZone": "Asia/Tokyo",
        "extra_float_digits": "2",
        "statement_timeout": "5s",
        "lock_timeout": "2s",
        "idle_in_transaction_session_timeout": "1min",
    }
    shown = asyncpg_login(proxy, "dora", settings=settings)
    assert shown == settings
    assert asyncpg_login(proxy, "alice", settings=settings) == settings  # restricted too


def test_formatting_parameters_accepted_through_libpq(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGDATESTYLE", "German")  # libpq sends these in the startup packet
    monkeypatch.setenv("PGTZ", "Europe/Paris")
    with connect(proxy, "dora", application_name="ops console", client_encoding="UTF8") as conn:
        assert scalar(conn, "SHOW application_name") == "ops console"
        assert scalar(conn, "SHOW DateStyle") == "German, DMY"
        assert scalar(conn, "SHOW TimeZone") == "Europe/Paris"
        assert scalar(conn, "SHOW client_encoding") == "UTF8"


def test_wrong_database(proxy: Proxy) -> None:
    fields = login_error(proxy, "dora", database="postgres")
    assert fields["sqlstate"] == "3D000"
    refused_startup(proxy, [("user", "dora"), ("database", "template1")], "3D000")


def test_startup_refusals_do_not_kill_the_proxy(proxy: Proxy) -> None:
    for _ in range(3):
        refused_startup(proxy, [*BASE_STARTUP, ("options", "-c role=postgres")], "42501")
    works(proxy)


# --- pgwarden passwd ----------------------------------------------------------------------


def passwd_command() -> list[str]:
    script = Path(sys.executable).with_name("pgwarden")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


def test_passwd_line_works_for_a_real_login(pgwarden: Launcher, tmp_path: Path) -> None:
    password = "Fresh pass: ünïcode & spaces"
    done = subprocess.run(
        [*passwd_command(), "passwd", "dora"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith('"dora" "SCRAM-SHA-256$')
    assert password not in done.stdout
    users = tmp_path / "passwd-users.txt"
    users.write_text(line + "\n")
    proxy = pgwarden(auth={"users_file": str(users)})
    with connect(proxy, "dora", password=password) as conn:
        assert scalar(conn, "SELECT current_user") == SVC_USER
    assert login_error(proxy, "dora", PASSWORDS["dora"])["sqlstate"] == "28P01"
    assert login_error(proxy, "bob")["sqlstate"] == "28P01"  # not in this users file
