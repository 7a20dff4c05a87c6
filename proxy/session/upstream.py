"""pgwarden's own login to PostgreSQL as the service account (sans-IO).

Strategy: send a StartupMessage carrying the service account, the database and
the client's filtered parameters; answer authentication requests through
proxy.auth.UpstreamAuthenticator; collect ParameterStatus and BackendKeyData
until ReadyForQuery. Anything else, or an ErrorResponse, fails the login with
UpstreamUnavailable. The server's error text is kept for the log only: the
client sees a generic 08006.
"""

from __future__ import annotations

from proxy.auth import UpstreamAuthenticator
from proxy.errors import ProtocolViolation, UpstreamUnavailable
from proxy.wire import backend as be
from proxy.wire import frontend as fe
from proxy.wire.buffer import Framer

_MAX_LOGIN_MESSAGE = 1 << 20


class UpstreamLogin:
    """Drives one upstream login; `done` once ReadyForQuery arrived."""

    __slots__ = ("_auth", "_framer", "_startup", "done", "key", "params", "status")

    def __init__(self, user: str, password: str | None, params: list[tuple[str, str]]) -> None:
        self._auth = UpstreamAuthenticator(user, password)
        self._framer = Framer(_MAX_LOGIN_MESSAGE, who="server")
        self._startup = fe.encode_startup([("user", user), *params])
        self.params: list[tuple[str, str]] = []
        self.key: tuple[int, bytes] | None = None
        self.done = False
        self.status = b"I"

    def startup_packet(self) -> bytes:
        return self._startup

    def feed(self, data: bytes) -> bytes:
        """Consume server bytes; return bytes to send back."""
        out = b""
        for mtype, msg in self._framer.feed(data):
            if self.done:
                raise ProtocolViolation("pgwarden: server spoke before being asked")
            out += self._message(mtype, msg)
        return out

    def _message(self, mtype: int, msg: bytes) -> bytes:
        if mtype == be.AUTHENTICATION:
            reply = self._auth.on_request(*be.decode_auth(msg))
            return reply or b""
        if mtype == be.PARAMETER_STATUS:
            self.params.append(be.decode_parameter_status(msg))
        elif mtype == be.BACKEND_KEY_DATA:
            self.key = be.decode_backend_key(msg)
        elif mtype == be.READY_FOR_QUERY:
            self.done = True
            self.status = msg[5:6]
        elif mtype == be.ERROR_RESPONSE:
            fields = be.decode_error_fields(msg)
            raise UpstreamUnavailable(
                f"upstream refused the login: {fields.get('C', '?')} {fields.get('M', '')}"
            )
        elif mtype not in (be.NOTICE_RESPONSE, be.NEGOTIATE_PROTOCOL):
            raise ProtocolViolation(f"pgwarden: unexpected {chr(mtype)!r} during upstream login")
        return b""
