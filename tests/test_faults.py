"""End to end: faults, limits and shutdown, through a real pgwarden subprocess.

Each test breaks something on purpose (a malformed or oversized message, a
silent or idle client, an unreachable or dying upstream, a flood of garbage,
SIGTERM mid-statement, too many connections) and checks the three error
families: the peer that broke the protocol gets a FATAL ErrorResponse and is
closed; a refusal leaves the session usable; pgwarden itself stays up and
keeps serving everyone else.

Raw sockets speak the protocol where a test must see exactly what pgwarden
sends (RawClient logs in with scramp's SCRAM client); psycopg is the ordinary
client elsewhere. Mostly dora (role dba, unrestricted) runs statements, so that a
fault test measures the relay and not the policy engine.
Timing checks use bounded polling with generous upper bounds, never fixed sleeps
that must be "long enough".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PASSWORDS, SVC_PASSWORD, SVC_USER, Proxy
from scramp import ScramClient

from proxy.pgserver import PgServer, free_port
from proxy.wire import backend as be
from proxy.wire import frontend as fe

Launcher = Callable[..., Proxy]
TIMEOUT = 10.0
SCRAM = "SCRAM-SHA-256"


# --- a raw protocol client ----------------------------------------------------------------


class RawClient:
    """A blocking socket speaking protocol v3 message by message."""

    def __init__(self, proxy: Proxy, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def message(self) -> bytes:
        head = self._exact(5)
        (length,) = struct.unpack("!I", head[1:])
        return head + self._exact(length - 4)

    def until_ready(self) -> list[bytes]:
        """Messages up to and including ReadyForQuery."""
        out = [self.message()]
        while out[-1][0] != be.READY_FOR_QUERY:
            out.append(self.message())
        return out

    def closed_by_peer(self) -> bool:
        """True once the peer closes (recv returns b'' or the connection resets)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def fatal(self) -> dict[str, str]:
        """Read the FATAL ErrorResponse pgwarden sends, then check it closed."""
        msg = self.message()
        while msg[0] in (be.NOTICE_RESPONSE, be.PARAMETER_STATUS):
            msg = self.message()
        assert msg[0] == be.ERROR_RESPONSE, msg
        fields = be.decode_error_fields(msg)
        assert fields["S"] == "FATAL", fields
        assert self.closed_by_peer(), f"still open after {fields}"
        return fields

    def startup(self, user: str, **params: str) -> None:
        self.send(fe.encode_startup([("user", user), ("database", "shop"), *params.items()]))

    def login(self, user: str, password: str | None = None, **params: str) -> list[bytes]:
        """SCRAM-SHA-256 login; return the messages after AuthenticationOk."""
        self.startup(user, **params)
        client = ScramClient([SCRAM], user, PASSWORDS[user] if password is None else password)
        assert be.decode_auth(self.message())[0] == be.AUTH_SASL
        self.send(fe.encode_sasl_initial(SCRAM, client.get_client_first().encode()))
        reply = self.message()
        if reply[0] == be.ERROR_RESPONSE:
            return [reply]
        client.set_server_first(be.decode_auth(reply)[1].decode())
        self.send(fe.encode_password(client.get_client_final().encode()))
        reply = self.message()
        if reply[0] == be.ERROR_RESPONSE:
            return [reply]
        client.set_server_final(be.decode_auth(reply)[1].decode())
        assert be.decode_auth(self.message())[0] == be.AUTH_OK
        first = self.message()
        if first[0] == be.ERROR_RESPONSE:
            return [first]
        return [first, *self.until_ready()] if first[0] != be.READY_FOR_QUERY else [first]

    def query(self, sql: str) -> list[bytes]:
        self.send(fe.encode_query(sql))
        return self.until_ready()


@contextlib.contextmanager
def raw(proxy: Proxy, timeout: float = TIMEOUT) -> Iterator[RawClient]:
    client = RawClient(proxy, timeout)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def logged_in(proxy: Proxy, user: str = "dora") -> Iterator[RawClient]:
    with raw(proxy) as client:
        replies = client.login(user)
        assert replies[-1][0] == be.READY_FOR_QUERY, [be.decode_error_fields(m) for m in replies]
        yield client


def error_fields(messages: list[bytes]) -> list[dict[str, str]]:
    return [be.decode_error_fields(m) for m in messages if m[0] == be.ERROR_RESPONSE]


def rows(messages: list[bytes]) -> int:
    return sum(1 for m in messages if m[0] == be.DATA_ROW)


