"""The session state machine: one client connection, from first byte to close.

Strategy (h11-style, no I/O): the network layer feeds `client_data`,
`server_data` and lifecycle events in; the session appends bytes to
`to_client` / `to_server`, control requests to `actions` and audit facts to
`events`, and the network layer drains all four after each call.

Phases, in order (any other transition is an error):

    STARTUP --SSLRequest--> TLS --tls_established--> STARTUP
    STARTUP --StartupMessage--> AUTH_INITIAL --SASLInitial--> AUTH_FINAL
    AUTH_FINAL --SASLResponse ok + role--> CONNECTING --upstream_connected-->
    UPSTREAM_LOGIN --ReadyForQuery--> READY --Terminate/fault--> CLOSED
    STARTUP --CancelRequest--> CLOSED

Rules:
* The client authenticates to pgwarden before any upstream connection exists.
* In READY every statement (Query, Parse) goes through the Gate first; a
  refused one is answered in order through the Pipeline, and nothing of it
  reaches the server.
* Server bytes are relayed in place: headers are scanned with unpack_from,
  runs of messages are forwarded as memoryview slices, DataRows are only
  counted, and very large DataRow/CopyData messages are streamed, not buffered.
"""

from __future__ import annotations

import copy
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from proxy.analysis.records import HIDDEN_PREFIX_BYTES, RecordSpec
from proxy.auth import ScramSecret, ScramServerExchange
from proxy.errors import (
    AuthFailed,
    MessageTooLarge,
    PgWardenError,
    PolicyRefusal,
    ProtocolViolation,
    StartupRefused,
    UpstreamUnavailable,
)
from proxy.session import pipeline as pl
from proxy.session.gate import (
    Accounting,
    Allow,
    Audit,
    Gate,
    KeyRow,
    Prepared,
    Refuse,
    locked_error,
    passthrough_audit,
)
from proxy.session.pipeline import Pipeline
from proxy.session.startup import filter_params
from proxy.session.upstream import UpstreamLogin
from proxy.wire import backend as be
from proxy.wire import frontend as fe
from proxy.wire.buffer import StartupFramer

_LEN = struct.Struct("!I")
_AUTH_MESSAGE_MAX = 8192
_SERVER_MESSAGE_MAX = 256 << 20  # non-row server messages are buffered whole
_STREAM_FROM = 256 << 10  # DataRow/CopyData larger than this are streamed through


class _Pending:
    """An incomplete message kept between reads.

    It grows by appending, and is handed back only once the message is whole,
    so a large message arriving in many small reads costs linear time.
    """

    __slots__ = ("buf", "need")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = 0  # total size at which the first message is complete

    def add(self, data: bytes) -> bytes | None:
        self.buf += data
        if len(self.buf) < self.need:
            return None
        out = bytes(self.buf)
        self.buf.clear()
        self.need = 0
        return out

    def complete(self, data: bytes) -> tuple[bytes | None, int]:
        """Take from `data` only what the pending message lacks: (the message, bytes used).

        The rest of `data` is then scanned where it lies, not copied behind the message.
        """
        used = 0
        if len(self.buf) < 5:  # the header itself was cut
            used = min(5 - len(self.buf), len(data))
            self.buf += data[:used]
            if len(self.buf) < 5:
                return None, used
            self.need = 1 + _LEN.unpack_from(self.buf, 1)[0]
        take = max(0, min(self.need - len(self.buf), len(data) - used))
        self.buf += memoryview(data)[used : used + take]
        used += take
        if len(self.buf) < self.need:
            return None, used
        out = bytes(self.buf)
        self.buf.clear()
        self.need = 0
        return out, used

    def keep(self, data: bytes, pos: int) -> None:
        rest = len(data) - pos
        self.need = 1 + _LEN.unpack_from(data, pos + 1)[0] if rest >= 5 else 5
        self.buf += memoryview(data)[pos:]


