"""The policy seam: every statement and every result stream passes here.

The session asks its Gate about each simple Query and each Parse before any
byte of it reaches the database, and reports the rows each statement returned.
A Gate answers with one of a closed set of verdicts. Unrestricted roles get
PassThroughGate (everything allowed, still counted and logged); restricted roles
get PolicyGate, which asks the policy engine (proxy/analysis/engine.py) and hands
the session the rewritten text to send.

Fail closed: while no engine is available (the upstream schema is not loaded yet),
a restricted role's statements are refused, never passed through.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Protocol

from proxy.analysis.engine import Engine, Evaluation
from proxy.analysis.fingerprint import UNPARSABLE, fingerprint
from proxy.errors import PgWardenError, PolicyRefusal
from proxy.policy.model import Limits, Role
from proxy.quota import has_quota


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end: the authenticated user and their policy role."""

    user: str
    role: str
    unrestricted: bool


@dataclass(frozen=True, slots=True)
class Audit:
    """What the statement event says of a statement: its shape, never its values."""

    fingerprint: str
    kind: str
    tables: tuple[str, ...] = ()


@lru_cache(maxsize=4096)
def passthrough_audit(sql: str) -> Audit:
    """The audit facts of an unrestricted statement (not analysed: its first keyword)."""
    shape = fingerprint(sql)
    return Audit(shape, shape.split(" ", 1)[0].lower() if shape != UNPARSABLE else "")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A restricted session's prepared statement: what was asked, and what was sent."""

    policy_version: str
    sql: str  # the client's text
    sent: str | None  # the text pgwarden sent upstream (None: the client's)


