"""pgbench with a custom script through pgwarden, as each role, in each query mode.

Strategy: the script is the support scenario's hot path (a customer by id, then its
tickets), run by two clients for a fixed number of transactions (never a duration)
in pgbench's three modes: simple Query, extended (unnamed statements) and prepared
(named statements, Parse once, then Bind/Execute). pgbench must report every
transaction done and none failed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import Proxy

from proxy.pgserver import bin_dir

from .conftest import Pii
from .scenario import CUSTOM_SCRIPT, Role

CLIENT = "pgbench"
CLIENTS, TRANSACTIONS = 2, 20
SCRIPT = """\
\\set id random(1, 200)
SELECT id, full_name, email, phone FROM customers WHERE id = :id;
SELECT ticket_no, subject, status FROM support_tickets WHERE customer_id = :id;
"""


@pytest.mark.compat(client=CLIENT, feature=CUSTOM_SCRIPT)
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_custom_script(
    compat_proxy: Proxy, role: Role, pii: Pii, mode: str, tmp_path: Path
) -> None:
    script = tmp_path / "lookup.sql"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [
            str(bin_dir() / "pgbench"),
            "-n",  # no vacuum of pgbench's own tables: there are none here
            "-M",
            mode,
            "-c",
            str(CLIENTS),
            "-j",
            "1",
            "-t",
            str(TRANSACTIONS),
            "-f",
            str(script),
        ],
        capture_output=True,
        text=True,
        env=compat_proxy.env(role.user, role.password, PGSSLMODE="disable"),
        timeout=120,
        check=False,
    )
    pii.check(role, [done.stdout, done.stderr], f"pgbench {mode}")
    assert done.returncode == 0, done.stderr[-2000:]
    total = CLIENTS * TRANSACTIONS
    assert f"number of transactions actually processed: {total}/{total}" in done.stdout
    assert "number of failed transactions: 0 " in done.stdout
