"""pgbench masked point look-ups: pgwarden (support role, masked) vs the same plain look-up.

Strategy: one throwaway PostgreSQL holds the demo shop database (proxy.demo.shop_sql).
pgbench runs a custom script, one look-up of a customer per transaction:

* id:    \\set id random(1, N)
         SELECT id, full_name, email, phone FROM customers WHERE id = :id
* email: the same columns WHERE email = :email_K. pgbench variables hold only
         numbers, and pgwarden rewrites an equality look-up on a masked column only
         when it compares with a literal or a parameter (an e-mail built in SQL from
         the id would be refused), so the script cannot compute the e-mail. Instead
         there is one script per customer of a fixed sample (EMAIL_SAMPLE customers
         spread over the id range), each with its own variable set by `pgbench -D`;
         pgbench picks a script at random per transaction. With -M extended or
         prepared the e-mail travels as a bound parameter ($1), as from an
         application; with -M simple pgbench pastes it into the text, so the
         value is quoted there.

-M simple is not in the default modes: pgbench then pastes the id into the text,
so every id look-up is a new statement text for pgwarden, a verdict-cache miss
and a full analysis (engine_cost.py's cold figure); that measures the engine, not
the proxy. (The e-mail variant has only EMAIL_SAMPLE distinct texts.)

Through pgwarden the bench user is a member of the `support` role of
policies/example.yaml (e-mail and phone masked with equality look-up; no
hourly/daily quota, which would stop a benchmark within seconds), so pgwarden
rewrites each statement into the masked form and PostgreSQL evaluates the masks.
pgbouncer and the direct connection run the SAME script, unmasked, as the service
account: the ratios are the whole price of the protection (proxy path, analysis,
masking in PostgreSQL), not of the proxy alone. Rounds are interleaved as in
pgbench_select.py, whose machinery (targets, pgbouncer set-up, pgbench runner,
clean-up) this script imports.

--rewritten adds a fourth target, `rewritten`: the direct connection running the
text pgwarden sends upstream (the engine's rewrite of the look-up, obtained
in-process from the same policy and schema), so pgwarden/rewritten is the cost of
the proxy alone and rewritten/direct the cost of the masking inside PostgreSQL.

Rules: as pgbench_select.py: nothing is installed; a target that fails is reported
and left out; every process started here stops on exit, Ctrl-C and SIGTERM
included; every wait has a deadline. Progress to stderr, the result to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pgbench_select import (
    CLIENT_USER,
    DB,
    MODES,
    SVC_USER,
    Credentials,
    Options,
    RoundStats,
    Target,
    TargetError,
    _modes,
    _positive_list,
    _round,
    check_connection_headroom,
    choice_list,
    drive,
    launch_pgwarden,
    progress,
    run_pgbench,
    svc_snapshot,
    table_rows,
)
from pgbench_select import (
    start_target as select_start_target,
)

from proxy.analysis.engine import Engine
from proxy.demo import shop_sql
from proxy.pgserver import PgServer
from proxy.policy import parse_policy

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_POLICY = REPO / "policies" / "example.yaml"
ROLE = "support"
ROWS_PER_QUERY = 1000  # a cap a one-row look-up never reaches
VARIANTS = ("id", "email")
REWRITTEN = "rewritten"  # direct, running the text pgwarden sends upstream
TARGETS = ("direct", "pgbouncer", "pgwarden")
RATIOS = (("pgwarden", "pgbouncer"), ("pgwarden", "direct"), ("pgbouncer", "direct"))
REWRITTEN_RATIOS = (("pgwarden", REWRITTEN), (REWRITTEN, "direct"))
QUOTA = "quotas"  # pgwarden again, with hourly and daily quotas: every look-up is charged
QUOTA_RATIOS = ((QUOTA, "pgwarden"),)
LOGGED = "logged"  # pgwarden again, at log level info: one statement event per statement
LOGGED_RATIOS = ((LOGGED, "pgwarden"),)
# record accounting (docs/policy.md, "Records"): the base pgwarden target runs the role as
# example.yaml has it, enumeration alerts on (the default: hidden keys, stripped rows);
# NO_RECORDS turns accounting off (alerts: off), BUDGETS adds records budgets (ledger)
NO_RECORDS = "no-records"
BUDGETS = "budgets"
RECORDS_RATIOS = (("pgwarden", NO_RECORDS), (BUDGETS, NO_RECORDS))
HUGE_QUOTA = 10**12  # never reached: the cost of checking and charging, not of refusing
COLUMNS = "id, full_name, email, phone"
EMAIL_SAMPLE = 100  # pgbench accepts at most 128 scripts
CHECK_ID = 42
PSQL_TIMEOUT_S = 30

Config = tuple[str, str, int]  # variant, pgbench -M mode, clients
Texts = Mapping[str, str]  # variant -> the look-up's SQL, with $1 for the value


def lookup_sql(column: str, value: str) -> str:
    """The look-up; `value` is $1, a pgbench variable or a literal from our own database."""
    return f"SELECT {COLUMNS} FROM customers WHERE {column} = {value}"  # noqa: S608


PLAIN: Texts = {"id": lookup_sql("id", "$1"), "email": lookup_sql("email", "$1")}


# --- options -------------------------------------------------------------------


@dataclass(frozen=True)
class LookupOptions(Options):
    """pgbench_select's options (its `scale` unused: the shop database is loaded) and ours."""

    customers: int = 68_000
    variants: tuple[str, ...] = VARIANTS
    rewritten: bool = False
    quotas: bool = False
    logged: bool = False
    records: bool = False

    @property
    def targets(self) -> tuple[str, ...]:
        base = ("direct", REWRITTEN, *TARGETS[1:]) if self.rewritten else TARGETS
        base = (*base, QUOTA) if self.quotas else base
        base = (*base, NO_RECORDS, BUDGETS) if self.records else base
        return (*base, LOGGED) if self.logged else base

    @property
    def ratios(self) -> tuple[tuple[str, str], ...]:
        ratios = RATIOS + REWRITTEN_RATIOS if self.rewritten else RATIOS
        ratios = ratios + QUOTA_RATIOS if self.quotas else ratios
        ratios = ratios + RECORDS_RATIOS if self.records else ratios
        return ratios + LOGGED_RATIOS if self.logged else ratios