class Phase(Enum):
    STARTUP = "startup"
    TLS = "tls"
    AUTH_INITIAL = "auth_initial"
    AUTH_FINAL = "auth_final"
    CONNECTING = "connecting"
    UPSTREAM_LOGIN = "upstream_login"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Upgrade the client connection to TLS (server side) now."""


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    """Open the upstream connection, then call upstream_connected()."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client asked to cancel the session holding this key."""

    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Flush to_client, then close both connections."""

    reason: str


Action = StartTLS | ConnectUpstream | Cancel | Close


@dataclass(frozen=True, slots=True)
class SessionConfig:
    users: Mapping[str, ScramSecret]
    open_gate: Callable[[str], Gate | None]  # user -> gate, None when the user has no role
    database: str
    upstream_user: str
    upstream_password: str | None
    tls_available: bool
    tls_required: bool
    max_message_bytes: int
    clock: Callable[[], float] = time.perf_counter  # for statement durations
    statement_events: bool = True  # off when the log level would drop them: no cost then


class Session:
    """One client connection. Not thread-safe; driven by one network layer."""

    def __init__(self, config: SessionConfig, key: tuple[int, bytes]) -> None:
        self.config = config
        self.key = key
        self.phase = Phase.STARTUP
        self.to_client: list[bytes | memoryview] = []
        self.to_server: list[bytes | memoryview] = []
        self.actions: list[Action] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.secure = False
        self.user: str | None = None
        self.gate: Gate | None = None
        self.upstream_key: tuple[int, bytes] | None = None
        self.application_name = ""
        self.statements = 0
        self.rows = 0
        self.closing = False
        self.refusal: PgWardenError | None = None  # answer to the StartupMessage (e.g. 53300)
        self.pipeline = Pipeline()
        self._startup = StartupFramer()
        self._auth_buf = b""
        self._scram: ScramServerExchange | None = None
        self._login: UpstreamLogin | None = None
        self._early = bytearray()
        self._replay = b""
        self._upstream_params: tuple[tuple[str, str], ...] = ()
        self._prepared: set[bytes] = set()
        self._client_tail = _Pending()
        self._skipping = False
        self._stmt_rows = 0
        self._tail = _Pending()
        self._guarded = False  # restricted role: RowDescription and ParameterStatus are checked
        self._statement_caps: dict[bytes, _RowCap | None] = {}  # prepared name -> its cap
        self._portal_caps: dict[bytes, _RowCap | None] = {}  # portal name -> its running count
        self._cursor_caps: dict[str, _RowCap | None] = {}  # DECLAREd cursor -> its running count
        self._statement_cursors: dict[bytes, tuple[str, bool] | None] = {}
        self._statement_policies: dict[bytes, Prepared] = {}  # prepared name -> its check
        self._drop_until_ready = False  # a statement over its cap was refused mid-stream
        self._inflight: deque[_Statement] = deque()  # Queries/Executes awaiting completion
        self._done = 0  # how many of pipeline.done have been turned into statement events
        self._statement_audits: dict[bytes, Audit | None] = {}  # prepared name -> audit
        self._portal_audits: dict[bytes, Audit | None] = {}  # portal name -> audit
        self._watched: dict[str, str] = {}
        self._stream_left = 0
        self._await = self.pipeline.queue.append  # expect the server's reply to a message

    # --- events from the network layer ----------------------------------

    @property
    def at_rest(self) -> bool:
        """Ready for a new statement: nothing in flight, no COPY."""
        return self.phase is Phase.READY and self.pipeline.idle

    def client_data(self, data: bytes) -> None:
        try:
            if self.phase is Phase.READY:
                self._ready_data(data)
            elif self.phase is Phase.STARTUP:
                self._startup_data(data)
            elif self.phase in (Phase.AUTH_INITIAL, Phase.AUTH_FINAL):
                self._auth_data(data)
            elif self.phase in (Phase.CONNECTING, Phase.UPSTREAM_LOGIN):
                self._buffer_early(data)
            elif self.phase is Phase.TLS:
                raise ProtocolViolation("pgwarden: data received during TLS negotiation")
        except PgWardenError as exc:
            self._fatal(exc)

    def server_data(self, data: bytes) -> None:
        try:
            if self.phase is Phase.READY:
                self._relay(data)
            elif self.phase is Phase.UPSTREAM_LOGIN:
                self._login_data(data)
            elif self.phase is not Phase.CLOSED:
                raise ProtocolViolation("pgwarden: server spoke out of turn")
        except UpstreamUnavailable as exc:
            self._upstream_fatal(exc)
        except ProtocolViolation as exc:
            self.events.append(("upstream.error", {"error": exc.message}))
            self._fatal(UpstreamUnavailable("pgwarden: protocol error from the database server"))
        if self._replay:  # what the client sent during login is the client's, not the server's
            early, self._replay = self._replay, b""
            self.client_data(early)
        if self.closing and self.at_rest:
            self._shutdown_now()

    def tls_established(self) -> None:
        self._expect(Phase.TLS)
        self.secure = True
        self.phase = Phase.STARTUP

    def upstream_connected(self) -> None:
        self._expect(Phase.CONNECTING)
        assert self.user is not None
        params = [("database", self.config.database), *self._upstream_params]
        self._login = UpstreamLogin(
            self.config.upstream_user, self.config.upstream_password, params
        )
        self.to_server.append(self._login.startup_packet())
        self.phase = Phase.UPSTREAM_LOGIN

    def upstream_failed(self, detail: str) -> None:
        self._upstream_fatal(UpstreamUnavailable(detail))

    def login_refused(self, error: PgWardenError) -> None:
        """A check made while connecting upstream (connections per user) says no."""
        self._expect(Phase.CONNECTING)
        self._fatal(error)

    def locked_out(self) -> None:
        """The user was locked (here or by another session): this session ends now."""
        if self.phase is not Phase.CLOSED and self.gate is not None:
            self._fatal(locked_error(self.gate.principal.user))

    def timed_out(self, what: str) -> None:
        if what == "startup":
            self._fatal(ProtocolViolation("pgwarden: startup timed out; closing"))
        else:
            self._fatal(
                PgWardenError(
                    "pgwarden: terminating connection due to idle timeout",
                    sqlstate="57P05",
                ),
                severity="FATAL",
            )

    def request_shutdown(self) -> None:
        """Finish the running statement, then close (graceful shutdown)."""
        self.closing = True
        if self.phase is not Phase.READY or self.pipeline.idle:
            self._shutdown_now()

    def server_closed(self) -> None:
        if self.phase is not Phase.CLOSED:
            self._upstream_fatal(UpstreamUnavailable("the database server closed the connection"))

    # --- startup and authentication ---------------------------------------

    def _startup_data(self, data: bytes) -> None:
        msg = self._startup.feed(data)
        while msg is not None and self.phase is Phase.STARTUP:
            self._startup_message(fe.decode_startup_form(msg))
            msg = self._startup.feed(b"") if self.phase is Phase.STARTUP else None

    def _startup_message(self, form: fe.StartupForm) -> None:
        if isinstance(form, fe.SSLRequest):
            self._ssl_request()
        elif isinstance(form, fe.GSSEncRequest):
            self.to_client.append(b"N")
        elif isinstance(form, fe.CancelRequest):
            self.actions.append(Cancel(form.pid, form.secret))
            self.actions.append(Close("cancel request"))
            self.phase = Phase.CLOSED
        else:
            self._startup_packet(form)

    def _ssl_request(self) -> None:
        if self.secure:
            raise ProtocolViolation("pgwarden: SSLRequest on an encrypted connection")
        if not self.config.tls_available:
            self.to_client.append(b"N")
            return
        if self._startup.pending():  # bytes after SSLRequest would bypass TLS
            raise ProtocolViolation("pgwarden: unencrypted data after SSLRequest")
        self.to_client.append(b"S")
        self.actions.append(StartTLS())
        self.phase = Phase.TLS

    def _startup_packet(self, form: fe.Startup) -> None:
        if self.refusal is not None:  # after SSL negotiation, as PostgreSQL does
            raise self.refusal
        if self.config.tls_required and not self.secure:
            raise StartupRefused(
                "pgwarden: TLS is required; connect with sslmode=require or stronger"
            )
        params = filter_params(form.params)
        if params.database != self.config.database:
            raise StartupRefused(
                f'pgwarden: database "{params.database}" is not served here',
                hint=f'Connect to database "{self.config.database}".',
                sqlstate="3D000",
            )
        if form.minor > 0 or params.declined_options:
            self.to_client.append(
                be.negotiate_protocol_version(fe.PROTOCOL_3_0, list(params.declined_options))
            )
        self.user = params.user
        self.application_name = params.application_name
        self._upstream_params = params.upstream
        self._scram = ScramServerExchange(params.user, self.config.users.get(params.user))
        self.to_client.append(be.auth_sasl(ScramServerExchange.MECHANISMS))
        self.phase = Phase.AUTH_INITIAL
        rest = self._startup.take_rest()
        if rest:
            self._auth_data(rest)

    def _auth_data(self, data: bytes) -> None:
        # One message at a time, without reading ahead: whatever follows the
        # last SASL message belongs to the READY phase and its own size limit.
        buf = self._auth_buf + data
        while self.phase in (Phase.AUTH_INITIAL, Phase.AUTH_FINAL) and len(buf) >= 5:
            length = _LEN.unpack_from(buf, 1)[0]
            if buf[0] != fe.PASSWORD:
                raise ProtocolViolation(
                    f"pgwarden: expected a password message, got {chr(buf[0])!r}"
                )
            if length < 4 or length > _AUTH_MESSAGE_MAX:
                raise ProtocolViolation(f"pgwarden: invalid authentication message length {length}")
            if len(buf) < 1 + length:
                break
            msg, buf = buf[: 1 + length], buf[1 + length :]
            try:
                self._auth_message(msg)
            except AuthFailed:
                self.events.append(("auth.failed", {"user": self.user, "reason": "password"}))
                raise
        if self.phase in (Phase.AUTH_INITIAL, Phase.AUTH_FINAL):
            self._auth_buf = buf
        elif buf:
            self._buffer_early(buf)

    def _auth_message(self, msg: bytes) -> None:
        assert self._scram is not None
        if self.phase is Phase.AUTH_INITIAL:
            mechanism, first = fe.decode_sasl_initial(msg)
            reply = self._scram.client_first(mechanism, first)
            self.to_client.append(be.auth_request(be.AUTH_SASL_CONTINUE, reply))
            self.phase = Phase.AUTH_FINAL
            return
        final = self._scram.client_final(fe.decode_sasl_response(msg))
        self._scram = None
        assert self.user is not None
        gate = self.config.open_gate(self.user)
        if gate is None:
            self.events.append(("auth.failed", {"user": self.user, "reason": "no role"}))
            raise StartupRefused(
                f'pgwarden: user "{self.user}" has no role in the policy',
                hint="Ask the security team to add you to a role.",
            )
        self.gate = gate
        self.events.append(("auth.ok", {"user": self.user, "role": gate.principal.role}))
        self.to_client.append(be.auth_request(be.AUTH_SASL_FINAL, final))
        self.to_client.append(be.auth_request(be.AUTH_OK))
        self.phase = Phase.CONNECTING
        self.actions.append(ConnectUpstream())

    def _buffer_early(self, data: bytes) -> None:
        self._early += data
        if len(self._early) > self.config.max_message_bytes + 5:
            raise ProtocolViolation("pgwarden: too much data before the session was ready")

    def _login_data(self, data: bytes) -> None:
        assert self._login is not None
        reply = self._login.feed(data)
        if reply:
            self.to_server.append(reply)
        if not self._login.done:
            return
        login, self._login = self._login, None
        self.upstream_key = login.key
        for name, value in login.params:
            self.to_client.append(be.parameter_status(name, value))
            if name in _WATCHED:
                self._watched[name] = value
        self._guarded = self.gate is not None and not self.gate.principal.unrestricted
        self.pipeline.tracking = self._guarded
        self.to_client.append(be.backend_key_data(*self.key))
        self.to_client.append(be.ready_for_query(login.status))
        self.pipeline.status = login.status
        self.phase = Phase.READY
        self._replay = bytes(self._early)  # replayed by server_data, outside its error handling
        self._early.clear()

    # --- READY: client to server -------------------------------------------
    #
    # The chunk is scanned in place like the server side: a handler returns
    # True to forward its message unchanged (it stays in the current run of
    # bytes) or the bytes to send instead (b"" to drop it). Most chunks are
    # forwarded as the very object the socket delivered.

    def _ready_data(self, data: bytes) -> None:
        if self._client_tail.buf:
            whole = self._client_tail.add(data)
            if whole is None:
                return
            data = whole
        cap = self.config.max_message_bytes
        out = self.to_server
        n = len(data)
        pos = run = 0
        while n - pos >= 5:
            mtype = data[pos]
            length = _LEN.unpack_from(data, pos + 1)[0]
            _check_length(length, cap)
            end = pos + 1 + length
            if end > n:
                break
            copying = self.pipeline.copy_in
            handler = (_COPY_HANDLERS if copying else _READY_HANDLERS).get(mtype)
            if handler is None:
                during = " during COPY" if copying else ""
                raise ProtocolViolation(f"pgwarden: unexpected message type {chr(mtype)!r}{during}")
            result = handler(self, data, pos, end)
            if result is not True:
                if run < pos:
                    out.append(memoryview(data)[run:pos])
                if result:
                    out.append(result)
                run = end
            pos = end
            if self.phase is Phase.CLOSED:
                break
        if run == 0 and pos == n:
            out.append(data)
        elif run < pos:
            out.append(memoryview(data)[run:pos])
        if pos < n and self.phase is not Phase.CLOSED:
            self._keep_client_tail(data, pos, cap)

    def _keep_client_tail(self, data: bytes, pos: int, cap: int) -> None:
        if len(data) - pos >= 5:  # refuse an oversized message before its body arrives
            _check_length(_LEN.unpack_from(data, pos + 1)[0], cap)
        self._client_tail.keep(data, pos)

    def _blocked(self) -> bool:
        """After a refusal (ours or the server's) messages up to Sync are dropped."""
        return self._skipping or self.pipeline.discarding

    def _on_query(self, data: bytes, pos: int, end: int) -> bool | bytes:
        if self._blocked():
            return b""
        assert self.gate is not None
        self.statements += 1
        checking = self.config.clock() if self.config.statement_events else 0.0
        sql = fe.decode_query(data[pos:end])
        verdict = self.gate.check_statement(sql, extended=False)
        if verdict.events:  # break_glass.opened / .closed
            self.events.extend(verdict.events)
        self._prepared.discard(b"")  # a simple Query drops the unnamed statement
        if isinstance(verdict, Allow):
            cap = _RowCap.of(verdict)
            if verdict.cursor is not None and self._guarded:
                cap = self._cursor_cap(verdict.cursor, cap)
            self.pipeline.sent_statement(pl.QUERY, cap)
            if self.config.statement_events:
                audit = verdict.audit or passthrough_audit(sql)
                self._inflight.append(_Statement(audit, self.config.clock(), checking))
            return True if verdict.sql is None else fe.encode_query(verdict.sql)
        self._note_internal(verdict)
        return self._refuse_simple(verdict.error)

    def _cursor_cap(self, cursor: tuple[str, bool], cap: _RowCap | None) -> _RowCap | None:
        """DECLARE starts a cursor's count; each FETCH from it adds to that count."""
        name, declared = cursor
        if declared:
            self._cursor_caps[name] = cap.cursor() if cap is not None else None
            return cap
        summed = self._cursor_caps.get(name)
        if summed is None or cap is None:
            return cap
        summed.counted = summed.counted or cap.counted
        left = cap.limit if cap.by_quota else None  # what the quotas leave for this FETCH
        summed.requota(summed.rows + left if left is not None else 1 << 62)
        return summed

    def _note_internal(self, verdict: Refuse) -> None:
        if self.config.statement_events:
            self._refused_event(verdict)
        if verdict.internal:  # analysis failed: a limitation or bug of pgwarden, worth a log line
            self.events.append(("analysis.failed", {"error": verdict.internal}))
        elif verdict.error.sqlstate == "53400":
            tables = list(verdict.audit.tables) if verdict.audit else []
            self.events.append(("quota.exhausted", {"cap": 0, "rows_seen": 0, "tables": tables}))

    def _on_parse(self, data: bytes, pos: int, end: int) -> bool | bytes:
        if self._blocked():
            return b""
        assert self.gate is not None
        name, query = fe.decode_parse_head(data, pos, end)
        self.statements += 1
        verdict = self.gate.check_statement(query, extended=True)
        if verdict.events:  # break_glass.opened / .closed
            self.events.extend(verdict.events)
        if isinstance(verdict, Allow):
            self._await(pl.PARSE)
            self._prepared.add(name)
            if self.config.statement_events:
                self._statement_audits[name] = verdict.audit or passthrough_audit(query, True)
            if self._guarded:
                self._statement_caps[name] = _RowCap.of(verdict)
                self._statement_cursors[name] = verdict.cursor
                self._statement_policies[name] = Prepared(
                    verdict.policy_version, query, verdict.sql
                )
            if verdict.sql is None:
                return True
            parse = fe.decode_parse(data[pos:end])
            return fe.encode_parse(parse.name, verdict.sql, parse.param_types)
        self._prepared.discard(name)
        self._note_internal(verdict)
        return self._refuse_extended(verdict.error)

    def _on_bind(self, data: bytes, pos: int, end: int) -> bool | bytes:
        if self._blocked():
            return b""
        portal_end = data.find(b"\0", pos + 5, end)
        name_end = data.find(b"\0", portal_end + 1, end)
        if portal_end < 0 or name_end < 0:
            raise ProtocolViolation("pgwarden: malformed Bind message")
        statement = data[portal_end + 1 : name_end]
        if statement not in self._prepared:
            shown = statement.decode("utf-8", "replace")
            return self._refuse_extended(
                PolicyRefusal(
                    f'pgwarden: prepared statement "{shown}" was not prepared through '
                    "pgwarden's Parse",
                    sqlstate="26000",
                )
            )
        self._await(pl.BIND)
        self._portal_audits[data[pos + 5 : portal_end]] = self._statement_audits.get(statement)
        if self._guarded:  # each Bind starts the portal's count afresh
            template = self._statement_caps.get(statement)
            portal = data[pos + 5 : portal_end]
            cap = template.fresh() if template is not None else None
            # A prepared statement reused: membership, policy version and quotas again.
            assert self.gate is not None
            counted = cap is not None and cap.counted
            left = self.gate.check_bind(self._statement_policies.get(statement), counted=counted)
            if isinstance(left, PgWardenError):
                self.pipeline.queue.pop()  # the BindComplete will not be asked for
                self._note_internal(Refuse(left, audit=self._statement_audits.get(statement)))
                return self._refuse_extended(left)
            if cap is not None and counted and left is not None:
                cap.requota(left)
            cursor = self._statement_cursors.get(statement)
            if cursor is not None:  # DECLARE or FETCH through the extended protocol
                cap = self._cursor_cap(cursor, cap)
            self._portal_caps[portal] = cap
            if cap is not None and cap.records is not None and cap.records.hidden:
                # result formats listed per column: the hidden key columns need theirs
                widened = fe.bind_with_text_results(data, pos, end, cap.records.hidden)
                if widened is not None:
                    return widened
        elif self.gate is not None:  # unrestricted or shadow: a reload may end the role
            ended = self.gate.check_bind(None, counted=False)
            if isinstance(ended, PgWardenError):
                self.pipeline.queue.pop()  # the BindComplete will not be asked for
                self._note_internal(Refuse(ended, audit=self._statement_audits.get(statement)))
                return self._refuse_extended(ended)
        return True

    def _on_describe(self, data: bytes, pos: int, end: int) -> bool | bytes:
        if self._blocked():
            return b""
        target = data[pos + 5] if end - pos > 6 else 0
        if target == 83:  # 'S'
            self._await(pl.DESCRIBE_STATEMENT)
        elif target == 80:  # 'P'
            self._await(pl.DESCRIBE_PORTAL)
        else:
            raise ProtocolViolation("pgwarden: invalid Describe target")
        return True

    def _on_execute(self, data: bytes, pos: int, end: int) -> bool | bytes:
        if self._blocked():
            return b""
        cap = None
        portal_end = data.find(b"\0", pos + 5, end)
        portal = data[pos + 5 : portal_end] if portal_end > 0 else b""
        if self._guarded:
            cap = self._portal_caps.get(portal)
        self.pipeline.sent_statement(pl.EXECUTE, cap)
        if self.config.statement_events:
            self._inflight.append(_Statement(self._portal_audits.get(portal), self.config.clock()))
        return True

    def _on_close(self, data: bytes, pos: int, end: int) -> bool | bytes:
        if self._blocked():
            return b""
        target, name = fe.decode_target(data[pos:end])
        if target == ord("S"):
            self._prepared.discard(name.encode())
            self._statement_caps.pop(name.encode(), None)
            self._statement_cursors.pop(name.encode(), None)
            self._statement_policies.pop(name.encode(), None)
            self._statement_audits.pop(name.encode(), None)
        else:
            self._portal_caps.pop(name.encode(), None)
            self._portal_audits.pop(name.encode(), None)
        self._await(pl.CLOSE)
        return True

    def _on_sync(self, data: bytes, pos: int, end: int) -> bool | bytes:
        if not self.pipeline.copy_in:  # the server ignores Sync during COPY FROM STDIN
            self._skipping = False
            self.pipeline.sent_sync()
        return True

    def _on_flush(self, data: bytes, pos: int, end: int) -> bool | bytes:
        return True

    def _on_copy_data(self, data: bytes, pos: int, end: int) -> bool | bytes:
        return True  # COPY data, or ignored by the server outside COPY (see pipeline)

    def _on_copy_end(self, data: bytes, pos: int, end: int) -> bool | bytes:
        self.pipeline.client_copy_end()
        return True

    def _on_function_call(self, data: bytes, pos: int, end: int) -> bool | bytes:
        if self._blocked():
            return b""
        refusal = PolicyRefusal(
            "pgwarden: the fastpath function call interface is not allowed",
            hint="Call functions from a SELECT statement.",
        )
        return self._refuse_simple(refusal)

    def _on_terminate(self, data: bytes, pos: int, end: int) -> bool | bytes:
        self.actions.append(Close("client terminated"))
        self.phase = Phase.CLOSED
        return True

    def _refuse_simple(self, error: PgWardenError) -> bytes:
        """Refuse a Query (or FunctionCall): the error, then the server's ReadyForQuery.

        Behind an extended batch still open (no Sync yet) a Sync of ours would end
        the batch early in the server, so there the refusal is answered alone.
        """
        if self.pipeline.unsynced:
            self._reply(self.pipeline.refuse(_error(error), ready=True, aborted=False))
            return b""
        self._reply(self.pipeline.refuse(_error(error), ready=True))
        return ABORT_PARSE + fe.SYNC_MESSAGE

    def _refuse_extended(self, error: PgWardenError) -> bytes:
        """Refuse an extended-protocol message: the rest up to Sync is dropped."""
        self._skipping = True
        self._reply(self.pipeline.refuse(_error(error), ready=False))
        return ABORT_PARSE

    def _reply(self, data: bytes) -> None:
        if data:
            self.to_client.append(data)

    # --- READY: server to client (the hot path) ------------------------------

    def _relay(self, data: bytes) -> None:
        if self._stream_left:
            data = self._stream(data)
        start = 0
        if self._tail.buf:
            head, start = self._tail.complete(data)
            if head is None:
                return
            self._scan(head)
            if self.phase is Phase.CLOSED:
                return
        if start < len(data):
            self._scan(data, start)

    def _stream(self, data: bytes) -> bytes:
        """Pass through the rest of a large DataRow/CopyData message."""
        n = min(self._stream_left, len(data))
        self.to_client.append(memoryview(data)[:n])
        self._stream_left -= n
        return data[n:] if n < len(data) else b""

    def _scan(self, data: bytes, start: int = 0) -> None:  # noqa: PLR0912, PLR0915 - the hot loop
        if self._guarded and (self._drop_until_ready or self.pipeline.capped()):
            self._scan_capped(data, start)
            return
        out = self.to_client
        view = memoryview(data)
        unpack = _LEN.unpack_from
        pipeline = self.pipeline
        queue = pipeline.queue
        steps = pl.STEPS
        plain = not pipeline.has_synthetic  # no refusal waiting to be released
        pipeline.drop_markers()
        n = len(data)
        pos = run = start
        rows = 0
        while n - pos >= 5:
            mtype = data[pos]
            length = unpack(data, pos + 1)[0]
            end = pos + 1 + length
            if length < 4:
                raise ProtocolViolation("pgwarden: invalid message length from server")
            if end > n:
                break
            if mtype == 68:  # DataRow: count it, forward it untouched
                rows += 1
                pos = end
                continue
            if mtype in _GUARDED_TYPES and self._guarded:
                guarded = self._guard(mtype, data, pos, end)
                if guarded is True:
                    out.append(view[run:pos])
                    return  # the session is closed; nothing after this message is forwarded
                if guarded:  # a RowDescription without its hidden record-key columns
                    out.append(view[run:pos])
                    out.append(guarded)
                    run = end
            # Fast path for the common replies (a table lookup, no calls);
            # everything else goes through the pipeline's full logic.
            step = steps.get((queue[0] << 8) | mtype) if queue else None
            if step == pl.STAY:
                rows += mtype == 100  # CopyData of COPY TO STDOUT: one row each
                pos = end
                continue
            if step == pl.POP and plain:
                queue.popleft()
                if mtype == 90:  # ReadyForQuery
                    pipeline.status = data[pos + 5 : pos + 6]
                pos = end
                continue
            if rows:
                self._stmt_rows += rows
                rows = 0
            extra = self._server_message(mtype, data, pos, end)
            plain = not pipeline.has_synthetic
            if pipeline.swallow:  # pgwarden's own abort: forward what came before, skip it
                pipeline.swallow = False
                out.append(view[run:pos])
                pos = run = end
                if extra:
                    out.append(extra)
                continue
            pos = end
            if extra:
                out.append(view[run:pos])
                out.append(extra)
                run = pos
        self._stmt_rows += rows
        if run == 0 and pos == n:
            out.append(data)
        elif run < pos:
            out.append(view[run:pos])
        if pos < n:
            self._keep_tail(data, view, pos)

    def _guard(self, mtype: int, data: bytes, pos: int, end: int) -> bool | bytes:
        """The result-path backstop for restricted roles; True when it closed the session.

        A RowDescription with hidden record-key columns comes back without them
        (bytes to send instead of the message).

        A RowDescription field that comes straight from a column the role may not
        see raw means the rewrite failed somewhere: the statement is aborted before
        any row of it is forwarded. A ParameterStatus reporting a change of identity
        or lexing settings ends the session.
        """
        if mtype == 84:
            forbidden = self.gate.forbidden if self.gate is not None else frozenset()
            hit = forbidden and any(o in forbidden for o in be.decode_row_origins(data, pos, end))
            if not hit:
                if data.find(HIDDEN_PREFIX_BYTES, pos, end) < 0:
                    return False
                return be.strip_hidden_fields(data, pos, end, HIDDEN_PREFIX_BYTES) or False
            self.events.append(("backstop.tripped", {"what": "raw classified column in a result"}))
            self._fatal(
                PolicyRefusal("pgwarden: result would expose a protected column; statement aborted")
            )
            return True
        name, value = be.decode_parameter_status(data[pos:end])
        if name not in _WATCHED or self._watched.get(name) == value:
            return False
        self.events.append(("backstop.tripped", {"what": f"server reported a change of {name}"}))
        self._fatal(PolicyRefusal(f"pgwarden: the session changed {name}; connection closed"))
        return True

    # --- row caps (restricted roles with limits.rows_per_query) ----------------------
    #
    # While a statement with a cap is in flight, server messages are handled one by
    # one. With on_exceed: reject, rows are held until the statement completes: if it
    # stays within the cap they are released with its CommandComplete, otherwise none
    # is delivered and the client gets 54000 instead (the engine's LIMIT cap+1 keeps
    # the database from producing more). With truncate, rows up to the cap pass at
    # once, the rest are dropped, and a NOTICE precedes a CommandComplete that counts
    # what was delivered. After a refusal the rest of the reply (later statements of
    # the same Query, pipelined Executes) is dropped up to ReadyForQuery, as
    # PostgreSQL does after an error; the server's transaction is not affected.

    def _scan_capped(self, data: bytes, start: int = 0) -> None:
        n = len(data)
        pos = start
        while n - pos >= 5 and self.phase is not Phase.CLOSED:
            length = _LEN.unpack_from(data, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation("pgwarden: invalid message length from server")
            end = pos + 1 + length
            if end > n:
                if length > _SERVER_MESSAGE_MAX:
                    raise ProtocolViolation("pgwarden: oversized message from server")
                break
            mtype = data[pos]
            if mtype in _ROW_TYPES and self._in_statement():
                pos = self._capped_rows(mtype, data, pos)
                continue
            self._capped_message(mtype, data, pos, end)
            pos = end
        if pos < n and self.phase is not Phase.CLOSED:
            self._tail.keep(data, pos)  # a capped result is never streamed: it may be held

    def _in_statement(self) -> bool:
        queue = self.pipeline.queue
        return bool(queue) and queue[0] in (pl.QUERY, pl.EXECUTE)

    def _capped_rows(self, mtype: int, data: bytes, pos: int) -> int:
        """A run of complete rows (DataRow or CopyData) in this read, counted at once.

        The rows within the cap travel as one slice of the read: no object per row.
        Returns where the run ends.
        """
        cap = self.pipeline.caps[0] if self.pipeline.caps else None
        if isinstance(cap, _RowCap) and cap.records is not None:
            return self._record_rows(cap, mtype, data, pos)
        capped = isinstance(cap, _RowCap)
        room = max(0, cap.limit - cap.rows) if isinstance(cap, _RowCap) else 0
        n = len(data)
        count = 0
        fits = start = pos
        while n - pos >= 5 and data[pos] == mtype:
            end = pos + 1 + _LEN.unpack_from(data, pos + 1)[0]
            if end > n:
                break
            pos = end
            count += 1
            if not capped or count <= room:
                fits = pos
        rows = memoryview(data)[start:fits]
        if not isinstance(cap, _RowCap):
            self._deliver_rows(rows, count)
            return pos
        taken = min(count, room)
        cap.rows += count
        if taken:
            if cap.truncate:
                self._deliver_rows(rows, taken)
                cap.batch += taken
            elif not cap.over:
                cap.held.append(rows)
                cap.held_rows += taken
        if count > taken:
            cap.over = True
            cap.held.clear()
            cap.held_rows = 0
        return pos

    # --- record accounting (proxy/analysis/records.py) ------------------------------
    #
    # A statement whose rows show records of classified tables carries hidden key
    # columns: each row loses them here and its keys are kept beside it. Under a row
    # cap the rows are held until the statement (or batch) completes; then the gate
    # checks them all at once (decoys, records budgets, enumeration alerts) and says
    # how many go out. Without a cap (a role with no rows_per_query) rows go out as
    # they come and are only counted.

    def _record_rows(self, cap: _RowCap, mtype: int, data: bytes, pos: int) -> int:
        spec = cap.records
        assert spec is not None
        hidden = spec.hidden if mtype == 68 else 0
        stream = cap.limit >= _UNCAPPED
        strip = be.strip_columns
        keys_of = cap.keys
        run = bytearray()  # this read's rows without their key columns, back to back
        taken = 0
        n = len(data)
        while n - pos >= 5 and data[pos] == mtype:
            end = pos + 1 + _LEN.unpack_from(data, pos + 1)[0]
            if end > n:
                break
            cap.rows += 1
            if cap.over or cap.rows > cap.limit:
                pos = end
                if not cap.over:
                    cap.over = True
                    if not cap.truncate:  # none of it will be delivered
                        cap.held.clear()
                        keys_of.clear()
                        cap.held_rows = 0
                        run = bytearray()
                        taken = 0
                continue
            if hidden:
                row, keys = strip(data, pos, end, hidden)
                run += row
            else:
                keys = ()
                run += memoryview(data)[pos:end]
            pos = end
            keys_of.append(keys)
            taken += 1
        if taken:
            if stream:
                self._deliver_rows(bytes(run), taken)
                cap.batch += taken
            else:
                cap.held.append(bytes(run))
                cap.held_rows += taken
        return pos

    def _records_end(self, cap: _RowCap, mtype: int, msg: bytes, simple: bool) -> bytes:
        """_cap_end for a statement whose rows carry record keys."""
        spec = cap.records
        assert spec is not None
        assert self.gate is not None
        keys, cap.keys = cap.keys, []
        held, _, over, batch, seen, earlier = _take_held(cap, mtype, simple)
        extra = [m for m in held if m[0] == 99]  # a CopyDone held behind the rows
        held = [m for m in held if m[0] != 99]
        if batch:  # streamed: already delivered, only counted
            self.gate.account(spec, keys, held=False)
            self._charge(cap, batch)
            self._reply_all(extra)
            return msg
        if mtype == 69 or self._drop_until_ready:  # nothing of the statement is delivered
            return msg
        if over and not cap.truncate:
            return self._over_cap_error(cap, seen, earlier)
        outcome = self.gate.account(spec, keys, held=True)
        self.events.extend(outcome.events)
        if outcome.decoy or outcome.lock:
            self._lock_out(outcome.decoy, outcome.lock)
            return b""
        counts = (over, seen, earlier, len(keys))
        sent = self._deliver_accounted(cap, outcome, held, (mtype, msg), counts)
        if outcome.error is None:
            self._reply_all(extra)
        return sent

    def _reply_all(self, messages: list[bytes | memoryview]) -> None:
        if messages and not self._drop_until_ready:
            self.to_client.extend(messages)

    def _deliver_accounted(
        self,
        cap: _RowCap,
        outcome: Accounting,
        held: list[bytes | memoryview],
        end: tuple[int, bytes],
        counts: tuple[bool, int, int, int],
    ) -> bytes:
        """Send what the gate let through of a held, accounted result."""
        mtype, msg = end
        over, seen, earlier, held_rows = counts
        if outcome.error is not None:
            self._drop_until_ready = True
            if self._inflight:
                self._inflight[0].error = outcome.error.sqlstate
            return _error(_delivered_before(outcome.error, earlier))
        delivered = outcome.deliver
        if delivered and not self._drop_until_ready:
            self._stmt_rows += delivered
            self.to_client.extend(_first_rows(held, delivered))
        self._charge(cap, delivered)
        if cap.rows:  # the statement goes on (a portal or cursor batch)
            cap.delivered += delivered
        notice = b""
        if over:
            fields = {"cap": cap.limit, "rows_seen": seen, "on_exceed": cap.mode}
            event = "quota.exhausted" if cap.by_quota else "limit.exceeded"
            self.events.append((event, fields | {"tables": list(cap.tables)}))
            notice = be.error_response(
                "NOTICE",
                "01000",
                f"pgwarden: result truncated to {cap.limit} rows, the row cap of your role",
                notice=True,
            )
        if outcome.notice:
            notice = be.error_response("NOTICE", "01000", outcome.notice, notice=True)
        if delivered < held_rows or over:
            return notice + (_recount(msg, delivered) if mtype == 67 else msg)
        return msg

    def _lock_out(self, decoy: str, alert: str) -> None:
        """A planted record was in the result, or an alert locks: nothing goes out, lock."""
        assert self.gate is not None
        stmt = self._inflight[0].audit if self._inflight else None
        fingerprint = stmt.fingerprint if stmt else ""
        if decoy:
            reason = "decoy"
            details: dict[str, Any] = {"table": decoy, "fingerprint": fingerprint}
            self.events.append(("decoy.touched", dict(details)))
        else:
            reason = "enumeration"
            details = {"kind": alert, "fingerprint": fingerprint}
        self.events.append(("user.locked", {"reason": reason, **details}))
        if self._inflight:  # the statement's own event: failed, nothing delivered
            failed = self._inflight.popleft()
            failed.error = "42501"
            self._statement_event(failed)
        self._fatal(locked_error(self.gate.principal.user))
        self.gate.lock(reason, details)

    def _over_cap_error(self, cap: _RowCap, seen: int, earlier: int) -> bytes:
        event = "quota.exhausted" if cap.by_quota else "limit.exceeded"
        fields = {"cap": cap.limit, "rows_seen": seen, "on_exceed": cap.mode}
        self.events.append((event, fields | {"tables": list(cap.tables)}))
        self._drop_until_ready = True
        if self._inflight:
            self._inflight[0].error = "53400" if cap.by_quota else "54000"
        refusal = _over_quota(cap.limit) if cap.by_quota else _over_cap(cap.limit)
        return _error(_delivered_before(refusal, earlier))

    def _capped_message(self, mtype: int, data: bytes, pos: int, end: int) -> None:
        msg = data[pos:end]
        if mtype in _GUARDED_TYPES:
            guarded = self._guard(mtype, data, pos, end)
            if guarded is True:
                return
            if guarded:
                msg = guarded
        queue = self.pipeline.queue
        in_statement = self._in_statement()
        cap = self.pipeline.caps[0] if in_statement and self.pipeline.caps else None
        if isinstance(cap, _RowCap) and mtype == 99:  # CopyDone: held behind the rows
            if not cap.over:
                cap.held.append(msg)
            return
        dropping = self._drop_until_ready  # a refusal earlier in this reply
        if isinstance(cap, _RowCap) and mtype in _STATEMENT_ENDS:
            msg = self._cap_end(cap, mtype, msg, queue[0] == pl.QUERY)
            if self.phase is Phase.CLOSED:
                return
        extra = self._server_message(mtype, data, pos, end)
        if self.pipeline.swallow:  # pgwarden's own abort
            self.pipeline.swallow = False
            if not dropping:
                self._reply(extra)
            return
        if mtype == 90:  # ReadyForQuery
            self._drop_until_ready = False
        elif dropping:
            return
        self._reply(msg + extra)

    def _deliver_rows(self, rows: bytes | memoryview, count: int) -> None:
        """Forward `count` rows (whole messages, back to back) unless this reply is dropped."""
        if count and not self._drop_until_ready:
            self._stmt_rows += count
            self.to_client.append(rows)

    def _cap_end(self, cap: _RowCap, mtype: int, msg: bytes, simple: bool) -> bytes:
        """The bytes to send for a statement's (or batch's) last message."""
        if cap.records is not None:
            return self._records_end(cap, mtype, msg, simple)
        held, held_rows, over, batch, seen, earlier = _take_held(cap, mtype, simple)
        if mtype == 69:  # ErrorResponse: nothing of the statement is delivered
            self._charge(cap, batch)
            return msg
        if not over:
            if held and not self._drop_until_ready:
                self._stmt_rows += held_rows
                self.to_client.extend(held)
            self._charge(cap, batch + held_rows)
            if cap.rows:  # the statement goes on (a portal or cursor batch)
                cap.delivered += held_rows
            return msg
        self._charge(cap, batch)
        event = "quota.exhausted" if cap.by_quota else "limit.exceeded"
        fields = {"cap": cap.limit, "rows_seen": seen, "on_exceed": cap.mode}
        self.events.append((event, fields | {"tables": list(cap.tables)}))
        if not cap.truncate:
            self._drop_until_ready = True  # the rest of this reply is dropped
            if self._inflight:
                self._inflight[0].error = "53400" if cap.by_quota else "54000"
            refusal = _over_quota(cap.limit) if cap.by_quota else _over_cap(cap.limit)
            return _error(_delivered_before(refusal, earlier))
        notice = be.error_response(
            "NOTICE",
            "01000",
            f"pgwarden: result truncated to {cap.limit} rows, the row cap of your role",
            notice=True,
        )
        return notice + (_recount(msg, batch) if mtype == 67 else msg)

    def _charge(self, cap: _RowCap, delivered: int) -> None:
        """Rows of a statement that reads classified tables count against the quotas."""
        if cap.counted and delivered and not self._drop_until_ready and self.gate is not None:
            self.gate.charge(delivered, cap.bucket)

    def _keep_tail(self, data: bytes, view: memoryview, pos: int) -> None:
        n = len(data)
        if n - pos >= 5:
            length = _LEN.unpack_from(data, pos + 1)[0]
            mtype = data[pos]
            if length < 4:
                raise ProtocolViolation("pgwarden: invalid message length from server")
            if mtype in (68, 100) and length > _STREAM_FROM:
                if mtype == 68:
                    self._stmt_rows += 1
                self.to_client.append(view[pos:n])
                self._stream_left = pos + 1 + length - n
                return
            if length > _SERVER_MESSAGE_MAX:
                raise ProtocolViolation("pgwarden: oversized message from server")
        self._tail.keep(data, pos)

    def _server_message(self, mtype: int, data: bytes, pos: int, end: int) -> bytes:
        status = data[pos + 5 : pos + 6] if mtype == 90 else b""  # ReadyForQuery
        completes, extra = self.pipeline.on_server(mtype, status)
        if self.pipeline.swallow:  # the answer to pgwarden's own abort: not the client's
            return extra
        if completes:
            assert self.gate is not None
            self.gate.rows_returned(self._stmt_rows)
            self.rows += self._stmt_rows
            if self._inflight:
                self._inflight[0].rows += self._stmt_rows
            self._stmt_rows = 0
        if mtype == 69 and self._inflight:  # ErrorResponse: the statement failed upstream
            self._inflight[0].error = _sqlstate(data, pos, end)
        while self.pipeline.done > self._done:
            self._done += 1
            if self._inflight:
                self._statement_event(self._inflight.popleft())
        return extra

    def _statement_event(self, stmt: _Statement) -> None:
        now = self.config.clock()
        fields = _statement_fields(stmt.audit, "allow")
        fields["rows"] = stmt.rows
        if stmt.rows > fields.get("shadow_cap", stmt.rows):  # shadow mode: over the cap
            fields["shadow_capped"] = True
        fields["duration_ms"] = round((now - stmt.checked_from) * 1000, 3)
        fields["upstream_ms"] = round((now - stmt.started) * 1000, 3)
        if stmt.error:
            fields["error"] = stmt.error
        self.events.append(("statement", fields))

    def _refused_event(self, verdict: Refuse) -> None:
        fields = _statement_fields(verdict.audit, "refuse")
        fields["reason"] = verdict.error.message
        fields["sqlstate"] = verdict.error.sqlstate
        self.events.append(("statement", fields))

    # --- closing -------------------------------------------------------------

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise RuntimeError(f"session event in phase {self.phase.value}, expected {phase.value}")

    def _fatal(self, exc: PgWardenError, severity: str | None = None) -> None:
        if self.phase is Phase.CLOSED:
            return
        sev = severity or ("FATAL" if exc.severity == "ERROR" else exc.severity)
        self.to_client.append(be.error_response(sev, exc.sqlstate, exc.message, exc.hint))
        if self.phase is Phase.READY:
            self.to_server.append(fe.TERMINATE_MESSAGE)
        self.actions.append(Close(exc.message))
        self.phase = Phase.CLOSED

    def _upstream_fatal(self, exc: UpstreamUnavailable) -> None:
        self.events.append(("upstream.error", {"error": exc.message}))
        self._fatal(
            UpstreamUnavailable(
                "pgwarden: upstream database unavailable",
                hint="pgwarden itself is running; try again shortly or contact the DBA.",
            )
        )

    def _shutdown_now(self) -> None:
        self._fatal(
            PgWardenError(
                "pgwarden: terminating connection due to administrator command",
                sqlstate="57P01",
            )
        )


_Handler = Callable[[Session, bytes, int, int], bool | bytes]

# READY-phase client messages, by type byte (class-level: no per-session tables).
_READY_HANDLERS: dict[int, _Handler] = {
    fe.QUERY: Session._on_query,
    fe.PARSE: Session._on_parse,
    fe.BIND: Session._on_bind,
    fe.DESCRIBE: Session._on_describe,
    fe.EXECUTE: Session._on_execute,
    fe.CLOSE: Session._on_close,
    fe.SYNC: Session._on_sync,
    fe.FLUSH: Session._on_flush,
    fe.COPY_DATA: Session._on_copy_data,
    fe.COPY_DONE: Session._on_copy_end,
    fe.COPY_FAIL: Session._on_copy_end,
    fe.FUNCTION_CALL: Session._on_function_call,
    fe.TERMINATE: Session._on_terminate,
}
# While the server reads COPY data, only these may come from the client.
_COPY_IN_ALLOWED = frozenset({fe.COPY_DATA, fe.COPY_DONE, fe.COPY_FAIL, fe.SYNC, fe.FLUSH})
_COPY_HANDLERS = {t: h for t, h in _READY_HANDLERS.items() if t in _COPY_IN_ALLOWED}


class _Statement:
    """A Query or Execute forwarded and not answered yet: its statement event to be."""

    __slots__ = ("audit", "checked_from", "error", "rows", "started")

    def __init__(self, audit: Audit | None, started: float, checked_from: float = 0.0) -> None:
        self.audit = audit
        self.started = started  # when it was forwarded upstream
        self.checked_from = checked_from or started  # when pgwarden began to check it
        self.rows = 0
        self.error = ""


def _statement_fields(audit: Audit | None, verdict: str) -> dict[str, Any]:
    """The statement event's fields every statement has (counts zero until known)."""
    fields: dict[str, Any] = {
        "fingerprint": audit.fingerprint if audit else "",
        "kind": audit.kind if audit else "",
        "tables": list(audit.tables) if audit else [],
        "verdict": verdict,
        "rows": 0,
        "duration_ms": 0.0,
        "upstream_ms": 0.0,
    }
    if audit is not None:
        fields["protocol"] = "extended" if audit.extended else "simple"
        fields.update(audit.shadow)  # shadow mode: what enforcement would have done
        fields.update(audit.break_glass)  # break-glass: the reason stated
    return fields


def _sqlstate(data: bytes, pos: int, end: int) -> str:
    """The SQLSTATE of the ErrorResponse at data[pos:end] (a code, never a message)."""
    at = data.find(b"\0C", pos + 4, end)
    if data[pos + 5 : pos + 6] == b"C":
        at = pos + 4
    return data[at + 2 : at + 7].decode("ascii", "replace") if at >= 0 else ""


_GUARDED_TYPES = (84, 83)  # RowDescription, ParameterStatus
_UNCAPPED = 1 << 62  # the limit of a cap that only carries record accounting
_ROW_TYPES = (68, 100)  # DataRow, CopyData (a row of COPY TO STDOUT)
# CommandComplete, PortalSuspended, ErrorResponse, EmptyQueryResponse
_STATEMENT_ENDS = (67, 115, 69, 73)


class _RowCap:
    """A statement's (or a portal's) row cap and what has been seen of its rows."""

    __slots__ = (
        "base",
        "batch",
        "bucket",
        "by_quota",
        "counted",
        "cumulative",
        "delivered",
        "held",
        "held_rows",
        "keys",
        "limit",
        "over",
        "records",
        "rows",
        "tables",
        "truncate",
    )

    def __init__(
        self,
        limit: int,
        *,
        truncate: bool,
        counted: bool = False,
        by_quota: bool = False,
        base: int | None = None,
    ) -> None:
        self.limit = limit
        self.base = base  # rows_per_query when the limit may come from a quota
        self.cumulative = False  # a cursor: rows add up over its FETCHes
        self.tables: tuple[str, ...] = ()  # for the limit.exceeded / quota.exhausted event
        self.truncate = truncate
        self.counted = counted  # delivered rows are charged to the user's quotas
        self.by_quota = by_quota  # the limit is what is left of a quota, not rows_per_query
        self.bucket = ""  # the ledger user its rows are charged to ("": the session's user)
        self.rows = 0  # rows the server sent for the statement (or portal) so far
        self.batch = 0  # rows delivered since the last completion message (truncate)
        self.delivered = 0  # rows of earlier batches (portal, cursor) already delivered
        self.held: list[bytes | memoryview] = []  # runs of rows (and a CopyDone), in order
        self.held_rows = 0  # rows in `held`
        self.over = False
        self.records: RecordSpec | None = None  # rows carry hidden record keys to account
        self.keys: list[KeyRow] = []  # the keys of each held (or streamed) row, in order

    @classmethod
    def of(cls, verdict: Allow) -> _RowCap | None:
        if verdict.cap is None and verdict.records is None:
            return None
        cap = cls(
            _UNCAPPED if verdict.cap is None else verdict.cap,
            truncate=verdict.truncate or verdict.cap is None,
            counted=verdict.counted,
            by_quota=verdict.by_quota,
            base=verdict.base_cap,
        )
        cap.tables = verdict.tables
        cap.records = verdict.records
        cap.bucket = verdict.bucket
        return cap

    def fresh(self) -> _RowCap:
        """The same cap with nothing seen yet (a new portal of the same statement)."""
        cap = copy.copy(self)
        cap.rows = cap.batch = cap.held_rows = 0
        cap.held = []
        cap.keys = []
        cap.over = cap.cumulative = False
        return cap

    def cursor(self) -> _RowCap:
        """The running count of a cursor DECLAREd with this cap."""
        summed = self.fresh()
        summed.base = self.base if self.base is not None else self.limit
        summed.limit = summed.base
        summed.by_quota = False
        summed.cumulative = True
        return summed

    def requota(self, left: int) -> None:
        """The limit for a new portal: rows_per_query, or what is left of the quota."""
        if self.base is not None and self.base <= left:
            self.limit, self.by_quota = self.base, False
        else:
            self.limit, self.by_quota = left, True

    @property
    def mode(self) -> str:
        return "truncate" if self.truncate else "reject"


# What pgwarden sends the server with a refusal so that the refusal aborts the
# transaction as an error would (see pipeline.py): a Parse that cannot succeed, of a
# named statement (a failed Parse of the unnamed one would drop the client's).
ABORT_PARSE = fe.encode_parse("pgwarden_refusal", "pgwarden refused the statement")


def _take_held(
    cap: _RowCap, mtype: int, simple: bool
) -> tuple[list[bytes | memoryview], int, bool, int, int, int]:
    """A statement's (or batch's) held rows and counts, the cap reset for what follows.

    (held, held rows, over the cap, rows delivered in this batch, rows the server
    sent, rows of earlier batches). A portal's or cursor's counts go on across
    batches; a statement's end starts the next one afresh.
    """
    held, cap.held = cap.held, []
    held_rows, cap.held_rows = cap.held_rows, 0
    counts = (cap.over, cap.batch, cap.rows, cap.delivered)
    cap.batch = 0
    if (simple or mtype != 115) and not cap.cumulative:  # a statement ended
        cap.rows = 0
        cap.delivered = 0
        cap.over = False
    return held, held_rows, *counts


def _first_rows(runs: list[bytes | memoryview], count: int) -> list[bytes | memoryview]:
    """The first `count` messages of `runs` (each a run of whole messages), as slices."""
    out: list[bytes | memoryview] = []
    for run in runs:
        if count <= 0:
            break
        pos, n = 0, len(run)
        while pos < n and count > 0:
            pos += 1 + _LEN.unpack_from(run, pos + 1)[0]
            count -= 1
        out.append(run if pos == n else memoryview(run)[:pos])
    return out


def _delivered_before(error: PgWardenError, earlier: int) -> PgWardenError:
    """Name the rows of earlier batches (portal, cursor) that the client already has."""
    if earlier:
        error.message = error.message.replace(
            "no rows delivered", f"no rows of this batch delivered ({earlier} before it)"
        )
    return error


def _over_cap(limit: int) -> PgWardenError:
    return PgWardenError(
        f"pgwarden: statement returned more than {limit} rows, the row cap of your role; "
        "no rows delivered",
        hint=f"Narrow the statement (a WHERE clause, or LIMIT {limit}).",
        sqlstate="54000",
    )


def _over_quota(limit: int) -> PgWardenError:
    return PgWardenError(
        f"pgwarden: statement returned more than the {limit} rows left of your row quota; "
        "no rows delivered",
        hint="The hourly or daily quota frees up as the window moves; `pgwarden quota show` "
        "(ops) tells when.",
        sqlstate="53400",
    )


def _recount(msg: bytes, rows: int) -> bytes:
    """A CommandComplete whose tag counts `rows` ("SELECT 51" -> "SELECT 50")."""
    words = msg[5:-1].split(b" ")
    if words and words[-1].isdigit():
        words[-1] = str(rows).encode()
    tag = b" ".join(words) + b"\0"
    return b"C" + _LEN.pack(4 + len(tag)) + tag


# Settings whose change (reported by the server) ends a restricted session.
_WATCHED = frozenset(
    {
        "session_authorization",
        "is_superuser",
        "standard_conforming_strings",
        "client_encoding",
        "search_path",
        "role",
    }
)


def _check_length(length: int, cap: int) -> None:
    if length < 4:
        raise ProtocolViolation(f"pgwarden: invalid message length {length}")
    if length > cap:
        raise MessageTooLarge(
            f"pgwarden: message of {length} bytes exceeds the limit of {cap} bytes"
        )


def _error(exc: PgWardenError) -> bytes:
    return be.error_response("ERROR", exc.sqlstate, exc.message, exc.hint)
