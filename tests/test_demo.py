"""`pgwarden demo` from an empty state folder serves a real login within 60 s.

The demo builds its own PostgreSQL and the 68,000-customer shop database, so
this is the slowest single test; it runs once, end to end, as a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from proxy.pgserver import bin_dir, free_port

DEMO_BUDGET_S = 60.0


def _login(port: int) -> int | None:
    """Log in with psql, exactly as the banner says; the customer count, or None."""
    conninfo = f"host=127.0.0.1 port={port} dbname=shop user=dora connect_timeout=3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        [str(bin_dir() / "psql"), "-X", "-At", conninfo, "-c", "SELECT count(*) FROM customers"],
        env={**env, "PGPASSWORD": "dora-demo"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return int(result.stdout) if result.returncode == 0 else None


def _wait_for_login(proc: subprocess.Popen[bytes], port: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        assert proc.poll() is None, "pgwarden demo exited early"
        count = _login(port)
        if count is not None:
            return count
        time.sleep(0.5)
    raise AssertionError(f"no login within {DEMO_BUDGET_S} s")


def test_demo_serves_a_login_within_a_minute_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "demo.log").open("wb")
    cmd = [sys.executable, "-m", "proxy", "demo", "--state", str(tmp_path / "state")]
    proc = subprocess.Popen(
        [*cmd, "--listen", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        started = time.monotonic()
        assert _wait_for_login(proc, port, started + DEMO_BUDGET_S) == 68_000
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "demo.log").read_text()
    assert "PGPASSWORD=alice-demo" in text  # the banner tells how to connect
    assert _login(port) is None  # Ctrl-C stopped pgwarden
    assert not _processes_using(tmp_path / "state")  # ... and its PostgreSQL


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
