"""The sans-IO wire codec: framing, frontend decoders and encoders, backend encoders.

Every decoding case goes through a framer first, fed whole, one byte at a time
and in seeded random splits, and the framer must give identical messages each
way: a decoder only ever sees what a framer handed out. Expected bytes of the
encoders are written out by hand from the protocol documentation
(https://www.postgresql.org/docs/current/protocol-message-formats.html).
"""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import MessageTooLarge, ProtocolViolation
from proxy.wire import backend as be
from proxy.wire import frontend as fe
from proxy.wire.buffer import Framer, StartupFramer

T = TypeVar("T")
CAP = 1 << 16


# --- feeding helpers ------------------------------------------------------------


def random_pieces(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut at random points, with the odd empty piece thrown in."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    pieces.insert(rng.randrange(len(pieces) + 1), b"")
    return pieces


def splits(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """The ways every case is fed: whole, one byte at a time, seeded random splits."""
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    if len(data) > 1:
        for seed in range(3):
            yield f"random-{seed}", random_pieces(data, random.Random(seed))


def feed_each_way(make_feeder: Callable[[], Callable[[bytes], list[T]]], data: bytes) -> list[T]:
    """Feed `data` every way to fresh feeders; all must give the same results."""
    results = {}
    for how, pieces in splits(data):
        feed = make_feeder()
        results[how] = [item for piece in pieces for item in feed(piece)]
    whole = results["whole"]
    for how, result in results.items():
        assert result == whole, f"fed {how}, got different messages than fed whole"
    return whole


def raise_each_way(
    make_feeder: Callable[[], Callable[[bytes], list[T]]],
    data: bytes,
    error: type[Exception],
    match: str,
) -> None:
    """Feeding `data` raises `error` every way, and only at its last byte."""
    outcomes: dict[str, str] = {}
    for how, pieces in splits(data):
        feed = make_feeder()
        *head, last = [p for p in pieces if p]
        for piece in head:
            feed(piece)  # nothing may be refused before the offending byte arrives
        try:
            feed(last)
        except error as exc:
            outcomes[how] = str(exc)
        else:
            outcomes[how] = f"no {error.__name__}"
    assert all(re.search(match, text) for text in outcomes.values()), outcomes


def framer_feeder(cap: int = CAP) -> Callable[[bytes], list[tuple[int, bytes]]]:
    return Framer(cap).feed


def startup_feeder(cap: int = 10_000) -> Callable[[bytes], list[bytes]]:
    framer = StartupFramer(cap)

    def feed(piece: bytes) -> list[bytes]:
        out = []
        msg = framer.feed(piece)
        while msg is not None:
            out.append(msg)
            msg = framer.feed(b"")
        return out

    return feed


def framed(msg: bytes) -> bytes:
    """`msg` after the typed-message framer, fed every way: the one message a decoder sees."""
    [(mtype, out)] = feed_each_way(framer_feeder, msg)
    assert (mtype, out) == (msg[0], msg)
    return out


def startup_framed(msg: bytes) -> bytes:
    [out] = feed_each_way(startup_feeder, msg)
    assert out == msg
    return out


# --- building messages by hand ----------------------------------------------------


def typed(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def untyped(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!II", len(body) + 8, code) + body


def startup_body(*pairs: bytes) -> bytes:
    return b"".join(p + b"\0" for p in pairs) + b"\0"


V3_0, V3_2 = 3 << 16, (3 << 16) | 2


# --- Framer -----------------------------------------------------------------------


STREAM = [
    typed(b"Q", b"SELECT 1\0"),
    typed(b"P", b"s1\0SELECT $1\0\0\1\0\0\0\x17"),
    typed(b"B", b"\0s1\0\0\0\0\1\0\0\0\x011\0\0"),
    typed(b"D", b"P\0"),
    typed(b"E", b"\0\0\0\0\0"),
    typed(b"H"),
    typed(b"S"),
    typed(b"d", b"1\tx\n"),
    typed(b"c"),
    typed(b"X"),
]


def test_framer_splits_typed_messages_every_way() -> None:
    messages = feed_each_way(framer_feeder, b"".join(STREAM))
    assert messages == [(m[0], m) for m in STREAM]
    assert all(type(m) is bytes for _, m in messages)


def test_framer_keeps_only_the_incomplete_tail() -> None:
    framer = Framer(CAP)
    query = typed(b"Q", b"SELECT 1\0")
    assert framer.feed(query + query[:7]) == [(ord("Q"), query)]
    assert len(framer) == 7
    assert framer.feed(query[7:]) == [(ord("Q"), query)]
    assert len(framer) == 0


def test_framer_take_rest_hands_back_the_buffer() -> None:
    framer = Framer(CAP)
    assert framer.feed(b"Q\0\0") == []
    assert framer.take_rest() == b"Q\0\0"
    assert len(framer) == 0
    assert framer.feed(typed(b"S")) == [(ord("S"), typed(b"S"))]


@pytest.mark.parametrize("length", [0, 1, 3])
def test_framer_refuses_lengths_below_four(length: int) -> None:
    header = b"Q" + struct.pack("!I", length)
    raise_each_way(framer_feeder, header, ProtocolViolation, f"invalid message length {length}")


@pytest.mark.parametrize("length", [CAP + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_framer_refuses_oversized_messages_from_the_header_alone(length: int) -> None:
    # Only the five header bytes are fed: the refusal must not wait for the body.
    header = b"Q" + struct.pack("!I", length)
    raise_each_way(framer_feeder, header, MessageTooLarge, f"message of {length} bytes")
    assert MessageTooLarge.sqlstate == "54000"
    assert issubclass(MessageTooLarge, ProtocolViolation)


def test_framer_accepts_a_message_of_exactly_the_cap() -> None:
    msg = typed(b"d", b"x" * 60)
    assert feed_each_way(lambda: framer_feeder(64), msg) == [(ord("d"), msg)]


def test_framer_refuses_a_bad_header_behind_good_messages() -> None:
    raise_each_way(
        framer_feeder, typed(b"S") + typed(b"S") + b"Q\0\0\0\2", ProtocolViolation, "length 2"
    )


# --- StartupFramer ----------------------------------------------------------------


def test_startup_framer_splits_startup_forms_every_way() -> None:
    ssl = fe.encode_ssl_request()
    startup = fe.encode_startup([("user", "alice")])
    assert feed_each_way(startup_feeder, ssl + startup) == [ssl, startup]


def test_startup_framer_leaves_the_rest_buffered() -> None:
    framer = StartupFramer()
    ssl = fe.encode_ssl_request()
    assert framer.feed(ssl + b"\x16\x03\x01") == ssl
    assert framer.pending() == 3
    assert framer.take_rest() == b"\x16\x03\x01"
    assert framer.pending() == 0


@pytest.mark.parametrize("length", [0, 4, 7, 10_001, 0xFFFFFFFF])
def test_startup_framer_refuses_bad_lengths_from_the_length_alone(length: int) -> None:
    raise_each_way(
        startup_feeder, struct.pack("!I", length), ProtocolViolation, "invalid startup packet"
    )


def test_startup_framer_cap_is_configurable() -> None:
    msg = fe.encode_startup([("user", "u" * 100)])
    assert feed_each_way(lambda: startup_feeder(len(msg)), msg) == [msg]
    raise_each_way(lambda: startup_feeder(len(msg) - 1), msg[:4], ProtocolViolation, "length")


# --- decode_startup_form ----------------------------------------------------------


def test_decode_ssl_request() -> None:
    assert fe.decode_startup_form(startup_framed(fe.encode_ssl_request())) == fe.SSLRequest()


def test_decode_gssenc_request() -> None:
    msg = untyped(fe.GSSENC_REQUEST)
    assert fe.decode_startup_form(startup_framed(msg)) == fe.GSSEncRequest()


@pytest.mark.parametrize(
    "secret",
    [b"\x00\x00\x16\x2e", bytes(range(32)), b"k" * 252],
    ids=["v3.0-four-bytes", "v3.2-32-bytes", "v3.2-252-bytes"],
)
def test_decode_cancel_request(secret: bytes) -> None:
    msg = startup_framed(fe.encode_cancel(1234, secret))
    assert fe.decode_startup_form(msg) == fe.CancelRequest(1234, secret)


# Regression: protocol 3.2 allows cancel keys of up to 256 bytes, so a
# CancelRequest may be 4 + 4 + 4 + 256 = 268 bytes long.
def test_decode_cancel_request_with_the_longest_3_2_key() -> None:
    msg = startup_framed(fe.encode_cancel(1234, b"k" * 256))
    assert fe.decode_startup_form(msg) == fe.CancelRequest(1234, b"k" * 256)


@pytest.mark.parametrize(
    "msg",
    [
        untyped(fe.CANCEL_REQUEST, b"\0\0\4\xd2"),  # no key at all
        untyped(fe.CANCEL_REQUEST, b"\0\0\4\xd2" + b"k" * 257),  # key above 256 bytes
        untyped(fe.SSL_REQUEST, b"\0\0\0\0"),  # SSLRequest of the wrong length
        untyped(fe.GSSENC_REQUEST, b"\0"),
    ],
    ids=["cancel-short", "cancel-long", "ssl-long", "gssenc-long"],
)
def test_decode_special_codes_of_the_wrong_length(msg: bytes) -> None:
    with pytest.raises(ProtocolViolation, match=r"unsupported frontend protocol 1234\."):
        fe.decode_startup_form(startup_framed(msg))


def test_decode_startup_3_0() -> None:
    msg = untyped(V3_0, startup_body(b"user", b"alice", b"database", b"shop"))
    assert fe.decode_startup_form(startup_framed(msg)) == fe.Startup(
        3, 0, (("user", "alice"), ("database", "shop"))
    )


def test_decode_startup_3_2_keeps_the_minor_version_and_protocol_options() -> None:
    msg = untyped(V3_2, startup_body(b"user", b"alice", b"_pq_.compression", b"on"))
    assert fe.decode_startup_form(startup_framed(msg)) == fe.Startup(
        3, 2, (("user", "alice"), ("_pq_.compression", "on"))
    )


def test_decode_startup_without_parameters() -> None:
    assert fe.decode_startup_form(startup_framed(untyped(V3_0, b"\0"))) == fe.Startup(3, 0, ())


@pytest.mark.parametrize(
    ("code", "version"), [(2 << 16, "2.0"), (4 << 16, "4.0"), (0, "0.0"), (0x7FFF0003, "32767.3")]
)
def test_decode_startup_of_unsupported_versions(code: int, version: str) -> None:
    msg = untyped(code, startup_body(b"user", b"alice"))
    with pytest.raises(ProtocolViolation, match=rf"unsupported frontend protocol {version}:"):
        fe.decode_startup_form(startup_framed(msg))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"user\0alice", "not terminated"),  # last parameter and packet both unterminated
        (b"user\0alice\0", "invalid startup packet layout"),  # no final terminator
        (b"user\0", "without a value"),  # the terminator is taken for the name's end
        (b"user\0alice\0database\0", "without a value"),
        (b"user\0alice\0\0\0", "invalid startup packet layout"),  # bytes after the terminator
        (b"user\0alice\0\0x\0", "invalid startup packet layout"),
        (b"", "invalid startup packet layout"),  # no terminator at all (length 8)
        (b"user\0\xff\xfe\0\0", "not valid UTF-8"),
        (b"us\xc3er\0alice\0\0", "not valid UTF-8"),
    ],
)
def test_decode_startup_parameters_of_odd_layout(body: bytes, match: str) -> None:
    msg = untyped(V3_0, body)
    with pytest.raises(ProtocolViolation, match=match):
        fe.decode_startup_form(startup_framed(msg))


# Regression: an empty parameter name ends PostgreSQL's startup list; pairs
# after it are an invalid layout (08P01).
def test_decode_startup_refuses_pairs_after_an_empty_name() -> None:
    msg = untyped(V3_0, b"user\0alice\0\0x\0y\0z\0\0")
    with pytest.raises(ProtocolViolation, match="invalid startup packet layout"):
        fe.decode_startup_form(startup_framed(msg))


# --- Query, Parse, Bind, Describe/Close, SASL ------------------------------------------


def test_decode_query() -> None:
    assert fe.decode_query(framed(typed(b"Q", "SELECT 'é'\0".encode()))) == "SELECT 'é'"
    assert fe.decode_query(framed(typed(b"Q", b"\0"))) == ""


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "unterminated string"),
        (b"SELECT 1", "unterminated string"),
        (b"SELECT 1\0\0", "trailing bytes"),
        (b"SELECT 1\0; DROP TABLE t\0", "trailing bytes"),
        (b"SELECT '\xff'\0", "not valid UTF-8"),
    ],
)
def test_decode_query_refuses(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        fe.decode_query(framed(typed(b"Q", body)))


def test_decode_parse() -> None:
    types = b"\0\2\0\0\0\x17\0\0\0\x19"
    msg = framed(typed(b"P", b"s1\0SELECT $1, $2\0" + types))
    assert fe.decode_parse(msg) == fe.ParseMessage("s1", "SELECT $1, $2", types)
    assert fe.decode_parse(framed(typed(b"P", b"\0SELECT 1\0\0\0"))) == fe.ParseMessage(
        "", "SELECT 1", b"\0\0"
    )


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"s1", "unterminated string"),
        (b"s1\0SELECT 1", "unterminated string"),
        (b"s1\0SELECT 1\0", "truncated Parse"),
        (b"s1\0SELECT 1\0\0", "truncated Parse"),
        (b"s1\0SELECT 1\0\0\1", "invalid parameter type list"),  # one type promised, none given
        (b"s1\0SELECT 1\0\0\1\0\0\0", "invalid parameter type list"),
        (b"s1\0SELECT 1\0\0\0\0", "invalid parameter type list"),  # trailing bytes
        (b"s1\0SELECT 1\0\xff\xff", "invalid parameter type list"),  # negative count
        (b"\xff\0SELECT 1\0\0\0", "not valid UTF-8"),
        (b"s1\0SELECT \xc3\0\0\0", "not valid UTF-8"),
    ],
)
def test_decode_parse_refuses(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        fe.decode_parse(framed(typed(b"P", body)))


def test_decode_bind_names() -> None:
    rest = b"\0\0\0\1\0\0\0\x0242\0\0"
    assert fe.decode_bind_names(framed(typed(b"B", b"p1\0s1\0" + rest))) == ("p1", "s1")
    assert fe.decode_bind_names(framed(typed(b"B", b"\0\0" + rest))) == ("", "")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "unterminated string"),
        (b"p1\0", "unterminated string"),
        (b"p1\0s1", "unterminated string"),
        (b"p1\0\xff\0", "not valid UTF-8"),
    ],
)
def test_decode_bind_names_refuses(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        fe.decode_bind_names(framed(typed(b"B", body)))


@pytest.mark.parametrize("mtype", [b"D", b"C"])
def test_decode_target(mtype: bytes) -> None:
    assert fe.decode_target(framed(typed(mtype, b"Ss1\0"))) == (ord("S"), "s1")
    assert fe.decode_target(framed(typed(mtype, b"P\0"))) == (ord("P"), "")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "invalid Describe/Close target"),
        (b"S", "invalid Describe/Close target"),
        (b"Xs1\0", "invalid Describe/Close target"),
        (b"Ss1", "unterminated string"),
        (b"Ss1\0\0", "trailing bytes"),
        (b"S\xff\0", "not valid UTF-8"),
    ],
)
def test_decode_target_refuses(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        fe.decode_target(framed(typed(b"D", body)))


def test_decode_sasl_initial() -> None:
    msg = framed(typed(b"p", b"SCRAM-SHA-256\0\0\0\0\x0bn,,n=,r=abc"))
    assert fe.decode_sasl_initial(msg) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert fe.decode_sasl_initial(framed(typed(b"p", b"X\0\0\0\0\0"))) == ("X", b"")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"SCRAM-SHA-256", "unterminated string"),
        (b"SCRAM-SHA-256\0", "truncated SASLInitialResponse"),
        (b"SCRAM-SHA-256\0\0\0\0", "truncated SASLInitialResponse"),
        (b"SCRAM-SHA-256\0\0\0\0\x05abc", "length mismatch"),
        (b"SCRAM-SHA-256\0\0\0\0\x02abc", "length mismatch"),
        (b"SCRAM-SHA-256\0\xff\xff\xff\xff", "length mismatch"),  # -1: no initial response
        (b"SCRAM\xff\0\0\0\0\0", "not valid UTF-8"),
    ],
)
def test_decode_sasl_initial_refuses(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        fe.decode_sasl_initial(framed(typed(b"p", body)))


def test_decode_sasl_response() -> None:
    assert fe.decode_sasl_response(framed(typed(b"p", b"c=biws,r=x,p=y"))) == b"c=biws,r=x,p=y"
    assert fe.decode_sasl_response(framed(typed(b"p"))) == b""


# --- frontend encoders: hand-written bytes --------------------------------------------


def test_encode_ssl_request() -> None:
    assert fe.encode_ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


def test_encode_cancel() -> None:
    assert fe.encode_cancel(1234, b"\x00\x00\x16\x2e") == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\x00\x00\x16\x2e"
    )


