"""Bytes allocated per forwarded DataRow on the cached path, measured with tracemalloc.

Strategy: the sans-IO Session (proxy/session/machine.py) is driven in this
process exactly as the network layer drives it, but over a plain blocking socket
to a throwaway PostgreSQL, so every byte it relays is a real server byte: a
scramp client logs in to the session, the session logs in upstream as the
service account, then a SELECT of --rows rows of ~100 bytes (bulk_read.py's
table) is sent twice. The first run fills the verdict cache and warms
everything; the second, the cached path, is measured. Each chunk is read from
the socket with recv(256 KiB) (uvloop's read size), outside the measurement,
then:

* session: tracemalloc's traced memory just before and just after
  session.server_data(chunk): what the session allocated for the chunk and
  still holds when it hands its output over (rows it holds back, copies of the
  chunk, slices, list entries).
* drain: what proxy/net/server.py's ClientConnection.drain allocates to hand
  that output to the transport. Output of 64 KiB and more (a chunk here is
  256 KiB) goes to transport.writelines piece by piece (one writev in uvloop,
  no join), so this is 0 by construction, kept as a column so that a change
  back to joining shows; smaller output is joined into one write.

bytes/row = (session + drain) / rows forwarded. Objects allocated and freed
within one call (a struct tuple, a temporary bytearray) are not in that sum:
tracemalloc keeps no running total; the largest such transient per chunk is
reported as peak KB. For the paths that allocate, the top lines (tracemalloc
statistics by line, over three chunks, proxy/ files only) name what allocates.

Four sessions: an unrestricted role (the fast path); a restricted role with
bulk.email masked and no row cap (still the fast path, with the result
backstop); the same with rows_per_query above the table (on_exceed: reject,
rows held until the statement completes), and with on_exceed: truncate.

Rules: nothing is installed; PostgreSQL stops on exit, Ctrl-C included; no
timing is taken. Progress to stderr, the result to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulk_read import SELECT_SQL, policy, table_sql, wire_bytes_sql
from pgbench_select import CLIENT_USER, DB, SVC_USER, Credentials, drive, progress, svc_snapshot
from scramp import ScramClient

from proxy.analysis.engine import Engine
from proxy.auth import parse_secret
from proxy.enumeration import Alert, Watcher
from proxy.errors import PgWardenError
from proxy.net.records import watch_all
from proxy.pgserver import PgServer
from proxy.policy import Policy, parse_policy
from proxy.policy.model import Alerts, Limits
from proxy.session.gate import Gate, Principal, gate_for
from proxy.session.machine import Phase, Session, SessionConfig
from proxy.wire import frontend as fe

RECV_BYTES = 256 * 1024  # uvloop's read buffer
TOP_CHUNKS = (2, 3, 4)  # chunks whose allocations are broken down by line
TOP_LINES = 5
MAX_MESSAGE = 16 << 20
TARGET_BYTES_PER_ROW = 1.0  # "~0": under one byte per row
SESSIONS = ("unrestricted", "masked", "capped-reject", "capped-truncate")
PROXY_DIR = str(Path(__file__).resolve().parents[1] / "proxy")


@dataclass(frozen=True)
class AllocOptions:
    rows: int
    json: bool


def parse_args(argv: Sequence[str] | None) -> AllocOptions:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, help="rows per SELECT (200000; 50000 with --quick)")
    p.add_argument("--quick", action="store_true", help="50,000 rows")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    rows = a.rows if a.rows is not None else (50_000 if a.quick else 200_000)
    if rows < 1000:
        p.error("--rows must be >= 1000")
    return AllocOptions(rows, a.json)


# --- the session, driven over a blocking socket ------------------------------------


class EngineHolder:
    """The EngineSource a PolicyGate reads: one engine, no quotas."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._records = NoLedger()

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def schema_miss(self) -> None:
        return None

    def quota_left(self, user: str, limits: Limits) -> int | PgWardenError:
        return 1 << 62

    def charge(self, user: str, rows: int, bucket: str = "") -> None:
        return None

    @property
    def records(self) -> NoLedger:
        return self._records

    @property
    def policy(self) -> Policy:
        return self._engine.policy


