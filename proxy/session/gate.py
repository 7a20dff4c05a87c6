"""The policy seam: every statement and every result stream passes here.

The session asks its Gate about each simple Query and each Parse before any
byte of it reaches the database, and reports the rows each statement returned.
A Gate answers with one of a closed set of verdicts. Unrestricted roles get
PassThroughGate (everything allowed, still counted and logged); restricted roles
get PolicyGate, which asks the policy engine (proxy/analysis/engine.py) and hands
the session the rewritten text to send. A role in shadow mode gets ShadowGate: the
engine judges every statement, the statement passes through untouched as an
unrestricted role's would, and what enforcement would have done goes to the log.

Fail closed: while no engine is available (the upstream schema is not loaded yet),
a restricted role's statements are refused, never passed through.

Break-glass (a role with `break_glass`): `SET pgwarden.reason = '...'` opens a window
of the role's duration_s for this session (PolicyGate keeps it; a new connection
starts without one). While it is open, statements are evaluated under the role's
break-glass rules, capped and charged to the quota bucket USER#break_glass, and
their audit carries the reason. The window is checked against the gate's clock at
every statement and Bind: once it has passed, the next statement is back under the
normal rules. A statement prepared in one window (or outside any) is bound only
in that same state. Events (break_glass.opened/closed) ride out on the verdicts.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

from proxy.analysis.engine import Engine, Evaluation
from proxy.analysis.fingerprint import UNPARSABLE, fingerprint
from proxy.analysis.records import RecordSpec
from proxy.enumeration import Alert
from proxy.errors import PgWardenError, PolicyRefusal
from proxy.policy.model import Alerts, Limits, Policy, Role, break_glass_bucket
from proxy.quota import has_quota


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end: the authenticated user and their policy role."""

    user: str
    role: str
    unrestricted: bool  # nothing enforced: an unrestricted role, or one in shadow mode
    shadow: bool = False  # the role is in shadow mode (would-be verdicts are logged)


@dataclass(frozen=True, slots=True)
class Audit:
    """What the statement event says of a statement: its shape, never its values."""

    fingerprint: str
    kind: str
    tables: tuple[str, ...] = ()
    extended: bool = False  # came in a Parse (else a simple Query): replay needs to know
    # shadow mode: what enforcement would have done (shadow_* fields of the event)
    shadow: tuple[tuple[str, object], ...] = ()
    # break-glass: break_glass and break_glass_reason (fields of the event)
    break_glass: tuple[tuple[str, object], ...] = ()


