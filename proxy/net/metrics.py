"""Prometheus metrics and the health endpoint, served on metrics_listen.

Strategy:
* The log events are the only input. The Server hands every event it logs to
  `Metrics.observe(event, fields)`, which maps it to series; no other module
  touches a metric, so what the metrics say and what the logs say cannot drift
  apart. docs/metrics.md lists the series and the event each comes from.
* `observe` runs once per statement, so it is cheap: one dict lookup picks the
  event's handler, label children are created once and kept in dicts keyed by
  their label values, and nothing is formatted. Values that are read anyway
  (the verdict cache counters) are read from a callback at scrape time.
* `observe` never raises: a metric must not be able to break a session. A field
  of the wrong type is skipped; an unknown event is ignored.
* The registry is this object's own, not prometheus_client's global one, so
  several servers in one process (the tests) never share series.
* With `--workers N`, the supervisor's Metrics answers the scrape: `remote`
  fetches every worker's exposition and `merge_expositions` sums them series
  by series (every pgwarden series is a counter, a gauge of a sum, or a
  histogram, so the sum is the whole pgwarden's value).
* The HTTP side is a tiny asyncio HTTP/1.1 server (GET only, one request per
  connection): the request head is read within `read_timeout_s` and at most
  `MAX_HEAD` bytes, anything else gets a 4xx and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

CacheStats = Callable[[], tuple[int, int]]
"""Returns the verdict cache's (hits, misses) so far; called at scrape time."""

RemoteExpositions = Callable[[], Awaitable[list[bytes]]]
"""Returns the expositions of the processes this one answers for (the workers)."""

HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, str]]]]
"""Returns (healthy, details), e.g. (False, {"upstream": "ok", "ledger": "unreachable"})."""

# 0.5 ms to 10 s: a cached allow is well under a millisecond of proxy time; a
# report query may take seconds.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

REFUSAL_REASONS = ("auth", "no_role", "limit", "tls", "other")
MAX_HEAD = 8192  # bytes of request line and headers together
MAX_CLIENTS = 64  # concurrent HTTP connections; more are closed at once

_STATUS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


class _HeadTooLarge(Exception):
    pass