def test_encode_startup() -> None:
    assert fe.encode_startup([("user", "alice"), ("database", "shop")]) == (
        b"\x00\x00\x00\x22\x00\x03\x00\x00user\x00alice\x00database\x00shop\x00\x00"
    )


def test_encode_query() -> None:
    assert fe.encode_query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"


def test_encode_parse() -> None:
    assert fe.encode_parse("s1", "SELECT $1", b"\x00\x01\x00\x00\x00\x17") == (
        b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"
    )
    assert fe.encode_parse("", "SELECT 1") == b"P\x00\x00\x00\x10\x00SELECT 1\x00\x00\x00"


def test_encode_password_and_sasl_initial() -> None:
    assert fe.encode_password(b"c=biws,r=abc,p=xyz") == b"p\x00\x00\x00\x16c=biws,r=abc,p=xyz"
    assert fe.encode_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc") == (
        b"p\x00\x00\x00\x21SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc"
    )


def test_fixed_frontend_messages() -> None:
    assert fe.SYNC_MESSAGE == b"S\x00\x00\x00\x04"
    assert fe.FLUSH_MESSAGE == b"H\x00\x00\x00\x04"
    assert fe.TERMINATE_MESSAGE == b"X\x00\x00\x00\x04"


# --- round trips ------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)
NAME = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_query_round_trip(sql: str) -> None:
    assert fe.decode_query(framed(fe.encode_query(sql))) == sql


