"""The session state machine, driven as the network layer drives it.

The client side is real: scramp's ScramClient logs in. The upstream is a
scripted byte stream written with proxy.wire.backend encoders and the small
builders below, as PostgreSQL would send it (these are tier-1 tests: the real
server is exercised end to end elsewhere). Every byte stream is fed whole, one
byte at a time and in seeded random splits (the `split` fixture), and what
comes out of the session is compared as joined bytes.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest
from scramp import ScramClient

from proxy.auth import make_secret, parse_secret
from proxy.errors import PgWardenError, PolicyRefusal
from proxy.session.gate import ALLOW, Allow, Gate, PassThroughGate, Principal, Refuse, Verdict
from proxy.session.machine import (
    ABORT_PARSE,
    Cancel,
    Close,
    ConnectUpstream,
    Phase,
    Session,
    SessionConfig,
    StartTLS,
)
from proxy.wire import backend as be
from proxy.wire import frontend as fe

SCRAM = "SCRAM-SHA-256"
PASSWORDS = {"alice": "alice-pw", "eve": "eve-pw"}
SECRETS = {user: parse_secret(make_secret(pw)) for user, pw in PASSWORDS.items()}
ROLES = {"alice": "support"}  # eve is in the users file but in no role
KEY = (4242, b"\x0a\x0b\x0c\x0d")  # what pgwarden hands the client
UPSTREAM_KEY = (31337, b"\xde\xad\xbe\xef")  # what the server hands pgwarden
SERVER_PARAMS = [
    ("server_version", "18.0"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
]
FORBIDDEN = "SELECT pan FROM payment_cards -- forbidden"


# --- gates ----------------------------------------------------------------------


class RefusingGate:
    """Refuses SQL containing 'forbidden', rewrites 'rewrite_me'; records rows per statement."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.forbidden: frozenset[tuple[int, int]] = frozenset()
        self.cap: int | None = None  # the row cap every allowed statement gets
        self.truncate = False
        self.checked: list[tuple[str, bool]] = []
        self.rows: list[int] = []
        self.charged: list[int] = []
        self.bind_answer: int | PgWardenError | None = None  # what check_bind says

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        self.checked.append((sql, extended))
        if "forbidden" in sql:
            return Refuse(PolicyRefusal("pgwarden: statement refused by policy"))
        if "rewrite_me" in sql:
            return Allow(sql.replace("rewrite_me", "rewritten"))
        if self.cap is not None:
            return Allow(None, self.cap, self.truncate)
        return ALLOW

    def rows_returned(self, count: int) -> None:
        self.rows.append(count)

    def charge(self, rows: int) -> None:
        self.charged.append(rows)

    def check_bind(self, prepared: object, *, counted: bool) -> int | PgWardenError | None:
        return self.bind_answer


def passthrough_gate(user: str) -> Gate | None:
    role = ROLES.get(user)
    return None if role is None else PassThroughGate(Principal(user, role, unrestricted=False))


def refusing_gate(user: str) -> Gate | None:
    role = ROLES.get(user)
    return None if role is None else RefusingGate(Principal(user, role, unrestricted=False))


def make_config(**overrides: object) -> SessionConfig:
    settings: dict[str, object] = {
        "users": SECRETS,
        "open_gate": passthrough_gate,
        "database": "shop",
        "upstream_user": "pgwarden_svc",
        "upstream_password": None,
        "tls_available": False,
        "tls_required": False,
        "max_message_bytes": 1 << 20,
    }
    settings.update(overrides)
    return SessionConfig(**settings)  # type: ignore[arg-type]


# --- messages, both directions -------------------------------------------------------