class _CacheCollector:
    """The verdict cache's hits and misses, read from `Metrics.cache_stats` per scrape.

    The engine's counters restart from zero when it is rebuilt (policy reload,
    schema refresh); a drop is taken as a restart and added to a base, so the
    exported counters only ever go up.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._last = (0, 0)
        self._base = (0, 0)

    def describe(self) -> list[Metric]:
        return self._families(None)

    def collect(self) -> list[Metric]:
        stats = self._metrics.cache_stats
        if stats is None:
            return self._families(None)
        try:
            hits, misses = stats()
        except Exception:  # noqa: BLE001  # a failing callback must not break the scrape
            return self._families(None)
        return self._families(self._advance(int(hits), int(misses)))

    def _advance(self, hits: int, misses: int) -> tuple[int, int]:
        last_hits, last_misses = self._last
        base_hits, base_misses = self._base
        if hits < last_hits or misses < last_misses:  # the engine was rebuilt
            base_hits += last_hits
            base_misses += last_misses
            self._base = (base_hits, base_misses)
        self._last = (hits, misses)
        return base_hits + hits, base_misses + misses

    @staticmethod
    def _families(values: tuple[int, int] | None) -> list[Metric]:
        hits = CounterMetricFamily(
            "pgwarden_verdict_cache_hits", "Statements whose verdict came from the cache."
        )
        misses = CounterMetricFamily(
            "pgwarden_verdict_cache_misses", "Statements analysed because no verdict was cached."
        )
        if values is not None:
            hits.add_metric([], values[0])
            misses.add_metric([], values[1])
        return [hits, misses]


class Metrics:
    """Every pgwarden series, fed by log events; serves /metrics and /healthz.

    Contract of the callbacks the Server sets:
    * `cache_stats()` returns the verdict cache's (hits, misses); it is called
      on the event loop at each scrape, so it must be quick and must not block.
    * `await health()` returns (healthy, details): healthy is True when
      pgwarden can reach both the upstream database and the quota ledger;
      details maps each dependency to a short word ("ok", "unreachable", ...)
      and is copied into the JSON body. It should bound its own probes; it is
      cancelled after `health_timeout_s` and any exception counts as unhealthy.
      With no callback, /healthz answers 200 (the process is up).
    """

    read_timeout_s = 5.0
    health_timeout_s = 5.0

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.cache_stats: CacheStats | None = None
        self.health: HealthCheck | None = None
        self.remote: RemoteExpositions | None = None
        self._clients = 0
        self._define_series()
        self._stmt: dict[tuple[str, str], Any] = {}  # (verdict, role) -> counter child
        self._role: dict[str, tuple[Any, Any]] = {}  # role -> (rows child, duration child)
        self._upstream: dict[str, Any] = {}  # role -> upstream-duration child
        self._refused = {r: self._conn_refused.labels(reason=r) for r in REFUSAL_REASONS}
        self._limit_cap = self._limit_hits.labels(kind="cap")
        self._limit_quota = self._limit_hits.labels(kind="quota")
        self._records_out = {w: self._records_exhausted.labels(window=w) for w in _WINDOWS}
        self._alert_kinds = {k: self._alerts.labels(kind=k) for k in _ALERT_KINDS}
        self._lock_reasons = {r: self._locks.labels(reason=r) for r in _LOCK_REASONS}
        self._reload_ok = self._policy_reloads.labels(result="loaded")
        self._reload_bad = self._policy_reloads.labels(result="rejected")
        self.registry.register(_CacheCollector(self))
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "conn.opened": self._on_opened,
            "conn.closed": self._on_closed,
            "auth.failed": self._on_auth_failed,
            "conn.refused": self._on_refused,
            "statement": self._on_statement,
            "limit.exceeded": lambda _: self._limit_cap.inc(),
            "quota.exhausted": lambda _: self._limit_quota.inc(),
            "policy.loaded": lambda _: self._reload_ok.inc(),
            "policy.rejected": lambda _: self._reload_bad.inc(),
            "ledger.error": lambda _: self._ledger_errors.inc(),
            "backstop.tripped": lambda _: self._backstop_trips.inc(),
            "analysis.failed": lambda _: self._analysis_failures.inc(),
            "upstream.error": lambda _: self._upstream_errors.inc(),
            "break_glass.opened": self._on_break_glass,
            "records.exhausted": lambda f: self._records_out[f["window"]].inc(),
            "decoy.touched": lambda _: self._decoys.inc(),
            "enumeration.alert": lambda f: self._alert_kinds[f["kind"]].inc(),
            "user.locked": lambda f: self._lock_reasons[f["reason"]].inc(),
        }

    def _define_series(self) -> None:
        r = self.registry
        self._conn_open = Gauge(
            "pgwarden_connections_open", "Client connections open now.", registry=r
        )
        self._conn_total = Counter(
            "pgwarden_connections", "Client connections accepted.", registry=r
        )
        self._conn_refused = Counter(
            "pgwarden_connections_refused",
            "Client connections refused, by reason (auth, no_role, limit, tls, other).",
            ["reason"],
            registry=r,
        )
        self._statements = Counter(
            "pgwarden_statements",
            "Statements checked, by verdict (allow, refuse) and role.",
            ["verdict", "role"],
            registry=r,
        )
        self._rows = Counter(
            "pgwarden_rows_forwarded", "Result rows sent to clients, by role.", ["role"], registry=r
        )
        self._limit_hits = Counter(
            "pgwarden_limit_hits",
            "Statements stopped by a row cap (kind=cap) or a quota (kind=quota).",
            ["kind"],
            registry=r,
        )
        self._duration = Histogram(
            "pgwarden_statement_duration_seconds",
            "Statement time as the client sees it, by role.",
            ["role"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._upstream_duration = Histogram(
            "pgwarden_statement_upstream_seconds",
            "Part of the statement time spent in the upstream database, by role.",
            ["role"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._policy_reloads = Counter(
            "pgwarden_policy_reloads",
            "Policy loads, by result (loaded, rejected).",
            ["result"],
            registry=r,
        )
        self._ledger_errors = Counter(
            "pgwarden_ledger_errors", "Failed reads or writes of the quota ledger.", registry=r
        )
        self._backstop_trips = Counter(
            "pgwarden_backstop_trips",
            "Sessions closed by the result backstop (a raw classified value on its way out).",
            registry=r,
        )
        self._analysis_failures = Counter(
            "pgwarden_analysis_failures",
            "Statements refused because pgwarden's own analysis failed.",
            registry=r,
        )
        self._upstream_errors = Counter(
            "pgwarden_upstream_errors", "Failures to reach the upstream database.", registry=r
        )
        self._records_exhausted = Counter(
            "pgwarden_records_exhausted",
            "Statements stopped by a distinct-record budget, by window (day, 7d, 30d).",
            ["window"],
            registry=r,
        )
        self._decoys = Counter(
            "pgwarden_decoys_touched",
            "Statements whose result held a planted (decoy) record: refused, user locked.",
            registry=r,
        )
        self._alerts = Counter(
            "pgwarden_enumeration_alerts",
            "Enumeration alerts, by kind (lookups, id_run, offset_paging).",
            ["kind"],
            registry=r,
        )
        self._locks = Counter(
            "pgwarden_users_locked",
            "Users locked, by reason (decoy, enumeration).",
            ["reason"],
            registry=r,
        )
        self._break_glass = Counter(
            "pgwarden_break_glass_opened",
            "Break-glass windows opened (a reason stated), by role.",
            ["role"],
            registry=r,
        )

    # -- events -----------------------------------------------------------------

    def observe(self, event: str, fields: Mapping[str, Any]) -> None:
        """Count one log event; unknown events are ignored and nothing ever raises."""
        handler = self._handlers.get(event)
        if handler is None:
            return
        try:
            handler(fields)
        except Exception:  # noqa: BLE001  # a malformed field costs a sample, never a session
            return

    def _on_opened(self, _: Mapping[str, Any]) -> None:
        self._conn_open.inc()
        self._conn_total.inc()

    def _on_closed(self, _: Mapping[str, Any]) -> None:
        self._conn_open.dec()

    def _on_auth_failed(self, fields: Mapping[str, Any]) -> None:
        self._refused["no_role" if fields.get("reason") == "no role" else "auth"].inc()

    def _on_refused(self, fields: Mapping[str, Any]) -> None:
        reason = fields.get("reason")
        child = self._refused.get(reason) if isinstance(reason, str) else None
        (child if child is not None else self._refused["other"]).inc()

    def _on_break_glass(self, fields: Mapping[str, Any]) -> None:
        role = fields.get("role")
        self._break_glass.labels(role=role if isinstance(role, str) else "").inc()

    def _on_statement(self, fields: Mapping[str, Any]) -> None:
        role = fields.get("role")
        if not isinstance(role, str):
            role = ""
        verdict = "allow" if fields.get("verdict") == "allow" else "refuse"
        key = (verdict, role)
        counter = self._stmt.get(key)
        if counter is None:
            counter = self._stmt[key] = self._statements.labels(verdict=verdict, role=role)
        counter.inc()
        children = self._role.get(role)
        if children is None:
            children = (self._rows.labels(role=role), self._duration.labels(role=role))
            self._role[role] = children
        rows = fields.get("rows")
        if rows:
            children[0].inc(rows)
        ms = fields.get("duration_ms")
        if ms is not None:
            children[1].observe(ms / 1000.0)
        upstream_ms = fields.get("upstream_ms")
        if upstream_ms is not None:
            child = self._upstream.get(role)
            if child is None:
                child = self._upstream[role] = self._upstream_duration.labels(role=role)
            child.observe(upstream_ms / 1000.0)

    def exposition(self) -> bytes:
        """This process's series, as text."""
        return bytes(generate_latest(self.registry))

    async def scrape(self) -> bytes:
        """The text /metrics answers with: this process's series, plus the workers' summed."""
        if self.remote is None:
            return self.exposition()
        return merge_expositions([self.exposition(), *await self.remote()])

    # -- HTTP -------------------------------------------------------------------

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """Listen on host:port for GET /metrics and GET /healthz; close the server to stop."""
        return await asyncio.start_server(self._handle, host, port, limit=MAX_HEAD)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients <= MAX_CLIENTS:
                response = await self._respond(reader)
                if response is not None:
                    writer.write(response)
                    async with asyncio.timeout(self.read_timeout_s):
                        await writer.drain()
        except (OSError, TimeoutError):  # the client went away or stalled
            pass
        finally:
            self._clients -= 1
            writer.close()
            with suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            async with asyncio.timeout(self.read_timeout_s):
                head = await _read_head(reader)
        except _HeadTooLarge:
            return _response(431, _TEXT, b"request head too large\n")
        except TimeoutError:
            return None
        if head is None:  # closed before the end of the head
            return None
        return await self._route(head[0].split() if head else [])

    async def _route(self, request_line: list[bytes]) -> bytes:
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
            return _response(400, _TEXT, b"bad request\n")
        method, target = request_line[0], request_line[1].split(b"?", 1)[0]
        if method != b"GET":
            return _response(405, _TEXT, b"only GET\n", extra=b"Allow: GET\r\n")
        if target == b"/metrics":
            return _response(200, CONTENT_TYPE_LATEST, await self.scrape())
        if target == b"/healthz":
            return await self._healthz()
        return _response(404, _TEXT, b"not found; try /metrics or /healthz\n")

    async def _healthz(self) -> bytes:
        healthy, details = await self._check()
        status = {"status": "ok" if healthy else "unavailable"}
        body = status | {key: value for key, value in details.items() if key != "status"}
        data = json.dumps(body).encode() + b"\n"
        return _response(200 if healthy else 503, _JSON, data)

    async def _check(self) -> tuple[bool, dict[str, str]]:
        if self.health is None:
            return True, {}
        try:
            async with asyncio.timeout(self.health_timeout_s):
                healthy, details = await self.health()
            return bool(healthy), {str(k): str(v) for k, v in details.items()}
        except TimeoutError:
            return False, {"error": "health check timed out"}
        except Exception as exc:  # noqa: BLE001  # any failure of the check means unhealthy
            return False, {"error": f"health check failed: {type(exc).__name__}"}