@settings(max_examples=200, deadline=None)
@given(TEXT, TEXT, st.lists(st.integers(0, 0xFFFFFFFF), max_size=8))
def test_parse_round_trip(name: str, sql: str, oids: list[int]) -> None:
    types = struct.pack(f"!h{len(oids)}I", len(oids), *oids)
    msg = fe.encode_parse(name, sql, types)
    assert fe.decode_parse(framed(msg)) == fe.ParseMessage(name, sql, types)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NAME, TEXT), max_size=6))
def test_startup_round_trip(params: list[tuple[str, str]]) -> None:
    # Names are non-empty: an empty name is the protocol's list terminator.
    msg = fe.encode_startup(params)
    assert fe.decode_startup_form(startup_framed(msg)) == fe.Startup(3, 0, tuple(params))


# --- backend encoders: hand-written bytes ------------------------------------------


def test_error_response() -> None:
    assert be.error_response("FATAL", "28P01", 'password authentication failed for user "bob"') == (
        b"E\x00\x00\x00\x49"
        b"SFATAL\x00VFATAL\x00C28P01\x00"
        b'Mpassword authentication failed for user "bob"\x00'
        b"\x00"
    )


def test_error_response_with_hint_and_as_notice() -> None:
    expected = b"\x00\x00\x00\x23SERROR\x00VERROR\x00C42501\x00Mno\x00Hask\x00\x00"
    assert be.error_response("ERROR", "42501", "no", "ask") == b"E" + expected
    assert be.error_response("ERROR", "42501", "no", "ask", notice=True) == b"N" + expected


