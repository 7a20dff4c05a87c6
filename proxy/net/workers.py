"""`pgwarden serve --workers N`: a supervisor and N worker processes on one port.

Strategy:
* The supervisor starts N workers: `python -m proxy serve` again with the same
  arguments, told their index and their end of a control socketpair through
  the environment (WORKER_ENV). Each worker is a whole pgwarden (its own event
  loop, schema snapshot, verdict cache, ledger pool) listening on the same
  host:port with SO_REUSEPORT, and the kernel spreads new connections over
  them. The supervisor never touches client traffic.
* It restarts a worker that dies (worker.exited, then worker.started; at once
  after a long life, with a growing pause up to RESTART_MAX_S while one keeps
  dying young), forwards SIGTERM and SIGHUP, and turns SIGINT into SIGTERM (a
  Ctrl-C in a terminal reaches every process of the group; workers ignore it,
  so a single Ctrl-C drains and a second one forces the exit, as with one
  process). If a worker of the first start cannot start (exit code 2: port
  taken, bad configuration), everything stops with exit code 2.
* What spans workers lives here, reached through the control channel:
  - connections per user: max_connections_per_user counts a user's
    connections on every worker. A worker asks before it opens the upstream
    connection and tells when the connection ends; a dead worker's
    connections are forgotten with it.
  - cancel requests: a worker's BackendKeyData pids carry its index in bits
    24-30 (`key_pid`), so a CancelRequest the kernel hands to another worker is
    passed on to the worker that owns the session.
  - quota charges: each charge is relayed to the other workers at once, so a
    user's sessions on several workers see each other's rows within
    milliseconds instead of at the next ledger read (the ledger stays the
    record and the source after a restart). Records shown (for distinct-record
    budgets) and locks are relayed the same way.
  - /metrics and /healthz on metrics_listen: the supervisor asks every worker
    for its series and its health and answers with the sum (healthy only when
    every worker is up and says so).
* A worker whose supervisor is gone (channel closed) drains and exits: workers
  never outlive the process that ops manage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy import audit
from proxy.errors import ConfigError
from proxy.net.channel import Channel, ChannelClosed, Message
from proxy.net.metrics import Metrics
from proxy.settings import Settings

WORKER_ENV = "PGWARDEN_WORKER"  # "INDEX:FD" in a worker's environment
INDEX_SHIFT = 24  # a worker's pids are INDEX << 24 | 1 .. 2**24 - 1
RESTART_MAX_S = 10.0
LONG_LIFE_S = 10.0  # a worker that lived this long is restarted at once
ASK_TIMEOUT_S = 5.0


def key_pid(index: int | None) -> int:
    """A random BackendKeyData pid; under a supervisor, it names the worker `index`."""
    if index is None:
        return secrets.randbelow(0x7FFFFFFF) + 1
    return (index << INDEX_SHIFT) | (secrets.randbelow((1 << INDEX_SHIFT) - 1) + 1)


def worker_of(pid: int) -> int:
    return pid >> INDEX_SHIFT


def worker_identity() -> tuple[int, int] | None:
    """(index, control fd) when this process is a worker, from WORKER_ENV."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, fd = value.partition(":")
    return int(index), int(fd)


# --- the worker's end ------------------------------------------------------------------


class SupervisorLink:
    """A worker's line to its supervisor (see the module docstring for what crosses it).

    `handlers` answer the supervisor's requests: metrics, health, cancel (a
    CancelRequest another worker received for one of our sessions), charge
    (another worker's quota charge), lock and seen (another worker locked a user,
    or showed a user records). `closed` is set when the supervisor goes.
    """

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self._sock = socket.socket(fileno=fd)
        self._channel: Channel | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, handle: Any) -> asyncio.Event:
        self._channel = Channel(self._sock, handle)
        self._task = asyncio.ensure_future(self._channel.run())
        opened = asyncio.ensure_future(self._channel.opened.wait())
        await asyncio.wait({opened, self._task}, return_when=asyncio.FIRST_COMPLETED)
        opened.cancel()
        return self._channel.closed

    def ready(self) -> None:
        self._send({"op": "ready", "pid": os.getpid()})

    async def acquire(self, user: str, limit: int) -> bool:
        """May `user` open one more connection (counted over every worker)?"""
        assert self._channel is not None
        try:
            answer = await self._channel.ask({"op": "acquire", "user": user, "limit": limit}, 5.0)
        except (ChannelClosed, TimeoutError):
            return False  # fail closed: no answer, no connection
        return answer.get("ok") is True

    def release(self, user: str) -> None:
        self._send({"op": "release", "user": user})

    def forward_cancel(self, pid: int, secret: bytes) -> None:
        self._send({"op": "cancel", "pid": pid, "secret": secret.hex()})

    def charge(self, user: str, rows: int) -> None:
        self._send({"op": "charge", "user": user, "rows": rows})

    def lock(self, user: str) -> None:
        """`user` was locked here (a decoy, a locking alert): every other worker ends them."""
        self._send({"op": "lock", "user": user})

    def seen(self, user: str, records: dict[int, float]) -> None:
        """`user` was shown these records (digest -> when): for the others' budgets."""
        self._send({"op": "seen", "user": user, "records": [[r, t] for r, t in records.items()]})

    def _send(self, message: Message) -> None:
        if self._channel is not None:
            self._channel.send(message)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._task is not None:
            self._task.cancel()