def login_refusal(proxy: Proxy, user: str = "dora") -> dict[str, str]:
    """Log in expecting a FATAL refusal; return its fields (the socket must close)."""
    with raw(proxy) as client:
        replies = client.login(user)
        assert replies[-1][0] == be.ERROR_RESPONSE, replies
        fields = be.decode_error_fields(replies[-1])
        assert fields["S"] == "FATAL", fields
        assert client.closed_by_peer()
        return fields


def connect(proxy: Proxy, user: str = "dora", **params: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        proxy.dsn(user, PASSWORDS[user]), connect_timeout=10, autocommit=True, **params
    )


def scalar(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def serves(proxy: Proxy) -> None:
    """pgwarden is alive and a fresh client gets an answer."""
    assert proxy.process.poll() is None, proxy.log_tail()
    with connect(proxy) as conn:
        assert scalar(conn, "SELECT 6 * 7") == 42


def collect_notices(conn: psycopg.Connection[Any]) -> list[tuple[str | None, str | None]]:
    """(severity, SQLSTATE) of what libpq hands its notice processor.

    libpq passes an ErrorResponse that arrives between queries (a FATAL sent by
    pgwarden on its own, say) to the notice processor, then reports the closed
    connection on the next query.
    """
    notices: list[tuple[str | None, str | None]] = []
    conn.add_notice_handler(lambda diag: notices.append((diag.severity, diag.sqlstate)))
    return notices


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"


def wait_until_running(pg: PgServer, application_name: str, sql_prefix: str) -> None:
    """Poll pg_stat_activity until the backend named application_name runs the statement."""
    with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True, connect_timeout=10) as admin:
        wait_for(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND state = 'active' AND starts_with(query, %s)",
                    (application_name, sql_prefix),
                ).fetchone()
                == (1,)
            ),
            10,
            f"{sql_prefix!r} to run",
        )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def logged(proxy: Proxy, event: str, at_least: int = 1) -> list[dict[str, Any]]:
    """The events named event, polled until at_least are there (5 s at most).

    pgwarden writes a refusal to the client before it logs it, so a test that has
    just read the refusal may be a moment ahead of the log.
    """
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in proxy.events() if e.get("event") == event]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def internal_errors(proxy: Proxy) -> list[dict[str, Any]]:
    return [e for e in proxy.events() if e.get("event") == "internal.error"]


# --- malformed messages ------------------------------------------------------------------

BIND = b"B" + struct.pack("!I", 12) + b"\0\0" + b"\0\0\0\0\0\0"
EXECUTE = b"E" + struct.pack("!I", 9) + b"\0" + b"\0\0\0\0"

MALFORMED_AFTER_LOGIN = {
    "length-below-4": b"Q\0\0\0\x02",
    "length-zero": b"Q\0\0\0\0",
    "unknown-type": b"z\0\0\0\x04",
    "nul-type": b"\0\0\0\0\x04",
    "password-in-ready": fe.encode_password(b"hunter2\0"),
    "query-without-nul": b"Q\0\0\0\x0cSELECT 1",
    "query-trailing-bytes": b"Q\0\0\0\x0fSELECT 1\0xyz",
    "query-not-utf8": fe.encode_query("SELECT 1")[:-1].replace(b"1", b"\xff") + b"\0",
    "parse-negative-param-count": b"P\0\0\0\x10\0SELECT 1\0\xff\xff",
    "parse-truncated": b"P\0\0\0\x0e\0SELECT 1\0",
    "bind-unterminated": b"B\0\0\0\x08abcd",
    "describe-bad-target": b"D\0\0\0\x06X\0",
    "close-trailing-bytes": b"C\0\0\0\x08S\0zz",
}


@pytest.mark.parametrize("name", list(MALFORMED_AFTER_LOGIN))
def test_malformed_message_after_login(proxy: Proxy, name: str) -> None:
    with logged_in(proxy) as client:
        client.send(MALFORMED_AFTER_LOGIN[name])
        fields = client.fatal()
        assert fields["C"] == "08P01", fields
        assert fields["M"].startswith("pgwarden: "), fields
    serves(proxy)


@pytest.mark.parametrize("message", [BIND, EXECUTE, b"Q\0\0\0\x0dSELECT 1\0"], ids=["B", "E", "Q"])
def test_regular_message_before_startup(proxy: Proxy, message: bytes) -> None:
    with raw(proxy) as client:
        client.send(message)
        fields = client.fatal()
        assert fields["C"] == "08P01", fields
    serves(proxy)


def test_malformed_message_breaks_only_its_own_session(proxy: Proxy) -> None:
    with logged_in(proxy) as bystander, logged_in(proxy) as victim:
        victim.send(b"Q\0\0\0\x01")
        assert victim.fatal()["C"] == "08P01"
        assert rows(bystander.query("SELECT 1")) == 1


