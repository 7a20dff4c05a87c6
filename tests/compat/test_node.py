"""node-postgres (npm `pg`, with and without pg-cursor) through pgwarden.

Strategy: tests/compat/node/scenario.js runs the whole scenario with the versions
that package-lock.json pins (`npm ci`, part of `make install`), once per role, in one
node process, and reports each feature as a JSON line (tests/compat/drivers.py).
Each test below judges one feature of that run and fills one cell of the matrix;
every value the driver received, binary results included, goes through the leak
check first. node-postgres speaks the extended protocol for every query with
parameters (a named statement for prepared_reuse, Execute with a row count for
pg-cursor) and the simple protocol for the others; `binary: true` asks for every
result column in binary format. The tests skip only when node itself is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Proxy

from proxy.pgserver import PgServer

from .conftest import CompatRecord, Pii
from .drivers import (
    CUSTOMER_COLUMNS,
    SHOP_TABLES,
    Run,
    cached_runs,
    check_batched_cap,
    check_cancel,
    check_listen,
    check_login,
    check_lookup,
    check_prepared,
    check_refused,
    check_rollback,
    check_row_cap,
    check_tickets,
    expected_customer,
)
from .scenario import (
    BINARY,
    CANCEL,
    CUSTOMERS,
    LIST_TICKETS,
    LISTEN_CHANNEL,
    LISTEN_NOTIFY,
    LOGIN,
    LOOKUP_BY_EMAIL,
    METADATA,
    PREPARED_REUSE,
    REFUSED_SQLSTATE,
    ROW_CAP,
    ROW_CAP_LIMIT,
    SERVER_CURSOR,
    TRANSACTION_ROLLBACK,
    Role,
)

CLIENT = "node-postgres"
POOL = "pool"
NODE = shutil.which("node")
NODE_DIR = Path(__file__).resolve().parent / "node"
OID_INT4, OID_TEXT, OID_TIMESTAMPTZ = 23, 25, 1184

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node (Node.js) is not installed: the node-postgres column needs it"
)


@pytest.fixture(scope="module")
def node_runs(compat_proxy: Proxy, pg: PgServer, pii: Pii) -> Callable[[Role], Run]:
    """role -> the scenario's run as that role (one node process per role, cached)."""
    if not (NODE_DIR / "node_modules" / "pg-cursor").is_dir():
        pytest.fail(f"node-postgres is not installed: run `make install` (npm ci in {NODE_DIR})")
    assert NODE is not None
    command = [NODE, "--no-deprecation", "scenario.js"]
    return cached_runs(compat_proxy, pg, pii, CLIENT, command=command, marker="$1", cwd=NODE_DIR)


@pytest.fixture
def node(node_runs: Callable[[Role], Run], role: Role) -> Run:
    return node_runs(role)


@pytest.mark.compat(client=CLIENT, feature=LOGIN)
def test_login(node: Run) -> None:
    facts = node[LOGIN]
    check_login(facts)
    assert facts["application_name"] == "pgwarden compat (node-postgres)"
    assert facts["backend_key"] is True  # pgwarden's own BackendKeyData, used by cancel


@pytest.mark.compat(client=CLIENT, feature=LOOKUP_BY_EMAIL)
def test_lookup_by_email(node: Run, role: Role, pii: Pii) -> None:
    check_lookup(node[LOOKUP_BY_EMAIL]["rows"], role, pii)


@pytest.mark.compat(client=CLIENT, feature=LIST_TICKETS)
def test_list_tickets(node: Run, role: Role, pii: Pii) -> None:
    check_tickets(node[LIST_TICKETS]["rows"], role, pii)


@pytest.mark.compat(client=CLIENT, feature=REFUSED_SQLSTATE)
def test_refused_statement_reports_its_sqlstate(node: Run, role: Role) -> None:
    check_refused(node[REFUSED_SQLSTATE], role)


