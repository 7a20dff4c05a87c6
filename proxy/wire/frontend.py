"""Frontend messages: what a client sends, and what pgwarden sends upstream.

Decoding is strict: a field that runs past the end of its message, a missing
NUL terminator or trailing garbage is a ProtocolViolation. Only the messages
policy needs are decoded (startup, Query, Parse, Bind's statement name, SASL);
everything else is forwarded as the bytes the client sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.errors import ProtocolViolation

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!iI")

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# Regular frontend message type bytes.
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
FUNCTION_CALL = ord("F")
TERMINATE = ord("X")
PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse and SASLResponse share it


@dataclass(frozen=True, slots=True)
class Startup:
    """A StartupMessage: protocol version and parameters, in the client's order."""

    major: int
    minor: int
    params: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSEncRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class ParseMessage:
    name: str
    query: str
    param_types: bytes  # raw int16 count + int32 OIDs, forwarded as is


StartupForm = Startup | SSLRequest | GSSEncRequest | CancelRequest


def _cstr(msg: bytes, pos: int) -> tuple[bytes, int]:
    end = msg.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("pgwarden: unterminated string in message")
    return msg[pos:end], end + 1


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"pgwarden: {what} is not valid UTF-8") from None


def decode_startup_form(msg: bytes) -> StartupForm:
    """Decode an untyped first message (length + code + body)."""
    length, code = _HDR.unpack_from(msg, 0)
    if code == SSL_REQUEST and length == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST and length == 8:
        return GSSEncRequest()
    if code == CANCEL_REQUEST and 16 <= length <= 268:  # 3.2 keys: 4 to 256 bytes
        return CancelRequest(_I32.unpack_from(msg, 8)[0], msg[12:])
    major, minor = code >> 16, code & 0xFFFF
    if major != 3 or code in (SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST):
        raise ProtocolViolation(
            f"pgwarden: unsupported frontend protocol {major}.{minor}: server supports 3.0"
        )
    return Startup(major, minor, _startup_params(msg))


def _startup_params(msg: bytes) -> tuple[tuple[str, str], ...]:
    params: list[tuple[str, str]] = []
    pos, end = 8, len(msg) - 1
    if msg[end] != 0:
        raise ProtocolViolation("pgwarden: startup packet is not terminated")
    while pos < end:
        key, pos = _cstr(msg, pos)
        if not key:  # PostgreSQL ends the list at an empty name: nothing may follow
            raise ProtocolViolation("pgwarden: invalid startup packet layout")
        if pos >= end + 1:
            raise ProtocolViolation("pgwarden: startup parameter without a value")
        value, pos = _cstr(msg, pos)
        params.append((_text(key, "startup parameter name"), _text(value, "startup parameter")))
    if pos != end:
        raise ProtocolViolation("pgwarden: invalid startup packet layout")
    return tuple(params)


def decode_query(msg: bytes) -> str:
    """The SQL text of a simple Query message."""
    raw, pos = _cstr(msg, 5)
    if pos != len(msg):
        raise ProtocolViolation("pgwarden: trailing bytes after Query string")
    return _text(raw, "query text")


def decode_parse(msg: bytes) -> ParseMessage:
    name, pos = _cstr(msg, 5)
    query, pos = _cstr(msg, pos)
    if len(msg) - pos < 2:
        raise ProtocolViolation("pgwarden: truncated Parse message")
    count = _I16.unpack_from(msg, pos)[0]
    if count < 0 or len(msg) - pos != 2 + 4 * count:
        raise ProtocolViolation("pgwarden: invalid parameter type list in Parse")
    return ParseMessage(_text(name, "statement name"), _text(query, "query text"), msg[pos:])


def decode_parse_head(data: bytes, pos: int, end: int) -> tuple[bytes, str]:
    """(raw statement name, query text) of the Parse message at data[pos:end].

    The hot-path form of decode_parse: no copy of the message, the name stays
    bytes (statement names are only compared). The whole layout is checked.
    """
    name_end = data.find(b"\0", pos + 5, end)
    query_end = data.find(b"\0", name_end + 1, end) if name_end >= 0 else -1
    if query_end < 0 or end - query_end < 3:
        raise ProtocolViolation("pgwarden: truncated Parse message")
    count = _I16.unpack_from(data, query_end + 1)[0]
    if count < 0 or end - query_end - 3 != 4 * count:
        raise ProtocolViolation("pgwarden: invalid parameter type list in Parse")
    return data[pos + 5 : name_end], _text(data[name_end + 1 : query_end], "query text")


