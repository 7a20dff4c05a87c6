"""In-process cost of the policy engine: cold analysis and verdict-cache hits.

Strategy: a throwaway PostgreSQL (proxy.pgserver.PgServer) holds the demo shop
database; the schema snapshot is read from it once, as pgwarden reads it (the
service account, proxy.net.catalog.read_snapshot), and the server is stopped
before anything is timed. An Engine is built from policies/example.yaml and that
snapshot, and ten typical support and analyst statements are timed:

* cold: what a cache miss costs, i.e. the whole analysis (PostgreSQL's grammar,
  sqlglot, the masking rewrite, generation and the second check), on a
  long-lived engine as in the proxy: an Engine with cache_size=0, so every call
  misses while its per-role views (built on first use) stay warm.
* fresh: the same statement as the first one on a new Engine, as after a policy
  or schema reload (the role's views and mask projections are built then too).
  Runs go round-robin over the statements, cold and fresh alternating, so drift
  hits all of them alike.
* hit: the verdict cache. The same text is evaluated in batches timed with
  perf_counter_ns; each call gets a fresh str object with the same text, as the
  proxy decodes each statement from the wire (so the key's hash is computed
  every time). The figure with one shared str object is in --json.

Rules: nothing is installed; PostgreSQL is stopped on exit, Ctrl-C included; a
statement the engine refuses is reported as such (its timing says nothing about
the analysis) and left out of the overall figures. Progress goes to stderr, the
result (table or --json) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pglast

from proxy.analysis.catalog import Snapshot
from proxy.analysis.engine import Engine
from proxy.demo import shop_sql
from proxy.errors import PgWardenError
from proxy.net.catalog import fetch_snapshot
from proxy.pgserver import PgServer
from proxy.policy import Policy, load_policy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = REPO / "policies" / "example.yaml"
DB = "shop"
SVC_USER, SVC_PASSWORD = "pgwarden_svc", "bench-svc"
HASH_KEY = b"pgwarden-bench-hash-key"
BATCH = 5_000  # cache-hit calls per timed batch
COLD_WARMUP = 3  # untimed cold runs per statement before the timed ones
TARGET_HIT_US = 5.0  # the performance issue's targets
TARGET_COLD_US = 2_000.0
# sqlglot modules the compiled wheel (sqlglotc) overlays with .so files
SQLGLOT_MODULES = (
    "sqlglot.tokenizer_core",
    "sqlglot.parser",
    "sqlglot.generator",
    "sqlglot.expressions.core",
    "sqlglot.optimizer.scope",
)

_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- the statements ------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    name: str
    role: str
    sql: str
    extended: bool = False  # a Parse (extended protocol) rather than a simple Query

    @property
    def user(self) -> str:
        """Who runs it: the support role's row filter names the user (example.yaml)."""
        return USERS.get(self.role, "")


USERS = {"support": "alice", "analyst": "bob"}


# psql 18's first catalog query for `\d customers`, byte for byte (psql -E).
PSQL_DESCRIBE = """\
SELECT c.oid,
  n.nspname,
  c.relname
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname OPERATOR(pg_catalog.~) '^(customers)$' COLLATE pg_catalog.default
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 2, 3;"""

QUERIES = (
    Query(
        "email literal",
        "support",
        "SELECT id, full_name, email, phone FROM customers WHERE email = 'yusuf.kim42@example.net'",
    ),
    Query(
        "phone literal",
        "support",
        "SELECT id, full_name, email FROM customers WHERE phone = '+1-555-2000126'",
    ),
    Query(
        "email = $1 (Parse)",
        "support",
        "SELECT id, full_name, email, phone FROM customers WHERE email = $1",
        extended=True,
    ),
    Query(
        "tickets join",
        "support",
        "SELECT t.ticket_no, t.subject, t.status, t.body, c.full_name, c.email "
        "FROM support_tickets t JOIN customers c ON c.id = t.customer_id "
        "WHERE c.id = 42 ORDER BY t.created_at DESC",
    ),
    Query(
        "tickets by status",
        "support",
        "SELECT status, count(*) FROM support_tickets GROUP BY status ORDER BY 2 DESC",
    ),
    Query(
        "orders sum(total)",
        "support",
        "SELECT c.full_name, count(o.id) AS orders, sum(o.total) AS spent "
        "FROM customers c JOIN orders o ON o.customer_id = c.id "
        "WHERE c.id = 42 GROUP BY c.full_name",
    ),
    Query(
        "listing LIMIT 20",
        "support",
        "SELECT id, full_name, email FROM customers ORDER BY id DESC LIMIT 20",
    ),
    Query(
        "CTE open tickets",
        "support",
        "WITH recent AS (SELECT customer_id, max(created_at) AS last FROM support_tickets "
        "WHERE status = 'open' GROUP BY customer_id) "
        "SELECT c.id, c.email, r.last FROM recent r JOIN customers c ON c.id = r.customer_id "
        "ORDER BY r.last DESC LIMIT 10",
    ),
    Query("psql \\d customers", "support", PSQL_DESCRIBE),
    Query("analyst distinct", "analyst", "SELECT count(DISTINCT email) FROM customers"),
)


# --- options -------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    customers: int
    runs: int
    calls: int
    policy: Path
    json: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customers", type=int, default=2000, help="shop size (2000)")
    p.add_argument("--runs", type=int, default=200, help="cold analyses per statement (200)")
    p.add_argument(
        "--calls", type=int, default=100_000, help="cache-hit calls per statement (100000)"
    )
    p.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policies/example.yaml")
    p.add_argument("--quick", action="store_true", help="--runs 50 --calls 20000 (a quick look)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    runs, calls = (50, 20_000) if a.quick else (a.runs, a.calls)
    if min(a.customers, runs, calls) < 1:
        p.error("--customers, --runs and --calls must be >= 1")
    return Options(a.customers, runs, calls, a.policy, a.json)


# --- the snapshot --------------------------------------------------------------


async def _fetch_snapshot(server: PgServer) -> Snapshot:
    return await fetch_snapshot(
        host=server.host,
        port=server.port,
        user=SVC_USER,
        password=SVC_PASSWORD,
        database=DB,
        ssl=False,
        timeout=30,
    )


def load_snapshot(customers: int) -> tuple[Snapshot, str]:
    """The shop database's snapshot and PostgreSQL's version; the server is gone after."""
    with tempfile.TemporaryDirectory(prefix="pgwarden-engine-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o711)  # an unprivileged PostgreSQL (when we are root) reaches its folder
        server = PgServer(work / "pgdata")
        progress("starting PostgreSQL")
        server.start()
        try:
            progress(f"building the shop database ({customers:,} customers)")
            server.psql(f"CREATE DATABASE {DB}")
            server.psql(shop_sql(customers), dbname=DB, timeout=900)
            server.create_service_account(SVC_USER, SVC_PASSWORD, DB)
            version = server.psql("SHOW server_version").strip()
            snapshot = asyncio.run(_fetch_snapshot(server))
        finally:
            server.stop()
    progress(f"snapshot: {len(snapshot.user_relations())} user relations; PostgreSQL stopped")
    return snapshot, version


# --- measuring -----------------------------------------------------------------


@dataclass
class Measured:
    query: Query
    allowed: bool = True
    message: str = ""
    cold_ns: list[int] = field(default_factory=list)  # misses on a long-lived engine
    fresh_ns: list[int] = field(default_factory=list)  # first statement on a new engine
    hit_ns: list[float] = field(default_factory=list)  # per-call mean of each batch
    hit_same_ns: list[float] = field(default_factory=list)

    @property
    def cold_median_us(self) -> float:
        return statistics.median(self.cold_ns) / 1000

    @property
    def cold_p95_us(self) -> float:
        return percentile(self.cold_ns, 95) / 1000

    @property
    def fresh_median_us(self) -> float:
        return statistics.median(self.fresh_ns) / 1000

    @property
    def hit_us(self) -> float:
        return statistics.median(self.hit_ns) / 1000

    @property
    def hit_same_us(self) -> float:
        return statistics.median(self.hit_same_ns) / 1000


def percentile(values: Sequence[float], pct: int) -> float:
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def check_verdicts(policy: Policy, snapshot: Snapshot, measured: list[Measured]) -> None:
    engine = Engine(policy, snapshot, HASH_KEY)
    for m in measured:
        q = m.query
        verdict = engine.evaluate(q.role, q.sql, extended=q.extended, user=q.user)
        if not verdict.allowed:
            m.allowed, m.message = False, verdict.message
            progress(f"{q.name}: REFUSED by the engine: {verdict.message}")


def time_miss(engine: Engine, q: Query) -> int:
    """One evaluation that misses the verdict cache, in ns."""
    misses = engine.misses
    t0 = time.perf_counter_ns()
    engine.evaluate(q.role, q.sql, extended=q.extended, user=q.user)
    elapsed = time.perf_counter_ns() - t0
    assert engine.misses == misses + 1, "the verdict cache answered a cold measurement"
    return elapsed


def measure_cold(policy: Policy, snapshot: Snapshot, measured: list[Measured], runs: int) -> None:
    active = [m for m in measured if m.allowed]
    progress(f"cold: {runs} runs x {len(active)} statements (warm engine, then a fresh one)")
    # A long-lived engine, as in the proxy, whose verdict cache keeps nothing: every call
    # is a miss, while its per-role views (built on first use) stay warm.
    warm = Engine(policy, snapshot, HASH_KEY, cache_size=0)
    for m in active:  # first calls pay for lazy imports and caches inside the libraries
        for _ in range(COLD_WARMUP):
            time_miss(warm, m.query)
            time_miss(Engine(policy, snapshot, HASH_KEY), m.query)
    for _ in range(runs):
        for m in active:
            m.cold_ns.append(time_miss(warm, m.query))
            # The first statement after a policy or schema reload: a new Engine.
            m.fresh_ns.append(time_miss(Engine(policy, snapshot, HASH_KEY), m.query))


def measure_hits(policy: Policy, snapshot: Snapshot, measured: list[Measured], calls: int) -> None:
    batches = max(1, -(-calls // BATCH))
    progress(f"cache hits: {batches} batches x {BATCH} calls per statement")
    for m in measured:
        if not m.allowed:
            continue
        q = m.query
        engine = Engine(policy, snapshot, HASH_KEY)
        evaluate = engine.evaluate
        evaluate(q.role, q.sql, extended=q.extended, user=q.user)  # the one miss
        for _ in range(batches):
            # New str objects with the same text, made outside the clock: a text decoded
            # from the wire has no cached hash, so the cache key is hashed on every call.
            texts = [q.sql.encode().decode() for _ in range(BATCH)]
            t0 = time.perf_counter_ns()
            for text in texts:
                evaluate(q.role, text, extended=q.extended, user=q.user)
            m.hit_ns.append((time.perf_counter_ns() - t0) / BATCH)
            same = q.sql
            t0 = time.perf_counter_ns()
            for _ in range(BATCH):
                evaluate(q.role, same, extended=q.extended, user=q.user)
            m.hit_same_ns.append((time.perf_counter_ns() - t0) / BATCH)
        assert engine.misses == 1, "a cache-hit measurement missed the cache"
        assert engine.hits == 2 * batches * BATCH


# --- results -------------------------------------------------------------------


def sqlglot_info() -> dict[str, Any]:
    """Whether sqlglotc's compiled modules are the ones imported (it has no module of its own:
    it overlays .so files onto sqlglot's package; sqlglot.tokens.SQLGLOTC_INSTALLED checks one).
    """
    compiled = {}
    for name in SQLGLOT_MODULES:
        module = importlib.import_module(name)
        compiled[name] = not str(getattr(module, "__file__", ".py")).endswith(".py")
    tokens = importlib.import_module("sqlglot.tokens")
    return {
        "sqlglot": _version("sqlglot"),
        "sqlglotc": _version("sqlglotc"),
        "sqlglotc_installed": bool(getattr(tokens, "SQLGLOTC_INSTALLED", False)),
        "compiled_modules": compiled,
        "sqlglotc_active": all(compiled.values()),
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def overall(measured: list[Measured]) -> dict[str, float | None]:
    ok = [m for m in measured if m.allowed and m.cold_ns]
    if not ok:
        return {"cold_median_us": None}
    cold = [ns for m in ok for ns in m.cold_ns]
    return {
        "cold_median_us": statistics.median(cold) / 1000,
        "cold_p95_us": percentile(cold, 95) / 1000,
        "cold_worst_median_us": max(m.cold_median_us for m in ok),
        "fresh_median_us": statistics.median(ns for m in ok for ns in m.fresh_ns) / 1000,
        "hit_us": statistics.median(ns for m in ok for ns in m.hit_ns) / 1000,
        "hit_worst_us": max(m.hit_us for m in ok),
        "hit_same_str_us": statistics.median(ns for m in ok for ns in m.hit_same_ns) / 1000,
    }


def as_json(measured: list[Measured], info: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for m in measured:
        row: dict[str, Any] = {
            "name": m.query.name,
            "role": m.query.role,
            "extended": m.query.extended,
            "sql": m.query.sql,
            "allowed": m.allowed,
        }
        if m.allowed and m.cold_ns:
            row |= {
                "cold_median_us": round(m.cold_median_us, 1),
                "cold_p95_us": round(m.cold_p95_us, 1),
                "cold_min_us": round(min(m.cold_ns) / 1000, 1),
                "fresh_median_us": round(m.fresh_median_us, 1),
                "hit_us": round(m.hit_us, 3),
                "hit_same_str_us": round(m.hit_same_us, 3),
                "hit_batches_us": [round(ns / 1000, 3) for ns in m.hit_ns],
            }
        else:
            row["message"] = m.message
        rows.append(row)
    summary = {k: None if v is None else round(v, 3) for k, v in overall(measured).items()}
    targets = {"hit_us": TARGET_HIT_US, "cold_us": TARGET_COLD_US}
    return {"settings": info, "results": rows, "overall": summary, "targets": targets}


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "-"
    return "met" if value < target else "NOT met"


def render_table(measured: list[Measured], info: dict[str, Any]) -> str:
    glot = info["sqlglot"]
    if glot["sqlglotc_active"]:
        active = f"sqlglotc {glot['sqlglotc']} active (compiled)"
    else:
        active = "sqlglotc NOT active (pure-Python sqlglot)"
    lines = [
        f"pgwarden policy engine, in process; policy {info['policy']}, shop with "
        f"{info['customers']:,} customers",
        f"cold: {info['runs']} cache misses per statement on a long-lived engine; fresh: "
        "the first statement on a new engine (after a reload)",
        f"hit: {info['calls']:,} calls per statement in batches of {BATCH:,}, median of the "
        "batches' per-call means; us = microseconds",
        f"Python {info['python']} | sqlglot {glot['sqlglot']}, {active} | "
        f"pglast {info['pglast']} | PostgreSQL {info['postgres']} (snapshot only) | "
        f"{info['cpus']} CPUs",
        "",
        f"{'statement':<22}{'role':<9}{'cold median us':>15}{'cold p95 us':>13}"
        f"{'fresh median us':>17}{'hit us':>9}",
    ]
    for m in measured:
        head = f"{m.query.name:<22}{m.query.role:<9}"
        if m.allowed and m.cold_ns:
            cold = f"{m.cold_median_us:>15.0f}{m.cold_p95_us:>13.0f}{m.fresh_median_us:>17.0f}"
            lines.append(head + cold + f"{m.hit_us:>9.2f}")
        else:
            lines.append(head + "  REFUSED: " + m.message)
    o = overall(measured)
    if o["cold_median_us"] is not None:
        lines += [
            f"{'overall':<31}{o['cold_median_us']:>15.0f}{o['cold_p95_us']:>13.0f}"
            f"{o['fresh_median_us']:>17.0f}{o['hit_us']:>9.2f}",
            "",
            f"cache hit: median {o['hit_us']:.2f} us, worst statement {o['hit_worst_us']:.2f} us "
            f"(target < {TARGET_HIT_US:.0f} us: {_verdict(o['hit_worst_us'], TARGET_HIT_US)}); "
            f"same str object {o['hit_same_str_us']:.2f} us",
            f"cold: median {o['cold_median_us']:.0f} us, worst statement median "
            f"{o['cold_worst_median_us']:.0f} us (target < {TARGET_COLD_US / 1000:.0f} ms: "
            f"{_verdict(o['cold_worst_median_us'], TARGET_COLD_US)})",
        ]
    refused = [m.query.name for m in measured if not m.allowed]
    if refused:
        lines.append(f"note: refused by the engine, left out of the overall: {', '.join(refused)}")
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        policy = load_policy(opts.policy)
        snapshot, postgres = load_snapshot(opts.customers)
    except KeyboardInterrupt:
        progress("interrupted; PostgreSQL is stopped")
        return 130
    except (RuntimeError, OSError, PgWardenError, asyncpg.PostgresError) as exc:
        progress(f"setup failed: {exc}")
        return 1
    info: dict[str, Any] = {
        "customers": opts.customers,
        "runs": opts.runs,
        "calls": opts.calls,
        "policy": os.path.relpath(opts.policy, REPO),
        "python": sys.version.split()[0],
        "pglast": pglast.__version__,
        "postgres": postgres,
        "sqlglot": sqlglot_info(),
        "cpus": os.cpu_count(),
    }
    measured = [Measured(q) for q in QUERIES]
    try:
        check_verdicts(policy, snapshot, measured)
        measure_cold(policy, snapshot, measured, opts.runs)
        measure_hits(policy, snapshot, measured, opts.calls)
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    with contextlib.suppress(BrokenPipeError):
        out = as_json(measured, info) if opts.json else None
        print(json.dumps(out, indent=2) if out is not None else render_table(measured, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
