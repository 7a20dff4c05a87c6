"""Bulk read: 1,000,000 rows of ~100 bytes through pgwarden, pgbouncer and directly.

Strategy: one throwaway PostgreSQL holds a table `bulk` (id, email, note) whose
rows are about 100 bytes on the wire. The client is psql from the same
PostgreSQL build, with its output going to /dev/null, in two methods:

* select: `SELECT id, email, note FROM bulk` with FETCH_COUNT set. psql 17+
  then reads the result in libpq's chunked-rows mode: DataRow messages stream
  through with bounded client memory, and no cursor is involved (a cursor would
  turn one statement into many FETCH round trips).
* copy:   `COPY (SELECT ...) TO STDOUT`: CopyData messages, the way exports
  (\\copy, pg_dump) read a table.

psql is C over libpq: per row it costs far less than a Python driver (psycopg's
stream() or asyncpg decode every value), so on a 2-CPU machine, where the client
shares the CPUs with PostgreSQL and the proxy, the client takes as little as
possible from what is measured. The throughput is rows / (wall time of one psql
run - the median wall time of `psql -c "SELECT 1"` through the same target,
measured before the warm-up): psql's start and the login are not streaming.

Targets, interleaved in rounds as in pgbench_select.py (whose machinery this
imports): `direct` and `pgbouncer` read the table plainly; `pgwarden` is an
unrestricted role; `masked` is a restricted role for which `bulk.email` is
classified and masked (email mask) with rows_per_query twice the table
(on_exceed: reject, the default: rows are held until the statement completes);
`truncate` is the same with on_exceed: truncate (rows pass at once); `rewritten`
is the direct connection running the text pgwarden sends upstream for the
restricted role (from its engine, in process), so masked/rewritten is the proxy's
share and rewritten/direct the masking's share inside PostgreSQL. The first run
of each target is a warm-up that also checks the answer (row count, masked or
not).

Rules: as pgbench_select.py: nothing is installed; a target that fails is
reported and left out; every process started here stops on exit, Ctrl-C and
SIGTERM included; every wait has a deadline. Progress to stderr, the result to
stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgbench_select import (
    CLIENT_USER,
    DB,
    SVC_USER,
    Credentials,
    Options,
    RoundStats,
    Target,
    TargetError,
    _round,
    check_connection_headroom,
    choice_list,
    drive,
    launch_pgwarden,
    progress,
    start_target,
    svc_snapshot,
    table_rows,
)

from proxy.analysis.engine import Engine
from proxy.pgserver import PgServer
from proxy.policy import parse_policy

METHODS = ("select", "copy")
TARGETS = ("direct", "pgbouncer", "pgwarden", "masked", "truncate", "rewritten")
RESTRICTED = ("masked", "truncate")  # pgwarden with the restricted role
DIRECT = ("direct", "rewritten")
RATIOS = (
    ("pgwarden", "direct"),
    ("masked", "direct"),
    ("truncate", "direct"),
    ("masked", "rewritten"),
    ("rewritten", "direct"),
    ("pgbouncer", "direct"),
)
ROLE = "exporter"
FETCH_COUNT = 10_000  # psql's chunk size in chunked-rows mode
RUN_TIMEOUT_S = 600
CONNECT_RUNS = 5
COLUMNS = "id, email, note"
SELECT_SQL = f"SELECT {COLUMNS} FROM bulk"  # noqa: S608 - constant
COPY_SQL = f"COPY ({SELECT_SQL}) TO STDOUT"

Config = tuple[str]  # method


def table_sql(rows: int) -> str:
    """The table: an int, an e-mail (~27 bytes) and 55 bytes of text: ~108 bytes a DataRow."""
    return f"""
CREATE TABLE bulk (id integer NOT NULL, email text NOT NULL, note text NOT NULL);
INSERT INTO bulk
  SELECT g, 'customer' || g || '@example.com', left(repeat(md5(g::text), 2), 55)
  FROM generate_series(1, {rows}) AS g;
VACUUM ANALYZE bulk;
"""  # noqa: S608 - rows is an integer


def wire_bytes_sql() -> str:
    """Average DataRow size: type, length, column count, three lengths and the values."""
    return (
        "SELECT round(avg(19 + octet_length(id::text) + octet_length(email) "
        "+ octet_length(note))) FROM bulk"
    )


def policy(*, truncate: bool, cap: int) -> str:
    """A restricted role: `bulk.email` masked, a cap larger than the table."""
    on_exceed = "truncate" if truncate else "reject"
    return f"""\