# --- the supervisor --------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    channel: Channel
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    users: Counter[str] = field(default_factory=Counter)  # connections per user


class Supervisor:
    """Starts, watches and restarts the workers; answers for all of them."""

    def __init__(self, settings: Settings, command: Sequence[str]) -> None:
        self.settings = settings
        self.command = list(command)
        self.log = audit.get_logger()
        self.workers: dict[int, _Worker] = {}
        self.metrics = Metrics()
        self.metrics.remote = self._expositions
        self.metrics.health = self._health
        self._live = self._define_series()
        self._stopping = False
        self._forced = False
        self._failed_start: int | None = None  # exit code of a worker that could not start
        self._serving = False  # every worker of the first start said ready
        self._all_ready = asyncio.Event()
        self._quick_deaths: dict[int, int] = {}
        self._watchers: set[asyncio.Task[Any]] = set()
        self._done = asyncio.Event()

    def _define_series(self) -> Any:
        from prometheus_client import Counter as PromCounter  # noqa: PLC0415
        from prometheus_client import Gauge  # noqa: PLC0415

        self._restarts = PromCounter(
            "pgwarden_worker_restarts",
            "Workers restarted after they exited unexpectedly.",
            registry=self.metrics.registry,
        )
        return Gauge(
            "pgwarden_workers_up", "Worker processes running now.", registry=self.metrics.registry
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop_signal)
        loop.add_signal_handler(signal.SIGINT, self._stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        count = self.settings.workers
        for index in range(count):
            await self._spawn(index)
        ready = asyncio.ensure_future(self._all_ready.wait())
        failed = asyncio.ensure_future(self._done.wait())
        waits: set[asyncio.Future[Any]] = {ready, failed}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        if self._failed_start is not None:
            ready.cancel()
            await self._stop_all(signal.SIGTERM)
            return self._failed_start
        self._serving = True
        metrics_server = await self._serve_metrics()
        s = self.settings
        self.log.info(
            "supervisor.started",
            workers=count,
            listen=f"{s.listen_host}:{s.listen_port}",
            pid=os.getpid(),
        )
        await self._done.wait()
        if metrics_server is not None:
            metrics_server.close()
        await self._wait_all()
        return 1 if self._forced else 0

    async def _serve_metrics(self) -> asyncio.Server | None:
        s = self.settings
        if s.metrics_host is None or s.metrics_port is None:
            return None
        try:
            return await self.metrics.serve(s.metrics_host, s.metrics_port)
        except OSError as exc:
            await self._stop_all(signal.SIGTERM)
            where = f"{s.metrics_host}:{s.metrics_port}"
            reason = f"cannot listen on {where}: {exc.strerror}"
            raise ConfigError("metrics_listen", reason) from None

    # -- workers -------------------------------------------------------------------------

    async def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, WORKER_ENV: f"{index}:{theirs.fileno()}"}
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, env=env, pass_fds=(theirs.fileno(),)
            )
        finally:
            theirs.close()
        worker = _Worker(index, process, Channel(ours, lambda m: self._handle(index, m)))
        self.workers[index] = worker
        self._live.set(len(self.workers))
        self._watch(worker.channel.run())
        self._watch(self._wait_for(worker))
        self.log.info("worker.started", worker=index, pid=process.pid)

    def _watch(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _wait_for(self, worker: _Worker) -> None:
        code = await worker.process.wait()
        worker.channel.close()
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self._live.set(len(self.workers))
        lived = time.monotonic() - worker.started
        if self._stopping:
            if not self.workers:
                self._done.set()
            return
        if code == 2 and not self._serving:
            self._failed_start = code  # the first start failed: configuration
            self._stopping = True
            self._done.set()
            return
        delay = self._restart_delay(worker.index, lived)
        self.log.error(
            "worker.exited",
            worker=worker.index,
            pid=worker.process.pid,
            **_exit_fields(code),
            lived_s=round(lived, 3),
            restart_in_s=delay,
        )
        self._restarts.inc()
        await asyncio.sleep(delay)
        if not self._stopping:
            await self._spawn(worker.index)

    def _restart_delay(self, index: int, lived: float) -> float:
        if lived >= LONG_LIFE_S:
            self._quick_deaths[index] = 0
            return 0.0
        deaths = self._quick_deaths.get(index, 0) + 1
        self._quick_deaths[index] = deaths
        return min(RESTART_MAX_S, 0.25 * float(2**deaths))

    # -- what workers ask ----------------------------------------------------------------

    def _handle(self, index: int, message: Message) -> Message | None:
        op = message.get("op")
        worker = self.workers.get(index)
        if worker is None:
            return None
        if op == "acquire":
            return {"ok": self._acquire(worker, str(message["user"]), int(message["limit"]))}
        if op == "release":
            user = str(message["user"])
            if worker.users[user] > 0:
                worker.users[user] -= 1
                if not worker.users[user]:
                    del worker.users[user]
        elif op == "cancel":
            owner = self.workers.get(worker_of(int(message["pid"])))
            if owner is not None:
                owner.channel.send(message)
        elif op in _RELAYED:
            for other in self.workers.values():
                if other is not worker:
                    other.channel.send(message)
        elif op == "ready":
            worker.ready.set()
            if len(self.workers) == self.settings.workers and all(
                w.ready.is_set() for w in self.workers.values()
            ):
                self._all_ready.set()
        return None

    def _acquire(self, worker: _Worker, user: str, limit: int) -> bool:
        if sum(w.users[user] for w in self.workers.values()) >= limit:
            return False
        worker.users[user] += 1
        return True

    async def _expositions(self) -> list[bytes]:
        answers = await self._ask_all({"op": "metrics"})
        return [a["text"].encode() for a in answers if isinstance(a, dict) and "text" in a]

    async def _health(self) -> tuple[bool, dict[str, str]]:
        answers = await self._ask_all({"op": "health"})
        details: dict[str, str] = {}
        healthy = len(self.workers) == self.settings.workers
        up = 0
        for answer in answers:
            if not isinstance(answer, dict) or "ok" not in answer:
                healthy = False
                continue
            up += 1
            healthy = healthy and answer["ok"] is True
            for key, value in answer.get("details", {}).items():
                if details.get(key, "ok") == "ok":
                    details[key] = str(value)  # a worker's complaint wins over "ok"
        details["workers"] = f"{up}/{self.settings.workers}"
        return healthy and up == self.settings.workers, details

    async def _ask_all(self, message: Message) -> list[Message | BaseException]:
        asks = [w.channel.ask(message, ASK_TIMEOUT_S) for w in self.workers.values()]
        return await asyncio.gather(*asks, return_exceptions=True)

    # -- signals and the end -------------------------------------------------------------

    def _stop_signal(self) -> None:
        if self._stopping:
            self._forced = True
            self.log.warning("shutdown.forced")
        else:
            self._stopping = True
            self.log.info("supervisor.shutdown", workers=len(self.workers))
        self._forward(signal.SIGTERM)
        if not self.workers:
            self._done.set()

    def _forward(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)

    async def _stop_all(self, sig: signal.Signals) -> None:
        self._stopping = True
        self._forward(sig)
        await self._wait_all()

    async def _wait_all(self) -> None:
        processes = [w.process.wait() for w in self.workers.values()]
        if processes:
            await asyncio.gather(*processes)
        await asyncio.sleep(0)


# What one worker tells the supervisor for all the others: quota charges, locks, records.
_RELAYED = frozenset({"charge", "lock", "seen"})


def _exit_fields(code: int) -> dict[str, Any]:
    if code < 0:
        return {"signal": signal.Signals(-code).name}
    return {"exit_code": code}


def worker_command(argv: Sequence[str]) -> list[str]:
    """How to start a worker: this interpreter, `-m proxy`, the serve arguments given."""
    return [sys.executable, "-m", "proxy", *argv]