def test_ready_for_query() -> None:
    assert be.ready_for_query(b"I") == b"Z\x00\x00\x00\x05I"
    assert be.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"
    assert be.ready_for_query(b"E") == b"Z\x00\x00\x00\x05E"


def test_auth_requests() -> None:
    assert be.auth_request(be.AUTH_OK) == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert be.auth_sasl(("SCRAM-SHA-256",)) == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )
    assert be.auth_request(be.AUTH_SASL_CONTINUE, b"r=ab,s=cd,i=4096") == (
        b"R\x00\x00\x00\x18\x00\x00\x00\x0br=ab,s=cd,i=4096"
    )
    assert (
        be.auth_request(be.AUTH_SASL_FINAL, b"v=xyz") == b"R\x00\x00\x00\x0d\x00\x00\x00\x0cv=xyz"
    )


def test_parameter_status() -> None:
    assert be.parameter_status("client_encoding", "UTF8") == (
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
    )


def test_backend_key_data() -> None:
    assert be.backend_key_data(1234, b"\x00\x00\x16\x2e") == (
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x00\x00\x16\x2e"
    )


def test_negotiate_protocol_version() -> None:
    assert be.negotiate_protocol_version(0, ["_pq_.compression"]) == (
        b"v\x00\x00\x00\x1d\x00\x00\x00\x00\x00\x00\x00\x01_pq_.compression\x00"
    )
    assert be.negotiate_protocol_version(0, []) == b"v\x00\x00\x00\x0c" + bytes(8)


