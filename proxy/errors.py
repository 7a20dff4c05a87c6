"""Error families, each carrying the SQLSTATE a client sees.

Three families, never mixed:

* ProtocolViolation - the peer broke the wire protocol (malformed, oversized or
  out-of-order message). The connection gets a FATAL ErrorResponse and closes.
* PolicyRefusal - policy said no. The client gets an ErrorResponse and the
  session goes on at the next ReadyForQuery.
* Everything else that escapes a session is our own bug: it is logged with
  context, that one connection is closed, and the process stays up.

Configuration problems (ConfigError) are reported before anything listens.
"""

from __future__ import annotations


class PgWardenError(Exception):
    """Base of every error pgwarden raises on purpose."""

    sqlstate = "XX000"
    severity = "ERROR"

    def __init__(self, message: str, *, hint: str | None = None, sqlstate: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if sqlstate is not None:
            self.sqlstate = sqlstate


class ProtocolViolation(PgWardenError):
    """The client or server broke protocol v3; the connection is closed."""

    sqlstate = "08P01"
    severity = "FATAL"


class MessageTooLarge(ProtocolViolation):
    """A message declared a length above the configured cap."""

    sqlstate = "54000"


class StartupRefused(PgWardenError):
    """Startup parameters or the login were refused; FATAL, then close."""

    sqlstate = "28000"
    severity = "FATAL"


class AuthFailed(StartupRefused):
    """Bad user name or password. Unknown users get the same reply (no enumeration)."""

    sqlstate = "28P01"


class UpstreamUnavailable(PgWardenError):
    """The database could not be reached or refused the service account."""

    sqlstate = "08006"
    severity = "FATAL"


class PolicyRefusal(PgWardenError):
    """A statement was refused by policy; the session goes on."""

    sqlstate = "42501"


class ConfigError(PgWardenError):
    """pgwarden.yaml or a file it names is invalid; reported before serving."""

    def __init__(self, key: str, message: str, *, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")
        self.key = key
