"""The extended-protocol pipeline: which replies the server still owes.

Strategy: every client message forwarded upstream that the server answers
pushes one expectation onto a FIFO; server messages pop them. This is what
lets pgwarden answer a refused statement *in order* (its ErrorResponse is
queued behind the replies to earlier pipelined messages and released the
moment they are done, so a client waiting on Flush is never stalled), know
when a session is idle, and attribute rows to the statement that produced them.

Rules, as the server applies them:
* After an ErrorResponse to an extended-protocol message the server discards
  everything until Sync, so the expectations up to the next Sync are dropped
  (including pending synthetic errors: the client sees one error per batch).
* During COPY FROM STDIN the server ignores Sync and Flush; Syncs the client
  pipelined behind the COPY's Execute are therefore not expected.
* A reply that matches no expectation is a protocol violation by the server:
  pgwarden never guesses, it closes the session.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from proxy.errors import ProtocolViolation
from proxy.wire import backend as be


class Expect(IntEnum):
    PARSE = 1
    BIND = 2
    CLOSE = 3
    DESCRIBE_STATEMENT = 4  # ParameterDescription, then RowDescription or NoData
    DESCRIBE_PORTAL = 5  # RowDescription or NoData
    EXECUTE = 6  # rows, then CommandComplete / EmptyQuery / PortalSuspended
    SYNC = 7  # ReadyForQuery
    QUERY = 8  # everything up to ReadyForQuery
    SYNTHETIC = 9  # a reply pgwarden makes itself (a refusal)


# Which server message completes which expectation (besides ErrorResponse).
_COMPLETES: dict[Expect, frozenset[int]] = {
    Expect.PARSE: frozenset({be.PARSE_COMPLETE}),
    Expect.BIND: frozenset({be.BIND_COMPLETE}),
    Expect.CLOSE: frozenset({be.CLOSE_COMPLETE}),
    Expect.DESCRIBE_PORTAL: frozenset({be.ROW_DESCRIPTION, be.NO_DATA}),
    Expect.EXECUTE: frozenset({be.COMMAND_COMPLETE, be.EMPTY_QUERY, be.PORTAL_SUSPENDED}),
}
_ASYNC = frozenset({be.NOTICE_RESPONSE, be.NOTIFICATION, be.PARAMETER_STATUS})
_IN_EXECUTE = frozenset({be.COPY_DATA, be.COPY_DONE, be.COPY_IN, be.COPY_OUT})
_EXTENDED = frozenset(
    {
        Expect.PARSE,
        Expect.BIND,
        Expect.CLOSE,
        Expect.DESCRIBE_STATEMENT,
        Expect.DESCRIBE_PORTAL,
        Expect.EXECUTE,
    }
)


class Synthetic:
    """A reply pgwarden owes the client; `ready` appends ReadyForQuery."""

    __slots__ = ("message", "ready")

    def __init__(self, message: bytes, *, ready: bool) -> None:
        self.message = message
        self.ready = ready


class Pipeline:
    """Expected replies, in order, plus the transaction and COPY state."""

    __slots__ = ("_payloads", "_q", "copy_in", "discarding", "status")

    def __init__(self) -> None:
        self._q: deque[Expect] = deque()
        self._payloads: deque[Synthetic] = deque()
        self.status = b"I"  # transaction status of the last ReadyForQuery
        self.copy_in = False  # the server is reading COPY data from the client
        self.discarding = False  # server failed an extended message; no Sync queued yet

    @property
    def idle(self) -> bool:
        return not self._q and not self.copy_in

    @property
    def pending(self) -> int:
        return len(self._q)

    def sent(self, kind: Expect) -> None:
        """A client message the server will answer was forwarded."""
        self._q.append(kind)

    def sent_sync(self) -> None:
        self.discarding = False
        self._q.append(Expect.SYNC)

    def refuse(self, message: bytes, *, ready: bool) -> bytes:
        """Queue a synthetic reply; return what can be sent right now."""
        self._q.append(Expect.SYNTHETIC)
        self._payloads.append(Synthetic(message, ready=ready))
        return self._release()

    def on_server(self, mtype: int) -> tuple[bool, bytes]:
        """Account for one server message (not DataRow).

        Returns (completes_statement, bytes to send after it).
        """
        if mtype in _ASYNC:
            return False, b""
        q = self._q
        if not q:
            if mtype == be.ERROR_RESPONSE:  # FATAL from the server, e.g. admin shutdown
                return False, b""
            raise ProtocolViolation(f"pgwarden: unexpected message {chr(mtype)!r} from server")
        head = q[0]
        if head is Expect.QUERY:
            return self._in_query(mtype)
        if mtype == be.ERROR_RESPONSE:
            return self._on_error(head)
        if mtype == be.READY_FOR_QUERY:
            return self._ready(head)
        return self._extended(head, mtype)

    def ready_status(self, status: bytes) -> None:
        self.status = status

    # --- internals -------------------------------------------------------

    def _in_query(self, mtype: int) -> tuple[bool, bytes]:
        if mtype == be.READY_FOR_QUERY:
            self._q.popleft()
            self.copy_in = False
            return False, self._release()
        if mtype == be.COPY_IN:
            self.copy_in = True
        elif mtype in (be.COMMAND_COMPLETE, be.ERROR_RESPONSE):
            self.copy_in = False
            return True, b""
        elif mtype == be.COPY_BOTH:
            raise ProtocolViolation("pgwarden: COPY BOTH (replication) is not supported")
        return False, b""

    def _on_error(self, head: Expect) -> tuple[bool, bytes]:
        self.copy_in = False
        if head is Expect.SYNC:  # e.g. a deferred constraint failing at the implicit COMMIT
            return False, b""
        q = self._q
        while q and q[0] is not Expect.SYNC:
            if q.popleft() is Expect.SYNTHETIC:
                payload = self._payloads.popleft()
                if payload.ready:  # a refused simple Query: its own batch
                    q.appendleft(Expect.SYNTHETIC)
                    self._payloads.appendleft(payload)
                    break
        if not q:
            self.discarding = True
        return head is Expect.EXECUTE, b""

    def _ready(self, head: Expect) -> tuple[bool, bytes]:
        if head is not Expect.SYNC:
            raise ProtocolViolation("pgwarden: ReadyForQuery from server out of order")
        self._q.popleft()
        return False, self._release()

    def _extended(self, head: Expect, mtype: int) -> tuple[bool, bytes]:
        if head is Expect.DESCRIBE_STATEMENT and mtype == be.PARAMETER_DESCRIPTION:
            self._q[0] = Expect.DESCRIBE_PORTAL
            return False, b""
        if head is Expect.EXECUTE and mtype in _IN_EXECUTE:
            if mtype == be.COPY_IN:
                self._enter_copy_in()
            return False, b""
        if mtype not in _COMPLETES.get(head, ()):
            raise ProtocolViolation(
                f"pgwarden: unexpected message {chr(mtype)!r} from server (awaiting {head.name})"
            )
        self._q.popleft()
        return head is Expect.EXECUTE, self._release()

    def _enter_copy_in(self) -> None:
        # Syncs pipelined behind this Execute reach the server while it is in
        # COPY mode, where it ignores them: they will not be answered.
        self.copy_in = True
        head = self._q.popleft()
        while self._q and self._q[0] is Expect.SYNC:
            self._q.popleft()
        self._q.appendleft(head)

    def _release(self) -> bytes:
        """Emit synthetic replies that are now at the head of the queue."""
        out = b""
        q = self._q
        while q and q[0] is Expect.SYNTHETIC:
            q.popleft()
            payload = self._payloads.popleft()
            out += payload.message
            if payload.ready:
                out += be.ready_for_query(self.status)
        return out

    def copy_finished(self) -> None:
        """The client sent CopyDone or CopyFail."""
        self.copy_in = False