version: 1
classify:
  public.bulk:
    email: email
roles:
  {ROLE}:
    members: [{CLIENT_USER}]
    statements: [select, copy_out]
    tables: [public.bulk]
    columns:
      email: {{mask: email}}
    limits: {{rows_per_query: {cap}, on_exceed: {on_exceed}}}
"""


# --- options -------------------------------------------------------------------


@dataclass(frozen=True)
class BulkOptions(Options):
    """pgbench_select's options (those pgwarden's and pgbouncer's set-up read) and ours."""

    rows: int = 1_000_000
    methods: tuple[str, ...] = METHODS
    targets: tuple[str, ...] = TARGETS

    @property
    def ratios(self) -> tuple[tuple[str, str], ...]:
        return tuple((n, d) for n, d in RATIOS if n in self.targets and d in self.targets)


_methods = choice_list(METHODS, "methods")
_targets = choice_list(TARGETS, "targets")


def parse_args(argv: Sequence[str] | None) -> BulkOptions:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, help="rows in the table (1000000; 500000 with --quick)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument(
        "--method",
        dest="methods",
        type=_methods,
        default=METHODS,
        help="select (DataRow, chunked), copy (COPY TO STDOUT), comma-separated (select,copy)",
    )
    p.add_argument(
        "--target",
        dest="targets",
        type=_targets,
        default=TARGETS,
        help=f"comma-separated, of {', '.join(TARGETS)} (all); direct is always in",
    )
    p.add_argument("--workers", type=int, help="passed to pgwarden serve --workers")
    p.add_argument("--quick", action="store_true", help="500,000 rows")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    rows = a.rows if a.rows is not None else (500_000 if a.quick else 1_000_000)
    if min(rows, a.rounds) < 1:
        p.error("--rows and --rounds must be >= 1")
    targets = tuple(t for t in TARGETS if t == "direct" or t in a.targets)
    return BulkOptions(
        seconds=0,
        rounds=a.rounds,
        clients=(1,),
        modes=("simple",),
        jobs=1,
        scale=0,
        warmup=1,
        workers=a.workers,
        json=a.json,
        rows=rows,
        methods=a.methods,
        targets=targets,
    )


# --- results -------------------------------------------------------------------


@dataclass
class BulkResults(RoundStats):
    opts: BulkOptions
    info: dict[str, Any] = field(default_factory=dict)
    # `tps` is what drive() and table_rows() read; here it holds rows per second.
    tps: dict[Config, dict[str, list[float]]] = field(default_factory=dict)
    seconds: dict[Config, dict[str, list[float]]] = field(default_factory=dict)
    connect_s: dict[str, float] = field(default_factory=dict)  # psql start + login, per target
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    interrupted: bool = False

    def configs(self) -> Iterator[Config]:
        for method in self.opts.methods:
            yield (method,)

    def measured(self) -> Sequence[str]:
        return self.opts.targets

    def row(self, config: Config) -> dict[str, Any]:
        return {
            "method": config[0],
            "rows_per_s": self.tps.get(config, {}),
            "seconds": self.seconds.get(config, {}),
            "connect_s": self.connect_s,
            "median": {t: _round(self.median(config, t), 0) for t in self.opts.targets},
            "ratios": {
                f"{n}/{d}": _round(self.ratio(config, n, d), 3) for n, d in self.opts.ratios
            },
            "spread": _round(self.spread(config), 3),
            "failed": {t: r for (m, t), r in self.failed.items() if (m,) == config},
        }

    def as_json(self) -> dict[str, Any]:
        rows = [self.row(config) for config in self.configs()]
        return {"settings": self.info, "results": rows, "notes": self.notes()}

    def notes(self) -> list[str]:
        notes = [f"{t.name}: {t.note}" for t in self.targets if t.note]
        notes += [f"{t.name}: {t.error}" for t in self.targets if t.error]
        if self.interrupted:
            notes.insert(0, "interrupted: partial results")
        for (method, name), reason in self.failed.items():
            notes.append(f"{name} {method}: {reason}")
        return notes