def test_oversized_message_refused_before_its_body(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"max_message_bytes": 65536})
    with logged_in(proxy) as client:
        assert rows(client.query("SELECT repeat('x', 60000)")) == 1  # under the cap: fine
        started = time.monotonic()
        client.send(b"Q" + struct.pack("!I", 1 << 30))  # 1 GB declared, no body sent
        fields = client.fatal()
        assert fields["C"] == "54000", fields
        assert time.monotonic() - started < 3
    serves(proxy)


def test_oversized_startup_packet(proxy: Proxy) -> None:
    with raw(proxy) as client:
        client.send(struct.pack("!II", 1 << 30, fe.PROTOCOL_3_0))
        assert client.fatal()["C"] == "08P01"


# --- timeouts ----------------------------------------------------------------------------


def closes_within(client: RawClient, limit: float) -> float:
    """Seconds until pgwarden closes this client (an ErrorResponse may come first)."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        while data := client.sock.recv(4096):
            assert data[:1] == b"E", data
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"closed after {elapsed:.1f}s"
    return elapsed


@pytest.mark.parametrize(
    "sent",
    [b"", fe.encode_startup([("user", "dora"), ("database", "shop")])[:11], b"\0\0"],
    ids=["nothing", "half-startup", "half-length"],
)
def test_startup_timeout(pgwarden: Launcher, sent: bytes) -> None:
    proxy = pgwarden(limits={"startup_timeout_s": 1})
    with raw(proxy, timeout=TIMEOUT) as client:
        client.send(sent)
        assert closes_within(client, 3.5) > 0.5
    serves(proxy)


def test_startup_timeout_during_authentication(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"startup_timeout_s": 1})
    with raw(proxy) as client:
        client.startup("dora")
        assert be.decode_auth(client.message())[0] == be.AUTH_SASL
        closes_within(client, 3.5)


def test_idle_timeout_closes_an_idle_session(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"idle_timeout_s": 1})
    with connect(proxy) as conn:
        notices = collect_notices(conn)
        assert scalar(conn, "SELECT 1") == 1
        time.sleep(2.5)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        # the FATAL comes alone, long before the query; if the query's write meets the
        # closed socket first, the reset may discard it (the raw client below reads it)
        assert notices in ([], [("FATAL", "57P05")]), notices
    with logged_in(proxy) as client:
        started = time.monotonic()
        fields = client.fatal()  # arrives by itself, without any query
        assert fields["C"] == "57P05", fields
        assert time.monotonic() - started < 3


def test_idle_timeout_spares_active_sessions(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"idle_timeout_s": 1})
    with connect(proxy) as conn:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert scalar(conn, "SELECT 1") == 1
            time.sleep(0.3)
        assert scalar(conn, "SELECT 1 FROM pg_sleep(1.6)") == 1  # a long statement is not idle


# --- upstream faults ---------------------------------------------------------------------


def test_upstream_unreachable(pgwarden: Launcher, proxy: Proxy) -> None:
    closed_port = free_port()
    broken = pgwarden(upstream={"dsn": f"postgresql://{SVC_USER}@127.0.0.1:{closed_port}/shop"})
    for _ in range(2):
        fields = login_refusal(broken)
        assert fields["C"] == "08006", fields
        assert fields["M"] == "pgwarden: upstream database unavailable", fields
        assert str(closed_port) not in fields["M"] + fields.get("H", "")
    assert broken.process.poll() is None, broken.log_tail()
    assert len(logged(broken, "upstream.error", at_least=2)) == 2, broken.log_tail()
    serves(proxy)


def test_upstream_unreachable_does_not_leak_the_per_user_slot(pgwarden: Launcher) -> None:
    closed_port = free_port()
    broken = pgwarden(
        upstream={"dsn": f"postgresql://{SVC_USER}@127.0.0.1:{closed_port}/shop"},
        limits={"max_connections_per_user": 1},
    )
    for _ in range(3):
        assert login_refusal(broken)["C"] == "08006"


class FaultyUpstream:
    """A TCP server on 127.0.0.1 playing a broken PostgreSQL: handle(conn, stop) per client.

    Handlers run in daemon threads, poll `stop` through short socket timeouts, and
    every socket is closed on exit (tests turn ResourceWarnings into errors).
    """

    def __init__(self, handle: Callable[[socket.socket, threading.Event], None]) -> None:
        self.handle = handle
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]

    def dsn(self) -> str:
        return f"postgresql://{SVC_USER}@127.0.0.1:{self.port}/shop"

    def __enter__(self) -> FaultyUpstream:
        self.threads[0].start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in list(self.threads):
            thread.join(timeout=10)
        self.listener.close()
        for sock in self.sockets:
            sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.1)
            self.sockets.append(conn)
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handle(conn, self.stop)


def read_until_eof(conn: socket.socket, stop: threading.Event) -> None:
    """Swallow what arrives, answer nothing."""
    while not stop.is_set():
        try:
            if not conn.recv(65536):
                return
        except TimeoutError:
            continue


def hang_up(conn: socket.socket, stop: threading.Event) -> None:
    conn.close()


def speak_garbage(conn: socket.socket, stop: threading.Event) -> None:
    with contextlib.suppress(TimeoutError):
        conn.recv(65536)  # the SSLRequest or StartupMessage
    conn.sendall(random.Random(7).randbytes(4096))
    read_until_eof(conn, stop)


def relay_cut_after(pg: PgServer, limit: int) -> Callable[[socket.socket, threading.Event], None]:
    """Relay to the real server, then drop both sides once `limit` bytes came back."""

    def relay(conn: socket.socket, stop: threading.Event) -> None:
        with socket.create_connection((pg.host, pg.port), timeout=10) as up:
            up.settimeout(0.05)
            down = 0
            while not stop.is_set() and down < limit:
                with contextlib.suppress(TimeoutError):
                    data = conn.recv(65536)
                    if not data:
                        return
                    up.sendall(data)
                with contextlib.suppress(TimeoutError):
                    data = up.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
                    down += len(data)
        conn.shutdown(socket.SHUT_RDWR)

    return relay


@pytest.mark.parametrize("handle", [hang_up, speak_garbage], ids=["hang-up", "garbage"])
def test_broken_upstream(pgwarden: Launcher, proxy: Proxy, handle: Any) -> None:
    with FaultyUpstream(handle) as upstream:
        broken = pgwarden(upstream={"dsn": upstream.dsn(), "tls": "disable"})
        for _ in range(2):
            fields = login_refusal(broken)
            assert fields["C"] == "08006", fields
            assert "pgwarden: " in fields["M"]
        assert broken.process.poll() is None, broken.log_tail()
        assert not internal_errors(broken)
    serves(proxy)


def test_upstream_hang_up_is_logged_as_upstream_error(pgwarden: Launcher) -> None:
    with FaultyUpstream(hang_up) as upstream:
        broken = pgwarden(upstream={"dsn": upstream.dsn(), "tls": "disable"})
        fields = login_refusal(broken)
        assert fields["C"] == "08006"
        assert fields["M"] == "pgwarden: upstream database unavailable", fields
        assert logged(broken, "upstream.error"), broken.log_tail()


def test_silent_upstream_times_out_during_tls_negotiation(pgwarden: Launcher) -> None:
    with FaultyUpstream(read_until_eof) as upstream:
        broken = pgwarden(
            upstream={"dsn": upstream.dsn(), "tls": "prefer", "connect_timeout_s": 1},
            limits={"startup_timeout_s": 20},
        )
        started = time.monotonic()
        fields = login_refusal(broken)
        assert fields["C"] == "08006", fields
        assert time.monotonic() - started < 4


def test_silent_upstream_times_out_during_login(pgwarden: Launcher) -> None:
    with FaultyUpstream(read_until_eof) as upstream:
        broken = pgwarden(
            upstream={"dsn": upstream.dsn(), "tls": "disable", "connect_timeout_s": 1},
            limits={"startup_timeout_s": 5},
        )
        started = time.monotonic()
        fields = login_refusal(broken)
        elapsed = time.monotonic() - started
        assert fields["C"] == "08006", fields
        assert elapsed < 4, elapsed
        assert logged(broken, "upstream.error"), broken.log_tail()


def test_upstream_connection_cut_mid_result(pgwarden: Launcher, pg: PgServer) -> None:
    with FaultyUpstream(relay_cut_after(pg, 200_000)) as upstream:
        cut = pgwarden(upstream={"dsn": upstream.dsn(), "tls": "disable"})
        with connect(cut) as victim, connect(cut) as bystander:
            assert scalar(victim, "SELECT 1") == 1
            with pytest.raises(psycopg.OperationalError):
                victim.execute("SELECT repeat('x', 1000) FROM generate_series(1, 5000)").fetchall()
            assert scalar(bystander, "SELECT 2") == 2
        assert cut.process.poll() is None, cut.log_tail()
        assert not internal_errors(cut)
        serves(cut)


def terminate_backend(pg: PgServer, application_name: str) -> None:
    with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True, connect_timeout=10) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row == (1,), f"expected one backend named {application_name}, got {row}"


def test_upstream_backend_dies_mid_session(proxy: Proxy, pg: PgServer) -> None:
    victim_name = unique_name("faults-victim")
    with (
        connect(proxy, application_name=victim_name) as victim,
        connect(proxy, application_name="faults-bystander") as bystander,
    ):
        assert scalar(victim, "SELECT 1") == 1
        terminate_backend(pg, victim_name)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert victim.closed or victim.broken
        assert scalar(bystander, "SELECT 2") == 2
    serves(proxy)


def test_upstream_backend_dies_during_a_statement(proxy: Proxy, pg: PgServer) -> None:
    victim_name = unique_name("faults-busy-victim")
    with connect(proxy, application_name=victim_name) as victim:
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                victim.execute("SELECT pg_sleep(20)")
            except Exception as exc:  # noqa: BLE001 - inspected by the test thread
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        wait_until_running(pg, victim_name, "SELECT pg_sleep")
        terminate_backend(pg, victim_name)
        worker.join(timeout=5)
        assert not worker.is_alive(), "the client kept waiting after its backend died"
        assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
    serves(proxy)


def test_upstream_backend_dies_while_raw_client_waits(proxy: Proxy, pg: PgServer) -> None:
    name = unique_name("faults-raw-victim")
    with raw(proxy) as client:
        assert client.login("dora", application_name=name)[-1][0] == be.READY_FOR_QUERY
        terminate_backend(pg, name)
        first = client.message()  # unsolicited: the server's FATAL, relayed or replaced
        assert first[0] == be.ERROR_RESPONSE, first
        assert be.decode_error_fields(first)["S"] == "FATAL"
        with contextlib.suppress(EOFError, ConnectionResetError):
            while True:
                assert client.message()[0] == be.ERROR_RESPONSE
        assert client.closed_by_peer()
    serves(proxy)


# --- FunctionCall ------------------------------------------------------------------------


def function_call(oid: int, *args: bytes) -> bytes:
    body = struct.pack("!Ih", oid, 0) + struct.pack("!h", len(args))
    body += b"".join(struct.pack("!i", len(a)) + a for a in args) + struct.pack("!h", 0)
    return b"F" + struct.pack("!I", len(body) + 4) + body


def test_function_call_refused_and_session_continues(proxy: Proxy) -> None:
    with logged_in(proxy) as client:
        oid = 2026  # pg_backend_pid(); any function: the call must never reach the server
        client.send(function_call(oid))
        replies = client.until_ready()
        errors = error_fields(replies)
        assert [e["C"] for e in errors] == ["42501"], errors
        assert errors[0]["S"] == "ERROR"
        assert errors[0]["M"].startswith("pgwarden: ")
        assert replies[-1] == be.ready_for_query(b"I")
        assert not any(m[0] == be.FUNCTION_RESULT for m in replies)
        assert rows(client.query("SELECT 1")) == 1
        client.send(fe.encode_query("BEGIN"))
        client.until_ready()
        client.send(function_call(oid, b"x"))
        assert client.until_ready()[-1] == be.ready_for_query(b"E")  # failed, as for any error
        client.send(fe.encode_query("SELECT 1"))
        assert [e["C"] for e in error_fields(client.until_ready())] == ["25P02"]
        client.query("ROLLBACK")
        assert rows(client.query("SELECT 1")) == 1


# --- garbage -----------------------------------------------------------------------------

GARBAGE_CONNECTIONS = 10_000
GARBAGE_CONCURRENCY = 50
GARBAGE_SEED = 20240611


def _startup_bytes(rng: random.Random) -> bytes:
    return fe.encode_startup(
        [("user", rng.choice(["dora", "alice", "nobody"])), ("database", "shop")]
    )


def _sasl_first(rng: random.Random) -> bytes:
    nonce = "".join(rng.choice("abcdefghijklmnop0123456789") for _ in range(24))
    return fe.encode_sasl_initial(SCRAM, f"n,,n=,r={nonce}".encode())


Garbage = tuple[str, bytes]  # (how to deliver it, the bytes)


def _length_then_noise(rng: random.Random, noise: bytes) -> Garbage:
    return "plain", struct.pack("!I", rng.randrange(8, 10_001)) + noise


def _protocol_code_then_noise(rng: random.Random, noise: bytes) -> Garbage:
    body = struct.pack("!I", fe.PROTOCOL_3_0) + noise
    return "plain", struct.pack("!I", len(body) + 4) + body


def _startup_then_noise(rng: random.Random, noise: bytes) -> Garbage:
    return "plain", _startup_bytes(rng) + noise


def _sasl_first_then_noise(rng: random.Random, noise: bytes) -> Garbage:
    return "plain", _startup_bytes(rng) + _sasl_first(rng) + noise


def _ssl_request_and_noise(rng: random.Random, noise: bytes) -> Garbage:
    return "plain", fe.encode_ssl_request() + noise  # in the same segment


def _cancel_then_noise(rng: random.Random, noise: bytes) -> Garbage:
    return "plain", fe.encode_cancel(rng.randrange(1 << 31), rng.randbytes(4)) + noise


def _gssenc_then_noise(rng: random.Random, noise: bytes) -> Garbage:
    return "plain", struct.pack("!II", 8, fe.GSSENC_REQUEST) + noise


def _noise_for_client_hello(rng: random.Random, noise: bytes) -> Garbage:
    return "after-S", noise


def _noise_inside_tls(rng: random.Random, noise: bytes) -> Garbage:
    return "in-tls", (_startup_bytes(rng) if rng.random() < 0.5 else b"") + noise


def _noise(rng: random.Random, noise: bytes) -> Garbage:
    return "plain", noise


GARBAGE_KINDS: list[Callable[[random.Random, bytes], Garbage]] = [
    _length_then_noise,
    _protocol_code_then_noise,
    _startup_then_noise,
    _sasl_first_then_noise,
    _ssl_request_and_noise,
    _cancel_then_noise,
    _gssenc_then_noise,
    _noise_for_client_hello,
    _noise_inside_tls,
    _noise,
    _noise,
    _noise,
]


def garbage_payload(rng: random.Random) -> Garbage:
    """Random bytes, alone or after a valid prefix that leads pgwarden into a later phase."""
    noise = rng.randbytes(rng.choice([1, 3, 4, 5, 7, 8, 9, 16, 64, 300, 2000, 9000]))
    return rng.choice(GARBAGE_KINDS)(rng, noise)


async def _deliver(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str, data: bytes
) -> None:
    if mode != "plain":
        writer.write(fe.encode_ssl_request())
        assert await reader.readexactly(1) == b"S"
    if mode == "in-tls":
        await writer.start_tls(_CLIENT_TLS)
    writer.write(data)
    await writer.drain()
    if mode != "in-tls":  # TLS streams cannot half-close; pgwarden answers or waits
        writer.write_eof()


_CLIENT_TLS = ssl.create_default_context()
_CLIENT_TLS.check_hostname = False
_CLIENT_TLS.verify_mode = ssl.CERT_NONE


async def _one_garbage_connection(proxy: Proxy, garbage: Garbage) -> bytes:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    reply = b""
    try:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await _deliver(reader, writer, *garbage)
            wait = TIMEOUT if garbage[0] != "in-tls" else 0.5
            with contextlib.suppress(TimeoutError):
                reply = await asyncio.wait_for(reader.read(1 << 20), wait)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    return reply


async def _garbage_flood(proxy: Proxy, payloads: list[Garbage]) -> list[bytes]:
    gate = asyncio.Semaphore(GARBAGE_CONCURRENCY)

    async def one(garbage: Garbage) -> bytes:
        async with gate:
            return await _one_garbage_connection(proxy, garbage)

    return await asyncio.gather(*(one(p) for p in payloads))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def garbage_then_logged_in(proxy: Proxy, rng: random.Random, count: int) -> None:
    for _ in range(count):
        with logged_in(proxy) as client:
            client.send(bytes([rng.choice(b"QPBzp\0\xff")]) + rng.randbytes(rng.randrange(4, 64)))
            client.sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):
                while client.sock.recv(65536):
                    pass


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_garbage_flood_leaves_the_proxy_healthy(pgwarden: Launcher) -> None:
    proxy = pgwarden()
    serves(proxy)
    rss_before = rss_kib(proxy.process.pid)
    rng = random.Random(GARBAGE_SEED)
    payloads = [garbage_payload(rng) for _ in range(GARBAGE_CONNECTIONS)]
    started = time.monotonic()
    replies = asyncio.run(_garbage_flood(proxy, payloads))
    elapsed = time.monotonic() - started
    garbage_then_logged_in(proxy, rng, 20)

    assert len(replies) == GARBAGE_CONNECTIONS
    assert proxy.process.poll() is None, proxy.log_tail()
    answered = [r for r in replies if r]
    assert len(answered) > GARBAGE_CONNECTIONS // 2  # most got an error or an auth request
    rss_after = rss_kib(proxy.process.pid)
    assert rss_after < rss_before + 64 * 1024, (rss_before, rss_after)
    assert not internal_errors(proxy), internal_errors(proxy)[:3]
    serves(proxy)
    assert elapsed < 90, f"{GARBAGE_CONNECTIONS} connections took {elapsed:.1f}s"


# --- SIGTERM -----------------------------------------------------------------------------


def refuses_connections(proxy: Proxy) -> bool:
    try:
        with socket.create_connection((proxy.host, proxy.port), timeout=2):
            return False
    except OSError:
        return True


def test_sigterm_lets_the_running_statement_finish(pgwarden: Launcher, pg: PgServer) -> None:
    proxy = pgwarden(limits={"shutdown_timeout_s": 8})
    outcome: dict[str, Any] = {}
    name = unique_name("faults-sigterm")
    with connect(proxy, application_name=name) as conn:
        notices = collect_notices(conn)
        assert scalar(conn, "SELECT 1") == 1

        def run() -> None:
            try:
                outcome["value"] = scalar(conn, "SELECT 7 FROM pg_sleep(1.5)")
            except Exception as exc:  # noqa: BLE001 - reported by the test thread
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        wait_until_running(pg, name, "SELECT 7 FROM pg_sleep")
        sent = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(proxy), 1.0, "the listener to close")
        worker.join(timeout=10)
        assert not worker.is_alive()
        assert outcome == {"value": 7}, outcome
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        # libpq hands an error that arrives between queries to the notice processor
        assert notices == [("FATAL", "57P01")], notices
    assert proxy.process.wait(timeout=8 + 5) == 0
    assert time.monotonic() - sent < 8, "exited only when the shutdown timeout cut in"
    assert any(e.get("event") == "shutdown" for e in proxy.events())


def test_sigterm_with_an_idle_session_exits_promptly(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"shutdown_timeout_s": 20})
    with connect(proxy) as conn, logged_in(proxy) as client:
        assert scalar(conn, "SELECT 1") == 1
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=10) == 0
        assert time.monotonic() - started < 3
        fields = client.fatal()
        assert fields["C"] == "57P01", fields
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


def test_sigterm_cancels_what_outlives_the_shutdown_timeout(
    pgwarden: Launcher, pg: PgServer
) -> None:
    proxy = pgwarden(limits={"shutdown_timeout_s": 1})
    name = unique_name("faults-sigterm-slow")
    with raw(proxy) as client:
        assert client.login("dora", application_name=name)[-1][0] == be.READY_FOR_QUERY
        client.send(fe.encode_query("SELECT pg_sleep(60)"))
        wait_until_running(pg, name, "SELECT pg_sleep")
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=30) == 0  # long before the statement would end
        closes_within(client, 5)


def test_sigterm_timeout_cancels_the_statement_in_the_database(
    pgwarden: Launcher, pg: PgServer
) -> None:
    proxy = pgwarden(limits={"shutdown_timeout_s": 1})
    name = unique_name("faults-sigterm-orphan")
    with raw(proxy) as client:
        assert client.login("dora", application_name=name)[-1][0] == be.READY_FOR_QUERY
        client.send(fe.encode_query("SELECT pg_sleep(8)"))
        wait_until_running(pg, name, "SELECT pg_sleep")
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=10) == 0
    with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True, connect_timeout=10) as admin:
        wait_for(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND state = 'active'",
                    (name,),
                ).fetchone()
                == (0,)
            ),
            3,
            "the statement to be cancelled in the database",
        )


# --- connection limits -------------------------------------------------------------------


def test_max_connections_per_user(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"max_connections_per_user": 2})
    with logged_in(proxy), logged_in(proxy):
        fields = login_refusal(proxy, "dora")
        assert fields["C"] == "53300", fields
        assert fields["M"].startswith("pgwarden: "), fields
        with logged_in(proxy, "alice"):  # the limit is per user
            pass
    with logged_in(proxy), logged_in(proxy):  # slots come back when sessions end
        pass
    serves(proxy)


def test_max_connections(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"max_connections": 3, "max_connections_per_user": 3})
    serves(proxy)  # the fixture's port probe has surely been reaped by now
    with logged_in(proxy, "alice"), logged_in(proxy, "bob"), logged_in(proxy, "dora"):
        with raw(proxy) as fourth:
            fourth.startup("carol")
            fields = fourth.fatal()
            assert fields["C"] == "53300", fields
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients"):
            connect(proxy, sslmode="disable")
    serves(proxy)


def test_max_connections_reason_reaches_a_default_libpq_client(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"max_connections": 2, "max_connections_per_user": 2})
    serves(proxy)  # the fixture's port probe has surely been reaped by now
    with logged_in(proxy, "alice"), logged_in(proxy, "bob"):
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            connect(proxy)  # sslmode=prefer, as psql and every libpq tool by default
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            connect(proxy, sslmode="require")


# --- what the log must never hold --------------------------------------------------------


def test_log_holds_no_password_and_no_literal(pgwarden: Launcher) -> None:
    proxy = pgwarden(log={"level": "debug"})
    secrets = ["pii-literal-123", "pii-param-456", "pii-error-789", "wrong-pw-314"]
    with connect(proxy) as conn:
        assert scalar(conn, "SELECT 'pii-literal-123' AS x") == "pii-literal-123"
        assert conn.execute("SELECT %s::text", ("pii-param-456",)).fetchone() == ("pii-param-456",)
        assert conn.execute("SELECT %s::text", ("pii-param-456",), prepare=True).fetchone()
        with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="pii-error-789"):
            conn.execute("SELECT 'pii-error-789'::int")
    with logged_in(proxy, "alice") as client:
        errors = error_fields(client.query("SELECT 'pii-literal-123' FROM payment_cards"))
        assert [e["C"] for e in errors] == ["42501"]
    with raw(proxy) as client:
        replies = client.login("alice", "wrong-pw-314")
        assert error_fields(replies)[0]["C"] == "28P01"
    for name, value in [("password", "pii-startup-pw-1"), ("options", "-c x.y=pii-opt-2")]:
        with raw(proxy) as client:
            client.startup("dora", **{name: value})
            assert client.fatal()["C"] == "42501"
        secrets.append(value)
    proxy.stop()
    text = proxy.log_path.read_text() + proxy.stderr_path.read_text()
    assert '"statement"' in text or "auth.ok" in text  # the log is there, and JSON
    for secret in [*secrets, *PASSWORDS.values(), SVC_PASSWORD]:
        assert secret not in text, f"{secret!r} leaked into the log"


# --- back-pressure ----------------------------------------------------------------------


SLOW_READER_ROWS = 100_000  # x ~1 KB: about 100 MB through pgwarden


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_a_client_that_stops_reading_makes_pgwarden_stop_reading_upstream(
    pgwarden: Launcher,
) -> None:
    proxy = pgwarden()
    with logged_in(proxy) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        rss_before = rss_kib(proxy.process.pid)
        sql = f"SELECT repeat('x', 1000) FROM generate_series(1, {SLOW_READER_ROWS})"  # noqa: S608 - a constant
        client.send(fe.encode_query(sql))
        deadline = time.monotonic() + 3  # the client reads nothing for 3 s
        peak = rss_before
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(proxy.process.pid))
            time.sleep(0.1)
        # Linked back-pressure: pgwarden holds at most a few socket buffers'
        # worth, not the 100 MB result.
        assert peak - rss_before < 32 * 1024, (rss_before, peak)
        replies = client.until_ready()
    assert rows(replies) == SLOW_READER_ROWS
    assert not error_fields(replies)


def test_a_taken_listen_port_is_a_clear_error_not_a_traceback(
    pgwarden: Launcher, proxy: Proxy
) -> None:
    second = pgwarden(listen=f"127.0.0.1:{proxy.port}", wait=False)
    assert second.process.wait(timeout=30) == 2
    err = second.stderr_path.read_text()
    assert f"pgwarden: listen: cannot listen on 127.0.0.1:{proxy.port}" in err, err
    assert "Traceback" not in err


def test_a_policy_using_hash_without_a_key_refuses_to_start(pgwarden: Launcher) -> None:
    # TEST_POLICY gives the analyst role {"*": hash}.
    proxy = pgwarden(hash_key_file=None, wait=False)
    assert proxy.process.wait(timeout=30) == 2
    err = proxy.stderr_path.read_text()
    assert "hash_key_file" in err
    assert "uses the hash mask" in err, err


def test_sigterm_with_twenty_busy_clients_breaks_no_statement(pgwarden: Launcher) -> None:
    proxy = pgwarden(limits={"shutdown_timeout_s": 20, "max_connections_per_user": 30})
    outcomes: list[object] = []
    lock = threading.Lock()
    started = threading.Barrier(21)

    def client() -> None:
        with connect(proxy) as conn:
            started.wait(timeout=30)
            try:
                value: object = scalar(conn, "SELECT 7 FROM pg_sleep(1)")
            except Exception as exc:  # noqa: BLE001 - reported by the test thread
                value = exc
            with lock:
                outcomes.append(value)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    started.wait(timeout=30)
    time.sleep(0.3)  # the statements are running
    proxy.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=30)
    assert outcomes == [7] * 20, [o for o in outcomes if o != 7][:3]
    assert proxy.process.wait(timeout=25) == 0
