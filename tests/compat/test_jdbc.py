"""pgjdbc (Debian's libpostgresql-jdbc-java) through pgwarden.

Strategy: tests/compat/java/Compat.java is compiled once with javac against the
system's pgjdbc jar and runs the whole scenario once per role in one JVM, reporting
each feature as a JSON line (tests/compat/drivers.py). Each test below judges one
feature of that run and fills one cell of the matrix; every value the driver
received goes through the leak check first. pgjdbc speaks the extended protocol for
everything: unnamed statements until a PreparedStatement reaches prepareThreshold,
then a named server-side one; with autocommit off and a fetch size, a portal read
with Execute(n); with binaryTransfer, binary results for the types it decodes
(integers, numeric, timestamps, bytea). At connect it sets extra_float_digits and
application_name, and its DatabaseMetaData calls (the ones DBeaver's navigator
makes) are large pg_catalog queries with regclass casts and information_schema
helpers. The tests skip only when java or javac is missing, or (outside CI, where
PGWARDEN_COMPAT_STRICT makes a skipped cell fail) when the jar is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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
    assert_pgwarden_refusal,
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
    value_of,
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

CLIENT = "pgjdbc"
PREPARE_THRESHOLD = "prepare_threshold"
JAVA, JAVAC = shutil.which("java"), shutil.which("javac")
SOURCE = Path(__file__).resolve().parent / "java" / "Compat.java"
JAR = Path(os.environ.get("PGWARDEN_PGJDBC_JAR", "/usr/share/java/postgresql.jar"))
BINARY_FORMAT = 1

pytestmark = [
    pytest.mark.skipif(
        JAVA is None or JAVAC is None,
        reason="java/javac (a JDK) is not installed: the pgjdbc column needs it",
    ),
    pytest.mark.skipif(
        not JAR.is_file() and os.environ.get("PGWARDEN_COMPAT_STRICT", "") != "1",
        reason=f"pgjdbc is not installed ({JAR}): apt-get install libpostgresql-jdbc-java "
        "(make install does it as root on Debian) or set PGWARDEN_PGJDBC_JAR",
    ),
]


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compat.java compiled against the pgjdbc jar."""
    if not JAR.is_file():
        pytest.fail(f"pgjdbc is not installed ({JAR}): run `make install` as root")
    assert JAVAC is not None
    out = tmp_path_factory.mktemp("pgjdbc-classes")
    done = subprocess.run(
        [JAVAC, "-Xlint:all", "-Werror", "-d", str(out), "-cp", str(JAR), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def jdbc_runs(compat_proxy: Proxy, pg: PgServer, pii: Pii, classes: Path) -> Callable[[Role], Run]:
    """role -> the scenario's run as that role (one JVM per role, cached)."""
    assert JAVA is not None
    command = [JAVA, "-cp", f"{classes}{os.pathsep}{JAR}", "Compat"]
    return cached_runs(compat_proxy, pg, pii, CLIENT, command=command, marker="?", cwd=classes)


@pytest.fixture
def jdbc(jdbc_runs: Callable[[Role], Run], role: Role) -> Run:
    return jdbc_runs(role)


@pytest.mark.compat(client=CLIENT, feature=LOGIN)
def test_login(jdbc: Run, role: Role) -> None:
    """Start-up parameters, then SET extra_float_digits, SET application_name (setClientInfo),
    SHOW TRANSACTION ISOLATION LEVEL and SET SESSION CHARACTERISTICS (setReadOnly)."""
    facts = jdbc[LOGIN]
    version, version_num, database, application_name, float_digits = facts["row"]
    check_login({"version": version, "server_version_num": version_num, "database": database})
    assert application_name == "pgwarden compat (pgjdbc)"
    assert float_digits == "3"
    assert facts["product"] == "PostgreSQL"
    assert facts["user_name"] == role.user
    assert facts["valid"] is True  # Connection.isValid: an empty query round trip
    assert facts["isolation"] == 2  # TRANSACTION_READ_COMMITTED
    assert facts["read_only"] is True


@pytest.mark.compat(client=CLIENT, feature=LOOKUP_BY_EMAIL)
def test_lookup_by_email(jdbc: Run, role: Role, pii: Pii) -> None:
    check_lookup(jdbc[LOOKUP_BY_EMAIL]["rows"], role, pii)


@pytest.mark.compat(client=CLIENT, feature=LIST_TICKETS)
def test_list_tickets(jdbc: Run, role: Role, pii: Pii) -> None:
    check_tickets(jdbc[LIST_TICKETS]["rows"], role, pii)


@pytest.mark.compat(client=CLIENT, feature=REFUSED_SQLSTATE)
def test_refused_statement_reports_its_sqlstate(jdbc: Run, role: Role) -> None:
    check_refused(jdbc[REFUSED_SQLSTATE], role)


@pytest.mark.compat(client=CLIENT, feature=ROW_CAP)
def test_row_cap(jdbc: Run, role: Role) -> None:
    check_row_cap(jdbc[ROW_CAP], role, CUSTOMERS)


@pytest.mark.compat(client=CLIENT, feature=PREPARED_REUSE)
def test_prepared_statement_reused(
    jdbc: Run, role: Role, truth: dict[int, tuple[Any, ...]]
) -> None:
    """One PreparedStatement executed 100 times: past prepareThreshold (5) it is named."""
    facts = jdbc[PREPARED_REUSE]
    check_prepared(facts["rows"], role, truth)
    assert facts["server_prepared"] is True


@pytest.mark.compat(client=CLIENT, feature=PREPARE_THRESHOLD)
def test_prepare_threshold_reached(
    jdbc: Run, role: Role, truth: dict[int, tuple[Any, ...]]
) -> None:
    """prepareThreshold=3: the driver switches to a named server-side statement."""
    facts = jdbc[PREPARE_THRESHOLD]
    assert facts["server_prepared"][-1] is True
    assert facts["rows"] == [expected_customer(truth[i], role) for i in range(1, 9)]
    if role.restricted:
        # pg_prepared_statements shows the statements pgwarden sent (mask SQL, hash pads)
        assert_pgwarden_refusal(facts["named_statements"])
    else:
        assert value_of(facts["named_statements"]) >= 1


@pytest.mark.compat(client=CLIENT, feature=TRANSACTION_ROLLBACK)
def test_transaction_rollback(jdbc: Run, role: Role) -> None:
    """setAutoCommit(false), an error, rollback(); then a write rolled back (dba)."""
    check_rollback(jdbc[TRANSACTION_ROLLBACK], role)


@pytest.mark.compat(client=CLIENT, feature=CANCEL)
def test_cancel(jdbc: Run) -> None:
    """Statement.cancel() from another thread: a CancelRequest with pgwarden's key."""
    check_cancel(jdbc[CANCEL])


@pytest.mark.compat(client=CLIENT, feature=LISTEN_NOTIFY)
def test_listen_notify(jdbc: Run, role: Role, compat_record: CompatRecord) -> None:
    facts = jdbc[LISTEN_NOTIFY]
    check_listen(facts, role)
    if role.restricted:
        compat_record.refused("42501", "LISTEN and NOTIFY are not statements support may run")
    else:
        assert facts["notifications"] == [[LISTEN_CHANNEL, "hello from pgjdbc"]]


@pytest.mark.compat(client=CLIENT, feature=METADATA)
def test_database_metadata(jdbc: Run) -> None:
    """getSchemas, getTables, getColumns, getPrimaryKeys, getIndexInfo, getImportedKeys,
    and the unfiltered getTables and getTypeInfo (catalog reads over the row cap)."""
    facts = jdbc[METADATA]
    assert "public" in value_of(facts["schemas"])
    assert value_of(facts["tables"]) == SHOP_TABLES
    assert [name for name, _ in value_of(facts["columns"])] == CUSTOMER_COLUMNS
    assert value_of(facts["primary_keys"]) == [["id", "customers_pkey"]]
    assert sorted(value_of(facts["index_info"])) == [
        ["customers_email_key", "email"],
        ["customers_phone_idx", "phone"],
        ["customers_pkey", "id"],
    ]
    assert value_of(facts["imported_keys"]) == [["customers", "customer_id"]]
    assert value_of(facts["all_tables"]) > ROW_CAP_LIMIT
    assert value_of(facts["type_info"]) > ROW_CAP_LIMIT
    assert facts["usable_after"] is True


@pytest.mark.compat(client=CLIENT, feature=SERVER_CURSOR)
def test_fetch_size(jdbc: Run, role: Role, compat_record: CompatRecord) -> None:
    """Autocommit off and setFetchSize: a portal read with Execute(10), then Execute(20)."""
    facts = jdbc[SERVER_CURSOR]
    assert facts["small"] == 45
    check_batched_cap(facts, role, CUSTOMERS)
    if role.restricted:
        compat_record.note(
            "a portal read in batches (fetchSize) receives the batches before the one that "
            f"crosses the row cap ({facts['big_delivered']} of at most {ROW_CAP_LIMIT} rows), "
            "then 54000"
        )


@pytest.mark.compat(client=CLIENT, feature=BINARY)
def test_binary_transfer(jdbc: Run, role: Role, pii: Pii) -> None:
    """prepareThreshold=-1 and binaryTransfer: int4, bytea, numeric, timestamptz in binary."""
    facts = jdbc[BINARY]
    check_lookup(facts["lookup"], role, pii)
    assert facts["lookup_formats"][0] == BINARY_FORMAT  # the id
    assert facts["bytes_formats"] == [BINARY_FORMAT] * 5
    c = pii.customer
    email, phone = expected_customer((c.id, c.full_name, c.email, c.phone), role)[2:]
    assert [row[:3] for row in facts["bytes"]] == [[c.id, email, phone]] * len(facts["bytes"])
    assert facts["bytes"], "the customer has orders"
