"""Shadow mode: a role's statements run as before, the log says what enforcement would do.

Strategy: one real pgwarden with the support role in `mode: shadow`. Alice runs a
statement enforcement refuses (a denied column), one it masks and one over the row
cap, through psycopg's simple protocol (ClientCursor) and its extended protocol
(parameters), and gets the raw answers a direct connection gets. The statement events
carry the would-be verdicts. Then the policy file is rewritten with the role enforced:
the open session's next statement (and a Bind of a statement prepared before) is
refused until it reconnects, and a new login gets the very same statements refused,
masked and capped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PASSWORDS, TEST_POLICY, PgServer, Proxy

from proxy.policy import parse_policy
from proxy.policy.loader import PolicyError

Launcher = Callable[..., Proxy]
SHADOW_POLICY = TEST_POLICY.replace(
    "  support:\n    members: [alice, carol]\n",
    "  support:\n    members: [alice, carol]\n    mode: shadow\n",
)
REFUSED = "SELECT street FROM customers WHERE id = {}"  # address: deny
MASKED = "SELECT email FROM customers WHERE id = {}"  # email: masked
OVER_CAP = "SELECT id FROM customers WHERE id > {}"  # every customer: over rows_per_query 50
CAP = 50


def _simple(conn: psycopg.Connection[Any], template: str) -> list[tuple[Any, ...]]:
    with psycopg.ClientCursor(conn) as cur:
        cur.execute(template.format("%s"), (1 if "id =" in template else 0,))
        return cur.fetchall()


def _extended(conn: psycopg.Connection[Any], template: str) -> list[tuple[Any, ...]]:
    return conn.execute(template.format("%s"), (1 if "id =" in template else 0,)).fetchall()


def _statements(proxy: Proxy, user: str) -> list[dict[str, Any]]:
    return [e for e in proxy.events() if e.get("event") == "statement" and e.get("user") == user]


def _events(proxy: Proxy, event: str) -> list[dict[str, Any]]:
    return [e for e in proxy.events() if e.get("event") == event]


def _wait_for(proxy: Proxy, event: str, count: int = 1) -> None:
    deadline = time.monotonic() + 15
    while len([e for e in proxy.events() if e.get("event") == event]) < count:
        assert time.monotonic() < deadline, f"no {event}\n{proxy.log_tail()}"
        time.sleep(0.05)


def test_a_shadow_role_gets_raw_results_and_the_log_says_what_enforcement_would_do(
    pgwarden: Launcher, pg: PgServer
) -> None:
    proxy = pgwarden(policy_text=SHADOW_POLICY)
    with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True) as direct:
        raw = {t: _extended(direct, t) for t in (REFUSED, MASKED, OVER_CAP)}
    assert len(raw[OVER_CAP]) > CAP
    dsn = proxy.dsn("alice", PASSWORDS["alice"], sslmode="disable")
    with psycopg.connect(dsn, autocommit=True) as alice:
        for run in (_simple, _extended):
            for template in (REFUSED, MASKED, OVER_CAP):
                assert run(alice, template) == raw[template], (run.__name__, template)
        prepared = "SELECT full_name FROM customers WHERE id = %s"
        alice.execute(prepared, (1,), prepare=True).fetchall()

        events = _statements(proxy, "alice")
        by_shape = {(e["fingerprint"], e["protocol"]): e for e in events}
        for protocol in ("simple", "extended"):
            refused = by_shape[(REFUSED.format("?"), protocol)]
            assert refused["verdict"] == "allow"
            assert refused["rows"] == 1
            assert refused["shadow_verdict"] == "refuse"
            assert refused["shadow_sqlstate"] == "42501"
            assert refused["shadow_reason"].startswith("pgwarden: ")
            assert "shadow_cap" not in refused
            masked = by_shape[(MASKED.format("?"), protocol)]
            assert masked["shadow_verdict"] == "allow"
            assert masked["shadow_masked"] == ["public.customers"]
            assert masked["shadow_cap"] == CAP
            assert "shadow_capped" not in masked
            assert "shadow_reason" not in masked
            over = by_shape[(OVER_CAP.format("?"), protocol)]
            assert over["shadow_verdict"] == "allow"
            assert over["rows"] == len(raw[OVER_CAP])
            assert (over["shadow_cap"], over["shadow_capped"]) == (CAP, True)
        assert not [e for e in proxy.events() if e.get("event") == "limit.exceeded"]

        # enforce: the open shadow session is refused until it reconnects
        proxy.policy_path.write_text(TEST_POLICY)
        _wait_for(proxy, "policy.loaded")
        loaded = next(e for e in proxy.events() if e.get("event") == "policy.loaded")
        assert loaded["changes"]["support"]["mode"] == "enforce"
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no longer in shadow"):
            alice.execute(prepared, (2,), prepare=True)  # a Bind of the statement prepared
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no longer in shadow"):
            _simple(alice, MASKED)

    with psycopg.connect(dsn, autocommit=True) as alice:
        for run in (_simple, _extended):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="street"):
                run(alice, REFUSED)
            got = run(alice, MASKED)
            assert len(got) == 1, got
            email = got[0][0]
            assert email != raw[MASKED][0][0]
            assert "*" in email
            with pytest.raises(psycopg.errors.ProgramLimitExceeded):
                run(alice, OVER_CAP)
    enforced = [e for e in _statements(proxy, "alice") if "shadow_verdict" not in e]
    assert {e["verdict"] for e in enforced} == {"allow", "refuse"}


def test_a_shadow_session_charges_no_quota_and_is_not_cut_by_the_backstop(
    pgwarden: Launcher,
) -> None:
    tight = SHADOW_POLICY.replace("rows_per_hour: 20000", "rows_per_hour: 10").replace(
        "members: [alice, carol]", "members: [shadow_quota_user]"
    )
    proxy = pgwarden(policy_text=tight, users={**PASSWORDS, "shadow_quota_user": "sq-pw"})
    dsn = proxy.dsn("shadow_quota_user", "sq-pw", sslmode="disable")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(3):  # 3 x 40 rows of a classified table: far over the hourly 10
            assert len(conn.execute("SELECT id, email FROM customers LIMIT 40").fetchall()) == 40
        # a whole-row read of a table with a denied column: raw for shadow mode
        assert conn.execute("SELECT c.* FROM customers c WHERE id = 1").fetchall()
    # every line of the session is written once its own conn.closed is (the launcher's
    # port probe logs a conn.closed of its own, without a user)
    deadline = time.monotonic() + 15
    while not [e for e in _events(proxy, "conn.closed") if e.get("user") == "shadow_quota_user"]:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    events = [
        e for e in proxy.events() if e.get("event") in ("quota.exhausted", "backstop.tripped")
    ]
    assert events == []
    rows = [e["rows"] for e in _statements(proxy, "shadow_quota_user")]
    assert rows == [40, 40, 40, 1]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    mode: loud\n", "roles.support.mode: must be enforce or shadow"),
        ("    mode: shadow\n    unrestricted: true\n", "mode: contradicts unrestricted: true"),
    ],
)
def test_mode_is_checked(body: str, message: str) -> None:
    text = TEST_POLICY.replace("  support:\n", "  support:\n" + body)
    with pytest.raises(PolicyError) as caught:
        parse_policy(text.encode(), source=Path("p.yaml"))
    assert any(message in e and e.startswith("p.yaml:") for e in caught.value.errors), (
        caught.value.errors
    )
    assert parse_policy(SHADOW_POLICY.encode(), source=Path("p.yaml")).roles["support"].mode == (
        "shadow"
    )