def render_table(results: BulkResults) -> str:
    o, i = results.opts, results.info
    lines = [
        f"bulk read of {o.rows:,} rows (~{i.get('row_bytes', '?')} bytes per DataRow) with psql "
        f"to /dev/null, {o.rounds} round(s); median rows/s per target, from the wall time "
        "less psql's start and login through that target: "
        + ", ".join(f"{t} {1000 * v:.0f} ms" for t, v in results.connect_s.items()),
        f"select: SELECT, FETCH_COUNT={FETCH_COUNT} (chunked rows) | copy: COPY (SELECT) TO "
        f"STDOUT | masked, truncate: role {ROLE}, email masked, rows_per_query "
        f"{i.get('cap', '?'):,} (reject, truncate) | rewritten: pgwarden's masked text, direct",
        f"PostgreSQL {i.get('postgres')} | PgBouncer {i.get('pgbouncer') or '-'} "
        f"(pool_mode=transaction) | pgwarden workers={o.workers or 'default'} | "
        f"{os.cpu_count()} CPUs shared by psql, proxies and PostgreSQL",
        "",
    ]
    lines += table_rows(results, [("method", "<8")], o.targets, o.ratios)
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------


def rewritten_texts(server: PgServer, creds: Credentials, cap: int) -> dict[str, str]:
    """What pgwarden sends upstream for each method, from its own engine."""
    snapshot = svc_snapshot(server, creds)
    doc = parse_policy(policy(truncate=False, cap=cap).encode(), source=Path("bulk-policy.yaml"))
    engine = Engine(doc, snapshot, hash_key=None)
    texts = {}
    for method, sql in (("select", SELECT_SQL), ("copy", COPY_SQL)):
        verdict = engine.evaluate(ROLE, sql, extended=False)
        if not verdict.allowed or verdict.sql is None:
            raise RuntimeError(f"the engine refused the {method} read: {verdict.message}")
        texts[method] = verdict.sql
    return texts


