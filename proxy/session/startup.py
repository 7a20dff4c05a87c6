"""Startup parameter filtering: what a client may ask of the server at login.

Rules: keep only parameters that change formatting, never parsing or identity
(user, database, application_name, client_encoding=UTF8, DateStyle, TimeZone,
extra_float_digits, IntervalStyle). Refuse `options` (it can set any GUC, such
as search_path), `replication`, and every other parameter: an unknown setting
is refused, not dropped, so a client never believes it got something it did
not. Protocol options (`_pq_.*`) are declined through NegotiateProtocolVersion
as PostgreSQL does. The client encoding is always UTF8 upstream, because the
SQL analyser reads statements as UTF-8 and a multibyte client encoding could
make it see different quotes than the server does.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import PgWardenError, ProtocolViolation

KEPT = {
    "application_name": "application_name",
    "datestyle": "DateStyle",
    "timezone": "TimeZone",
    "extra_float_digits": "extra_float_digits",
    "intervalstyle": "IntervalStyle",
    # timeouts a client may also SET (node-postgres sends statement_timeout here)
    "statement_timeout": "statement_timeout",
    "lock_timeout": "lock_timeout",
    "idle_in_transaction_session_timeout": "idle_in_transaction_session_timeout",
}
_UTF8_NAMES = frozenset({"utf8", "utf-8", "unicode", "sql_ascii"})
HINT = (
    "pgwarden accepts the startup parameters user, database, application_name, "
    "client_encoding (UTF8), DateStyle, TimeZone, extra_float_digits, IntervalStyle, "
    "statement_timeout, lock_timeout and idle_in_transaction_session_timeout."
)


class ParameterRefused(PgWardenError):
    sqlstate = "42501"
    severity = "FATAL"


@dataclass(frozen=True, slots=True)
class StartupParams:
    user: str
    database: str
    upstream: tuple[tuple[str, str], ...]  # forwarded to the server, besides user/database
    declined_options: tuple[str, ...]  # _pq_.* names for NegotiateProtocolVersion
    application_name: str


def filter_params(params: tuple[tuple[str, str], ...]) -> StartupParams:
    """Validate a StartupMessage's parameters; raise on anything not allowed."""
    seen: dict[str, str] = {}
    declined: list[str] = []
    for name, value in params:
        low = name.lower()
        if low.startswith("_pq_."):
            declined.append(name)
            continue
        if low in seen:
            raise ProtocolViolation(f'pgwarden: startup parameter "{name}" given twice')
        seen[low] = value
    user = seen.pop("user", "")
    if not user:
        raise ProtocolViolation("pgwarden: no user name specified in startup packet")
    database = seen.pop("database", "") or user
    _check_encoding(seen.pop("client_encoding", "UTF8"))
    upstream: list[tuple[str, str]] = [("client_encoding", "UTF8")]
    for low, value in seen.items():
        if low not in KEPT:
            raise ParameterRefused(f'pgwarden: startup parameter "{low}" is not allowed', hint=HINT)
        upstream.append((KEPT[low], value))
    return StartupParams(
        user, database, tuple(upstream), tuple(declined), seen.get("application_name", "")
    )


def _check_encoding(value: str) -> None:
    if value.strip().strip("'\"").lower() not in _UTF8_NAMES:
        raise ParameterRefused(
            f'pgwarden: client_encoding "{value}" is not supported; use UTF8', hint=HINT
        )
