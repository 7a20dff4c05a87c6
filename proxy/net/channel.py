"""The control channel between the supervisor and one worker (`--workers N`).

Strategy: a stream socket (a socketpair made by the supervisor) carrying frames
of a 4-byte big-endian length and an orjson object. Both ends run the same
`Channel`: a message with an "op" is a request for the other end's handler; if
it also has an "id", the handler's answer goes back as {"reply": id, ...}, which
resolves the asker's future. Handlers may be coroutines; they run in their own
tasks so a slow one (a health probe) never holds up the others. A frame larger
than MAX_FRAME or not an object ends the channel: both ends are our own code,
so that is a bug, and the owner is told through `closed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

_HEADER = struct.Struct("!I")
MAX_FRAME = 32 * 1024 * 1024  # a metrics exposition is the largest message

Message = dict[str, Any]
Handler = Callable[[Message], Message | Awaitable[Message | None] | None]


class ChannelClosed(Exception):
    """The other end went away before it answered."""


class Channel:
    """One end of a control socket: one-way messages and requests with answers."""

    def __init__(self, sock: socket.socket, handle: Handler) -> None:
        self._sock = sock
        self._handle = handle
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writer: asyncio.StreamWriter | None = None
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()

    async def run(self) -> None:
        """Read and dispatch frames until the other end closes; then fail every waiter."""
        try:
            reader, self._writer = await asyncio.open_connection(sock=self._sock)
        except OSError:
            self._end()
            return
        self.opened.set()
        try:
            while (message := await _read_frame(reader)) is not None:
                self._dispatch(message)
        except (OSError, ValueError, asyncio.IncompleteReadError, orjson.JSONDecodeError):
            pass
        finally:
            self._end()

    def send(self, message: Message) -> None:
        """Send a one-way message; dropped silently once the channel has closed."""
        if self._writer is None or self.closed.is_set():
            return
        body = orjson.dumps(message)
        self._writer.write(_HEADER.pack(len(body)) + body)

    async def ask(self, message: Message, timeout: float) -> Message:  # noqa: ASYNC109
        """Send a request and wait for its answer; ChannelClosed or TimeoutError otherwise."""
        if self._writer is None or self.closed.is_set():
            raise ChannelClosed
        ident = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            self.send({**message, "id": ident})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(ident, None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
        self._end()

    def _dispatch(self, message: Message) -> None:
        reply = message.get("reply")
        if reply is not None:
            future = self._waiting.get(reply)
            if future is not None and not future.done():
                future.set_result(message)
            return
        try:
            answer = self._handle(message)
        except Exception as exc:  # noqa: BLE001  # a failing handler answers, never kills the channel
            answer = {"error": type(exc).__name__}
        if inspect.isawaitable(answer):
            task = asyncio.ensure_future(self._answer_later(message.get("id"), answer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._answer(message.get("id"), answer)

    async def _answer_later(self, ident: object, answer: Awaitable[Message | None]) -> None:
        try:
            result = await answer
        except Exception as exc:  # noqa: BLE001  # see _dispatch
            result = {"error": type(exc).__name__}
        self._answer(ident, result)

    def _answer(self, ident: object, answer: Message | None) -> None:
        if ident is not None:
            self.send({**(answer or {}), "reply": ident})

    def _end(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed())
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.close()


async def _read_frame(reader: asyncio.StreamReader) -> Message | None:
    try:
        head = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (size,) = _HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError("control frame too large")
    message = orjson.loads(await reader.readexactly(size))
    if not isinstance(message, dict):
        raise ValueError("control frame is not an object")  # noqa: TRY004 - ends the channel
    return message
