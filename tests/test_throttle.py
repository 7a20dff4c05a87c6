"""Failed-login throttling per client address (proxy/net/throttle.py).

Strategy: the window logic with an injected clock, then a real pgwarden with
psycopg: wrong passwords from 127.0.0.1 get that address refused before any
password exchange, even with the right password, while 127.0.0.2 still gets
its SCRAM challenge; a user with no role is no guess; the window passing
lets the address in again.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import psycopg
import pytest
from conftest import PASSWORDS, Proxy

from proxy.net.throttle import LoginThrottle
from proxy.wire import frontend as fe


def test_the_window_counts_failures_per_address() -> None:
    throttle = LoginThrottle(max_failures=3, window_s=10)
    for at in (0.0, 1.0, 2.0):
        assert throttle.retry_in("10.0.0.1", now=at) == 0
        throttle.failed("10.0.0.1", now=at)
    assert throttle.retry_in("10.0.0.1", now=2.5) == pytest.approx(7.5)  # until 0.0 + 10
    assert throttle.retry_in("10.0.0.2", now=2.5) == 0  # another address
    assert throttle.retry_in("10.0.0.1", now=10.0) == 0  # the first failure left the window
    throttle.failed("10.0.0.1", now=10.5)  # three in the window again: 1.0, 2.0, 10.5
    assert throttle.retry_in("10.0.0.1", now=10.6) == pytest.approx(0.4)


def test_prune_forgets_addresses_whose_failures_left_the_window() -> None:
    throttle = LoginThrottle(max_failures=2, window_s=5)
    throttle.failed("a", now=0.0)
    throttle.failed("b", now=4.0)
    throttle.prune(now=6.0)
    assert list(throttle._failures) == ["b"]


def login(proxy: Proxy, user: str, password: str) -> str:
    try:
        with psycopg.connect(proxy.dsn(user, password, sslmode="disable"), connect_timeout=10):
            return "ok"
    except psycopg.OperationalError as exc:
        return str(exc)


def first_reply_from(proxy: Proxy, source: str) -> bytes:
    """The first message type pgwarden answers a startup from `source` with."""
    with socket.create_connection((proxy.host, proxy.port), 10, (source, 0)) as sock:
        sock.sendall(fe.encode_startup([("user", "alice"), ("database", "shop")]))
        return sock.recv(1)


def test_an_address_that_keeps_failing_is_refused_up_front(pgwarden: Callable[..., Proxy]) -> None:
    proxy = pgwarden(auth={"max_failures": 3, "failure_window_s": 3})
    assert "has no role" in login(proxy, "eve", PASSWORDS["eve"])  # not a guess: not counted
    for _ in range(3):
        assert "password authentication failed" in login(proxy, "alice", "guess")
    refused = login(proxy, "alice", PASSWORDS["alice"])  # even the right password
    assert "too many failed logins from this address" in refused
    assert first_reply_from(proxy, "127.0.0.1") == b"E"  # before any SCRAM exchange
    assert first_reply_from(proxy, "127.0.0.2") == b"R"  # another address: challenged
    reasons = [e.get("reason") for e in proxy.events() if e.get("event") == "conn.refused"]
    assert reasons == ["auth_failures", "auth_failures"]
    time.sleep(3.2)  # the window moves past the failures
    assert login(proxy, "alice", PASSWORDS["alice"]) == "ok"
