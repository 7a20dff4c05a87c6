"""`--workers N`: one port, N worker processes, one supervisor that answers for all.

Strategy: real `pgwarden serve` with `workers: 3`, real clients. Which worker
serves a connection is read from what the client sees: the BackendKeyData pid
pgwarden hands out carries the worker's index (pid >> 24), and psycopg shows it
as `pgconn.backend_pid`. With SO_REUSEPORT the kernel picks the worker, so a
test that needs two workers opens connections until it has them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import PASSWORDS, TEST_POLICY, Proxy

WORKERS = 3


def _events(proxy: Proxy, event: str) -> list[dict[str, Any]]:
    return [e for e in proxy.events() if e.get("event") == event]


def _wait_for(
    proxy: Proxy, event: str, count: int = 1, timeout: float = 20
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _events(proxy, event)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {event} events\n{proxy.log_tail(80)}")


def _start(pgwarden: Callable[..., Proxy], **overrides: Any) -> Proxy:
    overrides.setdefault("limits", {"max_connections_per_user": 20})  # _spread opens many
    proxy = pgwarden(workers=WORKERS, **overrides)
    _wait_for(proxy, "supervisor.started")
    return proxy


def _connect(proxy: Proxy, user: str = "dora", **kwargs: Any) -> psycopg.Connection[Any]:
    dsn = proxy.dsn(user, PASSWORDS.get(user, f"{user}-pw"), sslmode="disable")
    return psycopg.connect(dsn, autocommit=True, **kwargs)


def _worker(conn: psycopg.Connection[Any]) -> int:
    return conn.pgconn.backend_pid >> 24


@contextlib.contextmanager
def _spread(proxy: Proxy, user: str, workers: int) -> Iterator[list[psycopg.Connection[Any]]]:
    """Open connections until `workers` distinct workers serve one each; yield one per worker."""
    by_worker: dict[int, psycopg.Connection[Any]] = {}
    spare: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(60):
            conn = _connect(proxy, user)
            if _worker(conn) in by_worker:
                spare.append(conn)
                if len(spare) > 3:
                    spare.pop(0).close()  # keep a few open: a new one may land elsewhere
            else:
                by_worker[_worker(conn)] = conn
            if len(by_worker) == workers:
                break
        assert len(by_worker) == workers, "the kernel never spread connections over workers"
        for conn in spare:
            conn.close()
        yield list(by_worker.values())
    finally:
        for conn in by_worker.values():
            conn.close()


def _scrape(proxy: Proxy, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{proxy.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(exposition: str, line_start: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a worker outlived its supervisor"


# --- the port, the workers, signals --------------------------------------------------


def test_workers_share_one_port_and_each_logs_its_index(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    startups = _wait_for(proxy, "startup", WORKERS)
    assert sorted(e["worker"] for e in startups) == list(range(WORKERS))
    assert len({e["pid"] for e in startups}) == WORKERS
    with _spread(proxy, "dora", WORKERS) as conns:
        for conn in conns:
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    opened = _events(proxy, "conn.opened")
    assert {e["worker"] for e in opened} == set(range(WORKERS))  # every line names its worker


def test_sighup_reloads_every_worker(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    proxy.policy_path.write_text(TEST_POLICY.replace("members: [dora]", "members: [dora, eve]"))
    proxy.process.send_signal(signal.SIGHUP)
    loaded = _wait_for(proxy, "policy.loaded", WORKERS)
    assert {e["worker"] for e in loaded} == set(range(WORKERS))


def test_a_killed_worker_is_restarted_and_logged(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    victim = next(e for e in _wait_for(proxy, "startup", WORKERS) if e["worker"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    exited = _wait_for(proxy, "worker.exited")[0]
    assert (exited["worker"], exited["pid"], exited["signal"]) == (1, victim["pid"], "SIGKILL")
    assert exited["level"] == "error"
    restarted = [e for e in _wait_for(proxy, "worker.started", WORKERS + 1) if e["worker"] == 1]
    assert restarted[-1]["pid"] != victim["pid"]
    _wait_for(proxy, "startup", WORKERS + 1)
    with _spread(proxy, "dora", WORKERS) as conns:  # all three serve again
        assert all(conn.execute("SELECT 1").fetchone() == (1,) for conn in conns)


def test_sigterm_drains_every_worker_and_exits_zero(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    pids = [e["pid"] for e in _wait_for(proxy, "startup", WORKERS)]
    with _spread(proxy, "dora", 2) as conns:
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=30) == 0
        for conn in conns:  # idle sessions were ended with 57P01 by their worker
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    _wait_gone(pids)
    assert len(_events(proxy, "shutdown")) == WORKERS
    assert len(_events(proxy, "supervisor.shutdown")) == 1


def test_workers_leave_when_the_supervisor_is_killed(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    pids = [e["pid"] for e in _wait_for(proxy, "startup", WORKERS)]
    proxy.process.kill()
    proxy.process.wait(timeout=10)
    _wait_gone(pids)
    assert len(_events(proxy, "supervisor.lost")) == WORKERS


def test_a_worker_that_cannot_listen_stops_everything_with_exit_2(
    pgwarden: Callable[..., Proxy],
) -> None:
    with socket.socket() as squatter:  # no SO_REUSEPORT: the workers cannot share it
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proxy = pgwarden(workers=WORKERS, listen=f"127.0.0.1:{port}", wait=False)
        assert proxy.process.wait(timeout=60) == 2
    assert "cannot listen on" in proxy.stderr_path.read_text()


# --- what spans workers ----------------------------------------------------------------


def test_connections_per_user_are_counted_over_all_workers(
    pgwarden: Callable[..., Proxy],
) -> None:
    proxy = _start(pgwarden, limits={"max_connections_per_user": 2})
    with _connect(proxy) as first, _connect(proxy) as second:
        assert first.execute("SELECT 1").fetchone() == (1,)
        for _ in range(6):  # whichever worker the kernel picks, the third is refused
            with pytest.raises(psycopg.OperationalError, match="too many connections"):
                _connect(proxy)
        assert second.execute("SELECT 2").fetchone() == (2,)
    refused = _events(proxy, "conn.refused")
    assert [(e["reason"], e["user"]) for e in refused] == [("max_connections_per_user", "dora")] * 6
    deadline = time.monotonic() + 10  # closing gives the slots back
    while True:
        try:
            with _connect(proxy) as again, _connect(proxy) as twice:
                assert again.execute("SELECT 3").fetchone() == twice.execute("SELECT 3").fetchone()
                break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_cancel_reaches_the_worker_that_runs_the_query(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    with _spread(proxy, "dora", WORKERS) as conns:
        for conn in conns:  # the cancel request is a new connection: any worker takes it
            timer = threading.Timer(0.5, conn.cancel)
            timer.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
            timer.join()
            assert time.monotonic() - started < 20
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert len(_events(proxy, "cancel.forwarded")) == WORKERS


QUOTA_POLICY = TEST_POLICY.replace("rows_per_hour: 20000", "rows_per_hour: 60").replace(
    "members: [alice, carol]", "members: [wally]"
)


def test_quota_charges_reach_the_other_workers_at_once(pgwarden: Callable[..., Proxy]) -> None:
    user = f"wally{os.getpid()}"
    proxy = _start(
        pgwarden,
        policy_text=QUOTA_POLICY.replace("wally", user),
        users={**PASSWORDS, user: f"{user}-pw"},
    )
    with _spread(proxy, user, 2) as (here, there):
        there.execute("SELECT id FROM customers WHERE id = 1").fetchall()  # usage read, tiny
        rows = here.execute("SELECT id FROM customers ORDER BY id LIMIT 40").fetchall()
        assert len(rows) == 40
        time.sleep(0.3)  # the relay is asynchronous, but well under the 5 s ledger refresh
        with pytest.raises(psycopg.Error) as err:
            there.execute("SELECT id FROM customers ORDER BY id LIMIT 40").fetchall()
        assert err.value.sqlstate == "53400"


def test_metrics_and_health_answer_for_all_workers(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    with _spread(proxy, "dora", WORKERS) as conns:
        for conn in conns:
            for _ in range(5):
                conn.execute("SELECT 1")
        status, text = _scrape(proxy, "/metrics")
        assert status == 200
        assert _sample(text, 'pgwarden_statements_total{role="dba",verdict="allow"}') >= 15
        assert _sample(text, "pgwarden_connections_open") >= WORKERS
        assert _sample(text, "pgwarden_workers_up") == WORKERS
    status, body = _scrape(proxy, "/healthz")
    assert status == 200, body
    assert '"workers": "3/3"' in body


def _sleep_quietly(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute("SELECT pg_sleep(30)")


def test_a_ctrl_c_to_the_whole_group_drains_once(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    pids = [e["pid"] for e in _wait_for(proxy, "startup", WORKERS)]
    os.killpg(proxy.process.pid, signal.SIGINT)  # what a terminal does: every process gets it
    assert proxy.process.wait(timeout=30) == 0
    _wait_gone(pids)
    assert not _events(proxy, "shutdown.forced")


def test_a_second_sigterm_forces_the_exit(pgwarden: Callable[..., Proxy]) -> None:
    proxy = _start(pgwarden)
    pids = [e["pid"] for e in _wait_for(proxy, "startup", WORKERS)]
    with _connect(proxy) as busy:
        running = threading.Thread(target=_sleep_quietly, args=(busy,))
        running.start()
        time.sleep(0.5)
        proxy.process.send_signal(signal.SIGTERM)
        _wait_for(proxy, "shutdown", WORKERS)  # draining: the busy session holds its worker
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=30) == 1
        running.join()
    _wait_gone(pids)
    assert _events(proxy, "shutdown.forced")


RECORDS_POLICY = TEST_POLICY.replace("members: [alice, carol]", "members: [relay_user]").replace(
    "rows_per_day: 40000", "rows_per_day: 40000\n      records_per_day: 60"
) + ("decoys:\n  public.customers: [150]\n")


def test_records_and_locks_reach_every_worker_at_once(pgwarden: Callable[..., Proxy]) -> None:
    """One worker's records count in the others' budgets, and its lock ends their sessions,
    at once (not at their next ledger read, seconds later)."""
    users = {**PASSWORDS, "relay_user": "relay_user-pw"}
    proxy = _start(pgwarden, policy_text=RECORDS_POLICY, users=users)
    with _spread(proxy, "relay_user", WORKERS) as conns:
        first, *others = conns
        assert len(first.execute("SELECT id FROM customers WHERE id <= 50").fetchall()) == 50
        time.sleep(0.3)  # the relay takes a hop through the supervisor; the ledger, 5 s
        for conn in others:  # the 50 are known there already: 20 new ones would make 70
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="records"):
                conn.execute("SELECT id FROM customers WHERE id > 100 AND id <= 120")
            assert len(conn.execute("SELECT id FROM customers WHERE id <= 50").fetchall()) == 50
        with pytest.raises(psycopg.Error, match="locked"):
            first.execute("SELECT id FROM customers WHERE id = 150").fetchall()  # a decoy
        time.sleep(0.3)
        for conn in others:
            with pytest.raises(psycopg.Error, match="locked"):
                conn.execute("SELECT 1")
    assert len(_events(proxy, "user.locked")) == 1  # locked once, where the decoy was shown