def decode_bind_names(msg: bytes) -> tuple[str, str]:
    """(portal, statement) of a Bind message; the rest is forwarded untouched."""
    portal, pos = _cstr(msg, 5)
    stmt, _ = _cstr(msg, pos)
    return _text(portal, "portal name"), _text(stmt, "statement name")


def bind_with_text_results(data: bytes, pos: int, end: int, extra: int) -> bytes | None:
    """The Bind at data[pos:end] asking for `extra` more leading result columns, as text.

    Only when it lists one format code per result column (two or more); with none
    or one code every column, hidden ones included, gets that format already.
    None when the Bind needs no change.
    """
    unpack = _I16.unpack_from
    at = data.find(b"\0", pos + 5, end)
    at = data.find(b"\0", at + 1, end) if at >= 0 else -1
    if at < 0 or at + 3 > end:
        raise ProtocolViolation("pgwarden: malformed Bind message")
    at += 1
    codes = unpack(data, at)[0]
    at += 2 + 2 * codes
    if codes < 0 or at + 2 > end:
        raise ProtocolViolation("pgwarden: malformed Bind message")
    params = unpack(data, at)[0]
    at += 2
    for _ in range(params):
        if at + 4 > end:
            raise ProtocolViolation("pgwarden: malformed Bind message")
        length = _I32.unpack_from(data, at)[0]
        at += 4 + (length if length > 0 else 0)
    if at + 2 > end:
        raise ProtocolViolation("pgwarden: malformed Bind message")
    results = unpack(data, at)[0]
    if results < 2:
        return None
    if at + 2 + 2 * results != end:
        raise ProtocolViolation("pgwarden: malformed Bind message")
    body = data[pos + 5 : at] + _I16.pack(results + extra) + b"\0\0" * extra + data[at + 2 : end]
    return b"B" + _I32.pack(len(body) + 4) + body


def decode_target(msg: bytes) -> tuple[int, str]:
    """('S' or 'P', name) of a Describe or Close message."""
    if len(msg) < 7 or msg[5] not in b"SP":
        raise ProtocolViolation("pgwarden: invalid Describe/Close target")
    name, pos = _cstr(msg, 6)
    if pos != len(msg):
        raise ProtocolViolation("pgwarden: trailing bytes after Describe/Close name")
    return msg[5], _text(name, "statement or portal name")


def decode_sasl_initial(msg: bytes) -> tuple[str, bytes]:
    """(mechanism, client-first-message) of a SASLInitialResponse."""
    mech, pos = _cstr(msg, 5)
    if len(msg) - pos < 4:
        raise ProtocolViolation("pgwarden: truncated SASLInitialResponse")
    n = _I32.unpack_from(msg, pos)[0]
    data = msg[pos + 4 :]
    if n != len(data):
        raise ProtocolViolation("pgwarden: SASLInitialResponse length mismatch")
    return _text(mech, "SASL mechanism"), data


def decode_sasl_response(msg: bytes) -> bytes:
    return msg[5:]


# --- encoders for messages pgwarden sends upstream --------------------------


def _typed(mtype: bytes, body: bytes) -> bytes:
    return mtype + _I32.pack(len(body) + 4) + body


def encode_startup(params: list[tuple[str, str]]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params) + b"\0"
    return _I32.pack(len(body) + 4) + body


def encode_ssl_request() -> bytes:
    return _HDR.pack(8, SSL_REQUEST)


def encode_cancel(pid: int, secret: bytes) -> bytes:
    return _HDR.pack(12 + len(secret), CANCEL_REQUEST) + _I32.pack(pid) + secret


def encode_query(sql: str) -> bytes:
    return _typed(b"Q", sql.encode() + b"\0")


def encode_parse(name: str, sql: str, param_types: bytes = b"\0\0") -> bytes:
    return _typed(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + param_types)


def encode_password(payload: bytes) -> bytes:
    return _typed(b"p", payload)


def encode_sasl_initial(mechanism: str, data: bytes) -> bytes:
    return _typed(b"p", mechanism.encode() + b"\0" + _I32.pack(len(data)) + data)


SYNC_MESSAGE = b"S\0\0\0\4"
TERMINATE_MESSAGE = b"X\0\0\0\4"
FLUSH_MESSAGE = b"H\0\0\0\4"
