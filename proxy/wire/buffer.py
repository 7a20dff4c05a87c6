"""Framing: split a byte stream into protocol messages.

Strategy: every regular message is a type byte followed by an int32 length that
counts itself. The framer keeps one receive buffer, reads each header with
struct.unpack_from, refuses a declared length above the cap *before* buffering
the body (so a hostile peer cannot make us allocate), and hands out complete
messages as immutable bytes. The server-to-client relay does not use this
framer: it scans headers in place and forwards memoryview runs (see
proxy/session/relay.py). The startup phase has no type byte; that form is
framed by `StartupFramer`.

Rules:
* A length below 4 is a protocol violation, as is one above the cap.
* feed() consumes everything it is given: complete messages are returned,
  the incomplete tail stays buffered for the next call.
"""

from __future__ import annotations

import struct

from proxy.errors import MessageTooLarge, ProtocolViolation

_LEN = struct.Struct("!I")
HEADER_SIZE = 5


class Framer:
    """Frames typed messages (type byte + int32 length) from a byte stream."""

    __slots__ = ("_buf", "_cap", "_need", "_who")

    def __init__(self, max_size: int, who: str = "client") -> None:
        self._buf = bytearray()
        self._need = 0  # bytes the buffered incomplete message still lacks
        self._cap = max_size
        self._who = who

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Return (type byte, whole message) for every complete message.

        Messages are bytes (immutable) so a caller may keep or forward them.
        Only the incomplete tail is kept between calls.
        """
        if self._buf:  # append, do not re-copy: a big message in small reads stays linear
            self._buf += data
            if len(self._buf) < self._need:
                return []
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = data
        out: list[tuple[int, bytes]] = []
        pos = 0
        n = len(buf)
        self._need = 0
        while n - pos >= HEADER_SIZE:
            length = _LEN.unpack_from(buf, pos + 1)[0]
            self._check(buf[pos], length)
            end = pos + 1 + length
            if end > n:
                self._need = end - pos
                break
            out.append((buf[pos], buf[pos:end]))
            pos = end
        self._buf += memoryview(buf)[pos:]
        return out

    def take_rest(self) -> bytes:
        """Return and clear whatever is buffered (used when the framing changes)."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._need = 0
        return rest

    def _check(self, mtype: int, length: int) -> None:
        if length < 4:
            raise ProtocolViolation(
                f"pgwarden: invalid message length {length} from {self._who} (type {mtype:#04x})"
            )
        if length > self._cap:
            raise MessageTooLarge(
                f"pgwarden: message of {length} bytes from {self._who} exceeds the "
                f"limit of {self._cap} bytes"
            )


class StartupFramer:
    """Frames the untyped first message(s): int32 length, then the body."""

    __slots__ = ("_buf", "_cap")

    def __init__(self, max_size: int = 10_000) -> None:
        self._buf = bytearray()
        self._cap = max_size

    def feed(self, data: bytes) -> bytes | None:
        """Buffer data; return one complete startup-form message, or None."""
        self._buf += data
        if len(self._buf) < 4:
            return None
        length = _LEN.unpack_from(self._buf, 0)[0]
        if length < 8 or length > self._cap:
            raise ProtocolViolation(f"pgwarden: invalid startup packet length {length}")
        if len(self._buf) < length:
            return None
        msg = bytes(self._buf[:length])
        del self._buf[:length]
        return msg

    def pending(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest
