"""SIGHUP reloads the policy and the users file; an invalid file is rejected.

New logins see the reloaded files at once; an invalid policy is logged as
policy.rejected and the old one stays in force.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from conftest import PASSWORDS, TEST_POLICY, Proxy, users_file_text


def _login(proxy: Proxy, user: str, password: str) -> str:
    """'ok', or the error message the login failed with."""
    try:
        with psycopg.connect(proxy.dsn(user, password, sslmode="disable")) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        return str(exc)
    return "ok"


def _wait_for_event(proxy: Proxy, event: str, count: int = 1) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in proxy.events() if e.get("event") == event]
        if len(found) >= count:
            return found[count - 1]
        time.sleep(0.05)
    raise AssertionError(f"no {event} event\n{proxy.log_tail()}")


def test_sighup_applies_a_valid_policy_and_users_file(pgwarden: Callable[..., Proxy]) -> None:
    proxy = pgwarden()
    assert _login(proxy, "dora", PASSWORDS["dora"]) == "ok"
    proxy.policy_path.write_text(TEST_POLICY.replace("members: [dora]", "members: [frank]"))
    proxy.users_path.write_text(users_file_text({**PASSWORDS, "frank": "frank-pw"}))
    proxy.process.send_signal(signal.SIGHUP)
    loaded = _wait_for_event(proxy, "policy.loaded")
    assert loaded["users"] == len(PASSWORDS) + 1
    assert 'user "dora" has no role' in _login(proxy, "dora", PASSWORDS["dora"])
    assert _login(proxy, "frank", "frank-pw") == "ok"  # new user, new member


def test_an_unrestricted_user_removed_from_the_role_is_refused_at_the_next_statement(
    pgwarden: Callable[..., Proxy],
) -> None:
    proxy = pgwarden()
    with psycopg.connect(proxy.dsn("dora", PASSWORDS["dora"]), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() is not None
        prepared = "SELECT count(*) FROM orders WHERE id > %s"
        assert conn.execute(prepared, (0,), prepare=True).fetchone() is not None
        proxy.policy_path.write_text(TEST_POLICY.replace("members: [dora]", "members: [frank]"))
        proxy.process.send_signal(signal.SIGHUP)
        _wait_for_event(proxy, "policy.loaded")
        for sql, args in (("SELECT 1", None), (prepared, (1,))):  # a Query, then a Bind
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no longer in role"):
                conn.execute(sql, args, prepare=args is not None)


@pytest.mark.parametrize(
    "broken",
    ["version: 2\nroles: {}\n", "roles: [not, a, mapping\n", ""],
    ids=["bad-version", "bad-yaml", "empty"],
)
def test_sighup_keeps_the_old_policy_when_the_new_one_is_invalid(
    pgwarden: Callable[..., Proxy], broken: str
) -> None:
    proxy = pgwarden()
    proxy.policy_path.write_text(broken)
    proxy.process.send_signal(signal.SIGHUP)
    rejected = _wait_for_event(proxy, "policy.rejected")
    assert rejected["level"] == "error"
    assert all(str(proxy.policy_path) in line for line in rejected["errors"])
    assert _login(proxy, "dora", PASSWORDS["dora"]) == "ok"
    assert proxy.process.poll() is None


def test_a_changed_policy_file_is_reloaded_without_a_signal(
    pgwarden: Callable[..., Proxy],
) -> None:
    proxy = pgwarden()
    assert _login(proxy, "bob", PASSWORDS["bob"]) == "ok"
    time.sleep(1.1)  # a different mtime even on coarse file systems
    proxy.policy_path.write_text(TEST_POLICY.replace("members: [bob]", "members: [bob, frank]"))
    loaded = _wait_for_event(proxy, "policy.loaded")
    assert loaded["changes"] == {"analyst": {"members_added": ["frank"], "members_removed": []}}


def test_a_second_stop_signal_exits_at_once(pgwarden: Callable[..., Proxy]) -> None:
    proxy = pgwarden(limits={"shutdown_timeout_s": 60})
    conn = psycopg.connect(proxy.dsn("dora", PASSWORDS["dora"]), autocommit=True)
    try:

        def sleep_long() -> None:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_sleep(30)")

        busy = threading.Thread(target=sleep_long, daemon=True)
        busy.start()
        time.sleep(0.5)
        proxy.process.send_signal(signal.SIGTERM)
        _wait_for_event(proxy, "shutdown")
        assert proxy.process.poll() is None  # draining: the statement is still running
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=10) == 1
        assert time.monotonic() - started < 5
        _wait_for_event(proxy, "shutdown.forced")
    finally:
        conn.close()


def test_fifty_reloads_under_load_lose_no_statement(pgwarden: Callable[..., Proxy]) -> None:
    proxy = pgwarden()
    variants = [TEST_POLICY, TEST_POLICY.replace("members: [bob]", "members: [bob, frank]")]
    results: dict[str, int] = {"ok": 0}
    failures: list[str] = []
    stop = threading.Event()

    def work(user: str) -> None:
        with psycopg.connect(proxy.dsn(user, PASSWORDS[user]), autocommit=True) as conn:
            while not stop.is_set():
                try:
                    rows = conn.execute("SELECT id, email FROM customers WHERE id <= 3").fetchall()
                except psycopg.Error as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
                if len(rows) != 3:
                    failures.append(f"{len(rows)} rows")
                    return
                results["ok"] += 1

    workers = [threading.Thread(target=work, args=(u,)) for u in ("alice", "carol", "bob", "dora")]
    for w in workers:
        w.start()
    try:
        for n in range(50):
            # written whole (rename), as an editor or config tool does: the file watcher
            # may read it at any moment, and a half-written file is rightly rejected
            staged = proxy.policy_path.with_suffix(".new")
            staged.write_text(variants[n % 2])
            staged.replace(proxy.policy_path)
            proxy.process.send_signal(signal.SIGHUP)
            time.sleep(0.04)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    assert failures == []
    assert results["ok"] > 50
    _wait_for_event(proxy, "policy.loaded", count=50)
    assert not [e for e in proxy.events() if e.get("event") == "policy.rejected"]