_variants = choice_list(VARIANTS, "variants")


def parse_args(argv: Sequence[str] | None) -> LookupOptions:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, help="pgbench -T per run (10; 3 with --quick)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--clients", type=_positive_list, default=(8,), help="e.g. 8,32 (8)")
    p.add_argument(
        "--mode",
        dest="modes",
        type=_modes,
        default=("extended", "prepared"),
        help=f"pgbench -M values, comma-separated, of {', '.join(MODES)} (extended,prepared)",
    )
    p.add_argument(
        "--variant",
        dest="variants",
        type=_variants,
        default=VARIANTS,
        help="look-ups to run: id, email, comma-separated (id,email)",
    )
    p.add_argument("--customers", type=int, default=68_000, help="shop size (68000)")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j (2, capped at clients)")
    p.add_argument("--warmup", type=int, help="seconds of warm-up per target (2; 1 with --quick)")
    p.add_argument("--workers", type=int, help="passed to pgwarden serve --workers")
    p.add_argument(
        "--rewritten",
        action="store_true",
        help="add a target: pgwarden's rewritten text sent directly (masking cost in PostgreSQL)",
    )
    p.add_argument(
        "--quotas",
        action="store_true",
        help="add a target: pgwarden whose role has hourly and daily quotas (ledger cost)",
    )
    p.add_argument(
        "--records",
        action="store_true",
        help="add targets: record accounting off (alerts: off), and on with records budgets",
    )
    p.add_argument(
        "--logging",
        action="store_true",
        help="add a target: pgwarden at log level info (the statement event's cost)",
    )
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up (~2 minutes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else (3 if a.quick else 10)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    if min(seconds, a.rounds, a.jobs) < 1 or warmup < 0 or a.customers < EMAIL_SAMPLE:
        p.error(f"--seconds, --rounds, --jobs >= 1, --warmup >= 0, --customers >= {EMAIL_SAMPLE}")
    return LookupOptions(
        seconds=seconds,
        rounds=a.rounds,
        clients=a.clients,
        modes=a.modes,
        jobs=a.jobs,
        scale=0,
        warmup=warmup,
        workers=a.workers,
        json=a.json,
        customers=a.customers,
        variants=a.variants,
        rewritten=a.rewritten,
        quotas=a.quotas,
        logged=a.logging,
        records=a.records,
    )


# --- the database and the scripts ------------------------------------------------


def prepare_database(server: PgServer, opts: LookupOptions, creds: Credentials) -> list[str]:
    """The shop database as DB and the service account; returns the sampled e-mails."""
    server.psql(f"CREATE DATABASE {DB}")
    server.psql(shop_sql(opts.customers), dbname=DB, timeout=900)
    server.create_service_account(SVC_USER, creds.svc_password, DB)
    ids = ",".join(str(i) for i in sample_ids(opts.customers))
    out = server.psql(f"SELECT email FROM customers WHERE id IN ({ids}) ORDER BY id", dbname=DB)  # noqa: S608 - integers
    emails = out.split()
    if len(emails) != EMAIL_SAMPLE:
        raise RuntimeError(f"expected {EMAIL_SAMPLE} sampled customers, got {len(emails)}")
    return emails


def sample_ids(customers: int) -> list[int]:
    step = customers // EMAIL_SAMPLE
    return [1 + k * step for k in range(EMAIL_SAMPLE)]


@dataclass(frozen=True)
class Workloads:
    """pgbench arguments (scripts, -D variables) per text flavour, variant and mode."""

    scripts: Mapping[tuple[str, str], tuple[Path, ...]]  # (flavour, variant) -> files
    emails: tuple[str, ...]

    @classmethod
    def write(
        cls, folder: Path, customers: int, emails: Sequence[str], flavours: Mapping[str, Texts]
    ) -> Workloads:
        """flavours: "plain" (the client's look-up) and maybe REWRITTEN (pgwarden's text)."""
        folder.mkdir()
        scripts: dict[tuple[str, str], tuple[Path, ...]] = {}
        for flavour, texts in flavours.items():
            path = folder / f"{flavour}_id.sql"
            path.write_text(f"\\set id random(1, {customers})\n{_bind(texts['id'], ':id')};\n")
            scripts[(flavour, "id")] = (path,)
            paths = []
            for k in range(len(emails)):
                path = folder / f"{flavour}_email_{k:03d}.sql"
                path.write_text(_bind(texts["email"], f":email_{k}") + ";\n")
                paths.append(path)
            scripts[(flavour, "email")] = tuple(paths)
        return cls(scripts, tuple(emails))

    def args(self, flavour: str, variant: str, mode: str) -> list[str]:
        scripts = self.scripts[(flavour, variant)]
        if variant == "id":
            return ["-f", str(scripts[0])]
        args: list[str] = []
        for k, (script, email) in enumerate(zip(scripts, self.emails, strict=True)):
            value = f"'{email}'" if mode == "simple" else email  # simple: pasted into the text
            args += ["-f", f"{script}@1", "-D", f"email_{k}={value}"]
        return args


def _bind(sql: str, value: str) -> str:
    """The look-up with its one parameter $1 replaced by `value`."""
    if sql.count("$1") != 1:
        raise RuntimeError(f"expected one $1 in the look-up: {sql}")
    return sql.replace("$1", value)


def flavour_of(target: Target) -> str:
    return REWRITTEN if target.name == REWRITTEN else "plain"  # pgwarden, quotas: plain text


# --- pgwarden --------------------------------------------------------------------


def lookup_policy(*, quotas: bool = False, records: str = "") -> str:
    """policies/example.yaml's classification and support role, the bench user its member.

    records: "" as example.yaml has it, NO_RECORDS (alerts: off) or BUDGETS (huge budgets).
    Decoys are left out: a decoy would lock the bench user; they cost what budgets do.
    """
    example = yaml.safe_load(EXAMPLE_POLICY.read_text())
    role = dict(example["roles"][ROLE])
    role["members"] = [CLIENT_USER]
    role["limits"] = {"rows_per_query": ROWS_PER_QUERY}
    role.pop("row_filter", None)  # every customer is looked up; a filter is another cost
    role.pop("break_glass", None)
    if quotas:
        role["limits"] |= {"rows_per_hour": HUGE_QUOTA, "rows_per_day": HUGE_QUOTA}
    if records == NO_RECORDS:
        role["alerts"] = "off"
    elif records == BUDGETS:
        role["limits"] |= {f"records_per_{w}": HUGE_QUOTA for w in ("day", "7d", "30d")}
    doc = {"version": example["version"], "classify": example["classify"], "roles": {ROLE: role}}
    return yaml.safe_dump(doc, sort_keys=False)


def rewritten_texts(server: PgServer, creds: Credentials) -> dict[str, str]:
    """What pgwarden sends upstream for each look-up (a Parse with $1), from its engine."""
    policy = parse_policy(lookup_policy().encode(), source=Path("lookup-policy.yaml"))
    engine = Engine(policy, svc_snapshot(server, creds), hash_key=None)
    texts = {}
    for variant, sql in PLAIN.items():
        verdict = engine.evaluate(ROLE, sql, extended=True)
        if not verdict.allowed or verdict.sql is None:
            raise RuntimeError(f"the engine refused the {variant} look-up: {verdict.message}")
        texts[variant] = verdict.sql
    return texts


def start_target(
    name: str,
    work: Path,
    server: PgServer,
    opts: LookupOptions,
    creds: Credentials,
    *,
    stack: contextlib.ExitStack,
) -> Target:
    """pgbench_select's targets, with the look-up policy and a hash key for pgwarden."""
    quotas = name == QUOTA
    records = name if name in (NO_RECORDS, BUDGETS) else ""
    warden = functools.partial(
        launch_pgwarden,
        policy=lookup_policy(quotas=quotas, records=records),
        hash_key=creds.svc_password + "-hash",
        folder=name,
        log_level="info" if name == LOGGED else "warning",
    )
    return select_start_target(
        name, work, server, opts, creds, stack=stack, direct=("direct", REWRITTEN), warden=warden
    )


def psql_row(server: PgServer, target: Target, sql: str) -> str:
    cmd = [str(server.bin_dir / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]
    try:
        done = subprocess.run(
            cmd,
            env=target.client_env("extended"),
            capture_output=True,
            text=True,
            timeout=PSQL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"psql did not answer within {PSQL_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise TargetError(f"psql: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def check_answers(
    server: PgServer, targets: list[Target], flavours: Mapping[str, Texts], email: str
) -> None:
    """Each target answers both look-ups with one row: masked through pgwarden (and its
    rewritten text), raw otherwise."""
    for target in targets:
        if not target.usable:
            continue
        texts = flavours[flavour_of(target)]
        try:
            rows = [
                psql_row(server, target, _bind(texts["id"], str(CHECK_ID))),
                psql_row(server, target, _bind(texts["email"], f"'{email}'")),
            ]
        except TargetError as exc:
            target.fail(f"look-up check failed: {exc}")
            continue
        # masked: "***" shown, the e-mail not
        masked = target.name in ("pgwarden", REWRITTEN, QUOTA, LOGGED, NO_RECORDS, BUDGETS)
        for row in rows:
            shows_raw = email in row or "***" not in row
            if len(row.splitlines()) != 1 or shows_raw == masked:
                target.fail(f"unexpected look-up answer {row!r} (masked expected: {masked})")
                break
        else:
            progress(f"{target.name}: look-up answers {rows[0]!r}")


# --- results -----------------------------------------------------------------------


@dataclass
class LookupResults(RoundStats):
    opts: LookupOptions
    info: dict[str, Any] = field(default_factory=dict)
    tps: dict[Config, dict[str, list[float]]] = field(default_factory=dict)
    failed: dict[tuple[str, str, int, str], str] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    interrupted: bool = False

    def configs(self) -> Iterator[Config]:
        for variant in self.opts.variants:
            for mode in self.opts.modes:
                for clients in self.opts.clients:
                    yield variant, mode, clients

    def measured(self) -> Sequence[str]:
        return self.opts.targets

    def row(self, config: Config) -> dict[str, Any]:
        return {
            "variant": config[0],
            "mode": config[1],
            "clients": config[2],
            "tps": self.tps.get(config, {}),
            "median": {t: _round(self.median(config, t), 1) for t in self.opts.targets},
            "ratios": {
                f"{n}/{d}": _round(self.ratio(config, n, d), 3) for n, d in self.opts.ratios
            },
            "spread": _round(self.spread(config), 3),
            "failed": {t: r for (*c, t), r in self.failed.items() if tuple(c) == config},
        }

    def as_json(self) -> dict[str, Any]:
        rows = [self.row(config) for config in self.configs()]
        return {"settings": self.info, "results": rows, "notes": self.notes()}

    def notes(self) -> list[str]:
        notes = [f"{t.name}: {t.note}" for t in self.targets if t.note]
        notes += [f"{t.name}: {t.error}" for t in self.targets if t.error]
        if self.interrupted:
            notes.insert(0, "interrupted: partial results")
        for (variant, mode, clients, name), reason in self.failed.items():
            notes.append(f"{name} {variant} {mode} c={clients}: {reason}")
        return notes


def render_table(results: LookupResults) -> str:
    o, i = results.opts, results.info
    lines = [
        f"pgbench masked point look-ups, shop with {o.customers:,} customers, "
        f"{o.rounds} round(s) x {o.seconds} s, -j {o.jobs}; median TPS per target",
        f"pgwarden: role {ROLE} (email, phone masked) | pgbouncer, direct: the same "
        f"look-up unmasked | e-mail variant: {EMAIL_SAMPLE} customers"
        + (f" | {REWRITTEN}: pgwarden's masked text, sent directly" if o.rewritten else ""),
        f"PostgreSQL {i.get('postgres')} | PgBouncer {i.get('pgbouncer') or '-'} "
        f"(pool_mode=transaction) | pgwarden workers={o.workers or 'default'} | "
        f"{os.cpu_count()} CPUs shared by pgbench, proxies and PostgreSQL",
        "",
    ]
    keys = [("lookup", "<8"), ("mode", "<9"), ("clients", ">8")]
    lines += table_rows(results, keys, o.targets, o.ratios)
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------


def bench_one(
    server: PgServer,
    target: Target,
    config: Config,
    results: LookupResults,
    workloads: Workloads,
    *,
    seconds: int,
    label: str,
    record: bool = True,
) -> None:
    variant, mode, clients = config
    if not target.usable or (*config, target.name) in results.failed:
        return
    if target.service and (reason := target.service.exit_reason()):
        target.fail(f"stopped during the run: {reason}")
        return
    try:
        tps = run_pgbench(
            server,
            target,
            mode=mode,
            clients=clients,
            seconds=seconds,
            jobs=results.opts.jobs,
            workload=workloads.args(flavour_of(target), variant, mode),
        )
    except TargetError as exc:
        results.failed[(*config, target.name)] = str(exc)
        progress(f"{label} {target.name:<9} FAILED: {exc}; skipped in later rounds")
        return
    if record:
        results.tps.setdefault(config, {}).setdefault(target.name, []).append(tps)
    progress(f"{label} {target.name:<9} {tps:10.0f} tps")


def run(opts: LookupOptions, stack: contextlib.ExitStack, results: LookupResults) -> None:
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgwarden-lookup-")))
    work.chmod(0o711)  # unprivileged PostgreSQL and pgbouncer reach their subfolders
    creds = Credentials.generate()
    server = PgServer(work / "pgdata")
    progress("starting PostgreSQL")
    server.start()
    stack.callback(server.stop)
    check_connection_headroom(server, opts)
    progress(f"PostgreSQL on 127.0.0.1:{server.port}; shop with {opts.customers:,} customers")
    emails = prepare_database(server, opts, creds)
    flavours: dict[str, Texts] = {"plain": PLAIN}
    if opts.rewritten:
        flavours[REWRITTEN] = rewritten_texts(server, creds)
    workloads = Workloads.write(work / "scripts", opts.customers, emails, flavours)
    for name in opts.targets:
        results.targets.append(start_target(name, work, server, opts, creds, stack=stack))
    results.info.update(settings_info(server, opts, results.targets))
    results.info["texts"] = flavours
    check_answers(server, results.targets, flavours, emails[0])
    warm_up(server, results, workloads)
    for rnd in range(1, opts.rounds + 1):
        for config in results.configs():
            label = f"round {rnd}/{opts.rounds} {config[0]:<5} {config[1]:<8} c={config[2]:<3}"
            for target in results.targets:
                bench_one(
                    server, target, config, results, workloads, seconds=opts.seconds, label=label
                )


def warm_up(server: PgServer, results: LookupResults, workloads: Workloads) -> None:
    """Warms caches, pools and pgwarden's verdict cache; finds a broken target early."""
    opts = results.opts
    if opts.warmup == 0:
        return
    for variant in opts.variants:
        config = (variant, opts.modes[0], opts.clients[0])
        label = f"warm-up {variant:<5} {config[1]:<8} c={config[2]:<3}"
        for t in results.targets:
            bench_one(
                server,
                t,
                config,
                results,
                workloads,
                seconds=opts.warmup,
                label=label,
                record=False,
            )


def settings_info(server: PgServer, opts: LookupOptions, targets: list[Target]) -> dict[str, Any]:
    bouncer = next(t for t in targets if t.name == "pgbouncer")
    return {
        "postgres": server.psql("SHOW server_version").strip(),
        "pgbouncer": bouncer.version,
        "pgbouncer_pool_mode": "transaction",
        "pgbouncer_prepared_pool_mode": "session" if bouncer.databases else "transaction",
        "customers": opts.customers,
        "email_sample": EMAIL_SAMPLE,
        "role": ROLE,
        "seconds": opts.seconds,
        "rounds": opts.rounds,
        "clients": list(opts.clients),
        "modes": list(opts.modes),
        "variants": list(opts.variants),
        "jobs": opts.jobs,
        "warmup": opts.warmup,
        "workers": opts.workers,
        "cpus": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    return drive(opts, LookupResults(opts), run, render_table)


if __name__ == "__main__":
    sys.exit(main())