class DbaHolder(EngineHolder):
    """The same, whose policy has the bench user in an unrestricted role (`dba`)."""

    DBA = f"version: 1\nroles:\n  dba: {{members: [{CLIENT_USER}], unrestricted: true}}\n"

    @functools.cached_property
    def policy(self) -> Policy:  # type: ignore[override]  # read once, as a reload would
        return parse_policy(self.DBA.encode(), source=Path("dba.yaml"))


class NoLedger:
    """The record book without a ledger: no budgets, no locks, the real alert watcher."""

    def __init__(self) -> None:
        self.watcher = Watcher()

    def ready(self, user: str) -> bool:
        return True

    def locked(self, user: str) -> object | None:
        return None

    def admit(
        self, user: str, budgets: Iterable[tuple[str, float, int]], rows: list[tuple[int, ...]]
    ) -> tuple[int, tuple[str, float, int] | None]:
        return len(rows), None

    def shown(self, user: str, rows: list[tuple[int, ...]], *, budgets: bool) -> None:
        return None

    def watch(
        self,
        user: str,
        role: str,
        alerts: Alerts | None,
        observed: list[tuple[str, tuple[str, ...], bool, bool]],
    ) -> list[Alert]:
        return watch_all(self.watcher, (user, role, time.monotonic()), alerts, observed)

    def lock(self, user: str, reason: str, details: Mapping[str, Any]) -> None:
        return None


@dataclass
class Driven:
    """One Session with its upstream socket."""

    session: Session
    sock: socket.socket

    def send_upstream(self) -> None:
        s = self.session
        if s.to_server:
            self.sock.sendall(b"".join(s.to_server))
            s.to_server.clear()

    def take_client(self) -> bytes:
        out = b"".join(self.session.to_client)
        self.session.to_client.clear()
        return out


def login(server: PgServer, creds: Credentials, gate: Gate) -> Driven:
    config = SessionConfig(
        users={CLIENT_USER: parse_secret(creds.client_secret)},
        open_gate=lambda user: gate,
        database=DB,
        upstream_user=SVC_USER,
        upstream_password=creds.svc_password,
        tls_available=False,
        tls_required=False,
        max_message_bytes=MAX_MESSAGE,
        statement_events=False,  # the benchmarks run pgwarden at log level warning
    )
    session = Session(config, (1, b"\1\2\3\4"))
    session.client_data(fe.encode_startup([("user", CLIENT_USER), ("database", DB)]))
    session.to_client.clear()
    scram = ScramClient(["SCRAM-SHA-256"], CLIENT_USER, creds.client_password)
    first = scram.get_client_first().encode()
    session.client_data(fe.encode_sasl_initial("SCRAM-SHA-256", first))
    reply = b"".join(session.to_client)
    session.to_client.clear()
    scram.set_server_first(reply[9:].decode())
    session.client_data(fe.encode_password(scram.get_client_final().encode()))
    if session.phase is not Phase.CONNECTING:
        raise RuntimeError(f"client login failed: phase {session.phase.value}")
    session.actions.clear()
    driven = Driven(session, socket.create_connection((server.host, server.port), timeout=60))
    session.upstream_connected()
    while session.phase is Phase.UPSTREAM_LOGIN:
        driven.send_upstream()
        session.server_data(driven.sock.recv(RECV_BYTES))
    if session.phase is not Phase.READY:
        raise RuntimeError(f"upstream login failed: {driven.take_client()[-200:]!r}")
    driven.take_client()
    return driven


# --- measuring -----------------------------------------------------------------


@dataclass
class Measured:
    name: str
    rows: int = 0
    chunks: int = 0
    wire_bytes: int = 0
    session_bytes: int = 0
    drain_bytes: int = 0
    peak_bytes: int = 0
    top: list[dict[str, Any]] = field(default_factory=list)

    @property
    def per_row(self) -> float:
        return (self.session_bytes + self.drain_bytes) / self.rows if self.rows else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "chunks": self.chunks,
            "mean_chunk_bytes": self.wire_bytes // max(1, self.chunks),
            "session_bytes": self.session_bytes,
            "drain_bytes": self.drain_bytes,
            "bytes_per_row": round(self.per_row, 3),
            "session_bytes_per_row": round(self.session_bytes / max(1, self.rows), 3),
            "drain_bytes_per_row": round(self.drain_bytes / max(1, self.rows), 3),
            "peak_transient_kb": round(self.peak_bytes / 1024, 1),
            "top": self.top,
        }


