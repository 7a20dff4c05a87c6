"""The extended-protocol pipeline: which replies the server still owes.

Strategy: every client message forwarded upstream that the server answers
pushes one expectation onto a FIFO; server messages pop them. This is what
lets pgwarden answer a refused statement *in order* (its ErrorResponse is
queued behind the replies to earlier pipelined messages and released the
moment they are done, so a client waiting on Flush is never stalled), know
when a session is idle, and attribute rows to the statement that produced them.

The state machine is a table: (expectation at the head, server message type)
-> step. A pair missing from the table is a protocol violation by the server;
pgwarden never guesses, it closes the session. Expectations and steps are
plain ints because this runs for every server message.

Rules, as the server applies them:
* After an ErrorResponse to an extended-protocol message the server discards
  everything until Sync, so the expectations up to the next Sync are dropped
  (including pending synthetic errors: the client sees one error per batch).
* During COPY FROM STDIN the server ignores Sync and Flush. Whether a Query
  or Execute starts a COPY is only known when CopyInResponse arrives, and a
  client may already have sent its data, CopyDone and more behind it. So the
  client's CopyDone/CopyFail leave a COPY_END marker in the queue while a
  Query or Execute is in flight; on CopyInResponse the Syncs between the head
  and the first marker are the ones the server ignores. Without a marker the
  client has not finished: its Syncs are not expected until CopyDone/CopyFail.
* CopyData/CopyDone/CopyFail are always forwarded: outside COPY the server
  ignores them, inside they are the data.
* A refusal aborts the transaction, as an error does in PostgreSQL: with it
  pgwarden sends the server a Parse that cannot succeed (ABSORB; plus its own
  Sync, ABSORB_SYNC, for the simple protocol), so an open transaction block
  becomes failed (25P02 until ROLLBACK, COMMIT rolls back) and an implicit
  one rolls back. The server's answers to those are swallowed (`swallow`);
  the client sees pgwarden's refusal, then the server's ReadyForQuery status.
"""

from __future__ import annotations

from collections import deque

from proxy.errors import ProtocolViolation
from proxy.wire import backend as be

# Expectations (what the message at the head of the queue is waiting for).
PARSE = 1  # ParseComplete
BIND = 2  # BindComplete
CLOSE = 3  # CloseComplete
DESCRIBE_STATEMENT = 4  # ParameterDescription, then RowDescription or NoData
DESCRIBE_PORTAL = 5  # RowDescription or NoData
EXECUTE = 6  # rows, then CommandComplete / EmptyQuery / PortalSuspended
SYNC = 7  # ReadyForQuery
QUERY = 8  # everything up to ReadyForQuery
SYNTHETIC = 9  # a reply pgwarden makes itself (a refusal)
COPY_END = 10  # not a reply: where the client ended a COPY it pipelined ahead
ABSORB = 11  # ErrorResponse to pgwarden's own failing Parse (swallowed)
ABSORB_SYNC = 12  # ReadyForQuery to pgwarden's own Sync (swallowed, status kept)

_NAMES = {
    PARSE: "Parse",
    BIND: "Bind",
    CLOSE: "Close",
    DESCRIBE_STATEMENT: "Describe",
    DESCRIBE_PORTAL: "Describe",
    EXECUTE: "Execute",
    SYNC: "Sync",
    QUERY: "Query",
    SYNTHETIC: "refusal",
    COPY_END: "CopyDone",
    ABSORB: "refusal",
    ABSORB_SYNC: "refusal",
}

# Steps.
STAY = 0  # part of the reply; nothing to do
POP = 1  # completes the head
POP_STATEMENT = 2  # completes an Execute: a statement's rows are all out
QUERY_STATEMENT = 3  # one statement of a simple Query is done (CommandComplete/Error)
QUERY_DONE = 4  # ReadyForQuery ends the simple Query
TO_PORTAL = 5  # ParameterDescription: RowDescription/NoData still to come
COPY_IN_QUERY = 6
COPY_IN_EXECUTE = 7
EXTENDED_ERROR = 8  # the server will discard until Sync
ABSORBED = 9  # the answer to pgwarden's own message: swallow it