@dataclass(frozen=True, slots=True)
class Allow:
    """Forward the statement; `sql` replaces the client's text when set."""

    sql: str | None = None
    cap: int | None = None  # most rows one statement may deliver (the relay enforces it)
    truncate: bool = False  # over the cap: deliver `cap` rows and a notice (else: refuse)
    counted: bool = False  # delivered rows count against the user's hourly/daily quotas
    by_quota: bool = False  # `cap` is what is left of a quota (53400), not rows_per_query
    base_cap: int | None = None  # rows_per_query, when `cap` may come from a quota
    cursor: tuple[str, bool] | None = None  # (name, True for DECLARE / False for FETCH)
    tables: tuple[str, ...] = ()  # what the statement reads, for limit and quota events
    audit: Audit | None = None
    policy_version: str = ""  # the policy it was checked under (restricted roles)


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not forward; the client receives `error` and the session goes on."""

    error: PgWardenError
    internal: str = ""  # set when analysis itself failed (a pgwarden limitation or bug)
    audit: Audit | None = None


Verdict = Allow | Refuse

ALLOW = Allow()


class Gate(Protocol):
    """Per-session policy decisions. Pure: no I/O, no logging."""

    principal: Principal
    forbidden: frozenset[tuple[int, int]]  # (table OID, attnum) never to appear in a result

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        """Verdict for a simple Query (extended=False) or a Parse (extended=True)."""
        ...

    def rows_returned(self, count: int) -> None:
        """Rows one statement delivered to the client (called when it completes)."""
        ...

    def charge(self, rows: int) -> None:
        """Rows of a quota-counted statement were delivered (per statement or batch)."""
        ...

    def check_bind(self, prepared: Prepared | None, *, counted: bool) -> int | PgWardenError | None:
        """At every Bind of a prepared statement (restricted sessions).

        The refusal when the user left the role, or when the policy changed since
        the Parse in a way that changes what this statement must be; else, for a
        statement whose rows count against the quotas (`counted`), the rows the
        quotas leave (None: no quota, or not counted).
        """
        ...


class PassThroughGate:
    """Resolves the role and lets everything through (the foundation's policy)."""

    __slots__ = ("forbidden", "principal")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.forbidden: frozenset[tuple[int, int]] = frozenset()

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        return ALLOW  # the session fingerprints it for the log, only when that is on

    def rows_returned(self, count: int) -> None:
        return None

    def charge(self, rows: int) -> None:
        return None

    def check_bind(self, prepared: Prepared | None, *, counted: bool) -> int | PgWardenError | None:
        return None


class EngineSource(Protocol):
    """Where a gate finds the current policy engine (swapped on reload)."""

    @property
    def engine(self) -> Engine | None: ...

    def schema_miss(self) -> None:
        """A statement named a relation the snapshot lacks: refresh it soon."""
        ...

    def quota_left(self, user: str, limits: Limits) -> int | PgWardenError:
        """Rows `user` may still read under the hourly and daily quotas, or the refusal."""
        ...

    def charge(self, user: str, rows: int) -> None:
        """`user` was delivered `rows` rows of classified tables."""
        ...


class PolicyGate:
    """A restricted role: every statement is analysed and rewritten by the engine.

    The engine is read afresh for every statement, so a policy reload applies to
    the next statement of every open session; a user no longer in the role is
    refused from then on.
    """

    __slots__ = ("_source", "forbidden", "principal")

    def __init__(self, principal: Principal, source: EngineSource) -> None:
        self.principal = principal
        self._source = source
        self.forbidden: frozenset[tuple[int, int]] = frozenset()

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        engine = self._source.engine
        if engine is None:
            return _NOT_READY
        role = self._role(engine)
        if role is None:
            return Refuse(self._not_a_member())
        result = engine.evaluate(role.name, sql, extended=extended)
        self.forbidden = engine.forbidden_fields(role.name)
        audit = Audit(fingerprint(sql), ",".join(result.kinds), result.tables)
        if result.allowed:
            verdict = self._allow(result, role.limits)
            if isinstance(verdict, Allow):
                return replace(verdict, audit=audit, policy_version=engine.policy.version_hash)
            return replace(verdict, audit=audit)
        if result.unknown_relation:
            self._source.schema_miss()
        error = PolicyRefusal(result.message, hint=result.hint or None, sqlstate=result.sqlstate)
        return Refuse(error, internal=result.internal, audit=audit)

    def _allow(self, result: Evaluation, limits: Limits | None) -> Verdict:
        """Allow, with the row cap: rows_per_query, or what is left of a quota if less."""
        quotas = limits is not None and (limits.rows_per_hour or limits.rows_per_day)
        if not (quotas and result.classified):
            return Allow(
                result.sql, result.cap, result.truncate, cursor=result.cursor, tables=result.tables
            )
        assert limits is not None
        left = self._source.quota_left(self.principal.user, limits)
        if isinstance(left, PgWardenError):
            return Refuse(left)
        if result.cap is not None and result.cap <= left:
            return Allow(
                result.sql,
                result.cap,
                result.truncate,
                counted=True,
                base_cap=result.cap,
                cursor=result.cursor,
                tables=result.tables,
            )
        return Allow(
            result.sql,
            left,
            result.truncate,
            counted=True,
            by_quota=True,
            base_cap=result.cap,
            cursor=result.cursor,
            tables=result.tables,
        )

    def rows_returned(self, count: int) -> None:
        return None

    def charge(self, rows: int) -> None:
        self._source.charge(self.principal.user, rows)

    def check_bind(self, prepared: Prepared | None, *, counted: bool) -> int | PgWardenError | None:
        engine = self._source.engine
        if engine is None:
            return _NOT_READY.error
        role = self._role(engine)
        if role is None:
            return self._not_a_member()
        if prepared is None or not self._still_holds(engine, role, prepared):
            return PolicyRefusal(
                "pgwarden: the policy changed since this statement was prepared; Bind refused",
                hint="Prepare the statement again (reconnecting does it for most drivers).",
            )
        if not counted or not has_quota(role.limits):
            return None  # a statement that reads no classified table is never held back
        assert role.limits is not None
        return self._source.quota_left(self.principal.user, role.limits)

    @staticmethod
    def _still_holds(engine: Engine, role: Role, prepared: Prepared) -> bool:
        """Prepared under this policy, or the current one makes the very same text."""
        if prepared.policy_version == engine.policy.version_hash:
            return True
        again = engine.evaluate(role.name, prepared.sql, extended=True)
        return again.allowed and again.sql == prepared.sent

    def _role(self, engine: Engine) -> Role | None:
        """The user's role under the current policy, if it is still the one of the login."""
        role = engine.policy.role_of(self.principal.user)
        return role if role is not None and role.name == self.principal.role else None

    def _not_a_member(self) -> PgWardenError:
        return PolicyRefusal(
            f'pgwarden: user "{self.principal.user}" is no longer in role '
            f'"{self.principal.role}"; statement refused',
            hint="The policy changed; reconnect to get your current role.",
        )


_NOT_READY = Refuse(
    PolicyRefusal(
        "pgwarden: the schema of the upstream database is not loaded yet; statement refused",
        hint="pgwarden reads the upstream catalog at startup and retries; try again shortly.",
        sqlstate="57P03",
    )
)


def gate_for(principal: Principal, source: EngineSource) -> Gate:
    """The gate for a principal: pass-through when unrestricted, else the engine."""
    if principal.unrestricted:
        return PassThroughGate(principal)
    return PolicyGate(principal, source)