def psql_command(server: PgServer, sql: str) -> list[str]:
    psql = str(server.bin_dir / "psql")
    fetch = f"FETCH_COUNT={FETCH_COUNT}"
    return [psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-v", fetch, "-c", sql]


def read_once(server: PgServer, target: Target, sql: str, *, out: Path | None = None) -> float:
    """One psql run; its wall time in seconds, or TargetError naming the fault."""
    cmd = psql_command(server, sql)
    sink = out.open("wb") if out is not None else open(os.devnull, "wb")  # noqa: SIM115
    with sink:
        t0 = time.perf_counter()
        try:
            done = subprocess.run(
                cmd,
                env=target.client_env("simple"),
                stdout=sink,
                stderr=subprocess.PIPE,
                timeout=RUN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TargetError(f"psql did not finish within {RUN_TIMEOUT_S} s") from exc
        elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise TargetError(f"psql exit {done.returncode}: {done.stderr.decode().strip()[:300]}")
    return elapsed


def check_output(path: Path, rows: int, masked: bool) -> str | None:
    """Why the output is wrong (row count, masking), or None."""
    lines = 0
    with path.open("rb") as f:
        first = f.readline()
        lines = 1 if first else 0
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
    if lines != rows:
        return f"{lines} rows received, {rows} expected"
    if (b"***" in first) != masked:
        return f"first row {first[:80]!r}: masked expected: {masked}"
    return None


def sql_for(target: Target, method: str, texts: dict[str, str]) -> str:
    if target.name == "rewritten":
        return texts[method]
    return SELECT_SQL if method == "select" else COPY_SQL


def bench_one(
    server: PgServer,
    target: Target,
    config: Config,
    results: BulkResults,
    texts: dict[str, str],
    *,
    label: str,
    check: Path | None = None,
) -> None:
    method = config[0]
    if not target.usable or (method, target.name) in results.failed:
        return
    if target.service and (reason := target.service.exit_reason()):
        target.fail(f"stopped during the run: {reason}")
        return
    try:
        elapsed = read_once(server, target, sql_for(target, method, texts), out=check)
    except TargetError as exc:
        results.failed[(method, target.name)] = str(exc)
        progress(f"{label} {target.name:<9} FAILED: {exc}; skipped in later rounds")
        return
    rate = results.opts.rows / max(elapsed - results.connect_s.get(target.name, 0.0), 1e-3)
    if check is not None:
        masked = target.name in (*RESTRICTED, "rewritten")
        if (wrong := check_output(check, results.opts.rows, masked)) is not None:
            results.failed[(method, target.name)] = f"wrong answer: {wrong}"
            progress(f"{label} {target.name:<9} WRONG ANSWER: {wrong}; left out")
        else:
            progress(f"{label} {target.name:<9} {rate:12,.0f} rows/s ({elapsed:.2f} s), checked")
        check.unlink()
        return
    results.tps.setdefault(config, {}).setdefault(target.name, []).append(rate)
    results.seconds.setdefault(config, {}).setdefault(target.name, []).append(elapsed)
    progress(f"{label} {target.name:<9} {rate:12,.0f} rows/s ({elapsed:.2f} s)")


def measure_connect(server: PgServer, target: Target, results: BulkResults) -> None:
    """psql's start and login through the target: the median of CONNECT_RUNS trivial runs."""
    if not target.usable:
        return
    try:
        runs = [read_once(server, target, "SELECT 1") for _ in range(CONNECT_RUNS)]
    except TargetError as exc:
        target.fail(f"psql -c 'SELECT 1' failed: {exc}")
        return
    results.connect_s[target.name] = statistics.median(runs)
    progress(f"{target.name}: psql start and login {1000 * statistics.median(runs):.1f} ms")


def launch_for(name: str, cap: int) -> Any:
    if name not in RESTRICTED:
        return launch_pgwarden
    text = policy(truncate=name == "truncate", cap=cap)
    return functools.partial(launch_pgwarden, policy=text, folder=name)


def run(opts: BulkOptions, stack: contextlib.ExitStack, results: BulkResults) -> None:
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgwarden-bulk-")))
    work.chmod(0o711)  # unprivileged PostgreSQL and pgbouncer reach their subfolders
    creds = Credentials.generate()
    server = PgServer(work / "pgdata")
    progress("starting PostgreSQL")
    server.start()
    stack.callback(server.stop)
    check_connection_headroom(server, opts)
    progress(f"PostgreSQL on 127.0.0.1:{server.port}; table bulk with {opts.rows:,} rows")
    server.psql(f"CREATE DATABASE {DB}")
    server.psql(table_sql(opts.rows), dbname=DB, timeout=900)
    server.create_service_account(SVC_USER, creds.svc_password, DB)
    cap = 2 * opts.rows
    texts = rewritten_texts(server, creds, cap)
    for name in opts.targets:
        target = start_target(
            name,
            work,
            server,
            opts,
            creds,
            stack=stack,
            direct=DIRECT,
            warden=launch_for(name, cap),
        )
        results.targets.append(target)
    results.info.update(settings_info(server, opts, results.targets, cap, texts))
    for target in results.targets:
        measure_connect(server, target, results)
    for config in results.configs():
        for target in results.targets:
            label = f"warm-up {config[0]:<7}"
            bench_one(server, target, config, results, texts, label=label, check=work / "out.txt")
    for rnd in range(1, opts.rounds + 1):
        for config in results.configs():
            label = f"round {rnd}/{opts.rounds} {config[0]:<7}"
            for target in results.targets:
                bench_one(server, target, config, results, texts, label=label)


def settings_info(
    server: PgServer, opts: BulkOptions, targets: list[Target], cap: int, texts: dict[str, str]
) -> dict[str, Any]:
    bouncer = next((t for t in targets if t.name == "pgbouncer"), None)
    return {
        "postgres": server.psql("SHOW server_version").strip(),
        "pgbouncer": bouncer.version if bouncer else None,
        "rows": opts.rows,
        "row_bytes": int(float(server.psql(wire_bytes_sql(), dbname=DB).strip())),
        "cap": cap,
        "fetch_count": FETCH_COUNT,
        "rounds": opts.rounds,
        "methods": list(opts.methods),
        "targets": list(opts.targets),
        "texts": {"plain": {"select": SELECT_SQL, "copy": COPY_SQL}, "rewritten": texts},
        "workers": opts.workers,
        "cpus": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    return drive(opts, BulkResults(opts), run, render_table)


if __name__ == "__main__":
    sys.exit(main())