_ASYNC = (be.NOTICE_RESPONSE, be.NOTIFICATION, be.PARAMETER_STATUS)
_EXTENDED = (PARSE, BIND, CLOSE, DESCRIBE_STATEMENT, DESCRIBE_PORTAL, EXECUTE)


def _table() -> dict[int, int]:
    t: dict[int, int] = {}

    def on(head: int, mtypes: bytes | tuple[int, ...], step: int) -> None:
        for m in mtypes:
            t[(head << 8) | m] = step

    for head in (*_EXTENDED, SYNC, QUERY):
        on(head, _ASYNC, STAY)
    for head in _EXTENDED:
        on(head, b"E", EXTENDED_ERROR)
    on(PARSE, b"1", POP)
    on(BIND, b"2", POP)
    on(CLOSE, b"3", POP)
    on(DESCRIBE_STATEMENT, b"t", TO_PORTAL)
    on(DESCRIBE_PORTAL, b"Tn", POP)
    on(EXECUTE, b"CIs", POP_STATEMENT)
    on(EXECUTE, b"dcH", STAY)
    on(EXECUTE, b"G", COPY_IN_EXECUTE)
    on(SYNC, b"Z", POP)
    on(SYNC, b"E", STAY)  # e.g. a deferred constraint failing at the implicit COMMIT
    on(QUERY, b"TDdcHI", STAY)
    on(QUERY, b"CE", QUERY_STATEMENT)
    on(QUERY, b"G", COPY_IN_QUERY)
    on(QUERY, b"Z", QUERY_DONE)
    on(ABSORB, _ASYNC, STAY)
    on(ABSORB, b"E", ABSORBED)
    on(ABSORB_SYNC, _ASYNC, STAY)
    on(ABSORB_SYNC, b"Z", ABSORBED)
    return t


STEPS = _table()


class Synthetic:
    """A reply pgwarden owes the client; `ready` appends ReadyForQuery."""

    __slots__ = ("message", "ready")

    def __init__(self, message: bytes, *, ready: bool) -> None:
        self.message = message
        self.ready = ready


