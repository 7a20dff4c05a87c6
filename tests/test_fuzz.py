"""Garbage in: the codec may only refuse, and the session may only close.

Random bytes and mutated valid streams (bit flips, truncation, inserted and
deleted bytes, bad length words, messages duplicated and reordered) go to the
framers, to every decoder, and to Session.client_data / server_data in each
phase, in random pieces. The rules:

* the wire layer raises nothing but ProtocolViolation and its subclasses;
* a session never raises: a fault becomes a FATAL ErrorResponse and a Close
  action, and after the Close nothing more reaches the client or the server;
* whatever the garbage, only whole messages are forwarded upstream, and no
  statement the gate refuses (here: any containing "forbidden") is among them.

Sessions in later phases are deep copies of one logged-in template, so every
example starts from a fresh session without paying for a SCRAM login each time.
"""

from __future__ import annotations

import contextlib
import copy
import struct
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scramp import ScramClient
from test_session import (
    BIND_COMPLETE,
    COPY_DONE,
    FLUSH,
    FORBIDDEN,
    FUNCTION_CALL,
    PARSE_COMPLETE,
    PASSWORDS,
    READY_I,
    SCRAM,
    SYNC,
    TERMINATE,
    RefusingGate,
    authenticate,
    bind,
    close,
    command_complete,
    copy_data,
    copy_response,
    data_row,
    describe,
    execute,
    log_in,
    messages,
    msg,
    new_wire,
    parameter_description,
    refusing_gate,
    row_description,
    server_error,
    startup,
    upstream_welcome,
)

from proxy.errors import ProtocolViolation
from proxy.session.machine import Close, Phase, Session
from proxy.wire import backend as be
from proxy.wire import frontend as fe
from proxy.wire.buffer import Framer, StartupFramer

FUZZ = settings(max_examples=300, deadline=None)

# --- building garbage --------------------------------------------------------------

EDGE_LENGTHS = [0, 1, 3, 4, 5, 7, 8, 9, 16, 0x7FFFFFFF, 0xFFFFFFFF]
LENGTHS = st.sampled_from(EDGE_LENGTHS) | st.integers(0, 0xFFFFFFFF)


@st.composite
def mutated(draw: st.DrawFn, valid: list[bytes], *, typed: bool = True) -> bytes:
    """Valid messages, picked with repeats in any order, then damaged a few times."""
    chosen = draw(st.lists(st.sampled_from(valid), min_size=1, max_size=8))
    starts = [sum(len(m) for m in chosen[:i]) for i in range(len(chosen))]
    data = bytearray(b"".join(chosen))
    for op in draw(st.lists(st.sampled_from(["flip", "cut", "insert", "delete", "length"]))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:  # a bad length word where a message starts
            word = draw(st.sampled_from(starts)) + (1 if typed else 0)
            data[word : word + 4] = struct.pack("!I", draw(LENGTHS))
    return bytes(data)


def garbage(valid: list[bytes], *, typed: bool = True) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=200) | mutated(valid, typed=typed)