# --- backend decoders (the upstream login) ------------------------------------------


def test_backend_decoders() -> None:
    assert be.decode_auth(framed(be.auth_request(be.AUTH_SASL_CONTINUE, b"r=x"))) == (11, b"r=x")
    assert be.decode_parameter_status(framed(be.parameter_status("TimeZone", "UTC"))) == (
        "TimeZone",
        "UTC",
    )
    assert be.decode_backend_key(framed(be.backend_key_data(7, b"k" * 32))) == (7, b"k" * 32)
    fields = be.decode_error_fields(framed(be.error_response("FATAL", "3D000", "no db", "hint")))
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "3D000", "M": "no db", "H": "hint"}


@pytest.mark.parametrize(
    ("decoder", "msg", "match"),
    [
        (be.decode_auth, typed(b"R", b"\0\0\0"), "truncated authentication"),
        (be.decode_backend_key, typed(b"K", b"\0\0\0\1\0\0\0"), "truncated BackendKeyData"),
        (be.decode_parameter_status, typed(b"S", b"TimeZone\0UTC"), "malformed ParameterStatus"),
        (be.decode_parameter_status, typed(b"S", b"a\0b\0c\0"), "malformed ParameterStatus"),
    ],
)
def test_backend_decoders_refuse(
    decoder: Callable[[bytes], object], msg: bytes, match: str
) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        decoder(framed(msg))