class Pipeline:
    """Expected replies, in order, plus the transaction and COPY state."""

    __slots__ = (
        "_payloads",
        "caps",
        "copy_in",
        "discarding",
        "done",
        "queue",
        "status",
        "swallow",
        "tracking",
    )

    def __init__(self) -> None:
        # Public for the relay's fast path, which pops the common replies
        # itself (STEPS tells which); everything else goes through on_server.
        self.queue: deque[int] = deque()
        self._payloads: deque[Synthetic] = deque()
        self.status = b"I"  # transaction status of the last ReadyForQuery
        self.copy_in = False  # the server reads COPY data and the client has not ended it
        self.discarding = False  # server failed an extended message; no Sync queued yet
        # With `tracking` (restricted sessions), one entry per QUERY/EXECUTE in the
        # queue, in the same order: the row cap of that statement or portal, or None.
        self.tracking = False
        self.caps: deque[object] = deque()
        self.done = 0  # Queries and Executes answered (or dropped after an error) so far
        self.swallow = False  # the message just accounted for is not the client's

    @property
    def idle(self) -> bool:
        self.drop_markers()
        return not self.queue and not self.copy_in

    def drop_markers(self) -> None:
        """COPY_END markers that reached the head matched no COPY: forget them."""
        q = self.queue
        while q and q[0] == COPY_END:
            q.popleft()

    @property
    def has_synthetic(self) -> bool:
        return bool(self._payloads)

    @property
    def pending(self) -> int:
        return len(self.queue)

    def sent(self, kind: int) -> None:
        """A client message the server will answer was forwarded."""
        self.queue.append(kind)

    def sent_statement(self, kind: int, cap: object) -> None:
        """A Query or Execute was forwarded; `cap` rides along (tracking sessions)."""
        self.queue.append(kind)
        if self.tracking:
            self.caps.append(cap)

    def capped(self) -> bool:
        """Some statement in flight has a row cap."""
        return any(c is not None for c in self.caps)

    def sent_sync(self) -> None:
        self.discarding = False
        self.queue.append(SYNC)

    @property
    def unsynced(self) -> bool:
        """An extended-protocol batch is open: its Sync has not been sent yet."""
        for kind in reversed(self.queue):
            if kind in (SYNC, QUERY, ABSORB_SYNC):
                return False
            if kind in _EXTENDED or kind == ABSORB:
                return True
        return False

    def refuse(self, message: bytes, *, ready: bool, aborted: bool = True) -> bytes:
        """Queue a synthetic reply (behind the abort pgwarden sent); return what can go now.

        With `aborted`, the caller has sent the failing Parse, and with `ready` its
        Sync too, just before.
        """
        if aborted:
            self.queue.append(ABSORB)
            if ready:
                self.queue.append(ABSORB_SYNC)
        self.queue.append(SYNTHETIC)
        self._payloads.append(Synthetic(message, ready=ready))
        return self._release()

    def on_server(self, mtype: int, status: bytes = b"") -> tuple[bool, bytes]:
        """Account for one server message other than DataRow.

        Returns (a statement completed, bytes to send after this message).
        `status` is the transaction status byte of a ReadyForQuery.
        """
        q = self.queue
        self.drop_markers()
        if not q:
            if mtype in _ASYNC or mtype == be.ERROR_RESPONSE:  # e.g. FATAL admin shutdown
                return False, b""
            raise ProtocolViolation(f"pgwarden: unexpected message {chr(mtype)!r} from server")
        step = STEPS.get((q[0] << 8) | mtype)
        if step is None:
            raise ProtocolViolation(
                f"pgwarden: unexpected message {chr(mtype)!r} from server "
                f"(awaiting the reply to {_NAMES[q[0]]})"
            )
        if step == STAY:
            return False, b""
        if status:
            self.status = status
        return self._step(step)

    def _step(self, step: int) -> tuple[bool, bytes]:
        q = self.queue
        if step in (POP, POP_STATEMENT):
            if q.popleft() == EXECUTE:
                self.done += 1
                if self.tracking:
                    self.caps.popleft()
            return step == POP_STATEMENT, self._release() if self._payloads else b""
        if step == QUERY_STATEMENT:
            self.copy_in = False
            return True, b""
        if step == QUERY_DONE:
            q.popleft()
            self.done += 1
            if self.tracking:
                self.caps.popleft()
            self.copy_in = False
            return False, self._release() if self._payloads else b""
        if step == ABSORBED:
            q.popleft()
            self.swallow = True
            return False, self._release() if self._payloads else b""
        if step == TO_PORTAL:
            q[0] = DESCRIBE_PORTAL
        elif step in (COPY_IN_QUERY, COPY_IN_EXECUTE):
            self._enter_copy_in()
        else:
            return self._on_error()
        return False, b""

    def client_copy_end(self) -> None:
        """The client sent CopyDone or CopyFail."""
        if self.copy_in:
            self.copy_in = False
        elif QUERY in self.queue or EXECUTE in self.queue:  # a COPY may yet start
            self.queue.append(COPY_END)

    def _on_error(self) -> tuple[bool, bytes]:
        self.copy_in = False
        q = self.queue
        head = q[0]
        while q and q[0] not in (SYNC, ABSORB_SYNC):  # the server ignores all but Sync now,
            kind = q.popleft()
            if kind == SYNTHETIC:  # so a refusal queued behind is dropped too
                self._payloads.popleft()
            elif kind in (EXECUTE, QUERY):
                self.done += 1
                if self.tracking:
                    self.caps.popleft()
        if not q:
            self.discarding = True
        return head == EXECUTE, b""

    def _enter_copy_in(self) -> None:
        # Syncs between the COPY's Query/Execute and the client's CopyDone
        # reach the server in COPY mode, where it ignores them.
        q = self.queue
        head = q.popleft()
        kept: list[int] = []
        ended = False
        while q:
            kind = q.popleft()
            if kind == COPY_END:
                ended = True
                break
            if kind != SYNC:
                kept.append(kind)
        q.extendleft(reversed([head, *kept]))
        self.copy_in = not ended

    def _release(self) -> bytes:
        """Emit synthetic replies that are now at the head of the queue."""
        out = b""
        q = self.queue
        while q and q[0] == SYNTHETIC:
            q.popleft()
            payload = self._payloads.popleft()
            out += payload.message
            if payload.ready:
                out += be.ready_for_query(self.status)
        return out