@st.composite
def pieces(draw: st.DrawFn, streams: st.SearchStrategy[bytes]) -> list[bytes]:
    """A stream cut anywhere: whole, one byte at a time, or at random points."""
    data = draw(streams)
    how = draw(st.sampled_from(["whole", "bytewise", "random"]))
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def typed(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


# --- valid client messages to damage ----------------------------------------------------

STARTUP_FORMS = [
    fe.encode_ssl_request(),
    struct.pack("!II", 8, fe.GSSENC_REQUEST),
    fe.encode_cancel(4242, b"\x0a\x0b\x0c\x0d"),
    startup(),
    startup(application_name="psql", DateStyle="ISO"),
]
READY_MESSAGES = [
    fe.encode_query("SELECT 1"),
    fe.encode_query(FORBIDDEN),
    fe.encode_parse("s1", "SELECT $1", b"\0\1\0\0\0\x17"),
    fe.encode_parse("", FORBIDDEN),
    bind("s1", "", b"7"),
    bind(""),
    describe("P"),
    describe("S", "s1"),
    execute(),
    execute("", 10),
    close("S", "s1"),
    SYNC,
    FLUSH,
    FUNCTION_CALL,
    copy_data(b"1\tx\n"),
    COPY_DONE,
    typed(b"f", b"gave up\0"),
    TERMINATE,
]
COPY_MESSAGES = [copy_data(b"1\tx\n"), copy_data(b""), COPY_DONE, typed(b"f", b"no\0"), SYNC, FLUSH]


# --- sessions in every phase, as templates ----------------------------------------------


def snapshot(session: Session) -> Session:
    """A copy of `session` as it stands, with its outputs drained."""
    session.to_client.clear()
    session.to_server.clear()
    session.actions.clear()
    return copy.deepcopy(session)


@cache
def templates() -> dict[str, tuple[Session, list[bytes]]]:
    """Phase name -> (a session in that phase, valid client messages for it)."""
    out: dict[str, tuple[Session, list[bytes]]] = {}
    out["startup"] = (snapshot(new_wire("whole").session), STARTUP_FORMS)
    out["startup-tls"] = (snapshot(new_wire("whole", tls_available=True).session), STARTUP_FORMS)

    wire = new_wire("whole", open_gate=refusing_gate)
    wire.client(startup())
    client = ScramClient([SCRAM], "alice", PASSWORDS["alice"])
    initial = fe.encode_sasl_initial(SCRAM, client.get_client_first().encode())
    out["auth-initial"] = (snapshot(wire.session), [initial])
    wire.client(initial)
    client.set_server_first(messages(wire.to_client())[-1][1][4:].decode())
    final = fe.encode_password(client.get_client_final().encode())
    out["auth-final"] = (snapshot(wire.session), [final, *READY_MESSAGES[:4]])

    wire = new_wire("whole", open_gate=refusing_gate)
    authenticate(wire, "alice", PASSWORDS["alice"])
    out["connecting"] = (snapshot(wire.session), READY_MESSAGES)
    wire.session.upstream_connected()
    out["upstream-login"] = (snapshot(wire.session), READY_MESSAGES)

    wire = new_wire("whole", open_gate=refusing_gate)
    log_in(wire)
    out["ready"] = (snapshot(wire.session), READY_MESSAGES)
    # Mid-batch: replies owed, a refusal queued behind them, skipping until Sync.
    wire.client(fe.encode_parse("s1", "SELECT 1") + bind("s1") + execute())
    wire.client(fe.encode_parse("", FORBIDDEN) + fe.encode_query("SELECT 2"))
    out["ready-busy"] = (snapshot(wire.session), READY_MESSAGES)

    for truncate in (False, True):  # a row cap on every statement: the capped relay
        wire = new_wire("whole", open_gate=refusing_gate)
        log_in(wire)
        gate = wire.session.gate
        assert isinstance(gate, RefusingGate)
        gate.cap, gate.truncate = 2, truncate
        wire.client(fe.encode_query("SELECT id FROM t"))
        wire.client(fe.encode_parse("", "SELECT 1") + bind() + execute("", 1) + SYNC)
        out["capped-truncate" if truncate else "capped"] = (snapshot(wire.session), READY_MESSAGES)

    wire = new_wire("whole", open_gate=refusing_gate)
    log_in(wire)
    wire.client(fe.encode_query("COPY notes FROM STDIN"))
    wire.server(copy_response(b"G"))
    assert wire.session.pipeline.copy_in
    out["copy-in"] = (snapshot(wire.session), COPY_MESSAGES + READY_MESSAGES[:2])
    return out


BEFORE_LOGIN = ["startup", "startup-tls", "auth-initial", "auth-final"]
AFTER_LOGIN = [
    "connecting",
    "upstream-login",
    "ready",
    "ready-busy",
    "copy-in",
    "capped",
    "capped-truncate",
]


# --- the session's promises ----------------------------------------------------------------


class Watch:
    """Feeds a session and checks that nothing at all happens after its Close."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.frozen: tuple[int, int, int] | None = None

    def _outputs(self) -> tuple[int, int, int]:
        s = self.session
        return len(s.to_client), len(s.to_server), len(s.actions)

    def call(self, event: Callable[..., None], *args: Any) -> None:
        event(*args)  # must never raise
        closes = [a for a in self.session.actions if isinstance(a, Close)]
        assert len(closes) <= 1
        if self.frozen is not None:
            assert self._outputs() == self.frozen, "the session spoke after its Close"
        elif closes:
            assert self.session.phase is Phase.CLOSED
            self.frozen = self._outputs()


def assert_whole_and_allowed(upstream: bytes) -> None:
    """Upstream bytes are whole messages, and no refused statement is among them."""
    framer = Framer(1 << 30, who="test")
    for mtype, message in framer.feed(upstream):
        if mtype == fe.QUERY:
            assert "forbidden" not in fe.decode_query(message)
        elif mtype == fe.PARSE:
            assert "forbidden" not in fe.decode_parse(message).query
    assert len(framer) == 0, "a partial message was forwarded"


def finish_login(watch: Watch) -> None:
    """Complete the upstream login, so early client bytes get replayed."""
    session = watch.session
    if session.phase is Phase.CONNECTING:
        watch.call(session.upstream_connected)
    if session.phase is Phase.UPSTREAM_LOGIN:
        session.to_server.clear()  # the startup packet: untyped
        watch.call(session.server_data, upstream_welcome())


@pytest.mark.parametrize("phases", [BEFORE_LOGIN, AFTER_LOGIN], ids=["before", "after"])
@FUZZ
@given(data=st.data())
def test_session_survives_client_garbage(phases: list[str], data: st.DataObject) -> None:
    phase = data.draw(st.sampled_from(phases), label="phase")
    template, valid = templates()[phase]
    typed_stream = not phase.startswith("startup")
    chunks = data.draw(pieces(garbage(valid, typed=typed_stream)))
    watch = Watch(copy.deepcopy(template))
    for chunk in chunks:
        watch.call(watch.session.client_data, chunk)
    finish_login(watch)
    event(f"{phase}: {watch.session.phase.value}, forwarded {len(watch.session.to_server)}")
    assert_whole_and_allowed(b"".join(watch.session.to_server))
    if typed_stream:  # (in startup, single bytes answer SSLRequest and GSSENCRequest)
        messages(b"".join(watch.session.to_client))  # whole messages only


@FUZZ
@given(data=st.data(), phase=st.sampled_from(["connecting", "ready-busy"]))
def test_session_stops_talking_after_a_close(data: st.DataObject, phase: str) -> None:
    # A fault first (an unknown message type), then more of everything.
    template, valid = templates()[phase]
    watch = Watch(copy.deepcopy(template))
    watch.call(watch.session.client_data, typed(b"Y"))
    finish_login(watch)
    assert watch.frozen is not None
    for chunk in data.draw(pieces(garbage(valid))):
        watch.call(watch.session.client_data, chunk)
        watch.call(watch.session.server_data, chunk)
    watch.call(watch.session.request_shutdown)
    watch.call(watch.session.timed_out, "idle")
    watch.call(watch.session.server_closed)


SERVER_MESSAGES = [
    PARSE_COMPLETE,
    BIND_COMPLETE,
    row_description("a"),
    data_row(b"1"),
    data_row(None, b"x" * 40),
    command_complete("SELECT 1"),
    READY_I,
    be.ready_for_query(b"T"),
    server_error(),
    be.error_response("NOTICE", "00000", "note", notice=True),
    be.parameter_status("TimeZone", "UTC"),
    parameter_description(23),
    msg(b"n"),
    msg(b"s"),
    msg(b"3"),
    msg(b"I"),
    copy_response(b"G"),
    copy_response(b"H"),
    copy_data(b"1\n"),
    msg(b"c"),
]


@FUZZ
@given(
    data=st.data(),
    phase=st.sampled_from(["ready", "ready-busy", "copy-in", "capped", "capped-truncate"]),
)
def test_session_survives_server_garbage(data: st.DataObject, phase: str) -> None:
    template, _ = templates()[phase]
    watch = Watch(copy.deepcopy(template))
    for chunk in data.draw(pieces(garbage(SERVER_MESSAGES))):
        watch.call(watch.session.server_data, chunk)
    assert_whole_and_allowed(b"".join(watch.session.to_server))


# --- the wire layer refuses, and only refuses ------------------------------------------------


def frame_all(make: Callable[[], Framer | StartupFramer], chunks: list[bytes]) -> tuple[Any, ...]:
    """("framed", messages, what is left) from a fresh framer fed `chunks`, or the refusal."""
    framer = make()
    out: list[Any] = []
    try:
        for chunk in chunks:
            if isinstance(framer, Framer):
                out.extend(framer.feed(chunk))
            else:
                message = framer.feed(chunk)
                while message is not None:
                    out.append(message)
                    message = framer.feed(b"")
    except ProtocolViolation as exc:
        return "refused", type(exc), str(exc)
    return "framed", out, framer.take_rest()


TYPED_VALID = READY_MESSAGES + SERVER_MESSAGES


@FUZZ
@given(data=st.data(), cap=st.sampled_from([4, 64, 1 << 20]))
def test_framer_refuses_or_frames_the_same_whatever_the_split(
    data: st.DataObject, cap: int
) -> None:
    stream = data.draw(garbage(TYPED_VALID))
    whole = frame_all(lambda: Framer(cap), [stream])
    split = frame_all(lambda: Framer(cap), data.draw(pieces(st.just(stream))))
    assert split == whole
    if whole[0] == "framed":
        _, framed, rest = whole
        assert b"".join(m for _, m in framed) + rest == stream


@FUZZ
@given(data=st.data(), cap=st.sampled_from([8, 64, 10_000]))
def test_startup_framer_refuses_or_frames_the_same_whatever_the_split(
    data: st.DataObject, cap: int
) -> None:
    stream = data.draw(garbage(STARTUP_FORMS, typed=False))
    whole = frame_all(lambda: StartupFramer(cap), [stream])
    split = frame_all(lambda: StartupFramer(cap), data.draw(pieces(st.just(stream))))
    assert split == whole


@FUZZ
@given(garbage(STARTUP_FORMS, typed=False))
def test_startup_forms_decode_or_violate(stream: bytes) -> None:
    framer = StartupFramer()
    with contextlib.suppress(ProtocolViolation):
        message = framer.feed(stream)
        while message is not None:
            fe.decode_startup_form(message)
            message = framer.feed(b"")


DECODERS: dict[str, tuple[Callable[[bytes], object], list[bytes]]] = {
    "query": (fe.decode_query, [fe.encode_query("SELECT 'é'")]),
    "parse": (fe.decode_parse, [fe.encode_parse("s1", "SELECT $1", b"\0\1\0\0\0\x17")]),
    "bind": (fe.decode_bind_names, [bind("s1", "p1", b"42")]),
    "describe": (fe.decode_target, [describe("S", "s1"), close("P", "")]),
    "sasl-initial": (fe.decode_sasl_initial, [fe.encode_sasl_initial(SCRAM, b"n,,n=,r=x")]),
    "sasl-response": (fe.decode_sasl_response, [fe.encode_password(b"c=biws,r=x,p=y")]),
    "auth": (be.decode_auth, [be.auth_request(be.AUTH_SASL_CONTINUE, b"r=x,s=y,i=4096")]),
    "parameter-status": (be.decode_parameter_status, [be.parameter_status("TimeZone", "UTC")]),
    "backend-key": (be.decode_backend_key, [be.backend_key_data(1, b"abcd")]),
    "error-fields": (be.decode_error_fields, [server_error()]),
}


@FUZZ
@given(data=st.data(), name=st.sampled_from(sorted(DECODERS)))
def test_decoders_raise_only_protocol_violations(data: st.DataObject, name: str) -> None:
    decoder, valid = DECODERS[name]
    # A decoder sees what the framer hands out: the type byte and a length that fits.
    body = data.draw(st.binary(max_size=80) | mutated([m[5:] for m in valid], typed=False))
    message = typed(valid[0][:1], body)
    with contextlib.suppress(ProtocolViolation):
        decoder(message)
