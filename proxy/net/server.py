"""The asyncio server: listening socket, one ClientConnection per client.

Strategy (a thin layer over the sans-IO Session):
* ClientConnection and UpstreamConnection are asyncio.Protocol adapters. Each
  received chunk goes to the session, then the session's outputs are drained:
  bytes with writelines, actions (TLS, connect upstream, cancel, close) here.
* Back-pressure is linked: when one side's write buffer is full, reading from
  the other side pauses until it drains, so a slow client never makes pgwarden
  buffer a whole result set.
* Timeouts (startup, idle) are checked by one housekeeping task for all
  sessions instead of a timer per connection.
* Shutdown is ordered: stop accepting, let each session finish its running
  statement and close at its next ReadyForQuery, cancel what is left after
  limits.shutdown_timeout_s.
* A bug in a session closes that connection and is logged; the server goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import secrets
import signal
import ssl
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, cast

from proxy import audit
from proxy.analysis.catalog import Snapshot
from proxy.analysis.engine import Engine
from proxy.auth import load_users
from proxy.errors import ConfigError, PgWardenError, StartupRefused
from proxy.net.catalog import SchemaKeeper
from proxy.net.ledger import Ledger
from proxy.net.metrics import Metrics
from proxy.net.quotas import QuotaBook
from proxy.net.records import RecordBook
from proxy.net.throttle import LoginThrottle
from proxy.net.upstream import open_upstream, send_cancel, upstream_ssl_context
from proxy.net.workers import (
    Supervisor,
    SupervisorLink,
    key_pid,
    worker_command,
    worker_identity,
    worker_of,
)
from proxy.policy import Policy, load_policy
from proxy.policy.model import Limits, break_glass_bucket, policy_changes
from proxy.quota import LedgerUnavailable, has_quota
from proxy.session.gate import Gate, PolicyGate, Principal, gate_for, locked_error
from proxy.session.machine import (
    Cancel,
    Close,
    ConnectUpstream,
    Phase,
    Session,
    SessionConfig,
    StartTLS,
)
from proxy.settings import Settings


def client_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


HASH_KEY_ENV = "PGWARDEN_HASH_KEY"


def _stamps(paths: tuple[Path, ...]) -> tuple[tuple[float, int] | None, ...]:
    stamps: list[tuple[float, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_mtime, st.st_size))
    return tuple(stamps)


def read_hash_key(settings: Settings) -> bytes | None:
    """The hash mask's secret: hash_key_file, else env PGWARDEN_HASH_KEY, else None."""
    if settings.hash_key_file is not None:
        try:
            return settings.hash_key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError("hash_key_file", f"cannot read: {exc.strerror}") from None
    key = os.environ.get(HASH_KEY_ENV)
    return key.encode() if key else None


def require_hash_key(settings: Settings, policy: Policy) -> None:
    """A policy that hashes columns needs a secret key: refuse to run without one."""
    if policy.uses_hash() and settings.hash_key_file is None and not os.environ.get(HASH_KEY_ENV):
        raise ConfigError(
            "hash_key_file",
            f"{settings.policy}: the policy uses the hash mask; set hash_key_file "
            f"or env {HASH_KEY_ENV}",
        )


# drain: output smaller than this is joined into one write (small replies reach the
# client in one segment, as PostgreSQL sends them); larger output, a result being
# streamed, goes to writelines piece by piece so that it is never copied whole.
_JOIN_BELOW = 64 * 1024

_ERROR_EVENTS = frozenset({"backstop.tripped", "analysis.failed"})
_CRITICAL_EVENTS = frozenset({"decoy.touched", "user.locked"})
_INFO_EVENTS = frozenset({"break_glass.closed"})