def drain(session: Session) -> None:
    """ClientConnection.drain's client side: the pieces go to writelines as they are."""
    session.to_client.clear()


def query(driven: Driven, sql: str, measured: Measured | None) -> None:
    """Send one Query; relay the reply; with `measured`, account for every chunk."""
    s = driven.session
    rows_before = s.rows
    s.client_data(fe.encode_query(sql))
    driven.send_upstream()
    traced = tracemalloc.get_traced_memory
    snapshots: list[tracemalloc.Snapshot] = []
    while not s.at_rest:
        chunk = driven.sock.recv(RECV_BYTES)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        if measured is None:
            s.server_data(chunk)
            drain(s)
            continue
        measured.chunks += 1
        measured.wire_bytes += len(chunk)
        top = measured.chunks in TOP_CHUNKS
        if top:
            snapshots.append(tracemalloc.take_snapshot())
        before = traced()[0]
        tracemalloc.reset_peak()
        s.server_data(chunk)
        after, peak = traced()
        if top:
            snapshots.append(tracemalloc.take_snapshot())
        measured.session_bytes += after - before
        measured.peak_bytes = max(measured.peak_bytes, peak - before)
        drain(s)  # writelines(pieces): nothing allocated (see the module docstring)
    if s.phase is not Phase.READY:
        raise RuntimeError("the session closed during the query")
    if measured is not None:
        measured.rows = s.rows - rows_before
        measured.top = top_lines(snapshots)


def top_lines(snapshots: list[tracemalloc.Snapshot]) -> list[dict[str, Any]]:
    """What allocated, by line of proxy/ code, summed over the broken-down chunks."""
    only = [tracemalloc.Filter(True, PROXY_DIR + "/*")]
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for old, new in zip(snapshots[::2], snapshots[1::2], strict=True):
        for stat in new.filter_traces(only).compare_to(old.filter_traces(only), "lineno"):
            if stat.size_diff <= 0:
                continue
            frame = stat.traceback[0]
            where = f"{os.path.relpath(frame.filename, Path(PROXY_DIR).parent)}:{frame.lineno}"
            sizes[where] = sizes.get(where, 0) + stat.size_diff
            counts[where] = counts.get(where, 0) + stat.count_diff
    best = sorted(sizes, key=lambda w: -sizes[w])[:TOP_LINES]
    return [{"line": w, "bytes": sizes[w], "blocks": counts[w], "code": _code(w)} for w in best]


def _code(where: str) -> str:
    path, line = where.rsplit(":", 1)
    with contextlib.suppress(OSError, IndexError):
        text = (Path(PROXY_DIR).parent / path).read_text().splitlines()[int(line) - 1]
        return text.strip()
    return ""


# --- results -------------------------------------------------------------------


@dataclass
class AllocResults:
    opts: AllocOptions
    info: dict[str, Any] = field(default_factory=dict)
    tps: dict[str, Measured] = field(default_factory=dict)  # session name -> measurement
    interrupted: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": self.info,
            "results": {name: m.as_json() for name, m in self.tps.items()},
            "target_bytes_per_row": TARGET_BYTES_PER_ROW,
            "notes": ["interrupted: partial results"] if self.interrupted else [],
        }


