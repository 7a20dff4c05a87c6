"""The one scenario every client of the compatibility matrix runs, as data.

Strategy: each driver's test module runs the same statements, so a cell of the
matrix means the same thing in every column. Statements are written with `$1`
parameters (asyncpg, node-postgres, PostgreSQL's own syntax); `with_params` turns
them into a driver's marker (`%s` for psycopg, `?` for JDBC). Expected outcomes
depend on the role only: support (restricted) sees masks, NULLs and refusals,
dba (unrestricted) sees what a direct connection sees.

Rules:

* Feature ids are the matrix's row keys (tests/compat/matrix.py describes them);
  use the constants below so a typo cannot make a new row.
* Nothing here holds a seeded value: the customer a test looks up comes from the
  `pii` fixture, which reads it from the database.
"""

from __future__ import annotations

import re
from enum import StrEnum

from conftest import PASSWORDS, SHOP_CUSTOMERS

# --- feature ids (the matrix's rows) ----------------------------------------------
LOGIN = "login"
LOOKUP_BY_EMAIL = "lookup_by_email"
LIST_TICKETS = "list_tickets"
REFUSED_SQLSTATE = "refused_sqlstate"
ROW_CAP = "row_cap"
PREPARED_REUSE = "prepared_reuse"
TRANSACTION_ROLLBACK = "transaction_rollback"
CANCEL = "cancel"
LISTEN_NOTIFY = "listen_notify"
METADATA = "metadata"
PIPELINE = "pipeline"
SERVER_CURSOR = "server_cursor"
BINARY = "binary"
ASYNC = "async"
SCHEMA_DUMP = "schema_dump"
CUSTOM_SCRIPT = "custom_script"
POOL = "pool"
SINGLE_ROW = "single_row"


class Role(StrEnum):
    """A role of TEST_POLICY as the compat tests log in: `role == "support"` works."""

    SUPPORT = "support"
    DBA = "dba"

    @property
    def user(self) -> str:
        return ROLE_USERS[self.value]

    @property
    def password(self) -> str:
        return PASSWORDS[self.user]

    @property
    def restricted(self) -> bool:
        return self is Role.SUPPORT


ROLE_USERS = {"support": "alice", "dba": "dora"}
CUSTOMERS = SHOP_CUSTOMERS
ROW_CAP_LIMIT = 50  # TEST_POLICY: support's rows_per_query

# --- statements ---------------------------------------------------------------------
LOOKUP_SQL = "SELECT id, full_name, email, phone FROM customers WHERE email = $1"
TICKETS_SQL = (
    "SELECT ticket_no, subject, body, status FROM support_tickets"
    " WHERE customer_id = $1 ORDER BY id"
)
# More than the cap: every customer. Support: 54000 and no row; dba: all of them.
ROW_CAP_SQL = "SELECT id, full_name, email FROM customers ORDER BY id"
PREPARED_SQL = "SELECT id, full_name, email FROM customers WHERE id = $1"
PREPARED_RUNS = 100
# A refused statement and its SQLSTATE per role: support may not read street (deny);
# dba may do anything, so its "refusal" is an ordinary server error.
REFUSED = {
    Role.SUPPORT: ("SELECT id, street FROM customers WHERE id = 1", "42501"),
    Role.DBA: ("SELECT 1 / 0", "22012"),
}
# Long enough to be cancelled, allowed for support (no table, no pg_sleep): one row.
LONG_SQL = "SELECT count(*) FROM generate_series(1, 2000000000) AS g"
CANCELLED_SQLSTATE = "57014"
CURSOR_CAP_NOTE = (
    "a cursor read in batches receives the batches before the one that crosses"
    " the row cap, then 54000"
)
LISTEN_CHANNEL = "compat_channel"
POLICY_REFUSAL = "42501"
ROW_CAP_SQLSTATE = "54000"

_DOLLAR = re.compile(r"\$\d+")


def with_params(sql: str, marker: str) -> str:
    """sql with each $N replaced by marker (e.g. %s, ?), in order of appearance."""
    return _DOLLAR.sub(marker, sql)