@lru_cache(maxsize=4096)
def passthrough_audit(sql: str, extended: bool = False) -> Audit:
    """The audit facts of an unrestricted statement (not analysed: its first keyword)."""
    shape = fingerprint(sql)
    kind = shape.split(" ", 1)[0].lower() if shape != UNPARSABLE else ""
    return Audit(shape, kind, extended=extended)


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
    records: RecordSpec | None = None  # the rows are accounted record by record
    bucket: str = ""  # the ledger user its rows are charged to ("": the user's own)
    events: tuple[tuple[str, dict[str, object]], ...] = ()  # to log (break_glass.*)


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not forward; the client receives `error` and the session goes on."""

    error: PgWardenError
    internal: str = ""  # set when analysis itself failed (a pgwarden limitation or bug)
    audit: Audit | None = None
    events: tuple[tuple[str, dict[str, object]], ...] = ()  # to log (break_glass.*)


Verdict = Allow | Refuse

KeyRow = tuple[str | None, ...]  # the hidden key texts of one result row


@dataclass
class Accounting:
    """What to do with a result whose records were accounted (`Gate.account`)."""

    deliver: int  # how many of the held rows go to the client
    error: PgWardenError | None = None  # refuse the statement (records budget, reject)
    notice: str = ""  # the rows were cut short by the records budget (truncate)
    decoy: str = ""  # the table of a planted record in the rows: end the session, lock
    lock: str = ""  # an alert with action: lock (its kind): end the session
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)


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

    def charge(self, rows: int, bucket: str = "") -> None:
        """Rows of a quota-counted statement were delivered (per statement or batch).

        `bucket`: the ledger user of the statement's Allow ("": the user's own).
        """
        ...

    def check_bind(self, prepared: Prepared | None, *, counted: bool) -> int | PgWardenError | None:
        """At every Bind of a prepared statement (restricted sessions).

        The refusal when the user left the role, or when the policy changed since
        the Parse in a way that changes what this statement must be; else, for a
        statement whose rows count against the quotas (`counted`), the rows the
        quotas leave (None: no quota, or not counted).
        """
        ...

    def lock(self, reason: str, details: Mapping[str, Any]) -> None:
        """Lock the user in every process (a decoy touched, an alert with action: lock)."""
        ...

    def account(self, spec: RecordSpec, rows: list[KeyRow], *, held: bool) -> Accounting:
        """A result's records (the hidden keys of each row), before it is delivered.

        `held`: the rows are still held (else they were already delivered and only
        count). The answer says how many rows go out and whether the session ends.
        """
        ...


class PassThroughGate:
    """An unrestricted role: everything goes through, as long as the user is still in it.

    `policy` gives the current policy (swapped on reload): a user removed from the
    role, or a role that is no longer unrestricted, is refused from the next
    statement or Bind on, as restricted roles are.
    """

    __slots__ = ("_policy", "forbidden", "principal")

    def __init__(self, principal: Principal, policy: Callable[[], Policy] | None = None) -> None:
        self.principal = principal
        self._policy = policy
        self.forbidden: frozenset[tuple[int, int]] = frozenset()

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        left = self._left_the_role()
        return ALLOW if left is None else Refuse(left)  # fingerprinted by the session

    def _left_the_role(self) -> PgWardenError | None:
        if self._policy is None:
            return None
        role = self._policy().role_of(self.principal.user)
        if role is not None and role.name == self.principal.role and role.unrestricted:
            return None
        return PolicyRefusal(
            f'pgwarden: user "{self.principal.user}" is no longer in role '
            f'"{self.principal.role}"; statement refused',
            hint="The policy changed; reconnect to get your current role.",
        )

    def rows_returned(self, count: int) -> None:
        return None

    def charge(self, rows: int, bucket: str = "") -> None:
        return None

    def check_bind(self, prepared: Prepared | None, *, counted: bool) -> int | PgWardenError | None:
        return self._left_the_role()

    def account(self, spec: RecordSpec, rows: list[KeyRow], *, held: bool) -> Accounting:
        return Accounting(len(rows))

    def lock(self, reason: str, details: Mapping[str, Any]) -> None:
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

    @property
    def records(self) -> RecordKeeper: ...

    @property
    def policy(self) -> Policy:
        """The current policy (swapped on reload)."""
        ...


class RecordKeeper(Protocol):
    """The records shown per user, locks and alerts (proxy/net/records.py)."""

    def ready(self, user: str) -> bool: ...

    def locked(self, user: str) -> object | None: ...

    def admit(
        self, user: str, budgets: Iterable[tuple[str, float, int]], rows: list[tuple[int, ...]]
    ) -> tuple[int, tuple[str, float, int] | None]: ...

    def shown(self, user: str, rows: list[tuple[int, ...]], *, budgets: bool) -> None: ...

    def watch(
        self,
        user: str,
        role: str,
        alerts: Alerts | None,
        observed: list[tuple[str, tuple[str, ...], bool, bool]],
    ) -> list[Alert]: ...

    def lock(self, user: str, reason: str, details: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class BreakGlassWindow:
    """An open break-glass window of one session."""

    reason: str  # as the user typed it (logged verbatim)
    until: float  # on the gate's clock
    serial: int  # which window of the session: a prepared statement belongs to one

    @property
    def audit(self) -> tuple[tuple[str, object], ...]:
        return (("break_glass", True), ("break_glass_reason", self.reason))


_WINDOW_TAG = "#break_glass:"  # policy_version suffix of a statement prepared in a window


class PolicyGate:
    """A restricted role: every statement is analysed and rewritten by the engine.

    The engine is read afresh for every statement, so a policy reload applies to
    the next statement of every open session; a user no longer in the role is
    refused from then on.
    """

    __slots__ = ("_clock", "_pending", "_serial", "_source", "forbidden", "principal", "window")

    def __init__(
        self,
        principal: Principal,
        source: EngineSource,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.principal = principal
        self._source = source
        self._clock = clock
        self.forbidden: frozenset[tuple[int, int]] = frozenset()
        self.window: BreakGlassWindow | None = None  # break-glass, while open
        self._serial = 0
        self._pending: list[tuple[str, dict[str, object]]] = []  # events not yet handed out

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        verdict = self._check(sql, extended)
        if not self._pending:
            return verdict
        events, self._pending = tuple(self._pending), []
        return replace(verdict, events=verdict.events + events)

    def _check(self, sql: str, extended: bool) -> Verdict:
        engine = self._source.engine
        if engine is None:
            return _NOT_READY
        role = self._role(engine)
        if role is None:
            return Refuse(self._not_a_member())
        if self._source.records.locked(self.principal.user) is not None:
            return Refuse(locked_error(self.principal.user))
        self._expire(role)
        window = self.window
        result = engine.evaluate(
            role.name,
            sql,
            extended=extended,
            user=self.principal.user,
            break_glass=window is not None,
        )
        self.forbidden = engine.forbidden_fields(role.name)
        if result.allowed and result.reason is not None:
            self._state_reason(role, result.reason)
        shown = self.window or window  # the statement that closes it still carries it
        audit = Audit(
            fingerprint(sql),
            ",".join(result.kinds),
            result.tables,
            extended,
            break_glass=shown.audit if shown is not None else (),
        )
        if result.allowed:
            verdict = self._allow(result, role, window)
            if isinstance(verdict, Allow):
                # the SET that opens or closes a window is bound in the state it made
                # (asyncpg prepares every statement: its own Bind must not be refused)
                state = self.window if result.reason is not None else window
                return replace(
                    verdict,
                    audit=audit,
                    policy_version=engine.policy.version_hash + _tag(state),
                    records=result.records,
                )
            return replace(verdict, audit=audit)
        if result.unknown_relation:
            self._source.schema_miss()
        error = PolicyRefusal(result.message, hint=result.hint or None, sqlstate=result.sqlstate)
        return Refuse(error, internal=result.internal, audit=audit)

    # --- break-glass ---------------------------------------------------------------

    def _state_reason(self, role: Role, reason: str) -> None:
        """SET pgwarden.reason: open a window (a new one if one is open), or close it."""
        config = role.break_glass
        if not reason or config is None:
            self._close("reset")
            return
        if self.window is not None:
            self._close("reopened")
        self._serial += 1
        self.window = BreakGlassWindow(reason, self._clock() + config.duration_s, self._serial)
        until = datetime.now(UTC) + timedelta(seconds=config.duration_s)
        self._pending.append(
            (
                "break_glass.opened",
                {
                    "user": self.principal.user,
                    "role": role.name,
                    "reason": reason,
                    "duration_s": config.duration_s,
                    "until": until.isoformat(timespec="seconds"),
                },
            )
        )

    def _expire(self, role: Role) -> None:
        """Close the window once its time is up, or once the policy no longer has it."""
        if self.window is None:
            return
        if role.break_glass is None:
            self._close("policy")
        elif self._clock() >= self.window.until:
            self._close("expired")

    def _close(self, why: str) -> None:
        window, self.window = self.window, None
        if window is not None:
            self._pending.append(("break_glass.closed", self.closing_fields(window, why)))

    def closing_fields(self, window: BreakGlassWindow, why: str) -> dict[str, object]:
        """The fields of break_glass.closed (also logged by the server at session end)."""
        return {
            "user": self.principal.user,
            "role": self.principal.role,
            "reason": window.reason,
            "why": why,
        }

    def _limits(self, role: Role, window: BreakGlassWindow | None) -> tuple[Limits | None, str]:
        """The limits that apply now, and the ledger user they are charged to."""
        if window is not None and role.break_glass is not None:
            return role.break_glass.limits, break_glass_bucket(self.principal.user)
        return role.limits, ""

    def _allow(self, result: Evaluation, role: Role, window: BreakGlassWindow | None) -> Verdict:
        """Allow, with the row cap: rows_per_query, or what is left of a quota if less."""
        limits, bucket = self._limits(role, window)
        if (
            result.records is not None
            and _budgets(role)
            and not self._source.records.ready(self.principal.user)
        ):
            return Refuse(_records_unavailable())
        quotas = limits is not None and (limits.rows_per_hour or limits.rows_per_day)
        if not (quotas and result.classified):
            return Allow(
                result.sql, result.cap, result.truncate, cursor=result.cursor, tables=result.tables
            )
        assert limits is not None
        left = self._source.quota_left(bucket or self.principal.user, limits)
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
                bucket=bucket,
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
            bucket=bucket,
        )

    def rows_returned(self, count: int) -> None:
        return None

    def charge(self, rows: int, bucket: str = "") -> None:
        self._source.charge(bucket or self.principal.user, rows)

    def check_bind(self, prepared: Prepared | None, *, counted: bool) -> int | PgWardenError | None:
        engine = self._source.engine
        if engine is None:
            return _NOT_READY.error
        role = self._role(engine)
        if role is None:
            return self._not_a_member()
        if self._source.records.locked(self.principal.user) is not None:
            return locked_error(self.principal.user)
        self._expire(role)  # its event goes out with the next statement's verdict
        window = self.window
        stale = self._stale(engine, role, prepared, window)
        if stale is not None:
            return stale
        limits, bucket = self._limits(role, window)
        if not counted or not has_quota(limits):
            return None  # a statement that reads no classified table is never held back
        assert limits is not None
        return self._source.quota_left(bucket or self.principal.user, limits)

    def account(self, spec: RecordSpec, rows: list[KeyRow], *, held: bool) -> Accounting:
        engine = self._source.engine
        role = self._role(engine) if engine is not None else None
        if engine is None or role is None:  # the policy changed under the statement
            return Accounting(0, error=self._not_a_member()) if held else Accounting(len(rows))
        user, book = self.principal.user, self._source.records
        decoys = engine.policy.decoys if role.decoys else {}
        if decoys and held:
            for row in rows:
                for table, key in zip(spec.tables, row, strict=True):
                    if key is not None and key in decoys.get(table, ()):
                        return Accounting(0, decoy=table)
        budgets = _budgets(role)
        if budgets and held and not book.ready(user):  # forgotten meanwhile: fail closed
            return Accounting(0, error=_records_unavailable())
        named = [_record_ids(spec, row) for row in rows] if budgets else []
        out = Accounting(len(rows))
        if budgets:
            fits, stop = book.admit(user, budgets, named)
            if stop is not None and held:
                name, _, allowed = stop
                out.events.append(
                    (
                        "records.exhausted",
                        {"window": name, "budget": allowed, "rows_seen": len(rows)},
                    )
                )
                if not role.limits or role.limits.on_exceed == "reject":
                    return Accounting(0, error=_over_records(name, allowed), events=out.events)
                out.deliver = fits
                out.notice = (
                    f"pgwarden: result truncated to {fits} rows: the records_per_{name} "
                    "budget of your role is used up"
                )
        observed = [
            (
                table,
                tuple(k for row in rows[: out.deliver] if (k := row[i]) is not None),
                spec.lookup,
                spec.paging,
            )
            for i, table in enumerate(spec.tables)
        ]
        for alert in book.watch(user, role.name, role.alerts, observed):
            out.events.append(
                (
                    "enumeration.alert",
                    {
                        "kind": alert.kind,
                        "table": alert.table,
                        "count": alert.count,
                        "threshold": alert.threshold,
                        "window_s": alert.window_s,
                        "action": "lock" if alert.lock else "alert",
                    },
                )
            )
            if alert.lock and held:
                out.lock = alert.kind
        if out.lock:
            out.deliver = 0
            return out
        book.shown(user, named[: out.deliver], budgets=bool(budgets))
        return out

    def lock(self, reason: str, details: Mapping[str, Any]) -> None:
        """Lock the user in every process (a decoy touched, an alert with action: lock)."""
        self._source.records.lock(self.principal.user, reason, details)

    def _stale(
        self,
        engine: Engine,
        role: Role,
        prepared: Prepared | None,
        window: BreakGlassWindow | None,
    ) -> PgWardenError | None:
        """Why a prepared statement may not be bound now, or None."""
        if prepared is not None and _window_of(prepared.policy_version) != _tag(window):
            return PolicyRefusal(
                "pgwarden: break-glass opened or ended since this statement was prepared; "
                "Bind refused",
                hint="Prepare the statement again (send it again, or reconnect).",
            )
        if prepared is None or not self._still_holds(
            engine, role, prepared, self.principal.user, window
        ):
            return PolicyRefusal(
                "pgwarden: the policy changed since this statement was prepared; Bind refused",
                hint="Prepare the statement again (reconnecting does it for most drivers).",
            )
        return None

    @staticmethod
    def _still_holds(
        engine: Engine, role: Role, prepared: Prepared, user: str, window: BreakGlassWindow | None
    ) -> bool:
        """Prepared under this policy, or the current one makes the very same text."""
        if prepared.policy_version == engine.policy.version_hash + _tag(window):
            return True
        again = engine.evaluate(
            role.name, prepared.sql, extended=True, user=user, break_glass=window is not None
        )
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


def _tag(window: BreakGlassWindow | None) -> str:
    """What a statement's policy_version says of the break-glass window it was checked in."""
    return "" if window is None else f"{_WINDOW_TAG}{window.serial}"