def render_table(results: AllocResults) -> str:
    i = results.info
    lines = [
        f"tracemalloc bytes per forwarded DataRow, cached path: SELECT of {results.opts.rows:,} "
        f"rows (~{i.get('row_bytes', '?')} bytes each), real server bytes, "
        f"recv({RECV_BYTES // 1024} KiB)",
        "session: held by the Session after server_data(chunk); drain: ClientConnection.drain "
        "(writelines, no join); peak: largest transient per chunk",
        "",
        f"{'session':<17}{'rows':>9}{'chunks':>8}{'B/chunk':>9}{'session B/row':>15}"
        f"{'drain B/row':>13}{'total B/row':>13}{'peak KB':>9}",
    ]
    for name, m in results.tps.items():
        j = m.as_json()
        lines.append(
            f"{name:<17}{m.rows:>9,}{m.chunks:>8}{j['mean_chunk_bytes']:>9,}"
            f"{j['session_bytes_per_row']:>15.2f}{j['drain_bytes_per_row']:>13.2f}"
            f"{m.per_row:>13.2f}{j['peak_transient_kb']:>9.1f}"
        )
    fast = results.tps.get("unrestricted")
    if fast is not None:
        verdict = "met" if fast.per_row < TARGET_BYTES_PER_ROW else "NOT met"
        lines += [
            "",
            f"fast path (unrestricted): {fast.per_row:.2f} bytes per row "
            f"(target ~0, < {TARGET_BYTES_PER_ROW:.0f}: {verdict})",
        ]
    for name, m in results.tps.items():
        if m.top and m.per_row >= TARGET_BYTES_PER_ROW:
            lines += ["", f"{name}: top allocating lines (chunks {TOP_CHUNKS})"]
            for t in m.top:
                lines.append(
                    f"  {t['bytes']:>10,} B {t['blocks']:>7} blocks  {t['line']}  {t['code']}"
                )
    if results.interrupted:
        lines += ["", "note: interrupted: partial results"]
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------


def gates(engine: Engine, caps: dict[str, Engine]) -> dict[str, Callable[[], Gate]]:
    def restricted(e: Engine) -> Callable[[], Gate]:
        return lambda: gate_for(Principal(CLIENT_USER, "exporter", False), EngineHolder(e))

    return {
        "unrestricted": lambda: gate_for(Principal(CLIENT_USER, "dba", True), DbaHolder(engine)),
        "masked": restricted(engine),
        **{name: restricted(e) for name, e in caps.items()},
    }


def uncapped_policy() -> str:
    text = policy(truncate=False, cap=1)
    return "\n".join(line for line in text.splitlines() if "rows_per_query" not in line) + "\n"


def run(opts: AllocOptions, stack: contextlib.ExitStack, results: AllocResults) -> None:
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgwarden-alloc-")))
    work.chmod(0o711)
    creds = Credentials.generate()
    server = PgServer(work / "pgdata")
    progress("starting PostgreSQL")
    server.start()
    stack.callback(server.stop)
    progress(f"PostgreSQL on 127.0.0.1:{server.port}; table bulk with {opts.rows:,} rows")
    server.psql(f"CREATE DATABASE {DB}")
    server.psql(table_sql(opts.rows), dbname=DB, timeout=900)
    server.create_service_account(SVC_USER, creds.svc_password, DB)
    results.info.update(
        postgres=server.psql("SHOW server_version").strip(),
        rows=opts.rows,
        row_bytes=int(float(server.psql(wire_bytes_sql(), dbname=DB))),
        sql=SELECT_SQL,
        python=sys.version.split()[0],
    )
    snapshot = svc_snapshot(server, creds)

    def engine(text: str) -> Engine:
        return Engine(parse_policy(text.encode(), source=Path("alloc.yaml")), snapshot, None)

    cap = 2 * opts.rows
    caps = {
        "capped-reject": engine(policy(truncate=False, cap=cap)),
        "capped-truncate": engine(policy(truncate=True, cap=cap)),
    }
    for name, make_gate in gates(engine(uncapped_policy()), caps).items():
        progress(f"{name}: logging in, one warm-up SELECT, one measured")
        driven = login(server, creds, make_gate())
        with contextlib.closing(driven.sock):
            query(driven, SELECT_SQL, None)  # fills the verdict cache
            measured = Measured(name)
            tracemalloc.start(1)
            try:
                query(driven, SELECT_SQL, measured)
            finally:
                tracemalloc.stop()
        results.tps[name] = measured
        progress(f"{name}: {measured.per_row:.2f} bytes per row over {measured.chunks} chunks")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    return drive(opts, AllocResults(opts), run, render_table)


if __name__ == "__main__":
    sys.exit(main())
