"""/metrics and /healthz of a running pgwarden, after a scripted workload."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

import psycopg
import pytest
from conftest import PASSWORDS, Proxy
from prometheus_client.parser import text_string_to_metric_families

from proxy.pgserver import free_port

Launcher = Callable[..., Proxy]


def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{proxy.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def healthz(proxy: Proxy) -> tuple[int, dict[str, str]]:
    url = f"http://127.0.0.1:{proxy.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_metrics_after_a_workload(pgwarden: Launcher) -> None:
    proxy = pgwarden()
    with psycopg.connect(proxy.dsn("alice", PASSWORDS["alice"]), autocommit=True) as alice:
        for _ in range(3):
            alice.execute("SELECT id, email FROM customers WHERE id <= 5").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            alice.execute("SELECT street FROM customers")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            alice.execute("SELECT id FROM orders")
    with psycopg.connect(proxy.dsn("dora", PASSWORDS["dora"]), autocommit=True) as dora:
        dora.execute("SELECT 1").fetchall()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn("alice", "wrong"))
    m = scrape(proxy)
    assert m[("pgwarden_statements_total", (("role", "support"), ("verdict", "allow")))] >= 4
    assert m[("pgwarden_statements_total", (("role", "support"), ("verdict", "refuse")))] == 1
    assert m[("pgwarden_statements_total", (("role", "dba"), ("verdict", "allow")))] >= 1
    assert m[("pgwarden_rows_forwarded_total", (("role", "support"),))] >= 15
    assert m[("pgwarden_limit_hits_total", (("kind", "cap"),))] == 1
    assert m[("pgwarden_connections_total", ())] >= 3
    assert m[("pgwarden_connections_refused_total", (("reason", "auth"),))] >= 1
    assert m[("pgwarden_verdict_cache_hits_total", ())] >= 2  # the same text three times
    assert m[("pgwarden_verdict_cache_misses_total", ())] >= 3
    assert m[("pgwarden_statement_duration_seconds_count", (("role", "support"),))] >= 4
    assert m[("pgwarden_statement_upstream_seconds_count", (("role", "support"),))] >= 4


def test_healthz_follows_upstream_and_ledger(pgwarden: Launcher) -> None:
    assert healthz(pgwarden()) == (200, {"status": "ok", "upstream": "ok", "ledger": "ok"})
    dead = pgwarden(upstream={"dsn": f"postgresql://x@127.0.0.1:{free_port()}/shop"})
    status, body = healthz(dead)
    assert status == 503
    assert body["upstream"] == "unreachable"
