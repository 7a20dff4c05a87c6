"""The compatibility matrix: fixtures, the `compat` marker and the results file.

Strategy: every driver runs the same scenario (tests/compat/scenario.py) through one
pgwarden shared by the whole session (`compat_proxy`, TEST_POLICY), once per role
(`role`: support, restricted; dba, unrestricted). Each test says which cell it
fills with `@pytest.mark.compat(client=..., feature=...)`; a hook here collects the
outcome of every such test, and at the end of the session writes them to
RESULTS_PATH (build/compat-results.json). tests/compat/matrix.py renders that file
as docs/compatibility.md, and test_matrix.py (run last) fails when the committed
page no longer matches a complete run.

The contract for a driver's test module:

* `@pytest.mark.compat(client="psycopg", feature="login")`. client or feature may
  be left out when the test is parametrized with an argument of that name; role
  comes from the `role` fixture, or `role="dba"` on the marker for a test that
  runs as one role only. Feature ids: scenario.py (add driver-specific ones freely).
* `role` is a scenario.Role, a StrEnum: `role == "support"`, `role.user`,
  `role.password`, `role.restricted`. Run a test for one role only with
  `@pytest.mark.parametrize("role", ["dba"], indirect=True)`.
* `compat_proxy` is a conftest.Proxy: `.host`, `.port`, `.dsn(user, password)`,
  `.env(user, password)`; `role_dsn` is that DSN for the current role.
* `pii.assert_no_leak(received, what)` fails if any raw value support must not see
  (customers.email, phone, street, support_tickets.body, payment_cards.pan; also
  reversed, hex, base64, md5 and digits-only forms) is in `received`: a string,
  bytes, or any nesting of lists, tuples, dicts and records of those. The failure
  names the column and row id, never the value. `pii.check(role, received, what)`
  does the same for a restricted role and nothing for dba. `pii.customer` is a
  seeded customer with tickets (its raw e-mail is what lookup_by_email types in).
* `compat_record.refused(sqlstate, why)` marks a cell as refused by design (e.g.
  LISTEN for support): the test asserted the refusal; the matrix shows it as such.
  `compat_record.note(text)` adds a footnote (a known limitation) to the cell.
* `pg_admin` is a direct superuser connection to shop (pg_stat_activity);
  `wait_for_active(pg_admin, application_name)` waits until a query of that
  application is running upstream (for cancel tests; no sleeps).
* `@pytest.mark.compat_matrix_check` runs a test after every other test of the
  session (the page check in test_matrix.py, the log check in test_harness.py).
* PGWARDEN_COMPAT_STRICT=1 (for CI, where issue 7 wants no cell skipped): a skipped
  cell, or a compat module not collected, fails the page check instead of skipping it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import SVC_PASSWORD, SVC_USER, TEST_POLICY, Proxy, ProxyLauncher
from security.clients import texts_of
from security.conftest import SUPPORT_SECRETS, Forbidden, read_secrets
from tlsutil import Pki

from proxy.pgserver import PgServer

from .scenario import Role

COMPAT_DIR = Path(__file__).resolve().parent
REPO_ROOT = COMPAT_DIR.parents[1]
RESULTS_PATH = REPO_ROOT / "build" / "compat-results.json"
DOC_PATH = REPO_ROOT / "docs" / "compatibility.md"
_RESULTS = pytest.StashKey[dict[str, dict[str, Any]]]()
_DESELECTED = pytest.StashKey[list[str]]()
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_NOTE, _REFUSED = "compat_note", "compat_refused"
_OUTCOME_RANK = {"passed": 0, "xfailed": 1, "skipped": 2, "failed": 3, "error": 4}
WAIT_S = 15.0


# --- marker and results -------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "compat(client, feature, role=None): the compatibility-matrix cell a test fills",
    )
    config.addinivalue_line(
        "markers", "compat_matrix_check: runs after every other test (test_matrix.py)"
    )
    config.stash[_RESULTS] = {}
    config.stash[_DESELECTED] = []


def _in_compat(nodeid_or_path: str | Path) -> bool:
    return str(nodeid_or_path).replace("\\", "/").split("::")[0].startswith("tests/compat/")


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if _in_compat(item.nodeid):
            item.config.stash[_DESELECTED].append(item.nodeid)


def cell_of(item: pytest.Item) -> tuple[str, str, str] | None:
    """(client, feature, role) of a compat test, or None for a test without the marker."""
    marker = item.get_closest_marker("compat")
    if marker is None:
        return None
    params: Mapping[str, Any] = getattr(getattr(item, "callspec", None), "params", {})
    fields = {key: marker.kwargs.get(key, params.get(key)) for key in ("client", "feature", "role")}
    fields["role"] = fields["role"] or "-"
    for key, value in fields.items():
        if not isinstance(value, str) or not (_ID.match(value) or value == "-"):
            raise pytest.UsageError(f"{item.nodeid}: compat marker: bad or missing {key}")
    return str(fields["client"]), str(fields["feature"]), str(fields["role"])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Check every compat marker now; run the matrix check after all compat tests."""
    for item in items:
        cell_of(item)
    last = [item for item in items if item.get_closest_marker("compat_matrix_check")]
    items[:] = [item for item in items if item not in last] + last


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    cell = cell_of(item)
    if cell is not None:
        _merge(item.config.stash[_RESULTS], item, cell, report)
    return report


