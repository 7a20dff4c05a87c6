"""Memory per idle client connection: pgwarden's (and pgbouncer's) RSS with 1,000 idle clients.

Strategy: a throwaway PostgreSQL with max_connections raised (ALTER SYSTEM and a
restart: pgwarden opens one upstream connection per client, so the 1,000 idle
clients hold 1,000 server backends). pgwarden (an unrestricted role, as in
pgbench_select.py, whose set-up this imports) and, when installed, pgbouncer
(pool_mode=transaction: idle clients hold no server connection) are started.
For each proxy, asyncpg opens --warm connections first (the first logins pay
for imports, caches and pools that do not grow with clients), then pgwarden's
RSS is read from /proc/PID/status (VmRSS), --connections more clients log in
(SCRAM-SHA-256, as staff do) and stay idle, and RSS is read again after a
settling pause. KB per connection = RSS delta / --connections. The clients are
closed before the next proxy is measured.

asyncpg is the client because it is cheap per connection (no thread, no
libpq), logs in with SCRAM, and sends nothing after the login: the connections
are idle from pgwarden's point of view. What it costs lives in this process,
not in the proxies measured.

Rules: nothing is installed; every process started here stops on exit, Ctrl-C
and SIGTERM included; every wait has a deadline; a proxy that fails is
reported and left out. Progress to stderr, the result to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from pgbench_select import (
    CLIENT_USER,
    DB,
    SVC_USER,
    Credentials,
    Options,
    Target,
    choice_list,
    drive,
    progress,
    start_target,
)

from proxy.pgserver import PgServer

TARGETS = ("pgwarden", "pgbouncer")
TARGET_KB = 30.0  # the performance issue's target
CONNECT_TIMEOUT_S = 30.0
PARALLEL_LOGINS = 16  # logins in flight at once
SETTLE_S = 2.0  # pause before reading RSS: housekeeping runs, buffers settle


@dataclass(frozen=True)
class IdleOptions(Options):
    connections: int = 1000
    warm: int = 20
    targets: tuple[str, ...] = TARGETS


_targets = choice_list(TARGETS, "targets")


def parse_args(argv: Sequence[str] | None) -> IdleOptions:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=1000, help="idle clients measured (1000)")
    p.add_argument("--warm", type=int, default=20, help="clients opened before the baseline (20)")
    p.add_argument(
        "--target", dest="targets", type=_targets, default=TARGETS, help="pgwarden,pgbouncer"
    )
    p.add_argument("--workers", type=int, help="passed to pgwarden serve --workers")
    p.add_argument("--quick", action="store_true", help="accepted for the runner; changes nothing")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    if a.connections < 1 or a.warm < 1:
        p.error("--connections and --warm must be >= 1")
    total = a.connections + a.warm
    return IdleOptions(
        seconds=0,
        rounds=1,
        clients=(total,),  # pgwarden's per-user limit and pgbouncer's pool follow this
        modes=("simple",),
        jobs=1,
        scale=0,
        warmup=0,
        workers=a.workers,
        json=a.json,
        connections=a.connections,
        warm=a.warm,
        targets=a.targets,
    )


# --- measuring -----------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KB (kernel units: KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def open_clients(
    target: Target, creds: Credentials, count: int
) -> list[asyncpg.Connection[Any]]:
    env = target.client_env("simple")
    gate = asyncio.Semaphore(PARALLEL_LOGINS)

    async def one() -> asyncpg.Connection[Any]:
        async with gate:
            return await asyncpg.connect(
                host=env["PGHOST"],
                port=int(env["PGPORT"]),
                user=CLIENT_USER,
                password=creds.client_password,
                database=DB,
                ssl=False,
                timeout=CONNECT_TIMEOUT_S,
                statement_cache_size=0,
            )

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_clients(conns: list[asyncpg.Connection[Any]]) -> None:
    await asyncio.gather(*(c.close(timeout=10) for c in conns), return_exceptions=True)


async def measure(target: Target, creds: Credentials, opts: IdleOptions) -> dict[str, Any]:
    assert target.service is not None
    pid = target.service.proc.pid
    started = rss_kb(pid)
    warm = await open_clients(target, creds, opts.warm)
    await asyncio.sleep(SETTLE_S)
    before = rss_kb(pid)
    t0 = time.monotonic()
    idle = await open_clients(target, creds, opts.connections)
    login_s = time.monotonic() - t0
    await asyncio.sleep(SETTLE_S)
    after = rss_kb(pid)
    # Still alive and answering: the idle clients were not dropped meanwhile.
    alive = sum(not c.is_closed() for c in idle)
    await close_clients(idle + warm)
    return {
        "pid": pid,
        "rss_started_kb": started,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "kb_per_connection": round((after - before) / opts.connections, 2),
        "alive": alive,
        "login_s": round(login_s, 2),
    }


# --- results -------------------------------------------------------------------


@dataclass
class IdleResults:
    opts: IdleOptions
    info: dict[str, Any] = field(default_factory=dict)
    tps: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> measurement
    targets: list[Target] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    def notes(self) -> list[str]:
        notes = [f"{t.name}: {t.error}" for t in self.targets if t.error]
        notes += [f"{name}: {reason}" for name, reason in self.failed.items()]
        return (["interrupted: partial results"] if self.interrupted else []) + notes

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": self.info,
            "results": self.tps,
            "target_kb": TARGET_KB,
            "notes": self.notes(),
        }


def render_table(results: IdleResults) -> str:
    o = results.opts
    lines = [
        f"memory per idle client connection: {o.connections:,} idle clients (asyncpg, SCRAM) "
        f"after {o.warm} warm-up clients; RSS from /proc/PID/status",
        f"PostgreSQL {results.info.get('postgres')} max_connections "
        f"{results.info.get('max_connections')} | {os.cpu_count()} CPUs",
        "",
        f"{'proxy':<11}{'RSS before KB':>15}{'RSS after KB':>14}{'KB/conn':>9}{'alive':>7}"
        f"{'logins s':>10}",
    ]
    for name, m in results.tps.items():
        lines.append(
            f"{name:<11}{m['rss_before_kb']:>15,}{m['rss_after_kb']:>14,}"
            f"{m['kb_per_connection']:>9.1f}{m['alive']:>7}{m['login_s']:>10.1f}"
        )
    if (ours := results.tps.get("pgwarden")) is not None:
        verdict = "met" if ours["kb_per_connection"] < TARGET_KB else "NOT met"
        lines += [
            "",
            f"pgwarden: {ours['kb_per_connection']:.1f} KB per idle connection "
            f"(target < {TARGET_KB:.0f} KB: {verdict})",
        ]
    if notes := results.notes():
        lines += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------


def raise_fd_limit(needed: int) -> None:
    """Each client takes a descriptor here and two in pgwarden (which inherits this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed)) if hard != resource.RLIM_INFINITY else max(soft, needed)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        progress(f"warning: open-file limit {want} < {needed}: logins may fail")


