"""docs/logging.md is the contract: a real scenario emits its events with their fields.

The table in docs/logging.md is parsed (event, level, fields); one pgwarden goes
through logins good and bad, statements allowed, refused and capped, a quota running
out, a reload good and bad, a cancel, and a shutdown. Every line must be JSON with
ts, level and event; every event seen must be documented, at its documented level,
with its documented fields; and the events of the scenario must all be there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PASSWORDS, TEST_POLICY, Proxy

from proxy.wire import frontend as fe

Launcher = Callable[..., Proxy]
DOC = Path(__file__).resolve().parent.parent / "docs" / "logging.md"

# Fields a documented event may leave out (they apply only in some cases).
OPTIONAL = {
    "statement": {"reason", "sqlstate", "error", "tables"},
    "policy.loaded": {"changes"},
    "ledger.error": {"rows"},
    "upstream.error": {"during"},
    "conn.closed": {"reason"},
    "worker.exited": {"exit_code", "signal"},  # one or the other
    "conn.refused": {"user"},  # max_connections_per_user only
    "user.locked": {"table", "kind"},  # table for a decoy, kind for an alert
    "quota.exhausted": {"on_exceed"},  # not when refused before it ran
}


def documented() -> dict[str, tuple[str, set[str]]]:
    """event -> (level, fields) from the table of docs/logging.md."""
    events: dict[str, tuple[str, set[str]]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_.]+)`", cells[0])
        fields = set(re.findall(r"\b([a-z_]+)\b", re.sub(r"\([^)]*\)", "", cells[3])))
        fields -= {"and", "or", "the", "when", "per", "role", "from", "on", "of", "for"}
        for name in names:
            events[name] = (cells[1], fields)
    return events


def test_the_documented_events_are_the_ones_emitted(pgwarden: Launcher) -> None:
    doc = documented()
    assert {"statement", "conn.closed", "policy.loaded", "quota.exhausted"} <= set(doc)
    # its own user: the ledger is shared by every proxy of the test session
    policy = TEST_POLICY.replace("rows_per_hour: 20000", "rows_per_hour: 60").replace(
        "members: [alice, carol]", "members: [alice, carol, events_user]"
    )
    users = {**PASSWORDS, "events_user": "events-pw"}
    proxy = pgwarden(policy_text=policy, users=users)
    with psycopg.connect(proxy.dsn("events_user", "events-pw"), autocommit=True) as alice:
        alice.execute("SELECT id FROM customers WHERE id <= 50").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            alice.execute("SELECT street FROM customers")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            alice.execute("SELECT id FROM orders")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            alice.execute("SELECT id FROM customers WHERE id <= 20").fetchall()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn("events_user", "wrong-password"))
    proxy.policy_path.write_text("version: 1\nroles: {broken")
    proxy.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    proxy.policy_path.write_text(policy.replace("members: [bob]", "members: [bob, frank]"))
    proxy.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proxy.stop() == 0
    expected = {
        "startup", "schema.loaded", "conn.opened", "auth.ok", "auth.failed", "statement",
        "limit.exceeded", "quota.exhausted", "policy.rejected", "policy.loaded",
        "conn.closed", "shutdown",
    }  # fmt: skip
    assert_documented(proxy, doc, expected)


def test_the_supervisor_events_are_documented(pgwarden: Launcher) -> None:
    proxy = pgwarden(workers=2)
    deadline = time.monotonic() + 30
    while not [e for e in proxy.events() if e.get("event") == "supervisor.started"]:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    victim = next(e for e in proxy.events() if e.get("event") == "startup")
    os.kill(victim["pid"], signal.SIGKILL)
    while len([e for e in proxy.events() if e.get("event") == "startup"]) < 3:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    assert proxy.stop() == 0
    expected = {"supervisor.started", "worker.started", "worker.exited", "supervisor.shutdown"}
    assert_documented(proxy, documented(), expected)
    workers = [e for e in proxy.events() if e["event"] in ("startup", "shutdown")]
    assert all(isinstance(e["worker"], int) for e in workers)  # every worker line says whose


# Emitted only by a bug in pgwarden (unit-tested: tests/test_session.py,
# tests/test_faults.py, tests/test_metrics_unit.py), or by the CLI rather than
# the server (tests/test_quota_ledger.py).
NOT_IN_A_SCENARIO = {
    "backstop.tripped", "analysis.failed", "internal.error", "quota.reset", "user.unlocked",
}  # fmt: skip
# emitted, and checked against this page, in tests/test_records.py
RECORDS = {"records.exhausted", "enumeration.alert", "decoy.touched", "user.locked"}


def test_the_edge_events_are_documented_and_every_documented_event_happens(
    pgwarden: Launcher,
) -> None:
    doc = documented()
    proxy = pgwarden(limits={"startup_timeout_s": 1, "max_connections_per_user": 1})
    dora = proxy.dsn("dora", PASSWORDS["dora"], sslmode="disable")
    with socket.create_connection((proxy.host, proxy.port)) as tls:  # a TLS handshake of junk
        tls.sendall(fe.encode_ssl_request())
        assert tls.recv(1) == b"S"
        tls.sendall(b"\x16\x03\x01\x00\x05junk!")
        tls.recv(1024)
    with socket.create_connection((proxy.host, proxy.port)) as silent:  # says nothing
        silent.settimeout(10)
        silent.recv(1024)  # closed after startup_timeout_s
    with socket.create_connection((proxy.host, proxy.port)) as stranger:
        stranger.sendall(fe.encode_cancel(12345, b"nope"))
    with psycopg.connect(dora, autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            psycopg.connect(dora)
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
    proxy.policy_path.write_text(TEST_POLICY.replace("members: [bob]", "members: [bob, fay]"))
    wait_for_event(proxy, "policy.loaded")
    with psycopg.connect(dora, autocommit=True) as busy:
        running = threading.Thread(target=sleep_quietly, args=(busy,))
        running.start()
        time.sleep(0.5)
        proxy.process.send_signal(signal.SIGTERM)
        wait_for_event(proxy, "shutdown")
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=20) == 1
        running.join()
    edges = {
        "tls.failed", "conn.timeout", "cancel.ignored", "conn.refused", "cancel.forwarded",
        "policy.changed_on_disk", "shutdown.forced",
    }  # fmt: skip
    seen = assert_documented(proxy, doc, edges)

    down = pgwarden(upstream={"dsn": "postgresql://pgwarden_svc@127.0.0.1:1/shop"}, wait=False)
    wait_for_event(down, "startup")
    with pytest.raises(psycopg.OperationalError, match="upstream database unavailable"):
        psycopg.connect(down.dsn("dora", PASSWORDS["dora"], sslmode="disable"))
    assert down.stop() == 0
    seen |= assert_documented(down, doc, {"schema.failed", "ledger.error", "upstream.error"})

    supervisor = {"supervisor.started", "worker.started", "worker.exited", "supervisor.shutdown"}
    supervisor |= {"supervisor.lost"}  # all in tests/test_workers.py, the first four above too
    main = {  # test_the_documented_events_are_the_ones_emitted
        "startup", "schema.loaded", "conn.opened", "auth.ok", "auth.failed", "statement",
        "limit.exceeded", "quota.exhausted", "policy.rejected", "conn.closed", "shutdown",
    }  # fmt: skip
    supervisor |= {"break_glass.opened", "break_glass.closed"}  # tests/test_break_glass.py
    unaccounted = set(doc) - seen - supervisor - main - NOT_IN_A_SCENARIO - RECORDS
    assert not unaccounted, f"documented but never emitted by a test: {unaccounted}"


def sleep_quietly(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute("SELECT pg_sleep(30)")


def wait_for_event(proxy: Proxy, event: str) -> None:
    deadline = time.monotonic() + 20
    while not any(e.get("event") == event for e in proxy.events()):
        assert time.monotonic() < deadline, f"no {event}\n{proxy.log_tail()}"
        time.sleep(0.05)


def assert_documented(
    proxy: Proxy, doc: dict[str, tuple[str, set[str]]], expected: set[str]
) -> set[str]:
    """Every line is JSON; `expected` events occur; each event is documented and complete.

    Returns the events seen.
    """
    seen: dict[str, list[dict[str, Any]]] = {}
    for line in proxy.log_lines():
        record = json.loads(line)
        assert {"ts", "level", "event"} <= set(record), record
        seen.setdefault(record["event"], []).append(record)
    assert expected <= set(seen), expected - set(seen)
    for event, records in seen.items():
        assert event in doc, f"{event} is logged but not documented in docs/logging.md"
        level, fields = doc[event]
        for record in records:
            assert record["level"] == level, (event, record["level"], level)
            missing = fields - set(record) - OPTIONAL.get(event, set())
            assert not missing, (event, missing)
    return set(seen)
