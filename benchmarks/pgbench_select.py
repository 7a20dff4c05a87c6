"""pgbench -S side by side: direct PostgreSQL, pgbouncer and pgwarden in one run.

Strategy: one throwaway PostgreSQL (proxy.pgserver.PgServer) holds the pgbench
tables. pgbouncer (pool_mode=transaction, the common production mode) and
pgwarden both sit in front of it and log in upstream as the same service
account, pgwarden_svc; pgbench logs in to them as benchuser (SCRAM) and to
PostgreSQL directly as pgwarden_svc. Rounds are interleaved (round 1: direct,
pgbouncer, pgwarden; round 2: ...) so drift in the machine's speed hits every
target alike, and the table gives the median TPS per target and the ratios.

Rules: a target that fails to start or to run is reported and left out, the
others go on; nothing is installed; every process started here is stopped on
exit, Ctrl-C and SIGTERM included; every wait has a deadline. Progress goes to
stderr, the result (table or --json) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from proxy.analysis.catalog import Snapshot
from proxy.auth import make_secret
from proxy.net.catalog import fetch_snapshot
from proxy.pgserver import PgServer

DB = "bench"
SVC_USER = "pgwarden_svc"
CLIENT_USER = "benchuser"
TARGETS = ("direct", "pgbouncer", "pgwarden")
RATIOS = (("pgbouncer", "direct"), ("pgwarden", "direct"), ("pgwarden", "pgbouncer"))
MODES = ("simple", "extended", "prepared")
START_TIMEOUT_S = 30.0  # a proxy that does not listen by then is reported as failed
STOP_TIMEOUT_S = 10.0
RUN_GRACE_S = 30.0  # pgbench -T N gets N + this before it is killed
INIT_TIMEOUT_S = 600.0
RUN_AS = ("pgwarden-pg", "nobody")  # pgbouncer refuses root; first existing user wins

_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


class TargetError(Exception):
    """A target could not start or a pgbench run against it failed."""


# --- options -----------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    seconds: int
    rounds: int
    clients: tuple[int, ...]
    modes: tuple[str, ...]
    jobs: int
    scale: int
    warmup: int
    workers: int | None
    json: bool


def _positive_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 8,32")
    return values


def choice_list(allowed: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of some of `allowed`."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        if not values or [v for v in values if v not in allowed]:
            raise argparse.ArgumentTypeError(f"{what} are {', '.join(allowed)}; got {text!r}")
        return values

    return parse


_modes = choice_list(MODES, "modes")


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=10, help="pgbench -T per run (10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--clients", type=_positive_list, default=(8,), help="e.g. 8,32 (8)")
    p.add_argument(
        "--mode",
        dest="modes",
        type=_modes,
        default=("extended", "prepared"),
        help="pgbench -M values, comma-separated (extended,prepared)",
    )
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j (2, capped at clients)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s (10)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target (2)")
    p.add_argument("--workers", type=int, help="passed to pgwarden serve --workers")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    if min(a.seconds, a.rounds, a.jobs, a.scale) < 1 or a.warmup < 0:
        p.error("--seconds, --rounds, --jobs and --scale must be >= 1, --warmup >= 0")
    return Options(
        a.seconds, a.rounds, a.clients, a.modes, a.jobs, a.scale, a.warmup, a.workers, a.json
    )


# --- processes and ports -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A long-running process started here, in its own session, logging to a file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def exit_reason(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"exited with code {code}{self.log_tail()}"

    def log_tail(self, lines: int = 2) -> str:
        with contextlib.suppress(OSError):
            tail = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
            if tail:
                return "; log: " + " | ".join(tail)
        return ""

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
            if self.proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)


def spawn(cmd: list[str], log: Path, **kwargs: Any) -> Service:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
    return Service(proc, log)


def wait_listening(service: Service, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if reason := service.exit_reason():
            raise TargetError(f"failed to start: {reason}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TargetError(f"failed to start: not listening on {port} after {START_TIMEOUT_S:.0f} s")


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without PG* settings that could redirect a client."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, **extra}


# --- the database ------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    svc_password: str
    client_password: str
    client_secret: str  # SCRAM verifier for pgwarden's users file

    @classmethod
    def generate(cls) -> Credentials:
        client_password = secrets.token_hex(12)
        return cls(secrets.token_hex(12), client_password, make_secret(client_password))


def svc_snapshot(server: PgServer, creds: Credentials) -> Snapshot:
    """The schema snapshot of the benchmark database, read as the service account."""
    return asyncio.run(
        fetch_snapshot(
            host=server.host,
            port=server.port,
            user=SVC_USER,
            password=creds.svc_password,
            database=DB,
            ssl=False,
            timeout=30,
        )
    )


def prepare_database(server: PgServer, opts: Options, creds: Credentials) -> None:
    server.psql(f"CREATE DATABASE {DB}")
    # Its default privileges also cover the tables pgbench -i creates next.
    server.create_service_account(SVC_USER, creds.svc_password, DB)
    init = [str(server.bin_dir / "pgbench"), "-i", "-q", "-s", str(opts.scale), DB]
    env = clean_env(server.env("postgres", "postgres", DB))
    done = subprocess.run(
        init, env=env, capture_output=True, text=True, timeout=INIT_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {done.stderr.strip()}")


def check_connection_headroom(server: PgServer, opts: Options) -> None:
    """pgbouncer keeps its idle pools open while another target runs: all of them count."""
    limit = int(server.psql("SHOW max_connections").strip())
    needed = 3 * max(opts.clients) + 5
    if needed > limit:
        progress(f"warning: up to {needed} server connections may be needed; max {limit}")


# --- targets -----------------------------------------------------------------


@dataclass
class Target:
    """One column of the table: how pgbench reaches it, and why it is out if it is."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    databases: dict[str, str] = field(default_factory=dict)  # pgbench -M mode -> database
    service: Service | None = None
    version: str | None = None
    note: str | None = None
    error: str | None = None  # set once the target is out of the benchmark

    @property
    def usable(self) -> bool:
        return self.error is None

    def fail(self, reason: str) -> None:
        self.error = reason
        progress(f"{self.name}: {reason}; skipping that column")

    def client_env(self, mode: str) -> dict[str, str]:
        return clean_env({**self.env, "PGDATABASE": self.databases.get(mode, DB)})


