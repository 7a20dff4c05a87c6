"""`pgwarden demo` from an empty state folder: the banner's psql commands work as printed.

The demo builds its own PostgreSQL and the 68,000-customer shop database, so
this is the slowest single test; it runs once, end to end, as a user would:
start the command, copy the psql lines from its banner, run them, press Ctrl-C.
How long it takes to serve is measured by hand (docs/demo.md), never asserted:
the wait below is a guard against a hang, not a budget.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.demo import EXAMPLE_QUERY
from proxy.pgserver import free_port

HANG_GUARD_S = 240.0


def _banner_command(text: str, user: str) -> str | None:
    """The banner's shell line that logs `user` in, or None while it is not printed."""
    for line in text.splitlines():
        if line.strip().startswith(f"PGPASSWORD={user}-demo "):
            return line.strip()
    return None


def _run_banner_command(command: str, sql: str) -> subprocess.CompletedProcess[str]:
    """Paste the banner's line into a shell, add -c SQL, as a user would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        ["bash", "-c", f'{command} -X -At -F "|" -v ON_ERROR_STOP=1 -c "$0"', sql],
        env={**env, "PGCONNECT_TIMEOUT": "3"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _wait_for_service(proc: subprocess.Popen[bytes], log: Path) -> str:
    """Alice's banner line, once it logs in (psql exits 0)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "pgwarden demo exited early:\n" + log.read_text()
        command = _banner_command(log.read_text(), "alice")
        if command is not None and _run_banner_command(command, "SELECT 1").returncode == 0:
            return command
        time.sleep(0.5)
    raise AssertionError(f"the demo did not serve within the {HANG_GUARD_S} s hang guard")


@pytest.mark.timeout(HANG_GUARD_S + 60)
def test_demo_from_a_clean_state_serves_its_printed_psql_commands_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    port = free_port()
    log_path = tmp_path / "demo.log"
    cmd = [sys.executable, "-m", "proxy", "demo", "--state", str(tmp_path / "state")]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--listen", f"127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        alice = _wait_for_service(proc, log_path)
        _check_the_banner_users(log_path.read_text(), alice)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _run_banner_command(alice, "SELECT 1").returncode != 0  # Ctrl-C stopped pgwarden
    assert not _processes_using(tmp_path / "state")  # ... and its PostgreSQL


def _check_the_banner_users(text: str, alice: str) -> None:
    """Support sees masked e-mails, the analyst hashes, the dba everything."""
    assert "refused until" not in text  # the banner no longer predates the policy engine
    masked = _run_banner_command(alice, EXAMPLE_QUERY)
    assert masked.returncode == 0, masked.stderr
    assert masked.stdout.strip() == "1634|Ines Muller|i***@inbox.example|***4902"  # her ticket's
    outside = _run_banner_command(alice, "SELECT count(*) FROM customers WHERE id = 1")
    assert outside.stdout.strip() == "0", outside.stderr  # not a customer of her open tickets
    street = _run_banner_command(alice, "SELECT street FROM customers WHERE id = 1")
    assert "42501" in street.stderr or "may not see" in street.stderr
    dora = _banner_command(text, "dora")
    assert dora is not None
    count = _run_banner_command(dora, "SELECT count(*) FROM customers")
    assert count.stdout.strip() == "68000"
    bob = _banner_command(text, "bob")
    assert bob is not None
    hashed = _run_banner_command(bob, "SELECT email FROM customers WHERE id = 1")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() not in ("", "hiro.nguyen1@example.org", "h***@example.org")


def test_json_goes_with_a_scenario(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--json", "--state", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--json goes with --scenario" in done.stderr
    assert not (tmp_path / "s").exists()  # refused before anything started


def _processes_using(folder: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in args:
            found.append(args)
    return found