@pytest.mark.compat(client=CLIENT, feature=ROW_CAP)
def test_row_cap(node: Run, role: Role) -> None:
    facts = node[ROW_CAP]
    check_row_cap(facts, role, CUSTOMERS)
    # 'row' events count every DataRow that reached the driver: reject delivers none
    assert facts["rows_seen"] == (0 if role.restricted else CUSTOMERS)


@pytest.mark.compat(client=CLIENT, feature=PREPARED_REUSE)
def test_prepared_statement_reused(
    node: Run, role: Role, truth: dict[int, tuple[Any, ...]]
) -> None:
    """A named statement ({name, text, values}): one Parse, then Bind/Execute per run."""
    check_prepared(node[PREPARED_REUSE]["rows"], role, truth)


@pytest.mark.compat(client=CLIENT, feature=TRANSACTION_ROLLBACK)
def test_transaction_rollback(node: Run, role: Role) -> None:
    check_rollback(node[TRANSACTION_ROLLBACK], role)


@pytest.mark.compat(client=CLIENT, feature=CANCEL)
def test_cancel(node: Run) -> None:
    """A second Client's cancel(client, query): a CancelRequest with pgwarden's key."""
    check_cancel(node[CANCEL])


@pytest.mark.compat(client=CLIENT, feature=LISTEN_NOTIFY)
def test_listen_notify(node: Run, role: Role, compat_record: CompatRecord) -> None:
    facts = node[LISTEN_NOTIFY]
    check_listen(facts, role)
    if role.restricted:
        compat_record.refused("42501", "LISTEN and NOTIFY are not statements support may run")
    else:
        assert facts["notification"] == [LISTEN_CHANNEL, "hello from node-postgres"]


@pytest.mark.compat(client=CLIENT, feature=METADATA)
def test_metadata(node: Run) -> None:
    """What an admin panel reads: information_schema, pg_catalog, result field types."""
    facts = node[METADATA]
    assert facts["tables"] == SHOP_TABLES
    assert [name for name, _ in facts["columns"]] == CUSTOMER_COLUMNS
    assert facts["primary_key"] == ["id"]
    # more rows than support's cap: a statement that reads catalog relations only is not capped
    assert facts["types"] > ROW_CAP_LIMIT
    assert facts["fields"] == [
        ["id", OID_INT4],
        ["email", OID_TEXT],
        ["created_at", OID_TIMESTAMPTZ],
    ]


@pytest.mark.compat(client=CLIENT, feature=BINARY)
def test_binary_results(node: Run, role: Role, pii: Pii) -> None:
    facts = node[BINARY]
    check_lookup(facts["lookup"], role, pii)
    check_tickets(facts["tickets"], role, pii)
    c = pii.customer
    email, phone = expected_customer((c.id, c.full_name, c.email, c.phone), role)[2:]
    assert facts["bytes"] == [[email, phone]]  # bytea in binary format, decoded


@pytest.mark.compat(client=CLIENT, feature=SERVER_CURSOR)
def test_pg_cursor(node: Run, role: Role, compat_record: CompatRecord) -> None:
    """pg-cursor: a portal read with Execute(15), then one over the cap read by 20s."""
    facts = node[SERVER_CURSOR]
    assert facts["batches"] == [15, 15, 10]
    check_batched_cap(facts, role, CUSTOMERS)
    if role.restricted:
        compat_record.note(
            "a portal read in batches receives the batches before the one that crosses "
            f"the row cap ({facts['big_delivered']} of at most {ROW_CAP_LIMIT} rows), then 54000"
        )


@pytest.mark.compat(client=CLIENT, feature=POOL)
def test_pool(node: Run, role: Role, truth: dict[int, tuple[Any, ...]]) -> None:
    """pg.Pool with max 3: twelve concurrent queries, then a checked-out transaction."""
    facts = node[POOL]
    assert facts["rows"] == [expected_customer(truth[i], role) for i in range(1, 13)]
    assert 1 <= facts["clients"] <= 3
    assert facts["checkout"] is True