def _phase_outcome(report: pytest.TestReport) -> tuple[str, str]:
    if hasattr(report, "wasxfail"):
        return ("xfailed", str(report.wasxfail)) if report.skipped else ("failed", "XPASS")
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        return "skipped", reason.removeprefix("Skipped: ")
    if report.failed:
        return ("failed" if report.when == "call" else "error"), ""
    return "passed", ""


def _merge(
    results: dict[str, dict[str, Any]],
    item: pytest.Item,
    cell: tuple[str, str, str],
    report: pytest.TestReport,
) -> None:
    outcome, reason = _phase_outcome(report)
    client, feature, role = cell
    entry = results.setdefault(
        item.nodeid,
        {"client": client, "feature": feature, "role": role, "outcome": "passed", "reason": ""},
    )
    if _OUTCOME_RANK[outcome] > _OUTCOME_RANK[entry["outcome"]]:
        entry.update(outcome=outcome, reason=reason)
    for key, value in report.user_properties:
        if key == _NOTE:
            entry.setdefault("notes", [])
            if value not in entry["notes"]:
                entry["notes"].append(value)
        elif key == _REFUSED:
            entry["refused"] = value


def compat_results(config: pytest.Config) -> list[dict[str, Any]]:
    """The compat results of this session so far, one dict per test."""
    return [{"nodeid": nodeid, **entry} for nodeid, entry in config.stash[_RESULTS].items()]


def complete_run(session: pytest.Session) -> tuple[bool, str]:
    """Whether this session ran every compat test module, deselecting none; and why not."""
    deselected = session.config.stash[_DESELECTED]
    if deselected:
        return False, f"{len(deselected)} compat tests were deselected"
    collected = {Path(str(item.path)).name for item in session.items if _in_compat(item.nodeid)}
    missing = sorted(p.name for p in COMPAT_DIR.glob("test_*.py") if p.name not in collected)
    if missing:
        return False, "not collected: " + ", ".join(missing)
    return True, ""


def pytest_sessionfinish(session: pytest.Session) -> None:
    results = compat_results(session.config)
    if not results or hasattr(session.config, "workerinput"):
        return
    complete, why = complete_run(session)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "complete": complete,
        "incomplete_because": why,
        "results": sorted(results, key=lambda r: r["nodeid"]),
    }
    RESULTS_PATH.write_text(json.dumps(document, indent=1) + "\n")


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(params=[Role.SUPPORT, Role.DBA], ids=str)
def role(request: pytest.FixtureRequest) -> Role:
    """support (restricted, alice) and dba (unrestricted, dora)."""
    return Role(request.param)