def msg(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def messages(data: bytes) -> list[tuple[str, bytes]]:
    """(type, body) of each typed message in `data`; nothing may be left over."""
    out, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= 5, f"partial header at {pos}: {data[pos:]!r}"
        (length,) = struct.unpack_from("!I", data, pos + 1)
        assert pos + 1 + length <= len(data), f"partial message at {pos}"
        out.append((chr(data[pos]), data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def kinds(data: bytes) -> str:
    return "".join(kind for kind, _ in messages(data))


def error_fields(body: bytes) -> dict[str, str]:
    return {part[:1].decode(): part[1:].decode() for part in body.split(b"\0") if part}


def the_error(data: bytes) -> dict[str, str]:
    """Fields of the one ErrorResponse in `data`."""
    [body] = [body for kind, body in messages(data) if kind == "E"]
    return error_fields(body)


def startup(user: str = "alice", database: str = "shop", **params: str) -> bytes:
    return fe.encode_startup([("user", user), ("database", database), *params.items()])


def bind(statement: str = "", portal: str = "", *values: bytes) -> bytes:
    params = b"".join(struct.pack("!i", len(v)) + v for v in values)
    body = portal.encode() + b"\0" + statement.encode() + b"\0"
    return msg(b"B", body + struct.pack("!hh", 0, len(values)) + params + b"\0\0")


def describe(target: str = "P", name: str = "") -> bytes:
    return msg(b"D", target.encode() + name.encode() + b"\0")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", portal.encode() + b"\0" + struct.pack("!i", max_rows))


def close(target: str, name: str) -> bytes:
    return msg(b"C", target.encode() + name.encode() + b"\0")


def copy_data(data: bytes) -> bytes:
    return msg(b"d", data)


SYNC, FLUSH, TERMINATE = fe.SYNC_MESSAGE, fe.FLUSH_MESSAGE, fe.TERMINATE_MESSAGE
COPY_DONE = msg(b"c")
# FunctionCall: function OID, no argument formats, one text argument "1", text result.
FUNCTION_CALL = msg(b"F", struct.pack("!ihhi", 1598, 0, 1, 1) + b"1" + struct.pack("!h", 0))


def row_description(*names: str) -> bytes:
    fields = b"".join(
        n.encode() + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0) for n in names
    )
    return msg(b"T", struct.pack("!h", len(names)) + fields)


def data_row(*values: bytes | None) -> bytes:
    cols = b"".join(
        struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values
    )
    return msg(b"D", struct.pack("!h", len(values)) + cols)


def command_complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def copy_response(kind: bytes, columns: int = 1) -> bytes:
    return msg(kind, b"\0" + struct.pack("!h", columns) + b"\0\0" * columns)


PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE = msg(b"1"), msg(b"2"), msg(b"3")
NO_DATA, SERVER_COPY_DONE = msg(b"n"), msg(b"c")
READY_I, READY_T = be.ready_for_query(b"I"), be.ready_for_query(b"T")
READY_E = be.ready_for_query(b"E")


def parameter_description(*oids: int) -> bytes:
    return msg(b"t", struct.pack(f"!h{len(oids)}I", len(oids), *oids))


# With a refusal pgwarden sends the server a Parse that fails (the transaction aborts as
# for an error); the server's answer to it is swallowed.
ABORT = ABORT_PARSE
ABORT_SIMPLE = ABORT_PARSE + fe.SYNC_MESSAGE


def absorbed() -> bytes:
    return server_error("42601", 'syntax error at or near "pgwarden"')


def server_error(sqlstate: str = "22012", message: str = "division by zero") -> bytes:
    return be.error_response("ERROR", sqlstate, message)


def refusal_error(gate_message: str = "pgwarden: statement refused by policy") -> bytes:
    return be.error_response("ERROR", "42501", gate_message)


# --- driving a session ----------------------------------------------------------------


def pieces(data: bytes, split: str, rng: random.Random) -> Iterator[bytes]:
    if split == "whole" or len(data) < 2:
        yield data
    elif split == "bytewise":
        yield from (data[i : i + 1] for i in range(len(data)))
    else:
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
        yield from (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True))


class Wire:
    """Plays the network layer: feeds bytes in pieces, drains what the session wrote."""

    def __init__(self, session: Session, split: str, seed: int = 0) -> None:
        self.session = session
        self.split = split
        self.rng = random.Random(seed)
        self.server_first = ""  # the proxy's SCRAM server-first message, once sent

    def client(self, data: bytes) -> None:
        for piece in pieces(data, self.split, self.rng):
            self.session.client_data(piece)

    def server(self, data: bytes) -> None:
        for piece in pieces(data, self.split, self.rng):
            self.session.server_data(piece)

    def to_client(self) -> bytes:
        out = b"".join(self.session.to_client)
        self.session.to_client.clear()
        return out

    def to_server(self) -> bytes:
        out = b"".join(self.session.to_server)
        self.session.to_server.clear()
        return out

    def actions(self) -> list[object]:
        out = list(self.session.actions)
        self.session.actions.clear()
        return out

    def drain(self) -> None:
        """Forget what the session wrote so far (it was checked already)."""
        self.to_client(), self.to_server(), self.actions()


def new_wire(split: str, **config: object) -> Wire:
    return Wire(Session(make_config(**config), KEY), split)


@pytest.fixture(params=["whole", "bytewise", "random"])
def split(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def authenticate(wire: Wire, user: str, password: str, **params: str) -> bytes:
    """Startup and a SCRAM exchange by a real client; returns the reply to its last message."""
    wire.client(startup(user, **params))
    assert messages(wire.to_client())[-1] == ("R", be.auth_sasl((SCRAM,))[5:])
    client = ScramClient([SCRAM], user, password)
    wire.client(fe.encode_sasl_initial(SCRAM, client.get_client_first().encode()))
    [(kind, body)] = messages(wire.to_client())
    assert (kind, body[:4]) == ("R", struct.pack("!i", be.AUTH_SASL_CONTINUE))
    wire.server_first = body[4:].decode()
    client.set_server_first(wire.server_first)
    wire.client(fe.encode_password(client.get_client_final().encode()))
    reply = wire.to_client()
    if kinds(reply) == "RR":  # the proxy must prove it holds the verifier
        client.set_server_final(messages(reply)[0][1][4:].decode())
    return reply


def upstream_welcome(status: bytes = b"I") -> bytes:
    """What PostgreSQL sends the service account: AuthenticationOk to ReadyForQuery."""
    params = b"".join(be.parameter_status(name, value) for name, value in SERVER_PARAMS)
    key = be.backend_key_data(*UPSTREAM_KEY)
    return be.auth_request(be.AUTH_OK) + params + key + be.ready_for_query(status)


def log_in(wire: Wire, user: str = "alice") -> None:
    """A full login: SCRAM, the upstream connection, the welcome."""
    reply = authenticate(wire, user, PASSWORDS[user])
    assert kinds(reply) == "RR"
    assert messages(reply)[1] == ("R", struct.pack("!i", be.AUTH_OK))
    assert wire.actions() == [ConnectUpstream()]
    assert wire.session.phase is Phase.CONNECTING
    wire.session.upstream_connected()
    assert wire.session.phase is Phase.UPSTREAM_LOGIN
    wire.to_server()
    wire.server(upstream_welcome())
    assert wire.session.phase is Phase.READY
    wire.drain()


def ready_wire(split: str, **config: object) -> Wire:
    wire = new_wire(split, open_gate=refusing_gate, **config)
    log_in(wire)
    return wire


def gate_of(wire: Wire) -> RefusingGate:
    gate = wire.session.gate
    assert isinstance(gate, RefusingGate)
    return gate


def assert_closed(wire: Wire, reason: str | None = None) -> None:
    actions = wire.actions()
    assert len(actions) == 1
    assert isinstance(actions[0], Close)
    if reason is not None:
        assert actions[0].reason == reason
    assert wire.session.phase is Phase.CLOSED


def fatal(wire: Wire) -> dict[str, str]:
    """The FATAL the client got before the close, as fields."""
    data = wire.to_client()
    assert kinds(data)[-1] == "E"
    fields = error_fields(messages(data)[-1][1])
    assert fields["S"] == fields["V"] == "FATAL"
    assert_closed(wire, fields["M"])
    return fields


# --- startup: SSL, GSSAPI, cancel -----------------------------------------------------


def test_ssl_request_without_tls_is_answered_n_and_login_goes_on(split: str) -> None:
    wire = new_wire(split)
    wire.client(fe.encode_ssl_request())
    assert wire.to_client() == b"N"
    assert wire.actions() == []
    assert wire.session.phase is Phase.STARTUP
    log_in(wire)
    assert not wire.session.secure


def test_ssl_request_and_startup_in_one_chunk_without_tls(split: str) -> None:
    # Plaintext after N is what the client is supposed to send next.
    wire = new_wire(split)
    wire.client(fe.encode_ssl_request() + startup())
    assert wire.to_client() == b"N" + be.auth_sasl((SCRAM,))
    assert wire.session.phase is Phase.AUTH_INITIAL


def test_ssl_request_with_tls_starts_tls(split: str) -> None:
    wire = new_wire(split, tls_available=True)
    wire.client(fe.encode_ssl_request())
    assert wire.to_client() == b"S"
    assert wire.actions() == [StartTLS()]
    assert wire.session.phase is Phase.TLS
    wire.session.tls_established()
    assert wire.session.secure
    assert wire.session.phase is Phase.STARTUP
    log_in(wire)


def test_second_ssl_request_on_an_encrypted_connection_is_fatal(split: str) -> None:
    wire = new_wire(split, tls_available=True)
    wire.client(fe.encode_ssl_request())
    wire.session.tls_established()
    wire.drain()
    wire.client(fe.encode_ssl_request())
    assert fatal(wire)["C"] == "08P01"


def test_data_after_ssl_request_in_the_same_chunk_is_refused() -> None:
    # Buffer stuffing (CVE-2021-23214 in PostgreSQL): plaintext queued behind the
    # SSLRequest would be read as if it came through TLS. One chunk on purpose.
    wire = new_wire("whole", tls_available=True)
    wire.client(fe.encode_ssl_request() + startup())
    fields = fatal(wire)
    assert fields["C"] == "08P01"
    assert "after SSLRequest" in fields["M"]
    assert not wire.session.secure


def test_data_during_tls_negotiation_is_fatal() -> None:
    wire = new_wire("whole", tls_available=True)
    wire.client(fe.encode_ssl_request())
    wire.drain()
    wire.client(startup())
    assert fatal(wire)["C"] == "08P01"


def test_gssenc_request_is_answered_n(split: str) -> None:
    wire = new_wire(split)
    wire.client(struct.pack("!II", 8, fe.GSSENC_REQUEST))
    assert wire.to_client() == b"N"
    assert wire.session.phase is Phase.STARTUP
    log_in(wire)


def test_cancel_request_asks_to_cancel_and_closes(split: str) -> None:
    wire = new_wire(split)
    wire.client(fe.encode_cancel(*KEY))
    assert wire.actions() == [Cancel(*KEY), Close("cancel request")]
    assert wire.to_client() == b""
    assert wire.session.phase is Phase.CLOSED
    wire.client(startup())  # nothing more is read
    assert (wire.to_client(), wire.to_server(), wire.actions()) == (b"", b"", [])


# --- startup: refusals ------------------------------------------------------------------


def test_tls_required_refuses_a_plaintext_startup(split: str) -> None:
    wire = new_wire(split, tls_available=True, tls_required=True)
    wire.client(startup())
    fields = fatal(wire)
    assert fields["C"] == "28000"
    assert "TLS is required" in fields["M"]


def test_tls_required_accepts_a_startup_after_tls(split: str) -> None:
    wire = new_wire(split, tls_available=True, tls_required=True)
    wire.client(fe.encode_ssl_request())
    wire.session.tls_established()
    wire.drain()
    log_in(wire)


@pytest.mark.parametrize(
    "params",
    [
        {"options": "-c search_path=evil"},
        {"replication": "database"},
        {"search_path": "evil"},
        {"client_encoding": "SJIS"},
    ],
    ids=["options", "replication", "unknown", "client_encoding"],
)
def test_startup_parameters_that_are_refused(split: str, params: dict[str, str]) -> None:
    wire = new_wire(split)
    wire.client(startup(**params))
    fields = fatal(wire)
    assert fields["C"] == "42501"
    assert "H" in fields


def test_wrong_database_is_refused(split: str) -> None:
    wire = new_wire(split)
    wire.client(startup(database="postgres"))
    fields = fatal(wire)
    assert fields["C"] == "3D000"
    assert fields["M"] == 'pgwarden: database "postgres" is not served here'


def test_startup_without_user_is_a_protocol_violation(split: str) -> None:
    wire = new_wire(split)
    wire.client(fe.encode_startup([("database", "shop")]))
    assert fatal(wire)["C"] == "08P01"


def test_protocol_3_2_and_protocol_options_are_negotiated_down(split: str) -> None:
    wire = new_wire(split)
    body = (
        struct.pack("!I", (3 << 16) | 2) + b"user\0alice\0database\0shop\0_pq_.compression\0on\0\0"
    )
    wire.client(struct.pack("!I", len(body) + 4) + body)
    assert wire.to_client() == (
        be.negotiate_protocol_version(fe.PROTOCOL_3_0, ["_pq_.compression"])
        + be.auth_sasl((SCRAM,))
    )


# --- authentication --------------------------------------------------------------------


def test_wrong_password_is_refused(split: str) -> None:
    wire = new_wire(split)
    reply = authenticate(wire, "alice", "not-her-password")
    assert reply == be.error_response(
        "FATAL", "28P01", 'password authentication failed for user "alice"'
    )
    assert_closed(wire)
    assert ("auth.failed", {"user": "alice", "reason": "password"}) in wire.session.events


def test_unknown_user_gets_the_same_reply_as_a_wrong_password(split: str) -> None:
    # No user enumeration: the SCRAM exchange runs to the end against a mock
    # secret, and the refusal differs from a wrong password only by the name.
    known, unknown = new_wire(split), new_wire(split)
    wrong = authenticate(known, "alice", "guess")
    missing = authenticate(unknown, "zelda", "guess")  # a name as long as "alice"
    assert missing == wrong.replace(b'"alice"', b'"zelda"')
    assert_closed(unknown)
    shapes = [
        [(attr[:2], len(attr)) for attr in wire.server_first.split(",")]
        for wire in (known, unknown)
    ]
    assert shapes[0] == shapes[1]  # r=<nonce>, s=<16-byte salt>, i=4096
    assert unknown.server_first.endswith(",i=4096")


def test_user_without_a_role_is_refused_after_the_password(split: str) -> None:
    wire = new_wire(split)
    reply = authenticate(wire, "eve", PASSWORDS["eve"])
    assert kinds(reply) == "E"
    fields = the_error(reply)
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")
    assert fields["M"] == 'pgwarden: user "eve" has no role in the policy'
    assert_closed(wire)


def test_login_sends_our_own_backend_key(split: str) -> None:
    wire = new_wire(split)
    reply = authenticate(wire, "alice", PASSWORDS["alice"], application_name="psql")
    assert kinds(reply) == "RR"
    assert wire.actions() == [ConnectUpstream()]
    wire.client(b"")  # nothing happens while the upstream connects
    assert wire.to_server() == b""
    wire.session.upstream_connected()
    form = fe.decode_startup_form(wire.to_server())
    assert isinstance(form, fe.Startup)
    assert form.params == (
        ("user", "pgwarden_svc"),
        ("database", "shop"),
        ("client_encoding", "UTF8"),
        ("application_name", "psql"),
    )
    wire.server(upstream_welcome())
    welcome = b"".join(be.parameter_status(n, v) for n, v in SERVER_PARAMS)
    assert wire.to_client() == welcome + be.backend_key_data(*KEY) + READY_I
    assert wire.session.upstream_key == UPSTREAM_KEY
    assert wire.session.phase is Phase.READY
    assert wire.session.at_rest
    assert ("auth.ok", {"user": "alice", "role": "support"}) in wire.session.events


def test_upstream_refusing_the_login_is_unavailable_not_its_text(split: str) -> None:
    wire = new_wire(split)
    authenticate(wire, "alice", PASSWORDS["alice"])
    assert wire.actions() == [ConnectUpstream()]
    wire.session.upstream_connected()
    wire.server(be.error_response("FATAL", "28P01", "password authentication failed"))
    fields = fatal(wire)
    assert (fields["C"], fields["M"]) == ("08006", "pgwarden: upstream database unavailable")


def test_statements_sent_during_login_run_once_ready(split: str) -> None:
    wire = new_wire(split, open_gate=refusing_gate)
    authenticate(wire, "alice", PASSWORDS["alice"])
    assert wire.actions() == [ConnectUpstream()]
    query = fe.encode_query("SELECT 1")
    wire.client(query)
    wire.session.upstream_connected()
    wire.client(query)
    assert isinstance(fe.decode_startup_form(wire.to_server()), fe.Startup)  # nothing else yet
    wire.server(upstream_welcome())
    assert wire.to_server() == query + query
    assert wire.session.pipeline.pending == 2


# --- READY: simple query relay -------------------------------------------------------


def test_simple_query_is_relayed_byte_identical(split: str) -> None:
    wire = ready_wire(split)
    query = fe.encode_query("SELECT id, email FROM customers")
    wire.client(query)
    assert wire.to_server() == query
    assert not wire.session.at_rest
    reply = (
        row_description("id", "email")
        + data_row(b"1", b"ann@example.com")
        + data_row(b"2", None)
        + command_complete("SELECT 2")
        + READY_I
    )
    wire.server(reply)
    assert wire.to_client() == reply
    assert wire.session.rows == 2
    assert gate_of(wire).rows == [2]
    assert wire.session.statements == 1
    assert wire.session.at_rest


def test_rows_are_counted_per_statement(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("SELECT 1; SELECT 2"))
    reply = (
        row_description("a")
        + data_row(b"1") * 3
        + command_complete("SELECT 3")
        + row_description("b")
        + command_complete("SELECT 0")
        + row_description("c")
        + data_row(b"1")
        + command_complete("SELECT 1")
        + READY_I
    )
    wire.server(reply)
    assert wire.to_client() == reply
    assert gate_of(wire).rows == [3, 0, 1]
    assert wire.session.rows == 4


def test_server_notices_and_parameter_changes_pass_through(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("SET TimeZone = 'UTC'"))
    reply = (
        be.error_response("NOTICE", "00000", "hello", notice=True)
        + be.parameter_status("TimeZone", "UTC")
        + command_complete("SET")
        + READY_I
    )
    wire.server(reply)
    assert wire.to_client() == reply
    assert wire.session.at_rest


def test_refused_simple_query_aborts_the_transaction_like_an_error(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("BEGIN"))
    wire.server(command_complete("BEGIN") + READY_T)
    wire.drain()
    wire.client(fe.encode_query(FORBIDDEN))
    assert wire.to_server() == ABORT_SIMPLE  # the client's statement never goes
    assert wire.to_client() == b""
    assert not wire.session.at_rest
    wire.server(absorbed() + READY_E)  # the server's own error is not the client's
    assert wire.to_client() == refusal_error() + READY_E
    assert wire.session.at_rest
    assert gate_of(wire).checked[-1] == (FORBIDDEN, False)


def test_refused_simple_query_waits_for_the_statement_before_it(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("SELECT 1") + fe.encode_query(FORBIDDEN))
    assert wire.to_server() == fe.encode_query("SELECT 1") + ABORT_SIMPLE
    assert wire.to_client() == b""
    reply = row_description("a") + data_row(b"1") + command_complete("SELECT 1") + READY_I
    wire.server(reply)
    assert wire.to_client() == reply
    wire.server(absorbed() + READY_I)
    assert wire.to_client() == refusal_error() + READY_I
    assert wire.session.at_rest


def test_rewritten_statements_are_spliced_in_place(split: str) -> None:
    wire = ready_wire(split)
    types = b"\0\1\0\0\0\x17"
    before = fe.encode_query("SELECT 1")
    after = bind("s1", "", b"7") + execute() + SYNC
    wire.client(
        before
        + fe.encode_query("SELECT rewrite_me")
        + fe.encode_parse("s1", "SELECT rewrite_me FROM t WHERE id = $1", types)
        + after
    )
    assert wire.to_server() == (
        before
        + fe.encode_query("SELECT rewritten")
        + fe.encode_parse("s1", "SELECT rewritten FROM t WHERE id = $1", types)
        + after
    )
    assert [sql for sql, _ in gate_of(wire).checked] == [
        "SELECT 1",
        "SELECT rewrite_me",
        "SELECT rewrite_me FROM t WHERE id = $1",
    ]
    assert wire.session.pipeline.pending == 6  # Query, Query, Parse, Bind, Execute, Sync


# --- READY: extended protocol -------------------------------------------------------------


def test_extended_pipeline_of_several_batches(split: str) -> None:
    wire = ready_wire(split)
    batches = (
        fe.encode_parse("s1", "SELECT name FROM customers WHERE id = $1")
        + bind("s1", "", b"7")
        + describe("P")
        + execute()
        + SYNC
        + bind("s1", "p2", b"8")
        + execute("p2", 1)
        + SYNC
        + fe.encode_parse("", "SELECT 1")
        + describe("S", "")
        + bind("")
        + execute()
        + close("S", "s1")
        + FLUSH
    )
    wire.client(batches)
    assert wire.to_server() == batches
    replies = (
        PARSE_COMPLETE
        + BIND_COMPLETE
        + row_description("name")
        + data_row(b"Ann")
        + command_complete("SELECT 1")
        + READY_I
        + BIND_COMPLETE
        + data_row(b"Bob")
        + msg(b"s")  # PortalSuspended: max_rows reached
        + READY_I
        + PARSE_COMPLETE
        + parameter_description()
        + row_description("?column?")
        + BIND_COMPLETE
        + data_row(b"1")
        + command_complete("SELECT 1")
        + CLOSE_COMPLETE
    )
    wire.server(replies)
    assert wire.to_client() == replies
    assert wire.session.at_rest  # the flushed batch is answered; only Sync is missing
    wire.client(SYNC)
    assert wire.session.pipeline.pending == 1
    wire.server(READY_I)
    assert wire.to_client() == READY_I
    assert wire.session.at_rest
    assert gate_of(wire).rows == [1, 1, 1]


def test_refused_parse_is_answered_in_order_and_drops_until_sync(split: str) -> None:
    wire = ready_wire(split)
    allowed = fe.encode_parse("", "SELECT 1") + bind() + execute()
    refused = fe.encode_parse("", FORBIDDEN) + bind() + describe("P") + execute()
    wire.client(allowed + refused + SYNC)
    assert wire.to_server() == allowed + ABORT + SYNC
    assert wire.to_client() == b""  # the error waits behind the earlier replies
    replies = PARSE_COMPLETE + BIND_COMPLETE + data_row(b"1") + command_complete("SELECT 1")
    wire.server(replies)
    assert wire.to_client() == replies
    wire.server(absorbed())  # the batch fails in the server too: its work is rolled back
    assert wire.to_client() == refusal_error()
    wire.server(READY_I)
    assert wire.to_client() == READY_I
    assert wire.session.at_rest
    assert gate_of(wire).checked == [("SELECT 1", True), (FORBIDDEN, True)]


def test_refused_parse_before_flush_is_answered_when_earlier_replies_are_done(
    split: str,
) -> None:
    wire = ready_wire(split)
    allowed = fe.encode_parse("", "SELECT 1") + bind() + execute()
    wire.client(allowed + fe.encode_parse("q", FORBIDDEN) + FLUSH)
    assert wire.to_server() == allowed + ABORT + FLUSH
    wire.server(PARSE_COMPLETE + BIND_COMPLETE)
    assert wire.to_client() == PARSE_COMPLETE + BIND_COMPLETE
    wire.server(command_complete("SELECT 0") + absorbed())
    assert wire.to_client() == command_complete("SELECT 0") + refusal_error()
    wire.client(bind("q") + execute() + SYNC)  # still skipping: only Sync goes on
    assert wire.to_server() == SYNC
    wire.server(READY_I)
    assert wire.to_client() == READY_I
    assert wire.session.at_rest


def test_refused_parse_at_rest_is_answered_at_once(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_parse("", FORBIDDEN) + FLUSH)
    assert wire.to_server() == ABORT + FLUSH
    wire.server(absorbed())  # answered as soon as the server answers the abort
    assert wire.to_client() == refusal_error()


def test_server_error_mid_batch_drops_expectations_until_sync(split: str) -> None:
    wire = ready_wire(split)
    batch = fe.encode_parse("", "SELECT 1/0") + bind() + describe("P") + execute() + SYNC
    wire.client(batch + fe.encode_parse("", "SELECT 2") + bind() + execute() + SYNC)
    replies = PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + server_error() + READY_I
    wire.server(replies)
    assert wire.to_client() == replies
    assert wire.session.pipeline.pending == 4  # the second batch
    wire.server(PARSE_COMPLETE + BIND_COMPLETE + command_complete("SELECT 0") + READY_I)
    assert wire.session.at_rest


def test_server_error_before_sync_discards_client_messages_until_sync(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_parse("", "SELECT 1/0") + bind() + execute() + FLUSH)
    wire.to_server()
    wire.server(PARSE_COMPLETE + BIND_COMPLETE + server_error())
    assert wire.session.pipeline.discarding
    wire.client(fe.encode_parse("", "SELECT 2") + bind() + execute() + fe.encode_query("SELECT 3"))
    assert wire.to_server() == b""  # the server would ignore them all
    wire.client(SYNC)
    assert wire.to_server() == SYNC
    wire.server(READY_I)
    assert wire.to_client() == PARSE_COMPLETE + BIND_COMPLETE + server_error() + READY_I
    assert wire.session.at_rest


def test_server_error_swallows_our_pending_refusal_one_error_per_batch(split: str) -> None:
    wire = ready_wire(split)
    wire.client(
        fe.encode_parse("", "SELECT 1/0") + bind() + execute() + fe.encode_parse("", FORBIDDEN)
    )
    wire.client(SYNC)
    wire.server(PARSE_COMPLETE + BIND_COMPLETE + server_error() + READY_I)
    assert wire.to_client() == PARSE_COMPLETE + BIND_COMPLETE + server_error() + READY_I
    assert wire.session.at_rest


def test_bind_to_an_unknown_statement_is_refused(split: str) -> None:
    wire = ready_wire(split)
    wire.client(bind("never_parsed") + execute() + SYNC)
    assert wire.to_server() == ABORT + SYNC
    wire.server(absorbed())
    error = wire.to_client()
    fields = the_error(error)
    assert (fields["S"], fields["C"]) == ("ERROR", "26000")
    assert '"never_parsed"' in fields["M"]
    wire.server(READY_I)
    assert wire.to_client() == READY_I
    assert wire.session.at_rest


def test_statement_refused_on_reparse_cannot_be_bound(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_parse("s1", "SELECT 1") + SYNC)
    wire.server(PARSE_COMPLETE + READY_I)
    wire.client(fe.encode_parse("s1", FORBIDDEN) + SYNC + bind("s1") + execute() + SYNC)
    assert (
        wire.to_server() == fe.encode_parse("s1", "SELECT 1") + SYNC + ABORT + SYNC + ABORT + SYNC
    )
    wire.server(absorbed())
    assert kinds(wire.to_client()) == "1ZE"
    wire.server(READY_I + absorbed())
    out = wire.to_client()
    assert kinds(out) == "ZE"
    assert the_error(out[6:])["C"] == "26000"


def test_closed_and_simple_query_dropped_statements_cannot_be_bound(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_parse("s1", "SELECT 1") + fe.encode_parse("", "SELECT 2") + SYNC)
    wire.server(PARSE_COMPLETE + PARSE_COMPLETE + READY_I)
    wire.client(close("S", "s1") + SYNC + fe.encode_query("SELECT 3"))
    wire.server(CLOSE_COMPLETE + READY_I + command_complete("SELECT 0") + READY_I)
    wire.drain()
    for name in ("s1", ""):  # Close drops s1; a simple Query drops the unnamed one
        wire.client(bind(name) + SYNC)
        assert wire.to_server() == ABORT + SYNC
        wire.server(absorbed())
        assert the_error(wire.to_client())["C"] == "26000"
        wire.server(READY_I)
        assert wire.to_client() == READY_I


# --- READY: COPY ----------------------------------------------------------------------------


def test_copy_from_stdin_simple(split: str) -> None:
    wire = ready_wire(split)
    query = fe.encode_query("COPY notes FROM STDIN")
    wire.client(query)
    wire.server(copy_response(b"G"))
    assert wire.session.pipeline.copy_in
    rows = copy_data(b"1\tfirst\n") + copy_data(b"2\tsecond\n") + COPY_DONE
    wire.client(rows)
    assert wire.to_server() == query + rows
    assert not wire.session.pipeline.copy_in
    wire.server(command_complete("COPY 2") + READY_I)
    assert wire.to_client() == copy_response(b"G") + command_complete("COPY 2") + READY_I
    assert wire.session.at_rest


def test_copy_from_stdin_extended(split: str) -> None:
    wire = ready_wire(split)
    batch = fe.encode_parse("", "COPY notes FROM STDIN") + bind() + execute() + SYNC
    wire.client(batch)
    assert wire.session.pipeline.pending == 4
    wire.server(PARSE_COMPLETE + BIND_COMPLETE + copy_response(b"G"))
    # The Sync pipelined behind Execute reached a server in COPY mode, which
    # ignores it: only the Execute is still owed.
    assert wire.session.pipeline.pending == 1
    rows = copy_data(b"1\tfirst\n") + FLUSH + COPY_DONE + SYNC
    wire.client(rows)
    assert wire.to_server() == batch + rows
    assert wire.session.pipeline.pending == 2  # the Execute, and this Sync
    wire.server(command_complete("COPY 1") + READY_I)
    assert wire.session.at_rest
    assert kinds(wire.to_client()) == "12GCZ"


def test_copy_fail_in_extended_mode(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_parse("", "COPY notes FROM STDIN") + bind() + execute() + SYNC)
    wire.server(PARSE_COMPLETE + BIND_COMPLETE + copy_response(b"G"))
    wire.client(copy_data(b"1\n") + msg(b"f", b"client gave up\0") + SYNC)
    wire.server(server_error("57014", "COPY from stdin failed") + READY_I)
    assert kinds(wire.to_client()) == "12GEZ"
    assert wire.session.at_rest


def test_query_during_copy_in_is_a_protocol_violation(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("COPY notes FROM STDIN"))
    wire.server(copy_response(b"G"))
    wire.drain()
    wire.client(fe.encode_query("SELECT 1"))
    assert fatal(wire)["C"] == "08P01"
    assert wire.to_server() == TERMINATE


def test_copy_to_stdout(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("COPY notes TO STDOUT"))
    reply = (
        copy_response(b"H")
        + copy_data(b"1\tfirst\n")
        + copy_data(b"2\tsecond\n")
        + SERVER_COPY_DONE
        + command_complete("COPY 2")
        + READY_I
    )
    wire.server(reply)
    assert wire.to_client() == reply
    assert wire.session.at_rest


def test_copy_data_pipelined_before_copy_in_response_extended(split: str) -> None:
    # asyncpg-style: data and CopyDone sent right behind the Execute. The Sync
    # before the data is ignored by the server (COPY mode), the one after is not.
    wire = ready_wire(split)
    rows = copy_data(b"1\tfirst\n") + COPY_DONE
    batch = fe.encode_parse("", "COPY notes FROM STDIN") + bind() + execute() + SYNC
    wire.client(batch + rows + SYNC)
    assert wire.to_server() == batch + rows + SYNC
    wire.server(PARSE_COMPLETE + BIND_COMPLETE + copy_response(b"G"))
    assert not wire.session.pipeline.copy_in  # the client already ended this COPY
    wire.server(command_complete("COPY 1") + READY_I)
    assert kinds(wire.to_client()) == "12GCZ"
    assert wire.session.at_rest


def test_copy_data_pipelined_behind_a_simple_query(split: str) -> None:
    wire = ready_wire(split)
    query = fe.encode_query("COPY notes FROM STDIN")
    early = copy_data(b"1\tfirst\n")
    wire.client(query + early)
    wire.server(copy_response(b"G"))
    assert wire.session.pipeline.copy_in  # no CopyDone yet: more data may come
    wire.client(copy_data(b"2\tsecond\n") + SYNC + COPY_DONE)
    assert wire.to_server() == query + early + copy_data(b"2\tsecond\n") + SYNC + COPY_DONE
    wire.server(command_complete("COPY 2") + READY_I)
    assert kinds(wire.to_client()) == "GCZ"
    assert wire.session.at_rest


def test_copy_data_outside_copy_is_forwarded_for_the_server_to_ignore(split: str) -> None:
    # A client may send COPY data before the CopyInResponse arrives, so pgwarden
    # cannot tell stray data from early data; PostgreSQL ignores it outside COPY.
    wire = ready_wire(split)
    wire.client(copy_data(b"stray\n") + COPY_DONE)
    assert wire.to_server() == copy_data(b"stray\n") + COPY_DONE
    assert wire.session.phase is Phase.READY
    assert wire.session.at_rest


# --- READY: other client messages -------------------------------------------------------------


def test_function_call_is_refused_with_error_and_ready(split: str) -> None:
    wire = ready_wire(split)
    wire.client(FUNCTION_CALL)
    assert wire.to_server() == ABORT_SIMPLE
    wire.server(absorbed() + READY_I)
    out = wire.to_client()
    assert kinds(out) == "EZ"
    assert the_error(out)["C"] == "42501"
    assert out.endswith(READY_I)
    assert wire.session.at_rest


def test_terminate_is_forwarded_and_closes(split: str) -> None:
    wire = ready_wire(split)
    wire.client(TERMINATE + fe.encode_query("SELECT 1"))
    assert wire.to_server() == TERMINATE
    assert_closed(wire, "client terminated")
    wire.client(fe.encode_query("SELECT 2"))
    wire.server(READY_I)
    assert (wire.to_client(), wire.to_server(), wire.actions()) == (b"", b"", [])


def test_unknown_client_message_is_fatal(split: str) -> None:
    wire = ready_wire(split)
    wire.client(msg(b"Y", b"what"))
    fields = fatal(wire)
    assert fields["C"] == "08P01"
    assert wire.to_server() == TERMINATE


def test_client_message_over_the_cap_is_fatal(split: str) -> None:
    wire = ready_wire(split, max_message_bytes=1024)
    wire.client(b"Q" + struct.pack("!I", 1025))  # the header alone is refused
    assert fatal(wire)["C"] == "54000"


# --- READY: large rows ------------------------------------------------------------------------


def test_large_data_row_is_streamed_through(split: str) -> None:
    wire = ready_wire(split)
    big = data_row(bytes(range(256)) * 1200)  # 307 KiB, above the 256 KiB streaming threshold
    reply = (
        row_description("blob")
        + data_row(b"small")
        + big
        + data_row(b"small")
        + command_complete("SELECT 3")
        + READY_I
    )
    wire.client(fe.encode_query("SELECT blob FROM files"))
    wire.server(reply)
    assert wire.to_client() == reply
    assert gate_of(wire).rows == [3]
    assert wire.session.rows == 3
    assert wire.session.at_rest


def test_large_data_row_is_not_buffered_before_forwarding() -> None:
    wire = ready_wire("whole")
    big = data_row(b"x" * (300 << 10))
    wire.client(fe.encode_query("SELECT blob FROM files"))
    head = row_description("blob") + big[:1000]
    wire.session.server_data(head)
    assert wire.to_client() == head  # forwarded at once, not held until the row ends
    for at in range(1000, len(big), 7919):
        wire.session.server_data(big[at : at + 7919])
        assert wire.to_client() == big[at : at + 7919]
    wire.session.server_data(command_complete("SELECT 1") + READY_I)
    assert wire.session.rows == 1
    assert wire.session.at_rest


def test_large_data_row_bytewise_around_its_header() -> None:
    wire = ready_wire("whole")
    big = data_row(b"y" * (260 << 10))
    reply = row_description("blob") + big + command_complete("SELECT 1") + READY_I
    wire.client(fe.encode_query("SELECT blob FROM files"))
    cut = len(row_description("blob")) + 16
    for i in range(cut):  # the header and the first body bytes one at a time
        wire.session.server_data(reply[i : i + 1])
    wire.session.server_data(reply[cut : cut + (200 << 10)])
    for i in range(cut + (200 << 10), len(reply), 4096):
        wire.session.server_data(reply[i : i + 4096])
    assert wire.to_client() == reply
    assert wire.session.rows == 1
    assert wire.session.at_rest


# --- shutdown and timeouts ------------------------------------------------------------------------


def test_shutdown_waits_for_the_running_statement(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("SELECT pg_sleep(1)"))
    wire.to_server()
    wire.session.request_shutdown()
    assert wire.actions() == []
    wire.server(row_description("pg_sleep") + data_row(b"") + command_complete("SELECT 1"))
    assert wire.actions() == []
    assert wire.to_server() == b""
    wire.server(READY_I)
    out = wire.to_client()
    assert kinds(out) == "TDCZE"
    fields = error_fields(messages(out)[-1][1])
    assert (fields["S"], fields["C"]) == ("FATAL", "57P01")
    assert wire.to_server() == TERMINATE
    assert_closed(wire)


def test_shutdown_at_rest_closes_at_once(split: str) -> None:
    wire = ready_wire(split)
    wire.session.request_shutdown()
    assert fatal(wire)["C"] == "57P01"
    assert wire.to_server() == TERMINATE


def test_idle_timeout_is_fatal_57p05(split: str) -> None:
    wire = ready_wire(split)
    wire.session.timed_out("idle")
    fields = fatal(wire)
    assert fields["C"] == "57P05"
    assert fields["M"] == "pgwarden: terminating connection due to idle timeout"
    assert wire.to_server() == TERMINATE


def test_startup_timeout_is_fatal(split: str) -> None:
    wire = new_wire(split)
    wire.client(startup()[:10])
    wire.session.timed_out("startup")
    assert fatal(wire)["C"] == "08P01"


def test_server_closing_mid_statement_is_reported_as_unavailable(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("SELECT 1"))
    wire.session.server_closed()
    assert fatal(wire)["C"] == "08006"


def test_server_reply_nobody_asked_for_is_fatal(split: str) -> None:
    wire = ready_wire(split)
    wire.server(command_complete("SELECT 1"))
    fields = fatal(wire)
    assert fields["C"] == "08006"
    assert ("upstream.error", {"error": "pgwarden: unexpected message 'C' from server"}) in (
        wire.session.events
    )


# --- bugs found while writing these tests ---------------------------------------------------------


# Regression: bytes a client pipelines during the upstream login are replayed
# once the session is READY; a fault in them is the client's (08P01), never
# reported as a protocol error from the database server.
def test_client_fault_pipelined_during_login_is_blamed_on_the_client(split: str) -> None:
    wire = new_wire(split, open_gate=refusing_gate)
    authenticate(wire, "alice", PASSWORDS["alice"])
    assert wire.actions() == [ConnectUpstream()]
    wire.client(msg(b"Y", b"not a message"))
    wire.session.upstream_connected()
    wire.server(upstream_welcome())
    assert fatal(wire)["C"] == "08P01"
    assert not [e for e in wire.session.events if e[0] == "upstream.error"]


# Regression: the authentication phase reads one SASL message at a time, so a
# large Query pipelined behind the last one meets the READY limits, not the 8 KiB
# authentication limit, however the bytes are split.
def test_large_query_pipelined_behind_the_last_sasl_message() -> None:
    query = fe.encode_query("SELECT '" + "x" * 9000 + "'")
    outcomes = []
    for together in (False, True):
        wire = new_wire("whole", open_gate=refusing_gate)
        session = wire.session
        session.client_data(startup())
        client = ScramClient([SCRAM], "alice", PASSWORDS["alice"])
        session.client_data(fe.encode_sasl_initial(SCRAM, client.get_client_first().encode()))
        client.set_server_first(messages(wire.to_client())[-1][1][4:].decode())
        final = fe.encode_password(client.get_client_final().encode())
        for chunk in [final + query] if together else [final, query]:
            session.client_data(chunk)
        outcomes.append((session.phase, wire.actions()))
    assert outcomes[1] == outcomes[0] == (Phase.CONNECTING, [ConnectUpstream()])


# Regression: after the server fails an unsynced extended batch it ignores
# everything but Sync, so a refusal queued behind it is dropped, not left at the
# head of the queue where it would wedge the session.
def test_refused_query_behind_a_failed_unsynced_batch(split: str) -> None:
    wire = ready_wire(split)
    wire.client(
        fe.encode_parse("", "SELECT 1/0") + bind() + execute() + FLUSH + fe.encode_query(FORBIDDEN)
    )
    wire.server(PARSE_COMPLETE + BIND_COMPLETE + server_error())
    wire.client(SYNC)
    wire.server(READY_I)
    assert wire.session.phase is Phase.READY
    assert wire.session.at_rest
    assert wire.to_client() == PARSE_COMPLETE + BIND_COMPLETE + server_error() + READY_I


# Regression: after a refused Parse, a FunctionCall is ignored until Sync like
# every other message, so the client gets exactly one ReadyForQuery.
def test_function_call_after_a_refused_parse_waits_for_sync(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_parse("", FORBIDDEN) + FUNCTION_CALL + SYNC)
    assert wire.to_server() == ABORT + SYNC
    wire.server(absorbed() + READY_I)
    assert kinds(wire.to_client()) == "EZ"


# --- the result-path backstop (restricted roles) -----------------------------------


def origin_row_description(*origins: tuple[int, int]) -> bytes:
    fields = b"".join(
        b"c\0" + struct.pack("!ihihih", table, attnum, 25, -1, -1, 0) for table, attnum in origins
    )
    return msg(b"T", struct.pack("!h", len(origins)) + fields)


def test_a_raw_protected_column_in_a_result_aborts_before_any_row(split: str) -> None:
    wire = ready_wire(split)
    gate_of(wire).forbidden = frozenset({(16386, 3)})
    wire.client(fe.encode_query("SELECT id, email FROM customers"))
    wire.to_server()
    wire.server(
        origin_row_description((16386, 1), (16386, 3))
        + data_row(b"1", b"raw@example.com")
        + command_complete("SELECT 1")
        + READY_I
    )
    fields = fatal(wire)
    assert fields["C"] == "42501"
    assert b"raw@example.com" not in b"".join(wire.session.to_client)
    assert (
        "backstop.tripped",
        {"what": "raw classified column in a result"},
    ) in wire.session.events


def test_allowed_origins_pass_the_backstop(split: str) -> None:
    wire = ready_wire(split)
    gate_of(wire).forbidden = frozenset({(16386, 3)})
    wire.client(fe.encode_query("SELECT id FROM customers"))
    wire.to_server()
    reply = (
        origin_row_description((16386, 1), (0, 0))
        + data_row(b"1", b"x")
        + command_complete("SELECT 1")
        + READY_I
    )
    wire.server(reply)
    assert wire.to_client() == reply


@pytest.mark.parametrize(
    "name", ["session_authorization", "standard_conforming_strings", "client_encoding"]
)
def test_a_changed_identity_or_lexing_setting_ends_a_restricted_session(
    split: str, name: str
) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("SELECT 1"))
    wire.to_server()
    wire.server(msg(b"S", name.encode() + b"\0changed\0") + command_complete("SELECT 1") + READY_I)
    assert fatal(wire)["C"] == "42501"


def test_an_unchanged_watched_setting_passes(split: str) -> None:
    wire = ready_wire(split)
    wire.client(fe.encode_query("RESET ALL"))
    wire.to_server()
    reply = msg(b"S", b"application_name\0x\0") + command_complete("RESET") + READY_I
    wire.server(reply)
    assert wire.to_client() == reply


# --- row caps ------------------------------------------------------------------------


PARSE_SELECT = fe.encode_parse("", "SELECT id FROM t")


def capped_wire(split: str, cap: int = 3, *, truncate: bool = False) -> Wire:
    wire = ready_wire(split)
    gate_of(wire).cap = cap
    gate_of(wire).truncate = truncate
    return wire


def rows(n: int, start: int = 1) -> bytes:
    return b"".join(data_row(str(i).encode()) for i in range(start, start + n))


def test_a_statement_within_the_cap_is_delivered_whole(split: str) -> None:
    wire = capped_wire(split)
    wire.client(fe.encode_query("SELECT id FROM t"))
    wire.to_server()
    reply = row_description("id") + rows(3) + command_complete("SELECT 3") + READY_I
    wire.server(reply)
    assert wire.to_client() == reply
    assert gate_of(wire).rows == [3]


def test_reject_delivers_no_row_of_a_statement_over_the_cap(split: str) -> None:
    wire = capped_wire(split)
    wire.client(fe.encode_query("SELECT id FROM t"))
    wire.to_server()
    wire.server(row_description("id") + rows(4) + command_complete("SELECT 4") + READY_T)
    got = messages(wire.to_client())
    assert [k for k, _ in got] == ["T", "E", "Z"]
    assert error_fields(got[1][1])["C"] == "54000"
    assert got[2][1] == b"T"  # the server's transaction is untouched
    assert (
        "limit.exceeded",
        {"cap": 3, "rows_seen": 4, "on_exceed": "reject", "tables": []},
    ) in wire.session.events
    wire.client(fe.encode_query("SELECT 1"))  # the session goes on
    assert wire.to_server() == fe.encode_query("SELECT 1")


def test_reject_drops_the_rest_of_a_multi_statement_query(split: str) -> None:
    wire = capped_wire(split)
    wire.client(fe.encode_query("SELECT 1; SELECT id FROM t; SELECT 2"))
    wire.to_server()
    wire.server(
        row_description("a")
        + rows(1)
        + command_complete("SELECT 1")
        + row_description("id")
        + rows(5)
        + command_complete("SELECT 5")
        + row_description("b")
        + rows(1)
        + command_complete("SELECT 1")
        + READY_I
    )
    assert kinds(wire.to_client()) == "TDCTEZ"


def test_truncate_delivers_the_cap_and_a_notice(split: str) -> None:
    wire = capped_wire(split, truncate=True)
    wire.client(fe.encode_query("SELECT id FROM t"))
    wire.to_server()
    wire.server(row_description("id") + rows(4) + command_complete("SELECT 4") + READY_I)
    got = messages(wire.to_client())
    assert [k for k, _ in got] == ["T", "D", "D", "D", "N", "C", "Z"]
    assert got[5][1] == b"SELECT 3\0"
    assert "truncated to 3 rows" in error_fields(got[4][1])["M"]


def test_a_portal_is_capped_over_all_its_executes(split: str) -> None:
    wire = capped_wire(split)
    wire.client(PARSE_SELECT + bind() + execute("", 2) + SYNC)
    wire.to_server()
    wire.server(b"1" + struct.pack("!i", 4) + b"2" + struct.pack("!i", 4) + rows(2))
    wire.server(msg(b"s") + READY_T)
    assert kinds(wire.to_client()) == "12DDsZ"
    wire.client(execute("", 2) + SYNC)
    wire.to_server()
    wire.server(rows(2, 3) + msg(b"s") + READY_T)
    got = messages(wire.to_client())
    assert [k for k, _ in got] == ["E", "Z"]
    assert error_fields(got[0][1])["C"] == "54000"


def test_pipelined_executes_after_a_refusal_are_dropped(split: str) -> None:
    wire = capped_wire(split)
    wire.client(PARSE_SELECT + bind() + execute() + bind() + execute() + SYNC)
    wire.to_server()
    wire.server(
        b"1"
        + struct.pack("!i", 4)
        + b"2"
        + struct.pack("!i", 4)
        + rows(4)
        + command_complete("SELECT 4")
        + b"2"
        + struct.pack("!i", 4)
        + rows(1)
        + command_complete("SELECT 1")
        + READY_I
    )
    assert kinds(wire.to_client()) == "12EZ"


def test_a_server_error_delivers_nothing_held(split: str) -> None:
    wire = capped_wire(split)
    wire.client(fe.encode_query("SELECT 1/(3-id) FROM t"))
    wire.to_server()
    wire.server(row_description("x") + rows(2) + server_error() + READY_I)
    assert kinds(wire.to_client()) == "TEZ"


def test_copy_out_rows_are_capped(split: str) -> None:
    wire = capped_wire(split)
    wire.client(fe.encode_query("COPY (SELECT id FROM t) TO STDOUT"))
    wire.to_server()
    data = b"".join(copy_data(b"%d\n" % i) for i in range(4))
    wire.server(copy_response(b"H") + data + msg(b"c") + command_complete("COPY 4") + READY_I)
    assert kinds(wire.to_client()) == "HEZ"


def test_bind_is_refused_when_the_gate_says_the_statement_no_longer_holds(split: str) -> None:
    # e.g. the policy changed since the Parse, or the user left the role
    wire = ready_wire(split)
    wire.client(fe.encode_parse("s1", "SELECT 1") + SYNC)
    wire.to_server()
    wire.server(b"1" + struct.pack("!i", 4) + READY_I)
    wire.to_client()
    gate_of(wire).bind_answer = PolicyRefusal("pgwarden: the policy changed; Bind refused")
    wire.client(bind("s1") + execute() + SYNC)
    assert wire.to_server() == ABORT + SYNC
    wire.server(absorbed() + READY_I)
    got = messages(wire.to_client())
    assert [k for k, _ in got] == ["E", "Z"]
    assert error_fields(got[0][1])["C"] == "42501"
