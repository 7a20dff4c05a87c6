"""Backend messages: what PostgreSQL sends, and what pgwarden sends to clients.

pgwarden builds a handful of server messages itself (authentication requests,
its own BackendKeyData, errors and ReadyForQuery for refused statements); each
has one encoder here. Decoders cover only what the session inspects: the
authentication requests and parameters of the upstream login, and the fields of
an ErrorResponse for logging (never its free text, which may hold values).
"""

from __future__ import annotations

import struct

from proxy.errors import ProtocolViolation

_I32 = struct.Struct("!i")
_I32x2 = struct.Struct("!ii")
_I16 = struct.Struct("!h")

AUTHENTICATION = ord("R")
PARAMETER_STATUS = ord("S")
BACKEND_KEY_DATA = ord("K")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION = ord("A")
NEGOTIATE_PROTOCOL = ord("v")
DATA_ROW = ord("D")
ROW_DESCRIPTION = ord("T")
PARAMETER_DESCRIPTION = ord("t")
NO_DATA = ord("n")
COMMAND_COMPLETE = ord("C")
EMPTY_QUERY = ord("I")
PORTAL_SUSPENDED = ord("s")
PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
COPY_IN = ord("G")
COPY_OUT = ord("H")
COPY_BOTH = ord("W")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
FUNCTION_RESULT = ord("V")

AUTH_OK = 0
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def _typed(mtype: bytes, body: bytes) -> bytes:
    return mtype + _I32.pack(len(body) + 4) + body


def _fields(fields: list[tuple[bytes, str]]) -> bytes:
    return b"".join(code + text.encode() + b"\0" for code, text in fields) + b"\0"


def error_response(
    severity: str, sqlstate: str, message: str, hint: str | None = None, *, notice: bool = False
) -> bytes:
    """An ErrorResponse (or NoticeResponse). Never put a value from the data here."""
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    if hint:
        fields.append((b"H", hint))
    return _typed(b"N" if notice else b"E", _fields(fields))


def ready_for_query(status: bytes) -> bytes:
    return _typed(b"Z", status)


def auth_request(code: int, data: bytes = b"") -> bytes:
    return _typed(b"R", _I32.pack(code) + data)


def auth_sasl(mechanisms: tuple[str, ...]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return _typed(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return _typed(b"K", _I32.pack(pid) + secret)


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = _I32x2.pack(newest_minor, len(unsupported))
    return _typed(b"v", body + b"".join(o.encode() + b"\0" for o in unsupported))


# --- decoders for messages PostgreSQL sends pgwarden -------------------------


def decode_auth(msg: bytes) -> tuple[int, bytes]:
    """(code, rest) of an AuthenticationRequest."""
    if len(msg) < 9:
        raise ProtocolViolation("pgwarden: truncated authentication request from server")
    return _I32.unpack_from(msg, 5)[0], msg[9:]


def decode_parameter_status(msg: bytes) -> tuple[str, str]:
    parts = msg[5:].split(b"\0")
    if len(parts) != 3 or parts[2]:
        raise ProtocolViolation("pgwarden: malformed ParameterStatus from server")
    return parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")


def decode_backend_key(msg: bytes) -> tuple[int, bytes]:
    if len(msg) < 13:
        raise ProtocolViolation("pgwarden: truncated BackendKeyData from server")
    return _I32.unpack_from(msg, 5)[0], msg[9:]


def decode_error_fields(msg: bytes) -> dict[str, str]:
    """Field code -> text of an ErrorResponse/NoticeResponse."""
    out: dict[str, str] = {}
    for part in msg[5:].split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


_FIELD_TAIL = struct.Struct("!IhIhih")  # table oid, attnum, type oid, typlen, typmod, format


def decode_row_origins(msg: bytes, pos: int, end: int) -> list[tuple[int, int]]:
    """(table OID, column attnum) of each field of the RowDescription at msg[pos:end]."""
    count = _I16.unpack_from(msg, pos + 5)[0]
    at = pos + 7
    out: list[tuple[int, int]] = []
    for _ in range(count):
        nul = msg.find(b"\0", at, end)
        if nul < 0 or nul + 1 + _FIELD_TAIL.size > end:
            raise ProtocolViolation("pgwarden: malformed RowDescription from server")
        table, attnum, *_rest = _FIELD_TAIL.unpack_from(msg, nul + 1)
        out.append((table, attnum))
        at = nul + 1 + _FIELD_TAIL.size
    return out


# --- hidden key columns (record accounting, proxy/analysis/records.py) ------------------


def strip_hidden_fields(data: bytes, pos: int, end: int, prefix: bytes) -> bytes | None:
    """The RowDescription at data[pos:end] without its leading fields named `prefix`...

    None when it has none (the message is forwarded as it is).
    """
    count = _I16.unpack_from(data, pos + 5)[0]
    at = pos + 7
    hidden = 0
    while hidden < count and data.startswith(prefix, at, end):
        name_end = data.find(b"\0", at, end)
        if name_end < 0 or name_end + 19 > end:
            raise ProtocolViolation("pgwarden: malformed RowDescription from server")
        at = name_end + 19
        hidden += 1
    if not hidden:
        return None
    body = _I16.pack(count - hidden) + data[at:end]
    return b"T" + _I32.pack(len(body) + 4) + body


def strip_columns(
    data: bytes, pos: int, end: int, hidden: int
) -> tuple[bytes, tuple[str | None, ...]]:
    """The DataRow at data[pos:end] without its first `hidden` columns, and their text."""
    count = _I16.unpack_from(data, pos + 5)[0]
    at = pos + 7
    if hidden == 1 and count >= 1:  # the common case, kept short: one key column
        length = _I32.unpack_from(data, at)[0]
        at += 4
        if length < 0:
            key: str | None = None
        else:
            key = data[at : at + length].decode("utf-8", "replace")
            at += length
        if at > end:
            raise ProtocolViolation("pgwarden: malformed DataRow from server")
        return b"D" + _I32.pack(end - at + 6) + _I16.pack(count - 1) + data[at:end], (key,)
    if count < hidden:
        raise ProtocolViolation("pgwarden: a result row lacks its record keys")
    keys: list[str | None] = []
    for _ in range(hidden):
        length = _I32.unpack_from(data, at)[0]
        at += 4
        if length < 0:
            keys.append(None)
            continue
        keys.append(data[at : at + length].decode("utf-8", "replace"))
        at += length
    if at > end:
        raise ProtocolViolation("pgwarden: malformed DataRow from server")
    return b"D" + _I32.pack(end - at + 6) + _I16.pack(count - hidden) + data[at:end], tuple(keys)