def start_postgres(server: PgServer, opts: IdleOptions) -> int:
    """Start with max_connections above one backend per idle client, and headroom."""
    server.start()
    limit = opts.connections + opts.warm + 50
    server.psql(f"ALTER SYSTEM SET max_connections = {limit}")  # postgresql.auto.conf wins
    server.stop()
    server.start()
    return int(server.psql("SHOW max_connections").strip())


def run(opts: IdleOptions, stack: contextlib.ExitStack, results: IdleResults) -> None:
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgwarden-idle-")))
    work.chmod(0o711)  # unprivileged PostgreSQL and pgbouncer reach their subfolders
    raise_fd_limit(3 * (opts.connections + opts.warm) + 100)
    creds = Credentials.generate()
    server = PgServer(work / "pgdata")
    progress("starting PostgreSQL")
    stack.callback(server.stop)
    max_conn = start_postgres(server, opts)
    progress(f"PostgreSQL on 127.0.0.1:{server.port}, max_connections {max_conn}")
    server.psql(f"CREATE DATABASE {DB}")
    server.create_service_account(SVC_USER, creds.svc_password, DB)
    results.info.update(
        postgres=server.psql("SHOW server_version").strip(),
        max_connections=max_conn,
        connections=opts.connections,
        warm=opts.warm,
        cpus=os.cpu_count(),
    )
    for name in opts.targets:
        target = start_target(name, work, server, opts, creds, stack=stack)
        results.targets.append(target)
        if not target.usable:
            continue
        progress(f"{name}: {opts.warm} warm-up clients, then {opts.connections:,} idle clients")
        try:
            m = asyncio.run(measure(target, creds, opts))
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            results.failed[name] = f"{type(exc).__name__}: {exc}"
            progress(f"{name}: FAILED: {exc}")
            continue
        results.tps[name] = m
        progress(f"{name}: {m['kb_per_connection']:.1f} KB per idle connection")
        if target.service is not None:  # its idle pools and backends go before the next one
            target.service.stop()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    return drive(opts, IdleResults(opts), run, render_table)


if __name__ == "__main__":
    sys.exit(main())