@pytest.fixture(scope="session")
def compat_proxy(
    pg: PgServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """One pgwarden with TEST_POLICY for every compat test.

    The per-user connection limit is raised: a driver's pool or pgbench may hold
    several sessions, and the limit itself is tested elsewhere.
    """
    launcher = ProxyLauncher(pg, pki, tmp_path_factory.mktemp("compat-proxy"))
    try:
        yield launcher(
            policy_text=TEST_POLICY,
            limits={"max_connections_per_user": 32},
            metrics_listen=None,
        )
    finally:
        launcher.stop_all()


@pytest.fixture
def role_dsn(compat_proxy: Proxy, role: Role) -> str:
    """A libpq URI for the current role through compat_proxy (sslmode=disable)."""
    return compat_proxy.dsn(role.user, role.password, sslmode="disable")


@dataclass(frozen=True)
class Customer:
    """A seeded customer with tickets, as the database holds it (never printed)."""

    id: int
    full_name: str
    email: str
    phone: str
    ticket_nos: tuple[str, ...]
    bodies: tuple[str, ...]

    @property
    def masked_email(self) -> str:
        """What support sees: the first character, ***, then @domain."""
        local, _, domain = self.email.partition("@")
        return f"{local[:1]}***@{domain}"

    @property
    def masked_phone(self) -> str:
        return "***" + self.phone[-4:]

    def __repr__(self) -> str:
        return f"Customer(id={self.id}, {len(self.ticket_nos)} tickets)"


@dataclass
class Pii:
    """The raw values support must never receive, and the check for them."""

    forbidden: Forbidden
    customer: Customer

    def assert_no_leak(self, received: object, what: str) -> None:
        """Fail (naming column and row id, never the value) if a raw value is in received."""
        self.forbidden.assert_no_leak(list(texts_of(received, what)), what)

    def check(self, role: Role, received: object, what: str) -> None:
        """assert_no_leak for a restricted role; dba may see everything."""
        if role.restricted:
            self.assert_no_leak(received, what)

    def __repr__(self) -> str:
        return f"Pii({self.forbidden!r}, {self.customer!r})"


@pytest.fixture(scope="session")
def shop_service(pg: PgServer) -> Iterator[psycopg.Connection[Any]]:
    """shop as the service account: the ground truth of what the database holds."""
    dsn = pg.dsn(SVC_USER, SVC_PASSWORD, "shop")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        yield conn


@pytest.fixture(scope="session")
def truth(shop_service: psycopg.Connection[Any]) -> dict[int, tuple[Any, ...]]:
    """id -> (id, full_name, email) as the database holds them: what PREPARED_SQL reads."""
    rows = shop_service.execute("SELECT id, full_name, email FROM customers ORDER BY id")
    return {int(row[0]): tuple(row) for row in rows.fetchall()}


@pytest.fixture(scope="session")
def pii(shop_service: psycopg.Connection[Any]) -> Pii:
    """Support's forbidden values and a sample customer (the module doc)."""
    forbidden = Forbidden("support", read_secrets(shop_service, SUPPORT_SECRETS))
    row = shop_service.execute(
        "SELECT c.id, c.full_name, c.email, c.phone,"
        " array_agg(t.ticket_no ORDER BY t.id), array_agg(t.body ORDER BY t.id)"
        " FROM customers c JOIN support_tickets t ON t.customer_id = c.id"
        " GROUP BY c.id HAVING count(*) >= 2 ORDER BY c.id LIMIT 1"
    ).fetchone()
    assert row is not None, "no customer with two tickets in the seeded shop"
    customer = Customer(
        int(row[0]), str(row[1]), str(row[2]), str(row[3]), tuple(row[4]), tuple(row[5])
    )
    return Pii(forbidden, customer)


class CompatRecord:
    """What a test adds to its matrix cell besides pass or fail."""

    def __init__(self, node: pytest.Item) -> None:
        self._node = node

    def refused(self, sqlstate: str, why: str) -> None:
        """The cell is refused by design (the test asserted it): shown as refused."""
        self._node.user_properties.append((_REFUSED, f"{sqlstate}: {why}"))

    def note(self, text: str) -> None:
        """A footnote on the cell: a known limitation or a driver-specific detail."""
        self._node.user_properties.append((_NOTE, text))


@pytest.fixture
def compat_record(request: pytest.FixtureRequest) -> CompatRecord:
    return CompatRecord(request.node)


@pytest.fixture(scope="session")
def pg_admin(pg: PgServer) -> Iterator[psycopg.Connection[Any]]:
    """A direct superuser connection to shop (pg_stat_activity)."""
    with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True, connect_timeout=10) as conn:
        yield conn


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll check() every 20 ms until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def wait_for_active(admin: psycopg.Connection[Any], application_name: str) -> None:
    """Wait until a backend of that application_name runs a query upstream."""

    def running() -> bool:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND state = 'active' AND pid <> pg_backend_pid()",
            (application_name,),
        ).fetchone()
        return row is not None and int(row[0]) > 0

    wait_until(running, f"a running query of {application_name}")


def strict_matrix() -> bool:
    """PGWARDEN_COMPAT_STRICT=1 (CI): a skipped cell fails the matrix check."""
    return os.environ.get("PGWARDEN_COMPAT_STRICT", "") == "1"
