"""pgwarden replay: an audit log's statements judged again under a draft policy.

Strategy: a real pgwarden records an audit log while support and dba users run
allowed and refused statements through psycopg (simple and extended protocol);
`pgwarden replay` then judges that log under the same policy (nothing changes, exit
0) and under a stricter one (a column denied, a table taken away, a smaller row cap),
and must report exactly the statements that change, with their counts (exit 1).
Hand-written log lines cover the edge cases: unreplayable fingerprints, refusals
that were not the policy's, logs without the protocol field, shadow roles.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PASSWORDS, SVC_PASSWORD, SVC_USER, TEST_POLICY, PgServer, Proxy

from proxy.analysis.catalog import Snapshot
from proxy.analysis.engine import Engine
from proxy.analysis.fingerprint import FINGERPRINT_MAX, fingerprint
from proxy.policy import parse_policy
from proxy.replay import Report, replay, replay_text, report_json, report_text

ROOT = Path(__file__).resolve().parent.parent
Launcher = Callable[..., Proxy]
STRICTER = (
    TEST_POLICY.replace("      name: allow\n", "      name: deny\n")
    .replace(
        "tables: [public.customers, public.support_tickets, public.orders]",
        "tables: [public.customers, public.support_tickets]",
    )
    .replace("rows_per_query: 50\n", "rows_per_query: 5\n")
)

# (sql, parameters or None for the simple protocol, times, allowed now)
SUPPORT_RUN: list[tuple[str, tuple[object, ...] | None, int, bool]] = [
    ("SELECT id, full_name FROM customers WHERE id = 1", None, 2, True),  # name denied
    ("SELECT email FROM customers WHERE email = 'nobody@example.com'", None, 1, True),
    ("SELECT street FROM customers", None, 1, False),  # address: deny already
    ("SELECT count(*) FROM orders", None, 1, True),  # orders taken away
    ("SELECT 1; SELECT 2", None, 1, True),  # several statements: simple protocol only
    ("SELECT '{\"a\": 1}'::jsonb ? 'a'", None, 1, True),  # the jsonb ? operator
    ("SELECT id FROM customers WHERE id <= 10", None, 1, True),  # 10 rows: over a cap of 5
    ("SELECT id FROM orders WHERE id = %s", (1,), 3, True),  # orders taken away
    ("SELECT full_name FROM customers WHERE id = %s", (1,), 1, True),  # name denied
    ("SELECT email FROM customers WHERE id = %s", (1,), 2, True),  # unchanged
    ("DELETE FROM orders WHERE id = %s", (-1,), 1, False),  # not a select: refused
]


def _record(proxy: Proxy) -> None:
    dsn = proxy.dsn("alice", PASSWORDS["alice"], sslmode="disable")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql, params, times, allowed in SUPPORT_RUN:
            for _ in range(times):
                try:
                    if params is None:
                        with psycopg.ClientCursor(conn) as cur:
                            cur.execute(sql)
                    else:
                        conn.execute(sql, params)
                except psycopg.errors.InsufficientPrivilege:
                    assert not allowed, sql
                else:
                    assert allowed, sql
    dora = proxy.dsn("dora", PASSWORDS["dora"], sslmode="disable")
    with psycopg.connect(dora, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM payment_cards").fetchall()


def _shape(sql: str) -> str:
    return fingerprint(sql.replace("%s", "$1"))


@pytest.fixture(scope="module")
def audit_log(pg: PgServer, pki: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import ProxyLauncher  # noqa: PLC0415 - the module fixture's own launcher

    launcher = ProxyLauncher(pg, pki, tmp_path_factory.mktemp("replay"))
    try:
        proxy = launcher()
        _record(proxy)
    finally:
        launcher.stop_all()
    return proxy.log_path


def _replay_cli(
    log: Path, policy_text: str, pg: PgServer, tmp: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    policy = tmp / "draft.yaml"
    policy.write_text(policy_text)
    schema = pg.dsn(SVC_USER, SVC_PASSWORD, dbname="shop")
    cmd = [sys.executable, "-m", "proxy", "replay", str(log), "--policy", str(policy)]
    return subprocess.run(
        [*cmd, "--schema", schema, *extra], capture_output=True, text=True, check=False, cwd=ROOT
    )


def test_the_same_policy_changes_nothing(audit_log: Path, pg: PgServer, tmp_path: Path) -> None:
    done = _replay_cli(audit_log, TEST_POLICY, pg, tmp_path, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    recorded = sum(times for _, _, times, _ in SUPPORT_RUN) + 1  # and dora's statement
    assert out["statements"] == recorded
    assert (out["newly_refused"], out["newly_allowed"], out["newly_capped"]) == (0, 0, 0)
    assert out["changes"] == []
    assert out["by_role_table"] == []
    assert out["unreplayable"] == 1
    [jsonb] = out["unreplayable_statements"]
    assert (jsonb["fingerprint"], jsonb["count"]) == ("SELECT ? :: jsonb ? ?", 1)
    assert out["unchanged"] == recorded - 1


def test_a_stricter_policy_reports_exactly_the_statements_that_change(
    audit_log: Path, pg: PgServer, tmp_path: Path
) -> None:
    done = _replay_cli(audit_log, STRICTER, pg, tmp_path, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    out = json.loads(done.stdout)
    changes = {(c["change"], c["fingerprint"], c["protocol"]): c["count"] for c in out["changes"]}
    assert changes == {
        ("newly refused", _shape("SELECT id, full_name FROM customers WHERE id = 1"), "simple"): 2,
        ("newly refused", _shape("SELECT count(*) FROM orders"), "simple"): 1,
        ("newly refused", _shape("SELECT id FROM orders WHERE id = %s"), "extended"): 3,
        ("newly refused", _shape("SELECT full_name FROM customers WHERE id = %s"), "extended"): 1,
        ("newly capped", _shape("SELECT id FROM customers WHERE id <= 10"), "simple"): 1,
    }
    assert (out["newly_refused"], out["newly_allowed"], out["newly_capped"]) == (7, 0, 1)
    assert all(c["users"] == ["alice"] and c["role"] == "support" for c in out["changes"])
    reasons = {c["fingerprint"]: c["reason"] for c in out["changes"]}
    assert "public.orders" in reasons[_shape("SELECT count(*) FROM orders")]
    by_table = {(r["role"], r["table"]): r for r in out["by_role_table"]}
    assert set(by_table) == {("support", "public.customers"), ("support", "public.orders")}
    assert by_table[("support", "public.customers")]["newly_refused"] == 3
    assert by_table[("support", "public.customers")]["newly_capped"] == 1
    assert by_table[("support", "public.orders")]["newly_refused"] == 4

    text = _replay_cli(audit_log, STRICTER, pg, tmp_path)
    assert text.returncode == 1
    assert "newly refused 7, newly allowed 0, newly capped 1, unreplayable 1" in text.stdout
    assert "by role and table:" in text.stdout
    assert "support  public.orders" in text.stdout


def test_usage_errors_exit_2(tmp_path: Path, pg: PgServer) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text('{"event": "startup"}\n')
    done = _replay_cli(empty, TEST_POLICY, pg, tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert "no statement events" in done.stderr
    missing = _replay_cli(tmp_path / "nope.log", TEST_POLICY, pg, tmp_path)
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr
    broken = _replay_cli(empty, "version: 1\nroles: [", pg, tmp_path)
    assert broken.returncode == 2
    assert "draft.yaml:" in broken.stderr


# --- hand-written log lines ---------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return Snapshot.from_json((ROOT / "policies" / "shop.schema.json").read_text())


def _run(
    snapshot: Snapshot, events: list[dict[str, Any]], policy_text: str = TEST_POLICY
) -> Report:
    policy = parse_policy(policy_text.encode(), source=Path("draft.yaml"))
    engine = Engine(policy, snapshot, b"replay-test-key")
    lines = ["not json", "{broken", *(json.dumps({"event": "statement", **e}) for e in events)]
    return replay(lines, policy, engine)


def _event(shape: str, verdict: str = "allow", **fields: Any) -> dict[str, Any]:
    base = {"user": "alice", "role": "support", "fingerprint": shape, "verdict": verdict}
    return {"tables": [], "rows": 1, "protocol": "extended", **base, **fields}


def test_replay_text_turns_each_question_mark_into_a_parameter() -> None:
    assert replay_text("SELECT id FROM customers WHERE id = ? AND email = ?") == (
        "SELECT id FROM customers WHERE id = $1 AND email = $2",
        1,
    )
    assert replay_text('SELECT "a ? b" FROM t WHERE x = ?') == (
        'SELECT "a ? b" FROM t WHERE x = $1',
        1,
    )
    assert replay_text("select ? ; select ?") == ("select $1 ; select $2", 2)
    assert isinstance(replay_text("select j ? ? from t"), str)  # the jsonb operator
    assert isinstance(replay_text("<unparsable>"), str)
    assert isinstance(replay_text(""), str)
    assert "cut" in str(replay_text("select " + "x, " * (FINGERPRINT_MAX // 3)))


def test_unreplayable_fingerprints_are_listed_never_guessed(snapshot: Snapshot) -> None:
    long = ("SELECT id " + ", id" * FINGERPRINT_MAX)[:FINGERPRINT_MAX]
    report = _run(
        snapshot,
        [
            _event("<unparsable>"),
            _event(long),
            _event("SELECT id FROM customers WHERE payload ? ?"),
            _event("SELECT ? ; SELECT ?", protocol=None),  # which protocol? not logged
        ],
    )
    assert (report.unreplayable, report.changed, report.exit_code) == (4, 0, 0)
    whys = {why for (_, _, why) in report.unreplayed}
    assert len(whys) == 4
    assert "unreplayable (4):" in report_text(report, "a.log", "draft.yaml")


def test_refusals_that_were_not_the_policys_verdict(snapshot: Snapshot) -> None:
    shape = "SELECT email FROM customers WHERE id = ?"
    report = _run(
        snapshot,
        [
            _event(shape, "refuse", sqlstate="53400", reason="pgwarden: quota"),  # allowed
            _event(shape, "refuse", sqlstate="57P03", reason="pgwarden: schema not loaded"),
            _event(
                shape,
                "refuse",
                sqlstate="42501",
                reason='pgwarden: user "alice" is no longer in role "support"; statement refused',
            ),
            _event("SELECT FROM WHERE", "refuse", sqlstate="42601", reason="parse"),
            {"fingerprint": shape, "verdict": "allow"},  # no user: not a session's line
        ],
    )
    assert report.statements == 2
    assert (report.unchanged, report.changed, report.unreplayable) == (2, 0, 0)
    assert sum(report.skipped.values()) == 3


def test_the_protocol_decides_for_several_statements(snapshot: Snapshot) -> None:
    shape = "SELECT ? ; SELECT ?"
    report = _run(
        snapshot,
        [
            _event(shape, protocol="simple"),
            _event(shape, "refuse", sqlstate="42601", reason="one command", protocol="extended"),
        ],
    )
    assert (report.unchanged, report.changed) == (2, 0)


def test_roles_moved_removed_and_in_shadow_mode(snapshot: Snapshot) -> None:
    draft = TEST_POLICY.replace("members: [alice, carol]", "members: [carol]").replace(
        "  analyst:\n", "  analyst:\n    mode: shadow\n"
    )
    refused = "SELECT street FROM customers"
    report = _run(
        snapshot,
        [
            _event("SELECT email FROM customers WHERE id = ?", tables=["public.customers"]),
            _event(refused, "refuse", user="bob", role="analyst", sqlstate="42501", reason="x"),
            _event(refused, "refuse", user="carol", sqlstate="42501", reason="x"),
        ],
        draft,
    )
    assert report.counts["newly refused"] == 1  # alice: in no role
    assert report.counts["newly allowed"] == 1  # bob: shadow mode runs everything
    assert report.unchanged == 1
    out = json.loads(report_json(report))
    gone = next(c for c in out["changes"] if c["change"] == "newly refused")
    assert (gone["draft_role"], gone["sqlstate"]) == (None, "28000")
    assert "no role" in gone["reason"]
    shadow = next(c for c in out["changes"] if c["change"] == "newly allowed")
    assert (shadow["role"], shadow["draft_role"], shadow["users"]) == (
        "analyst",
        "analyst",
        ["bob"],
    )
    assert report.exit_code == 1


def test_a_fingerprint_keeps_non_ascii_names_whole() -> None:
    shape = fingerprint("SELECT \"café\" , id FROM customers WHERE email = 'ü' -- é")
    assert shape == 'SELECT "café" , id FROM customers WHERE email = ?'
    assert replay_text(shape) == ('SELECT "café" , id FROM customers WHERE email = $1', 1)
