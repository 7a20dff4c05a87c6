"""The policy seam: every statement and every result stream passes here.

The session asks its Gate about each simple Query and each Parse before any
byte of it reaches the database, and reports the rows each statement returned.
A Gate answers with one of a closed set of verdicts. In the foundation the only
gate is PassThroughGate (the role is resolved, everything is allowed); the
policy engine plugs in by providing another Gate, without touching the codec
or the session.

Fail closed: until the policy engine exists, a restricted role cannot be
checked, so its statements are refused (RestrictedUnavailableGate) rather than
passed through with raw values. Unrestricted roles pass through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.errors import PgWardenError, PolicyRefusal


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end: the authenticated user and their policy role."""

    user: str
    role: str
    unrestricted: bool


@dataclass(frozen=True, slots=True)
class Allow:
    """Forward the statement; `sql` replaces the client's text when set."""

    sql: str | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not forward; the client receives `error` and the session goes on."""

    error: PgWardenError


Verdict = Allow | Refuse

ALLOW = Allow()


class Gate(Protocol):
    """Per-session policy decisions. Pure: no I/O, no logging."""

    principal: Principal

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        """Verdict for a simple Query (extended=False) or a Parse (extended=True)."""
        ...

    def rows_returned(self, count: int) -> None:
        """Rows one statement delivered to the client (called when it completes)."""
        ...


class PassThroughGate:
    """Resolves the role and lets everything through (the foundation's policy)."""

    __slots__ = ("principal",)

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        return ALLOW

    def rows_returned(self, count: int) -> None:
        return None


class RestrictedUnavailableGate(PassThroughGate):
    """For restricted roles while no policy engine is present: refuse, never leak."""

    __slots__ = ("_refusal",)

    def __init__(self, principal: Principal) -> None:
        super().__init__(principal)
        self._refusal = Refuse(
            PolicyRefusal(
                f'pgwarden: role "{principal.role}" is restricted and this pgwarden '
                "version cannot enforce column policies yet; statement refused",
                hint="Only unrestricted roles can run statements in this version.",
            )
        )

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        return self._refusal


def gate_for(principal: Principal) -> Gate:
    """The gate the foundation gives a principal."""
    if principal.unrestricted:
        return PassThroughGate(principal)
    return RestrictedUnavailableGate(principal)