def connect_env(server: PgServer, port: int, user: str, password: str) -> dict[str, str]:
    env = server.env(user, password, DB)
    return {**env, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGSSLMODE": "disable"}


# --- pgbouncer ---------------------------------------------------------------

PREPARED_IN_TRANSACTION_MODE = (1, 21)  # max_prepared_statements appeared in PgBouncer 1.21
SESSION_DB = f"{DB}_session"


def find_pgbouncer() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("pgbouncer", path=path)


def pgbouncer_version(binary: str) -> tuple[int, int]:
    cmd = [binary, "--version"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out.stdout)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def unprivileged_user() -> pwd.struct_passwd | None:
    """The user pgbouncer runs as when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in RUN_AS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise TargetError(f"running as root and none of the users {RUN_AS} exists")


def pgbouncer_ini(
    workdir: Path, server: PgServer, opts: Options, *, port: int, pw: str, prepared_ok: bool
) -> str:
    upstream = f"host=127.0.0.1 port={server.port} dbname={DB} user={SVC_USER} password={pw}"
    pool = max(opts.clients)
    prepared = (
        "max_prepared_statements = 100"
        if prepared_ok
        else f"; no max_prepared_statements before 1.21: -M prepared uses {SESSION_DB}"
    )
    return f"""\
[databases]
{DB} = {upstream}
{SESSION_DB} = {upstream} pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {workdir / "userlist.txt"}
pool_mode = transaction
{prepared}
max_client_conn = {2 * pool + 10}
default_pool_size = {pool}
min_pool_size = 0
reserve_pool_size = 0
server_tls_sslmode = disable
logfile = {workdir / "pgbouncer.log"}
pidfile = {workdir / "pgbouncer.pid"}
log_connections = 0
log_disconnections = 0
"""


def write_pgbouncer_files(
    workdir: Path, server: PgServer, opts: Options, creds: Credentials, *, port: int, ok: bool
) -> Path:
    ini = workdir / "pgbouncer.ini"
    pw = creds.svc_password
    ini.write_text(pgbouncer_ini(workdir, server, opts, port=port, pw=pw, prepared_ok=ok))
    # Plain text, not the SCRAM secret: with a SCRAM secret in the userlist and a forced
    # user in [databases], pgbouncer (1.18 included; fixed by its PR #1612) reuses the
    # client's SCRAM keys for the server login, which fails (issues #944, #1461).
    # Clients still log in with SCRAM.
    (workdir / "userlist.txt").write_text(f'"{CLIENT_USER}" "{creds.client_password}"\n')
    return ini


def launch_pgbouncer(
    target: Target, work: Path, server: PgServer, opts: Options, creds: Credentials
) -> tuple[Service, int]:
    if (binary := find_pgbouncer()) is None:
        raise TargetError("pgbouncer not found (apt-get install pgbouncer)")
    version = pgbouncer_version(binary)
    target.version = "{}.{}".format(*version)
    prepared_ok = version >= PREPARED_IN_TRANSACTION_MODE
    if not prepared_ok and "prepared" in opts.modes:
        target.databases["prepared"] = SESSION_DB
        target.note = (
            f"PgBouncer {target.version} cannot keep prepared statements in transaction mode "
            "(needs 1.21+): its -M prepared runs use pool_mode=session"
        )
    workdir = work / "pgbouncer"
    workdir.mkdir()
    port = free_port()
    ini = write_pgbouncer_files(workdir, server, opts, creds, port=port, ok=prepared_ok)
    ids: dict[str, Any] = {}
    if (user := unprivileged_user()) is not None:
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    log = workdir / "stdout.log"
    return spawn([binary, str(ini)], log, cwd=workdir, **ids), port


# --- pgwarden ----------------------------------------------------------------


def pgwarden_yaml(work: Path, server: PgServer, port: int, opts: Options) -> str:
    per_user = 2 * max(opts.clients)  # the default of 4 would refuse pgbench's clients
    most = max(1000, per_user)  # idle_memory.py opens more than the default 1,000
    return f"""\
listen: 127.0.0.1:{port}
upstream:
  dsn: postgresql://{SVC_USER}@127.0.0.1:{server.port}/{DB}
  tls: disable
auth:
  users_file: {work / "users.txt"}
policy: {work / "policy.yaml"}
metrics_listen: null
log: {{format: json, level: warning}}
limits: {{max_connections: {most}, max_connections_per_user: {per_user}}}
"""


POLICY = f"""\
version: 1
roles:
  dba:
    members: [{CLIENT_USER}]
    unrestricted: true
"""


def launch_pgwarden(
    target: Target,
    work: Path,
    server: PgServer,
    opts: Options,
    creds: Credentials,
    *,
    policy: str = POLICY,
    hash_key: str | None = None,
    folder: str = "pgwarden",
    log_level: str = "warning",
) -> tuple[Service, int]:
    workdir = work / folder
    workdir.mkdir()
    port = free_port()
    (workdir / "users.txt").write_text(f'"{CLIENT_USER}" "{creds.client_secret}"\n')
    (workdir / "policy.yaml").write_text(policy)
    config = workdir / "pgwarden.yaml"
    yaml_text = pgwarden_yaml(workdir, server, port, opts).replace(
        "level: warning", f"level: {log_level}"
    )
    if hash_key is not None:
        (workdir / "hash.key").write_text(hash_key + "\n")
        yaml_text += f"hash_key_file: {workdir / 'hash.key'}\n"
    config.write_text(yaml_text)
    cmd = [sys.executable, "-m", "proxy", "serve", "-c", str(config)]
    if opts.workers is not None:
        cmd += ["--workers", str(opts.workers)]
    env = clean_env({"PGWARDEN_UPSTREAM_PASSWORD": creds.svc_password})
    return spawn(cmd, workdir / "pgwarden.log", cwd=workdir, env=env), port


# --- runs --------------------------------------------------------------------


def start_target(
    name: str,
    work: Path,
    server: PgServer,
    opts: Options,
    creds: Credentials,
    *,
    stack: contextlib.ExitStack,
    direct: tuple[str, ...] = ("direct",),
    warden: Callable[..., tuple[Service, int]] = launch_pgwarden,
) -> Target:
    """Start a target; its process stops when the stack closes; a failure marks it out.

    Targets named in `direct` connect to PostgreSQL itself; `warden` starts pgwarden.
    """
    target = Target(name)
    if name in direct:
        target.env = connect_env(server, server.port, SVC_USER, creds.svc_password)
        return target
    launch = launch_pgbouncer if name == "pgbouncer" else warden
    try:
        target.service, port = launch(target, work, server, opts, creds)
        stack.callback(target.service.stop)
        wait_listening(target.service, port)
    except (TargetError, OSError) as exc:
        target.fail(str(exc))
        return target
    target.env = connect_env(server, port, CLIENT_USER, creds.client_password)
    return target


def pgbench_error(stdout: str, stderr: str) -> str:
    """The first line that names the fault, not pgbench's closing summary."""
    lines = (stderr.strip() or stdout.strip() or "no output").splitlines()
    faults = [ln for ln in lines if re.search(r"error|fatal", ln, re.IGNORECASE)]
    return (faults or lines)[0].strip()


def run_pgbench(
    server: PgServer,
    target: Target,
    *,
    mode: str,
    clients: int,
    seconds: int,
    jobs: int,
    workload: Sequence[str] = ("-S",),
) -> float:
    """One pgbench run (-S unless `workload` says otherwise: e.g. -f script); returns TPS
    or raises TargetError naming the fault."""
    cmd = [str(server.bin_dir / "pgbench"), *workload, "-n", "-M", mode, "-c", str(clients)]
    cmd += ["-j", str(min(jobs, clients)), "-T", str(seconds)]
    try:
        done = subprocess.run(
            cmd,
            env=target.client_env(mode),
            capture_output=True,
            text=True,
            timeout=seconds + RUN_GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"pgbench did not finish within {seconds + RUN_GRACE_S:.0f} s") from exc
    found = re.search(r"^tps = ([0-9.]+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or found is None:
        fault = pgbench_error(done.stdout, done.stderr)
        raise TargetError(f"pgbench exit {done.returncode}: {fault}")
    return float(found.group(1))


# --- results -----------------------------------------------------------------


class RoundStats:
    """Medians, noise and ratios over the rounds in `tps` (every benchmark's results)."""

    tps: Mapping[Any, Mapping[str, list[float]]]
    failed: Mapping[Any, str]

    def measured(self) -> Sequence[str]:
        """The targets whose rounds count for the noise."""
        raise NotImplementedError

    def median(self, config: tuple[Any, ...], target: str) -> float | None:
        values = self.tps.get(config, {}).get(target)
        failed = (*config, target) in self.failed
        return statistics.median(values) if values and not failed else None

    def spread(self, config: tuple[Any, ...]) -> float | None:
        """The widest (max - min) / median over rounds among the targets: the noise."""
        spreads = [
            (max(v) - min(v)) / statistics.median(v)
            for t in self.measured()
            if len(v := self.tps.get(config, {}).get(t, [])) > 1 and self.median(config, t)
        ]
        return max(spreads, default=None)

    def ratio(self, config: tuple[Any, ...], num: str, den: str) -> float | None:
        a, b = self.median(config, num), self.median(config, den)
        return a / b if a is not None and b else None


@dataclass
class Results(RoundStats):
    opts: Options
    info: dict[str, Any] = field(default_factory=dict)
    tps: dict[tuple[str, int], dict[str, list[float]]] = field(default_factory=dict)
    failed: dict[tuple[str, int, str], str] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    interrupted: bool = False

    def configs(self) -> Iterator[tuple[str, int]]:
        for mode in self.opts.modes:
            for clients in self.opts.clients:
                yield mode, clients

    def measured(self) -> Sequence[str]:
        return TARGETS

    def row(self, config: tuple[str, int]) -> dict[str, Any]:
        return {
            "mode": config[0],
            "clients": config[1],
            "tps": self.tps.get(config, {}),
            "median": {t: _round(self.median(config, t), 1) for t in TARGETS},
            "ratios": {f"{n}/{d}": _round(self.ratio(config, n, d), 3) for n, d in RATIOS},
            "spread": _round(self.spread(config), 3),
            "failed": {t: r for (m, c, t), r in self.failed.items() if (m, c) == config},
        }

    def as_json(self) -> dict[str, Any]:
        rows = [self.row(config) for config in self.configs()]
        notes = self.notes()
        return {"settings": self.info, "results": rows, "notes": notes}

    def notes(self) -> list[str]:
        notes = [f"{t.name}: {t.note}" for t in self.targets if t.note]
        notes += [f"{t.name}: {t.error}" for t in self.targets if t.error]
        if self.interrupted:
            notes.insert(0, "interrupted: partial results")
        for (mode, clients, name), reason in self.failed.items():
            notes.append(f"{name} {mode} c={clients}: {reason}")
        return notes


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(results: Results) -> str:
    o, i = results.opts, results.info
    lines = [
        f"pgbench -S -n, scale {o.scale}, {o.rounds} round(s) x {o.seconds} s, -j {o.jobs}; "
        f"median TPS per target",
        f"PostgreSQL {i.get('postgres')} | PgBouncer {i.get('pgbouncer') or '-'} "
        f"(pool_mode=transaction) | pgwarden workers={o.workers or 'default'} | "
        f"{os.cpu_count()} CPUs shared by pgbench, proxies and PostgreSQL",
        "",
    ]
    lines += table_rows(results, [("mode", "<9"), ("clients", ">8")], TARGETS, RATIOS)
    return "\n".join(lines)


def table_rows(
    results: Any,
    keys: Sequence[tuple[str, str]],
    targets: Sequence[str],
    ratios: Sequence[tuple[str, str]],
) -> list[str]:
    """Header, one row per configuration (its key columns, medians, ratios, spread), notes."""
    head = "".join(f"{title:{spec}}" for title, spec in keys)
    head += "".join(f"{t:>11}" for t in targets)
    lines = [head + "".join(f"{n + '/' + d:>20}" for n, d in ratios) + f"{'spread':>8}"]
    for config in results.configs():
        row = "".join(f"{value:{spec}}" for value, (_, spec) in zip(config, keys, strict=False))
        row += "".join(f"{_fmt(results.median(config, t), '.0f'):>11}" for t in targets)
        row += "".join(f"{_fmt(results.ratio(config, n, d), '.2f'):>20}" for n, d in ratios)
        row += f"{_fmt(results.spread(config), '.0%'):>8}"
        lines.append(row)
    if notes := results.notes():
        lines += ["", *(f"note: {n}" for n in notes)]
    return lines


# --- the run -----------------------------------------------------------------


def warm_up(server: PgServer, targets: list[Target], opts: Options) -> None:
    """A short run per target: warms caches and pools, and finds a broken target early."""
    mode, clients = opts.modes[0], opts.clients[0]
    for target in targets:
        if not target.usable or opts.warmup == 0:
            continue
        progress(f"warm-up {target.name} ({mode}, {clients} clients, {opts.warmup} s)")
        try:
            run_pgbench(
                server, target, mode=mode, clients=clients, seconds=opts.warmup, jobs=opts.jobs
            )
        except TargetError as exc:
            target.fail(f"warm-up failed: {exc}")


def bench_one(
    server: PgServer, target: Target, config: tuple[str, int], results: Results, label: str
) -> None:
    mode, clients = config
    opts = results.opts
    if not target.usable or (mode, clients, target.name) in results.failed:
        return
    if target.service and (reason := target.service.exit_reason()):
        target.fail(f"stopped during the run: {reason}")
        return
    try:
        tps = run_pgbench(
            server, target, mode=mode, clients=clients, seconds=opts.seconds, jobs=opts.jobs
        )
    except TargetError as exc:
        results.failed[(mode, clients, target.name)] = str(exc)
        progress(f"{label} {target.name:<9} FAILED: {exc}; skipped in later rounds")
        return
    results.tps.setdefault(config, {}).setdefault(target.name, []).append(tps)
    progress(f"{label} {target.name:<9} {tps:10.0f} tps")


def run_rounds(server: PgServer, targets: list[Target], results: Results) -> None:
    opts = results.opts
    for rnd in range(1, opts.rounds + 1):
        for config in results.configs():
            label = f"round {rnd}/{opts.rounds} {config[0]:<8} c={config[1]:<3}"
            for target in targets:
                bench_one(server, target, config, results, label)


def run(opts: Options, stack: contextlib.ExitStack, results: Results) -> None:
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgwarden-bench-")))
    work.chmod(0o711)  # unprivileged PostgreSQL and pgbouncer reach their subfolders
    creds = Credentials.generate()
    server = PgServer(work / "pgdata")
    progress("starting PostgreSQL")
    server.start()
    stack.callback(server.stop)
    check_connection_headroom(server, opts)
    progress(f"PostgreSQL on 127.0.0.1:{server.port}; pgbench -i -s {opts.scale}")
    prepare_database(server, opts, creds)
    for name in TARGETS:
        results.targets.append(start_target(name, work, server, opts, creds, stack=stack))
    results.info.update(settings_info(server, opts, results.targets))
    warm_up(server, results.targets, opts)
    run_rounds(server, results.targets, results)


def settings_info(server: PgServer, opts: Options, targets: list[Target]) -> dict[str, Any]:
    bouncer = next(t for t in targets if t.name == "pgbouncer")
    return {
        "postgres": server.psql("SHOW server_version").strip(),
        "pgbouncer": bouncer.version,
        "pgbouncer_pool_mode": "transaction",
        "pgbouncer_prepared_pool_mode": "session" if bouncer.databases else "transaction",
        "seconds": opts.seconds,
        "rounds": opts.rounds,
        "clients": list(opts.clients),
        "modes": list(opts.modes),
        "jobs": opts.jobs,
        "scale": opts.scale,
        "workers": opts.workers,
        "cpus": os.cpu_count(),
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _ignore_interrupts() -> None:
    """A second Ctrl-C must not cut the clean-up short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _describe(exc: BaseException) -> str:
    stderr = getattr(exc, "stderr", None)
    return f"{exc}: {stderr.strip()}" if isinstance(stderr, str) and stderr.strip() else str(exc)


def drive(
    opts: Any,
    results: Any,
    run_all: Callable[[Any, contextlib.ExitStack, Any], None],
    render: Callable[[Any], str],
) -> int:
    """Run a benchmark with clean-up on every exit path; print what was measured."""
    signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        with contextlib.ExitStack() as stack:
            try:
                run_all(opts, stack, results)
            finally:
                _ignore_interrupts()
    except KeyboardInterrupt:
        progress("interrupted; everything started here is stopped")
        results.interrupted = True
        code = 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        progress(f"setup failed: {_describe(exc)}")
        return 1
    if code == 0 or results.tps:
        print(json.dumps(results.as_json(), indent=2) if opts.json else render(results))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    return drive(opts, Results(opts), run, render_table)


if __name__ == "__main__":
    sys.exit(main())
