"""Traceable hashes: `hash: {per_user: true}` and `pgwarden trace`.

Two analysts pull hashed e-mails through a real pgwarden; each leaked file is
attributed to the user whose key produced it, from the raw values read as the
service account. Never a raw value in the output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from conftest import HASH_KEY, PASSWORDS, SVC_PASSWORD, TEST_POLICY, Proxy

from proxy.analysis.masks import hash_value, per_user_key
from proxy.cli import main
from proxy.policy import PolicyError, parse_policy
from proxy.trace import attribute, hashes_in

Launcher = Callable[..., Proxy]

POLICY = TEST_POLICY.replace(
    '    columns: {"*": hash}\n',
    '    columns: {"*": {mask: hash, per_user: true}}\n',
).replace("members: [bob]", "members: [bob, eve]")
USERS = {**PASSWORDS}


def pull(proxy: Proxy, user: str, limit: int) -> list[str]:
    with psycopg.connect(proxy.dsn(user, USERS[user]), autocommit=True) as conn:
        sql = f"SELECT email FROM customers ORDER BY id LIMIT {limit}"  # noqa: S608 - a constant
        return [str(r[0]) for r in conn.execute(sql)]


def test_per_user_hashes_differ_and_stay_joinable(pgwarden: Launcher) -> None:
    proxy = pgwarden(policy_text=POLICY)
    bob, eve = pull(proxy, "bob", 20), pull(proxy, "eve", 20)
    assert len(set(bob)) == 20
    assert not set(bob) & set(eve)
    with psycopg.connect(proxy.dsn("bob", USERS["bob"]), autocommit=True) as conn:
        joined = conn.execute(
            "SELECT count(*) FROM customers c JOIN customers d ON d.email = c.email"
        ).fetchone()
    assert joined is not None
    assert joined[0] > 0  # equal values, equal hashes, for one user
    key = per_user_key(HASH_KEY.encode(), "bob")
    with psycopg.connect(proxy.dsn("dora", USERS["dora"]), autocommit=True) as conn:
        first = conn.execute("SELECT email FROM customers ORDER BY id LIMIT 1").fetchone()
    assert first is not None
    assert hash_value(str(first[0]), key) == bob[0]


def test_trace_attributes_each_file_to_its_user(
    pgwarden: Launcher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = pgwarden(policy_text=POLICY)
    monkeypatch.setenv("PGWARDEN_UPSTREAM_PASSWORD", SVC_PASSWORD)
    files = {}
    for user, count in (("bob", 40), ("eve", 25)):
        leak = tmp_path / f"{user}.csv"
        leak.write_text(
            "".join(f"{i},{h},whatever\n" for i, h in enumerate(pull(proxy, user, count)))
        )
        files[user] = (leak, count)
    capsys.readouterr()
    for user, (leak, count) in files.items():
        assert main(["trace", str(leak), "--config", str(proxy.config_path)]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert (
            lines[1]
            == f"{user}: {count} of {count} hashed values (public.customers.email: {count})"
        )
        assert lines[-1] == f"unattributed: 0 of {count} hashed values"
        assert "@" not in out  # no raw value is ever printed
    other = tmp_path / "other.txt"
    other.write_text("0123456789abcdef deadbeefdeadbeef\n")
    assert (
        main(["trace", str(other), "--config", str(proxy.config_path), "--users", "bob,eve"]) == 1
    )
    assert "unattributed: 2 of 2" in capsys.readouterr().out


def test_per_user_applies_to_hash_only() -> None:
    bad = TEST_POLICY.replace(
        "phone: {mask: last4, lookup: equality}", "phone: {mask: last4, per_user: true}"
    )
    with pytest.raises(PolicyError, match=r"per_user: applies to mask hash only"):
        parse_policy(bad.encode(), source=Path("p.yaml"))
    wrong = TEST_POLICY.replace('columns: {"*": hash}', 'columns: {"*": {mask: hash, per_user: 1}}')
    with pytest.raises(PolicyError, match="must be true or false"):
        parse_policy(wrong.encode(), source=Path("p.yaml"))


def test_trace_is_fast_enough_for_the_incident() -> None:
    # 68,000 values x 20 users: the size of the leak pgwarden exists for.
    key = b"k" * 32
    values = {"public.customers.email": [f"user{i}@example.com".encode() for i in range(68_000)]}
    users = [f"agent{i:02d}" for i in range(20)]
    thief = per_user_key(key, "agent13")
    leaked = hashes_in(
        "\n".join(hash_value(v.decode(), thief) for v in values["public.customers.email"][:5000])
    )
    started = time.monotonic()
    results = attribute(leaked, values, users, key)
    elapsed = time.monotonic() - started
    assert results[0].user == "agent13"
    assert results[0].matched == 5000
    assert all(r.matched == 0 for r in results[1:])
    assert elapsed < 30, elapsed  # about 1-2 s on one core; generous for shared CI