class GateSources:
    """What a PolicyGate reads: the current engine, the quota book and the record book."""

    __slots__ = ("_quotas", "_records", "_schema")

    def __init__(self, schema: SchemaKeeper, quotas: QuotaBook, records: RecordBook) -> None:
        self._schema = schema
        self._quotas = quotas
        self._records = records

    @property
    def records(self) -> RecordBook:
        return self._records

    @property
    def policy(self) -> Policy:
        return self._schema.policy

    @property
    def engine(self) -> Engine | None:
        return self._schema.engine

    def schema_miss(self) -> None:
        self._schema.schema_miss()

    def quota_left(self, user: str, limits: Limits) -> int | PgWardenError:
        return self._quotas.left(user, limits)

    def charge(self, user: str, rows: int) -> None:
        self._quotas.charge(user, rows)


class Server:
    """Shared state of one pgwarden process: settings, policy, live sessions."""

    WATCH_S = 1.0  # how often the policy and users files are checked for changes

    def __init__(self, settings: Settings, link: SupervisorLink | None = None) -> None:
        self.settings = settings
        self.link = link  # set when this process is one worker of several
        self.log = audit.get_logger() if link is None else audit.get_logger(worker=link.index)
        self.users = load_users(settings.users_file)
        self.policy: Policy = load_policy(settings.policy)
        require_hash_key(settings, self.policy)
        self.schema = SchemaKeeper(
            settings.upstream,
            upstream_ssl_context(settings.upstream),
            self.policy,
            read_hash_key(settings),
            on_loaded=self._schema_loaded,
            on_failed=self._schema_failed,
        )
        self.metrics = Metrics()
        self.metrics.cache_stats = self.schema.cache_stats
        self.metrics.health = self.health
        self.quotas = QuotaBook(Ledger(settings), self.log)
        self.quotas.observe = self.metrics.observe
        if link is not None:
            self.quotas.relay = link.charge
        self.records = RecordBook(self.quotas.ledger, self.log)
        self.records.observe = self.metrics.observe
        self.records.on_lock = self.end_sessions_of
        if link is not None:  # the other workers hear of locks and records at once
            self.records.relay_lock = link.lock
            self.records.relay_seen = link.seen
        self.sources = GateSources(self.schema, self.quotas, self.records)
        self.client_ssl = client_ssl_context(settings)
        self.upstream_ssl = upstream_ssl_context(settings.upstream)
        self.throttle = LoginThrottle(settings.auth.max_failures, settings.auth.failure_window_s)
        self.connections: dict[int, ClientConnection] = {}  # by our BackendKeyData pid
        self.per_user: dict[str, int] = {}
        self.total_connections = 0
        self.session_config = SessionConfig(
            users=self.users,
            open_gate=self.open_gate,
            database=settings.upstream.database,
            upstream_user=settings.upstream.user,
            upstream_password=settings.upstream.password,
            tls_available=self.client_ssl is not None,
            tls_required=settings.tls.required,
            max_message_bytes=settings.limits.max_message_bytes,
            statement_events=settings.log_level in ("debug", "info"),
        )
        self._listener: asyncio.Server | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- policy seam ---------------------------------------------------------

    def open_gate(self, user: str) -> Gate | None:
        role = self.policy.role_of(user)
        if role is None:
            return None
        shadow = role.mode == "shadow"  # enforces nothing: unguarded, no quotas
        principal = Principal(user, role.name, role.unrestricted or shadow, shadow)
        if self.link is not None:  # counted over all workers, when connecting upstream
            return gate_for(principal, self.sources)
        if self.per_user.get(user, 0) >= self.settings.limits.max_connections_per_user:
            raise self.too_many_for(user, self.log)
        self.per_user[user] = self.per_user.get(user, 0) + 1
        return gate_for(principal, self.sources)

    def end_sessions_of(self, user: str) -> None:
        """A user was locked: every open session of theirs in this process ends now."""
        for conn in list(self.connections.values()):
            gate = conn.session.gate
            if gate is not None and gate.principal.user == user and not conn.closed:
                conn.locked_out()

    def too_many_for(self, user: str, log: Any) -> StartupRefused:
        """max_connections_per_user reached: log and count it; the error for the client."""
        limit = self.settings.limits.max_connections_per_user
        log.warning("conn.refused", reason="max_connections_per_user", user=user)
        self.metrics.observe("conn.refused", {"reason": "limit"})
        return StartupRefused(
            f'pgwarden: too many connections for user "{user}" (limit {limit})',
            sqlstate="53300",
        )

    def gate_closed(self, user: str) -> None:
        if self.link is not None:
            return
        left = self.per_user.get(user, 1) - 1
        if left > 0:
            self.per_user[user] = left
        else:
            self.per_user.pop(user, None)

    # --- keys and cancel -----------------------------------------------------

    def new_key(self, conn: ClientConnection) -> tuple[int, bytes]:
        index = None if self.link is None else self.link.index
        while True:
            pid = key_pid(index)
            if pid not in self.connections:
                self.connections[pid] = conn
                return pid, secrets.token_bytes(4)

    def cancel(self, pid: int, secret: bytes) -> None:
        if self.link is not None and worker_of(pid) != self.link.index:
            self.link.forward_cancel(pid, secret)  # that worker's session, if any
            return
        conn = self.connections.get(pid)
        if conn is None or not hmac.compare_digest(conn.session.key[1], secret):
            self.log.info("cancel.ignored")
            return
        target = conn.session.upstream_key
        if target is None:
            return
        self.log.info("cancel.forwarded", session=conn.sid)
        self.spawn(self._send_cancel(*target))

    async def _send_cancel(self, pid: int, secret: bytes) -> None:
        try:
            await send_cancel(self.settings.upstream, self.upstream_ssl, pid, secret)
        except PgWardenError as exc:
            self.log.warning("upstream.error", error=exc.message, during="cancel")

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- lifecycle -----------------------------------------------------------

    async def serve(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        # Restricted roles need the schema: give the first read a bounded chance before
        # listening, so the first clients are not refused; an unreachable upstream does
        # not keep pgwarden from starting (the read is retried in the background).
        keeper = asyncio.ensure_future(self.schema.run())
        with suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(self.schema.first_attempt.wait(), self.quotas.start()),
                s.upstream.connect_timeout_s + 1.0,
            )
        try:
            self._listener = await loop.create_server(
                lambda: ClientConnection(self),
                s.listen_host,
                s.listen_port,
                reuse_address=True,
                reuse_port=self.link is not None,
                backlog=1024,
            )
        except OSError as exc:
            raise ConfigError(
                "listen", f"cannot listen on {s.listen_host}:{s.listen_port}: {exc.strerror}"
            ) from None
        audit.batch_on(loop.call_soon)
        loop.add_signal_handler(signal.SIGTERM, self._stop_signal)
        if self.link is None:
            loop.add_signal_handler(signal.SIGINT, self._stop_signal)
        else:  # the supervisor turns a Ctrl-C into SIGTERM for every worker
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.log.info(
            "startup",
            listen=f"{s.listen_host}:{s.listen_port}",
            upstream=s.upstream.dsn,
            policy=str(s.policy),
            policy_hash=self.policy.version_hash,
            pid=os.getpid(),
        )
        housekeeping = asyncio.ensure_future(self._housekeeping())
        self.spawn(self.records.prune_forever())
        watcher = asyncio.ensure_future(self._watch_files())
        metrics_server = None
        if self.link is not None:
            self.spawn(self._follow_supervisor(self.link))
        elif s.metrics_host is not None and s.metrics_port is not None:
            try:
                metrics_server = await self.metrics.serve(s.metrics_host, s.metrics_port)
            except OSError as exc:
                where = f"{s.metrics_host}:{s.metrics_port}"
                raise ConfigError(
                    "metrics_listen", f"cannot listen on {where}: {exc.strerror}"
                ) from None
        await self._stopping.wait()
        if metrics_server is not None:
            metrics_server.close()
        await self._shutdown()
        housekeeping.cancel()
        watcher.cancel()
        keeper.cancel()
        return 0

    async def _follow_supervisor(self, link: SupervisorLink) -> None:
        """Answer the supervisor; drain and exit if it goes away."""
        closed = await link.start(self._supervisor_asks)
        link.ready()
        await closed.wait()
        if not self._stopping.is_set():
            self.log.error("supervisor.lost")
            self._stopping.set()

    def _supervisor_asks(self, message: dict[str, Any]) -> Any:
        op = message.get("op")
        if op == "metrics":
            return {"text": self.metrics.exposition().decode()}
        if op == "health":
            return self._health_answer()
        if op == "cancel":
            self.cancel(int(message["pid"]), bytes.fromhex(str(message["secret"])))
        elif op == "charge":
            self.quotas.add_remote(str(message["user"]), int(message["rows"]))
        elif op == "lock":
            self.records.remote_lock(str(message["user"]))
        elif op == "seen":
            found = message["records"]
            self.records.add_remote(str(message["user"]), {int(r): float(t) for r, t in found})
        return None

    async def _health_answer(self) -> dict[str, Any]:
        ok, details = await self.health()
        return {"ok": ok, "details": details}

    def _stop_signal(self) -> None:
        """SIGTERM/SIGINT: drain; a second one exits at once."""
        if self._stopping.is_set():
            self.log.warning("shutdown.forced")
            audit.flush()
            sys.stdout.flush()
            os._exit(1)
        self._stopping.set()

    def reload(self) -> None:
        """SIGHUP: re-read the policy and the users file; keep the old ones if invalid.

        New logins use what was reloaded; open sessions of restricted roles
        apply the new policy from their next statement. The schema snapshot is
        read again as well.
        """
        try:
            policy = load_policy(self.settings.policy)
            users = load_users(self.settings.users_file)
            require_hash_key(self.settings, policy)
        except ConfigError as exc:
            errors = exc.message.splitlines()
        else:
            errors = []
        if errors:
            self.log.error("policy.rejected", errors=errors)
            self.metrics.observe("policy.rejected", {})
            return
        old, self.policy = self.policy, policy
        self.schema.set_policy(policy, read_hash_key(self.settings))
        self.schema.refresh_soon()
        self.users.clear()
        self.users.update(users)
        self.log.info(
            "policy.loaded",
            policy_hash=policy.version_hash,
            users=len(users),
            changes=policy_changes(old, policy),
        )
        self.metrics.observe("policy.loaded", {})

    async def _watch_files(self) -> None:
        """Reload when the policy or users file changes on disk (polled: no dependency).

        A change is a different (mtime, size); a half-written file simply fails
        validation (policy.rejected) and the next change is picked up again.
        """
        paths = (self.settings.policy, self.settings.users_file)
        seen = _stamps(paths)
        while True:
            await asyncio.sleep(self.WATCH_S)
            now = _stamps(paths)
            if now != seen:
                seen = now
                self.log.info("policy.changed_on_disk")
                self.reload()

    async def health(self) -> tuple[bool, dict[str, str]]:
        """/healthz: can pgwarden reach the upstream database and the quota ledger now?"""
        up = self.settings.upstream
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(up.host, up.port), 3.0)
        except (OSError, TimeoutError):
            upstream = "unreachable"
        else:
            writer.close()
            upstream = "ok"
        try:
            await asyncio.wait_for(self.quotas.ledger.usage("pgwarden-healthz"), 3.0)
        except (LedgerUnavailable, TimeoutError):
            ledger = "unreachable"
        else:
            ledger = "ok"
        ok = upstream == "ok" and ledger == "ok"
        return ok, {"upstream": upstream, "ledger": ledger}

    def _schema_loaded(self, snapshot: Snapshot) -> None:
        self.log.info("schema.loaded", relations=len(snapshot.relations))

    def _schema_failed(self, error: str) -> None:
        self.log.warning("schema.failed", error=error)

    async def _shutdown(self) -> None:
        assert self._listener is not None
        self._listener.close()
        live = list(self.connections.values())
        self.log.info("shutdown", sessions=len(live))
        for conn in live:
            conn.shutdown()
        deadline = time.monotonic() + self.settings.limits.shutdown_timeout_s
        while self.connections and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a dict
            await asyncio.sleep(0.05)
        running = [
            key
            for c in self.connections.values()
            if (key := c.session.upstream_key) is not None and not c.session.at_rest
        ]
        if running:  # stop the statements in the database too, not just our sockets
            cancels = [asyncio.ensure_future(self._send_cancel(*key)) for key in running]
            await asyncio.wait(cancels, timeout=5)
        for conn in list(self.connections.values()):
            conn.abort("shutdown timeout")
        await self.records.close(flush_s=5.0)  # records and locks reach the ledger
        await self.quotas.close(flush_s=5.0)  # charges reach the ledger before we exit
        if self.link is not None:
            self.link.close()
        await asyncio.sleep(0)
        audit.batch_off()

    async def _housekeeping(self) -> None:
        limits = self.settings.limits
        interval = max(0.05, min(1.0, limits.startup_timeout_s / 4, limits.idle_timeout_s / 4))
        pruned = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - pruned > 60:
                self.throttle.prune(now)
                pruned = now
            for conn in list(self.connections.values()):
                conn.check_timeouts(now)


