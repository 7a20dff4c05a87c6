"""Metrics without PostgreSQL: log events in, exposition text and HTTP answers out.

The exposition is read back with prometheus_client's own parser, and the HTTP
server is spoken to over a real socket with raw bytes, so garbage, oversized
and stalled requests are what a misbehaving client would really send.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from proxy.net.metrics import DURATION_BUCKETS, MAX_HEAD, Metrics, merge_expositions

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def statement(role: str, verdict: str, rows: int, ms: float) -> dict[str, object]:
    return {"role": role, "verdict": verdict, "kind": "select", "rows": rows, "duration_ms": ms}


# -- events -> series -------------------------------------------------------------


def test_a_scripted_session_shows_up_in_every_series() -> None:
    m = Metrics()
    script: list[tuple[str, dict[str, object]]] = [
        ("policy.loaded", {"hash": "abc"}),
        ("conn.opened", {}),
        ("auth.ok", {"user": "alice", "role": "support"}),
        ("statement", statement("support", "allow", 10, 1.5)),
        ("statement", statement("support", "allow", 40, 30.0)),
        ("statement", statement("support", "refuse", 0, 0.2)),
        ("limit.exceeded", {"cap": 50}),
        ("quota.exhausted", {"cap": 0}),
        ("conn.opened", {}),
        ("auth.ok", {"user": "bob", "role": "analyst"}),
        ("statement", statement("analyst", "allow", 1000, 2500.0)),
        ("conn.opened", {}),
        ("auth.failed", {"user": "mallory", "reason": "bad password"}),
        ("conn.closed", {"statements": 0, "rows": 0, "duration_s": 0.1}),
        ("conn.opened", {}),
        ("auth.failed", {"user": "eve", "reason": "no role"}),
        ("conn.closed", {"statements": 0, "rows": 0, "duration_s": 0.1}),
        ("conn.refused", {"reason": "limit"}),
        ("conn.refused", {"reason": "tls"}),
        ("conn.refused", {"reason": "startup timeout"}),
        ("policy.rejected", {"error": "policy.yaml:3:1: bad"}),
        ("ledger.error", {"error": "down", "during": "charge"}),
        ("ledger.error", {"error": "down", "during": "read"}),
        ("backstop.tripped", {"what": "raw classified column in a result"}),
        ("analysis.failed", {"error": "RecursionError"}),
        ("upstream.error", {"error": "refused"}),
        ("conn.closed", {"statements": 3, "rows": 50, "duration_s": 2.0}),
    ]
    for event, fields in script:
        m.observe(event, fields)
    found = samples(m)

    assert value(found, "pgwarden_connections_open") == 1
    assert value(found, "pgwarden_connections_total") == 4
    reasons = ("auth", "no_role", "limit", "tls", "other")
    refused = {r: value(found, "pgwarden_connections_refused_total", reason=r) for r in reasons}
    assert refused == {"auth": 1, "no_role": 1, "limit": 1, "tls": 1, "other": 1}
    stmts = "pgwarden_statements_total"
    assert value(found, stmts, verdict="allow", role="support") == 2
    assert value(found, stmts, verdict="refuse", role="support") == 1
    assert value(found, stmts, verdict="allow", role="analyst") == 1
    assert (stmts, frozenset({("verdict", "refuse"), ("role", "analyst")})) not in found
    assert value(found, "pgwarden_rows_forwarded_total", role="support") == 50
    assert value(found, "pgwarden_rows_forwarded_total", role="analyst") == 1000
    assert value(found, "pgwarden_limit_hits_total", kind="cap") == 1
    assert value(found, "pgwarden_limit_hits_total", kind="quota") == 1
    assert value(found, "pgwarden_policy_reloads_total", result="loaded") == 1
    assert value(found, "pgwarden_policy_reloads_total", result="rejected") == 1
    assert value(found, "pgwarden_ledger_errors_total") == 2
    assert value(found, "pgwarden_backstop_trips_total") == 1
    assert value(found, "pgwarden_analysis_failures_total") == 1
    assert value(found, "pgwarden_upstream_errors_total") == 1

    hist = "pgwarden_statement_duration_seconds"
    assert value(found, f"{hist}_count", role="support") == 3
    assert value(found, f"{hist}_sum", role="support") == pytest.approx(0.0317)
    assert value(found, f"{hist}_bucket", role="support", le="0.0005") == 1  # 0.2 ms
    assert value(found, f"{hist}_bucket", role="support", le="0.0025") == 2  # + 1.5 ms
    assert value(found, f"{hist}_bucket", role="support", le="0.05") == 3  # + 30 ms
    assert value(found, f"{hist}_bucket", role="analyst", le="1.0") == 0
    assert value(found, f"{hist}_bucket", role="analyst", le="2.5") == 1


def test_the_histogram_spans_half_a_millisecond_to_ten_seconds() -> None:
    assert DURATION_BUCKETS[0] == 0.0005
    assert DURATION_BUCKETS[-1] == 10.0
    assert list(DURATION_BUCKETS) == sorted(set(DURATION_BUCKETS))
    m = Metrics()
    m.observe("statement", statement("dba", "allow", 0, 60_000.0))  # a minute: only +Inf
    found = samples(m)
    hist = "pgwarden_statement_duration_seconds_bucket"
    assert value(found, hist, role="dba", le="10.0") == 0
    assert value(found, hist, role="dba", le="+Inf") == 1


def test_series_that_alerts_rely_on_exist_at_zero_before_any_event() -> None:
    found = samples(Metrics())
    assert value(found, "pgwarden_connections_open") == 0
    assert value(found, "pgwarden_connections_refused_total", reason="auth") == 0
    assert value(found, "pgwarden_limit_hits_total", kind="quota") == 0
    assert value(found, "pgwarden_policy_reloads_total", result="rejected") == 0
    assert value(found, "pgwarden_ledger_errors_total") == 0


def test_upstream_time_is_observed_when_the_event_carries_it() -> None:
    m = Metrics()
    m.observe("statement", statement("support", "allow", 1, 3.0))
    m.observe("statement", {**statement("support", "allow", 1, 3.0), "upstream_ms": 2.0})
    found = samples(m)
    name = "pgwarden_statement_upstream_seconds"
    assert value(found, f"{name}_count", role="support") == 1
    assert value(found, f"{name}_sum", role="support") == pytest.approx(0.002)


def test_unknown_events_change_nothing() -> None:
    m = Metrics()
    before = samples(m)
    for event in ("startup", "shutdown", "auth.ok", "tls.failed", "", "statement.extra"):
        m.observe(event, {"role": "support", "rows": 5})
    assert samples(m) == before


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"role": None, "verdict": None, "rows": None, "duration_ms": None},
        {"role": ["not", "hashable"], "verdict": "allow", "rows": 1, "duration_ms": 1},
        {"role": "support", "verdict": "allow", "rows": "many", "duration_ms": 1},
        {"role": "support", "verdict": "allow", "rows": -3, "duration_ms": "slow"},
        {"role": "support", "verdict": "allow", "rows": 1, "duration_ms": 10**400},
        {"role": "support", "verdict": "maybe", "rows": 0, "duration_ms": 1},
    ],
)
def test_malformed_statement_fields_never_raise(fields: dict[str, object]) -> None:
    m = Metrics()
    m.observe("statement", fields)
    m.observe("conn.refused", {"reason": ["x"]})
    m.observe("auth.failed", {})
    found = samples(m)  # and the exposition still renders
    assert value(found, "pgwarden_connections_refused_total", reason="other") == 1
    assert value(found, "pgwarden_connections_refused_total", reason="auth") == 1
    verdicts = {dict(labels).get("verdict") for name, labels in found if "statements" in name}
    assert verdicts <= {"allow", "refuse"}  # a verdict label never takes a stray value


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe("conn.opened", {})
    assert value(samples(a), "pgwarden_connections_total") == 1
    assert value(samples(b), "pgwarden_connections_total") == 0


# -- verdict cache, read at scrape time ----------------------------------------------


def cache_values(m: Metrics) -> tuple[float, float] | None:
    found = samples(m)
    none: frozenset[tuple[str, str]] = frozenset()
    key_h, key_m = (
        ("pgwarden_verdict_cache_hits_total", none),
        ("pgwarden_verdict_cache_misses_total", none),
    )
    if key_h not in found:
        return None
    return found[key_h], found[key_m]


def test_cache_stats_are_read_from_the_callback_at_scrape_time() -> None:
    m = Metrics()
    assert cache_values(m) is None  # no callback: declared, no sample
    stats = [7, 3]
    m.cache_stats = lambda: (stats[0], stats[1])
    assert cache_values(m) == (7, 3)
    stats[:] = [20, 4]
    assert cache_values(m) == (20, 4)


def test_cache_counters_survive_an_engine_rebuild() -> None:
    m = Metrics()
    stats = [100, 10]
    m.cache_stats = lambda: (stats[0], stats[1])
    assert cache_values(m) == (100, 10)
    stats[:] = [5, 2]  # a policy reload built a fresh engine
    assert cache_values(m) == (105, 12)
    stats[:] = [9, 2]
    assert cache_values(m) == (109, 12)


def test_a_failing_cache_callback_does_not_break_the_scrape() -> None:
    m = Metrics()

    def broken() -> tuple[int, int]:
        raise RuntimeError("engine gone")

    m.cache_stats = broken
    assert cache_values(m) is None
    assert value(samples(m), "pgwarden_connections_open") == 0


def test_observe_is_cheap_enough_for_every_statement() -> None:
    # A generous bound (typically ~2 us): catches a regression to per-call label
    # lookups or formatting, not scheduler noise.
    m = Metrics()
    fields = statement("support", "allow", 5, 1.0)
    m.observe("statement", fields)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        m.observe("statement", fields)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 50e-6


# -- HTTP ---------------------------------------------------------------------------


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes; b"" if it reset the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        headers[name.strip().lower()] = rest.strip()
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    return status, headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return parse(await exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))


def with_server(m: Metrics, body: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await m.serve("127.0.0.1", 0)
        try:
            await body(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


async def still_serving(port: int) -> None:
    status, _, _ = await get(port, "/metrics")
    assert status == 200


def test_get_metrics_answers_with_the_exposition() -> None:
    m = Metrics()
    m.observe("conn.opened", {})
    m.observe("statement", statement("support", "allow", 3, 1.0))

    async def body(port: int) -> None:
        for path in ("/metrics", "/metrics?name[]=x"):
            status, headers, text = await get(port, path)
            assert status == 200
            assert headers["content-type"] == CONTENT_TYPE_LATEST
            names = {f.name for f in text_string_to_metric_families(text.decode())}
            assert {"pgwarden_connections_open", "pgwarden_statements"} <= names
            assert b'pgwarden_rows_forwarded_total{role="support"} 3.0' in text

    with_server(m, body)


def test_healthz_without_a_callback_says_the_process_is_up() -> None:
    async def body(port: int) -> None:
        status, headers, text = await get(port, "/healthz")
        assert (status, headers["content-type"]) == (200, "application/json")
        assert json.loads(text) == {"status": "ok"}

    with_server(Metrics(), body)


def test_healthz_follows_the_callback() -> None:
    m = Metrics()
    state = {"upstream": "ok", "ledger": "ok"}

    async def health() -> tuple[bool, dict[str, str]]:
        return all(v == "ok" for v in state.values()), {**state, "status": "ignored"}

    m.health = health

    async def body(port: int) -> None:
        status, _, text = await get(port, "/healthz")
        assert (status, json.loads(text)) == (
            200,
            {"status": "ok", "upstream": "ok", "ledger": "ok"},
        )
        state["upstream"] = "unreachable"
        status, _, text = await get(port, "/healthz")
        assert status == 503
        assert json.loads(text) == {
            "status": "unavailable",
            "upstream": "unreachable",
            "ledger": "ok",
        }
        state["upstream"] = "ok"
        status, _, _ = await get(port, "/healthz")
        assert status == 200

    with_server(m, body)


def test_healthz_is_503_when_the_callback_fails_or_hangs() -> None:
    m = Metrics()
    m.health_timeout_s = 0.2

    async def broken() -> tuple[bool, dict[str, str]]:
        raise OSError("probe failed")

    async def hanging() -> tuple[bool, dict[str, str]]:
        await asyncio.sleep(60)
        return True, {}

    async def nonsense() -> tuple[bool, dict[str, str]]:
        return None  # type: ignore[return-value]  # a buggy callback

    async def body(port: int) -> None:
        m.health = nonsense
        status, _, _ = await get(port, "/healthz")
        assert status == 503
        m.health = broken
        status, _, text = await get(port, "/healthz")
        assert status == 503
        assert json.loads(text)["status"] == "unavailable"
        m.health = hanging
        status, _, text = await get(port, "/healthz")
        assert status == 503
        assert json.loads(text) == {"status": "unavailable", "error": "health check timed out"}

    with_server(m, body)


def test_unknown_paths_are_404_and_other_methods_405() -> None:
    async def body(port: int) -> None:
        for path in ("/", "/metricsx", "/healthz/", "/../etc/passwd"):
            status, _, _ = await get(port, path)
            assert status == 404, path
        for method in ("POST", "HEAD", "PUT", "DELETE", "OPTIONS", "get"):
            raw = await exchange(port, f"{method} /metrics HTTP/1.1\r\n\r\n".encode())
            status, headers, _ = parse(raw)
            assert (status, headers["allow"]) == (405, "GET"), method
        await still_serving(port)

    with_server(Metrics(), body)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET /metrics HTTP/1.1 extra\r\n\r\n",
        b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
    ],
)
def test_garbage_gets_400_and_the_server_goes_on(garbage: bytes) -> None:
    async def body(port: int) -> None:
        status, _, _ = parse(await exchange(port, garbage))
        assert status == 400
        await still_serving(port)

    with_server(Metrics(), body)


def test_bare_newlines_are_accepted() -> None:
    async def body(port: int) -> None:
        status, _, _ = parse(await exchange(port, b"GET /metrics HTTP/1.0\nHost: x\n\n"))
        assert status == 200

    with_server(Metrics(), body)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",  # one oversized request line
        # many headers, each short, together over the cap
        b"GET /metrics HTTP/1.1\r\n" + (b"X-Pad: " + b"b" * 200 + b"\r\n") * 60 + b"\r\n",
        b"x" * (MAX_HEAD + 1),  # no newline at all
    ],
)
def test_an_oversized_head_closes_the_connection(request_bytes: bytes) -> None:
    async def body(port: int) -> None:
        raw = await exchange(port, request_bytes)
        assert raw == b"" or parse(raw)[0] == 431  # answered 431, or reset while sending
        await still_serving(port)

    with_server(Metrics(), body)


def test_a_stalled_or_vanishing_client_is_dropped() -> None:
    m = Metrics()
    m.read_timeout_s = 0.2

    async def body(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metr")  # and then nothing
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
        writer.close()
        await writer.wait_closed()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # half a head, then gone
        writer.close()
        await writer.wait_closed()
        await still_serving(port)

    with_server(m, body)


def test_concurrent_scrapes_all_answer() -> None:
    async def body(port: int) -> None:
        results = await asyncio.gather(*(get(port, "/metrics") for _ in range(20)))
        assert {status for status, _, _ in results} == {200}

    with_server(Metrics(), body)


def test_workers_expositions_sum_series_by_series() -> None:
    first, second = Metrics(), Metrics()
    for metrics, rows in ((first, 3), (second, 4)):
        metrics.observe("conn.opened", {})
        metrics.observe(
            "statement", {"role": "support", "verdict": "allow", "rows": rows, "duration_ms": 2.0}
        )
    second.observe("statement", {"role": "dba", "verdict": "refuse"})
    merged = merge_expositions([first.exposition(), second.exposition()]).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
    }
    assert samples[("pgwarden_connections_open", ())] == 2
    assert samples[("pgwarden_rows_forwarded_total", (("role", "support"),))] == 7
    assert samples[("pgwarden_statements_total", (("role", "dba"), ("verdict", "refuse")))] == 1
    bucket = ("pgwarden_statement_duration_seconds_bucket", (("le", "0.0025"), ("role", "support")))
    assert samples[bucket] == 2
    assert not any(name.endswith("_created") for name, _ in samples)  # timestamps: no sum


def test_a_supervisor_scrape_adds_its_workers() -> None:
    supervisor, worker = Metrics(), Metrics()
    worker.observe("conn.opened", {})

    async def remote() -> list[bytes]:
        return [worker.exposition(), worker.exposition()]

    supervisor.remote = remote
    text = asyncio.run(supervisor.scrape()).decode()
    assert "pgwarden_connections_open 2.0" in text.splitlines()