class _Merged:
    """A collector yielding already-summed families (for generate_latest)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_expositions(texts: list[bytes]) -> bytes:
    """Sum the samples of several expositions, series by series (label set by label set).

    `_created` timestamps are dropped: a sum of them means nothing, and they are
    optional in the format. Families and samples keep their first-seen order, so
    histogram buckets stay ascending.
    """
    families: dict[str, tuple[Metric, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name.endswith("_created") and family.type == "gauge":
                continue
            entry = families.get(family.name)
            if entry is None:
                entry = families[family.name] = (
                    Metric(family.name, family.documentation, family.type),
                    {},
                )
            sums = entry[1]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                sums[key] = sums.get(key, 0.0) + sample.value
    merged = []
    for metric, sums in families.values():
        for (name, labels), value in sums.items():
            metric.add_sample(name, dict(labels), value)
        merged.append(metric)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merged))
    return bytes(generate_latest(registry))


async def _read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """Request line and header lines, up to the blank line; None on early EOF."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError as exc:  # one line longer than the reader's limit
            raise _HeadTooLarge from exc
        if not line.endswith(b"\n"):
            return None
        size += len(line)
        if size > MAX_HEAD:
            raise _HeadTooLarge
        if line in (b"\r\n", b"\n"):
            return lines
        lines.append(line)


def _response(status: int, content_type: str, body: bytes, *, extra: bytes = b"") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_STATUS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


_WINDOWS = ("day", "7d", "30d")
_ALERT_KINDS = ("lookups", "id_run", "offset_paging")
_LOCK_REASONS = ("decoy", "enumeration")