def _window_of(policy_version: str) -> str:
    at = policy_version.find(_WINDOW_TAG)
    return policy_version[at:] if at >= 0 else ""


def _budgets(role: Role) -> tuple[tuple[str, float, int], ...]:
    return role.limits.record_budgets() if role.limits is not None else ()


def _record_ids(spec: RecordSpec, row: KeyRow) -> tuple[int, ...]:
    """The records one row shows: one per key column, plus one unnamed when unkeyed."""
    ids = [record_id(table, key) for table, key in zip(spec.tables, row, strict=True)]
    if spec.unkeyed:
        ids.append(record_id("", None))
    return tuple(ids)


def record_id(table: str, key: str | None) -> int:
    """The ledger's name for a record: a signed 64-bit digest (a fresh one for None)."""
    if key is None:
        return secrets.randbits(63)  # an unnamed record: new every time
    digest = hashlib.blake2b(f"{table}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def locked_error(user: str) -> PgWardenError:
    return PolicyRefusal(
        f'pgwarden: user "{user}" is locked; contact the security team',
        hint="An operator unlocks it with `pgwarden quota unlock USER`.",
        sqlstate="42501",
    )


def _records_unavailable() -> PgWardenError:
    return PgWardenError(
        "pgwarden: the ledger is unreachable; statement refused",
        hint="Statements counted against a records budget need the ledger; try again shortly.",
        sqlstate="08006",
    )


def _over_records(window: str, budget: int) -> PgWardenError:
    words = {"day": "24 hours", "7d": "7 days", "30d": "30 days"}[window]
    return PgWardenError(
        f"pgwarden: statement would show more distinct records than the {budget} your role "
        f"may see in {words} (records_per_{window}); no rows delivered",
        hint="Records you were already shown in that window stay free to read again; "
        "`pgwarden quota show` (ops) tells the counts.",
        sqlstate="53400",
    )


_NOT_READY = Refuse(
    PolicyRefusal(
        "pgwarden: the schema of the upstream database is not loaded yet; statement refused",
        hint="pgwarden reads the upstream catalog at startup and retries; try again shortly.",
        sqlstate="57P03",
    )
)


class ShadowGate:
    """A role in shadow mode: judged by the engine, enforced not at all.

    Every statement passes through untouched (no rewrite, cap, quota charge or
    backstop: the session is not guarded) and its Audit carries the verdict
    enforcement would have given. The policy is read afresh for every statement:
    once the user's role is no longer this role in shadow mode (a reload switched it
    to enforce, or moved the user), statements and Binds are refused until the user
    reconnects and gets the enforcing gate.
    """

    __slots__ = ("_source", "forbidden", "principal")

    def __init__(self, principal: Principal, source: EngineSource) -> None:
        self.principal = principal
        self._source = source
        self.forbidden: frozenset[tuple[int, int]] = frozenset()

    def check_statement(self, sql: str, *, extended: bool) -> Verdict:
        engine = self._source.engine
        if engine is None:  # enforcement would refuse (57P03); shadow mode lets it run
            audit = passthrough_audit(sql, extended)
            return Allow(audit=replace(audit, shadow=_shadow_refusal(_NOT_READY.error)))
        ended = self._ended(engine)
        if ended is not None:
            return Refuse(ended, audit=Audit(fingerprint(sql), "", extended=extended))
        result = engine.evaluate(
            self.principal.role, sql, extended=extended, user=self.principal.user
        )
        if result.unknown_relation:
            self._source.schema_miss()
        shadow = _shadow_allow(result) if result.allowed else _shadow_refusal(result)
        kinds = ",".join(result.kinds)
        return Allow(audit=Audit(fingerprint(sql), kinds, result.tables, extended, shadow))

    def rows_returned(self, count: int) -> None:
        return None

    def charge(self, rows: int, bucket: str = "") -> None:
        return None  # shadow mode charges no quota

    def account(self, spec: RecordSpec, rows: list[KeyRow], *, held: bool) -> Accounting:
        return Accounting(len(rows))  # never called: shadow statements carry no record keys

    def lock(self, reason: str, details: Mapping[str, Any]) -> None:
        return None

    def check_bind(self, prepared: Prepared | None, *, counted: bool) -> int | PgWardenError | None:
        engine = self._source.engine
        return None if engine is None else self._ended(engine)

    def _ended(self, engine: Engine) -> PgWardenError | None:
        """The refusal once the policy no longer puts this user in this role's shadow mode."""
        role = engine.policy.role_of(self.principal.user)
        if role is not None and role.name == self.principal.role and role.mode == "shadow":
            return None
        return PolicyRefusal(
            f'pgwarden: the policy changed: role "{self.principal.role}" is no longer in '
            "shadow mode for this user; statement refused",
            hint="Reconnect: the policy is enforced from your next login.",
        )


def _shadow_allow(result: Evaluation) -> tuple[tuple[str, object], ...]:
    fields: list[tuple[str, object]] = [("shadow_verdict", "allow")]
    if result.cap is not None:
        fields.append(("shadow_cap", result.cap))
    if result.masked:
        fields.append(("shadow_masked", list(result.masked)))
    return tuple(fields)


def _shadow_refusal(refusal: Evaluation | PgWardenError) -> tuple[tuple[str, object], ...]:
    return (
        ("shadow_verdict", "refuse"),
        ("shadow_reason", refusal.message),
        ("shadow_sqlstate", refusal.sqlstate),
    )


def gate_for(principal: Principal, source: EngineSource) -> Gate:
    """The gate for a principal: pass-through when unrestricted, else the engine."""
    if principal.shadow:
        return ShadowGate(principal, source)
    if principal.unrestricted:
        return PassThroughGate(principal, lambda: source.policy)
    return PolicyGate(principal, source)