class ClientConnection(asyncio.Protocol):
    """Adapter between a client socket, its Session and its upstream socket."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sid = secrets.token_hex(6)
        self.session = Session(server.session_config, server.new_key(self))
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.log = server.log.bind(session=self.sid)
        self.started = time.monotonic()
        self.last_activity = self.started  # updated by housekeeping when bytes_in moved
        self._seen_bytes_in = 0
        self.upstream_started = 0.0
        self.bytes_in = 0
        self.role = ""  # set at auth.ok, for the metrics
        self.address = ""  # the client's IP address (failed-login throttling)
        self.slot: str | None = None  # the user counted by the supervisor for this connection
        self.bytes_out = 0
        self.closed = False

    # asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = self.transport.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.address = str(peer[0]) if isinstance(peer, tuple) else client
        self.log = self.log.bind(client=client)
        server = self.server
        server.total_connections += 1
        if len(server.connections) > server.settings.limits.max_connections:
            self.log.warning("conn.refused", reason="max_connections")
            server.metrics.observe("conn.refused", {"reason": "limit"})
            self.session.refusal = StartupRefused(
                "pgwarden: sorry, too many clients already", sqlstate="53300"
            )
            return
        wait = server.throttle.retry_in(self.address)
        if wait:  # refused before any password exchange: guessing here costs nothing
            self.log.warning("conn.refused", reason="auth_failures")
            server.metrics.observe("conn.refused", {"reason": "auth"})
            self.session.refusal = StartupRefused(
                f"pgwarden: too many failed logins from this address; try again in "
                f"{math.ceil(wait)} s",
                sqlstate="28000",
            )
            return
        self.log.info("conn.opened")
        server.metrics.observe("conn.opened", {})

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            self.session.client_data(data)
        except Exception:  # our own bug: close this connection, keep the process
            self.log.exception("internal.error", where="client_data")
            self.abort("internal error")
            return
        self.drain()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._close("client disconnected")

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # from the upstream side ---------------------------------------------------

    def server_data(self, data: bytes) -> None:
        try:
            self.session.server_data(data)
        except Exception:
            self.log.exception("internal.error", where="server_data")
            self.abort("internal error")
            return
        self.drain()

    def server_lost(self) -> None:
        if not self.closed:
            self.session.server_closed()
            self.drain()

    # draining the session -------------------------------------------------------

    def drain(self) -> None:
        s = self.session
        if s.to_server:
            if self.upstream is not None:
                self.upstream.write(s.to_server)
            s.to_server.clear()
        if s.to_client:
            if self.transport is not None and not self.closed:
                pieces = s.to_client
                size = len(pieces[0]) if len(pieces) == 1 else sum(map(len, pieces))
                self.bytes_out += size
                if len(pieces) == 1:
                    self.transport.write(pieces[0])
                elif size < _JOIN_BELOW:  # one send, as the server's own replies go
                    self.transport.write(b"".join(pieces))
                else:  # a large result: the pieces as they are, no copy of it
                    self.transport.writelines(pieces)
            s.to_client.clear()
        if s.events:
            self._log_events()
        if s.actions:
            actions = list(s.actions)
            s.actions.clear()
            for action in actions:
                self._act(action)

    def _log_events(self) -> None:
        observe = self.server.metrics.observe
        for event, fields in self.session.events:
            observe(event, fields if "role" in fields else {**fields, "role": self.role})
            if event == "statement":  # the one line per statement
                self.log.info(event, **fields)
            elif event == "auth.ok":  # from here on every line names the user and role
                self.log = self.log.bind(user=fields["user"], role=fields["role"])
                self.role = str(fields["role"])
                self.log.info(event)
            elif event in _ERROR_EVENTS:
                self.log.error(event, **fields)
            elif event in _CRITICAL_EVENTS:
                self.log.critical(event, **fields)
            elif event in _INFO_EVENTS:
                self.log.info(event, **fields)
            else:  # auth.failed, upstream.error, limit.exceeded, quota.exhausted
                if event == "auth.failed" and fields.get("reason") != "no role":
                    self.server.throttle.failed(self.address)
                self.log.warning(event, **fields)
        self.session.events.clear()

    def _act(self, action: object) -> None:
        if isinstance(action, Close):
            self._close(action.reason)
        elif isinstance(action, StartTLS):
            self.server.spawn(self._start_tls())
        elif isinstance(action, ConnectUpstream):
            self.server.spawn(self._connect_upstream())
        elif isinstance(action, Cancel):
            self.server.cancel(action.pid, action.secret)

    async def _start_tls(self) -> None:
        assert self.transport is not None
        assert self.server.client_ssl is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                self.server.client_ssl,
                server_side=True,
                ssl_handshake_timeout=self.server.settings.limits.startup_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.log.info("tls.failed", error=type(exc).__name__)
            self.abort("tls handshake failed")
            return
        if transport is None or self.closed:
            self.abort("tls handshake failed")
            return
        self.transport = transport
        self.session.tls_established()
        self.drain()

    async def _connect_upstream(self) -> None:
        self.upstream_started = time.monotonic()
        server = self.server
        gate = self.session.gate
        if gate is not None and not gate.principal.unrestricted:  # quota usage, read at login
            role = server.policy.roles.get(gate.principal.role)
            if role is not None and has_quota(role.limits):
                await server.quotas.load(gate.principal.user)
            if role is not None and role.break_glass is not None:  # its own small quota
                await server.quotas.load(break_glass_bucket(gate.principal.user))
            budgets = role is not None and role.limits is not None and role.limits.record_budgets()
            await server.records.load(gate.principal.user, records=bool(budgets))
            if server.records.locked(gate.principal.user) is not None and not self.closed:
                self.log.warning("conn.refused", reason="locked", user=gate.principal.user)
                locked = locked_error(gate.principal.user)
                self.session.login_refused(StartupRefused(locked.message, hint=locked.hint))
                self.drain()
                return
        if gate is not None and server.link is not None and not await self._count_user(gate):
            return
        try:
            transport = await open_upstream(
                server.settings.upstream, server.upstream_ssl, lambda: UpstreamConnection(self)
            )
        except PgWardenError as exc:
            if not self.closed:
                self.session.upstream_failed(exc.message)
                self.drain()
            return
        if self.closed:
            transport.close()
            return
        self.session.upstream_connected()
        self.drain()

    async def _count_user(self, gate: Gate) -> bool:
        """Workers: one more connection for this user, counted over every worker?"""
        server = self.server
        assert server.link is not None
        user = gate.principal.user
        limit = server.settings.limits.max_connections_per_user
        allowed = await server.link.acquire(user, limit)
        if self.closed:
            if allowed:
                server.link.release(user)
            return False
        if allowed:
            self.slot = user
            return True
        self.session.login_refused(server.too_many_for(user, self.log))
        self.drain()
        return False

    # closing ----------------------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        limits = self.server.settings.limits
        phase = self.session.phase
        if phase in (Phase.CONNECTING, Phase.UPSTREAM_LOGIN):
            if now - self.upstream_started > self.server.settings.upstream.connect_timeout_s:
                self.session.upstream_failed("timed out logging in to the database server")
                self.drain()
        elif phase is not Phase.READY:
            if now - self.started > limits.startup_timeout_s:
                self.log.info("conn.timeout", phase=self.session.phase.value)
                self.session.timed_out("startup")
                self.drain()
        elif not self.session.at_rest or self.bytes_in != self._seen_bytes_in:
            self._seen_bytes_in = self.bytes_in  # busy, or the client spoke since last time:
            self.last_activity = now  # idle time counts from here
        elif now - self.last_activity > limits.idle_timeout_s:
            self.log.info("conn.timeout", phase="idle")
            self.session.timed_out("idle")
            self.drain()

    def shutdown(self) -> None:
        self.session.request_shutdown()
        self.drain()

    def locked_out(self) -> None:
        """The user was locked: end this session (soon: never inside another's callback)."""
        asyncio.get_running_loop().call_soon(self._end_locked)

    def _end_locked(self) -> None:
        if not self.closed:
            self.session.locked_out()
            self.drain()

    def abort(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._close(reason)

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        server = self.server
        s = self.session
        server.connections.pop(s.key[0], None)
        if s.gate is not None and s.user is not None:
            server.gate_closed(s.user)
        if isinstance(s.gate, PolicyGate) and s.gate.window is not None:  # break-glass ends
            self.log.info(
                "break_glass.closed", **s.gate.closing_fields(s.gate.window, "session_end")
            )
        if self.slot is not None and server.link is not None:
            server.link.release(self.slot)
        if self.upstream is not None:
            self.upstream.close()
        if self.transport is not None:
            self.transport.close()
        self.log.info(
            "conn.closed",
            reason=reason,
            statements=s.statements,
            rows=s.rows,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration_s=round(time.monotonic() - self.started, 3),
        )
        server.metrics.observe("conn.closed", {})


class UpstreamConnection(asyncio.Protocol):
    """The service-account connection that serves one client."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.client.upstream = self
        # Server bytes go straight to the client side: one call less per read.
        self.data_received = self.client.server_data  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        self.client.server_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client.server_lost()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and not self.client.closed:
            self.client.transport.resume_reading()

    def write(self, chunks: list[bytes | memoryview]) -> None:
        if self.transport is not None:
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def run(settings: Settings, argv: tuple[str, ...] = ()) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code.

    With workers > 1 this process becomes the supervisor and starts the workers
    with `argv` (the serve arguments); a worker finds its index in its environment.
    """
    audit.configure(settings.log_format, settings.log_level)
    identity = worker_identity()
    if settings.workers > 1 and identity is None:
        if not argv:
            raise ConfigError("workers", "several workers need the serve command line")
        return asyncio.run(Supervisor(settings, worker_command(argv)).run())
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(_main(settings, identity))
    return uvloop.run(_main(settings, identity))


async def _main(settings: Settings, identity: tuple[int, int] | None) -> int:
    link = None if identity is None else SupervisorLink(*identity)
    server = Server(settings, link)
    try:
        with suppress(asyncio.CancelledError):
            return await server.serve()
        return 0
    finally:
        audit.batch_off()  # whatever ended the loop, no line waits on it
