"""The compat harness itself: the leak check every driver test relies on is not vacuous.

Strategy: feed the `pii` fixture's check raw values in the shapes drivers hand back
(str, bytes, nested rows, dicts, records) and expect a failure naming the column,
never the value; masked values and dba's checks must pass.
"""

from __future__ import annotations

import pytest
from conftest import Proxy

from .conftest import Pii
from .scenario import Role


@pytest.mark.parametrize(
    "shape",
    ["text", "bytes", "rows", "dict", "reversed"],
)
def test_a_raw_value_in_any_shape_fails(pii: Pii, shape: str) -> None:
    email = pii.customer.email
    received: object = {
        "text": f"before {email} after",
        "bytes": email.encode(),
        "rows": [(1, ("x", [email]))],
        "dict": {"k": {"nested": email}},
        "reversed": email[::-1],
    }[shape]
    with pytest.raises(pytest.fail.Exception) as info:
        pii.assert_no_leak(received, "a test")
    message = str(info.value)
    assert "customers.email of row id" in message
    assert email not in message  # the failure never prints the value


def test_masked_values_and_the_unrestricted_role_pass(pii: Pii) -> None:
    c = pii.customer
    pii.assert_no_leak([(c.id, c.full_name, c.masked_email, c.masked_phone, None)], "masked")
    pii.check(Role.DBA, [c.email, c.phone, *c.bodies], "dba sees raw values")
    with pytest.raises(pytest.fail.Exception):
        pii.check(Role.SUPPORT, [c.bodies[0]], "a ticket body")


@pytest.mark.compat_matrix_check  # runs after every compat test (conftest.py)
def test_the_proxy_log_holds_no_seeded_value(compat_proxy: Proxy, pii: Pii) -> None:
    """Every driver typed raw e-mails and read raw rows as dba: the log keeps none."""
    lines = compat_proxy.log_lines()
    assert any('"event":"statement"' in line or '"event": "statement"' in line for line in lines)
    pii.assert_no_leak(lines, "the compat proxy's log")
