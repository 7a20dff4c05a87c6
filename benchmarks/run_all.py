"""Every benchmark in one run: one JSON result file and one table of the performance targets.

Strategy: each scenario is its own script, run here as a child process with
--json (so each starts and stops its own PostgreSQL, pgbouncer and pgwarden,
and its clean-up on Ctrl-C is its own), one after the other, never in
parallel: on a small machine they would measure each other. Their progress
lines pass through to stderr; their JSON is collected into one file
(benchmarks/results/latest.json by default, git-ignored: numbers of one
machine at one moment; benchmarks/README.md quotes the table). The table
compares each figure with the performance issue's target and says met, MISSED
or reported (no target). --quick runs the same scenarios shorter (fewer
seconds per pgbench run, fewer rows); ratios are then rougher, never
different in kind.

Rules: a scenario that fails is named in the table and the file, and the
others still run; nothing is installed; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgbench_select import choice_list, progress

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results" / "latest.json"
SCENARIO_TIMEOUT_S = 3 * 3600
GRACE_S = 5.0  # after Ctrl-C: the script got it too and is cleaning up
CLEANUP_S = 120.0  # after our own SIGINT, before SIGKILL


@dataclass(frozen=True)
class Scenario:
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    about: str


SCENARIOS: dict[str, Scenario] = {
    "select": Scenario(
        "pgbench_select.py",
        ("--clients", "8,32", "--mode", "extended,prepared"),
        ("--clients", "8,32", "--mode", "extended,prepared", "--seconds", "3", "--warmup", "1"),
        "pgbench -S, unrestricted role",
    ),
    "lookup": Scenario(
        "pgbench_lookup.py",
        ("--clients", "8", "--records"),
        ("--quick", "--records"),
        "masked point look-ups (and record accounting off / with budgets)",
    ),
    "bulk": Scenario("bulk_read.py", (), ("--quick",), "bulk read, psql to /dev/null"),
    "engine": Scenario("engine_cost.py", (), ("--quick",), "policy engine in process"),
    "alloc": Scenario("row_allocations.py", (), ("--quick",), "tracemalloc bytes per DataRow"),
    "idle": Scenario("idle_memory.py", (), (), "RSS per idle client connection"),
}
_scenarios = choice_list(tuple(SCENARIOS), "scenarios")


@dataclass(frozen=True)
class RunOptions:
    quick: bool
    only: tuple[str, ...]
    output: Path
    render: Path | None


def parse_args(argv: Sequence[str] | None) -> RunOptions:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="shorter runs (about 6 minutes instead of 15)"
    )
    p.add_argument(
        "--only",
        type=_scenarios,
        default=tuple(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)} (all)",
    )
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON result file")
    p.add_argument(
        "--render", type=Path, help="print the table of an earlier result file; run nothing"
    )
    a = p.parse_args(argv)
    return RunOptions(a.quick, a.only, a.output, a.render)


# --- running -------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C during a scenario; carries what that scenario wrote before it stopped."""

    def __init__(self, entry: dict[str, Any]) -> None:
        super().__init__("interrupted")
        self.entry = entry


def run_scenario(name: str, quick: bool) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    args = [*(scenario.quick if quick else scenario.full), "--json"]
    cmd = [sys.executable, str(HERE / scenario.script), *args]
    progress(f"=== {name}: {scenario.about} ({scenario.script} {' '.join(args)})")
    t0 = time.monotonic()
    entry: dict[str, Any] = {"script": scenario.script, "args": args}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        out = stop(proc)
        entry["error"] = f"did not finish within {SCENARIO_TIMEOUT_S} s"
    except KeyboardInterrupt:
        collect(entry, proc, stop(proc), t0)
        raise Interrupted(entry) from None
    collect(entry, proc, out, t0)
    return entry


def stop(proc: subprocess.Popen[str]) -> str:
    """Let the script clean up (it stops what it started on SIGINT), then insist."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.communicate(timeout=GRACE_S)[0]  # Ctrl-C reached it as well
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=CLEANUP_S)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def collect(entry: dict[str, Any], proc: subprocess.Popen[str], out: str, t0: float) -> None:
    entry["seconds"] = round(time.monotonic() - t0, 1)
    entry["exit"] = proc.returncode
    try:
        entry["result"] = json.loads(out)
    except json.JSONDecodeError:
        entry.setdefault("error", f"exit {proc.returncode}, no JSON on stdout")
    else:
        if proc.returncode != 0:
            entry.setdefault("error", f"exit {proc.returncode} (partial results)")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the targets ---------------------------------------------------------------

Row = dict[str, Any]  # figure, value, goal, verdict, noise


def _row(figure: str, value: float | None, goal: str, ok: bool | None, noise: Any = None) -> Row:
    verdict = "-" if value is None else ("reported" if ok is None else ("met" if ok else "MISSED"))
    return {"figure": figure, "value": value, "goal": goal, "verdict": verdict, "noise": noise}


def _at_least(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


def _below(value: float | None, goal: float) -> bool | None:
    return None if value is None else value < goal


def select_rows(result: dict[str, Any]) -> Iterator[Row]:
    for r in result.get("results", []):
        where = f"pgbench -S {r['mode']:<8} {r['clients']:>2} clients"
        ratio = r["ratios"].get("pgwarden/pgbouncer")
        yield _row(
            f"{where} pgwarden/pgbouncer", ratio, ">= 0.95", _at_least(ratio, 0.95), r.get("spread")
        )
        direct = r["ratios"].get("pgwarden/direct")
        yield _row(f"{where} pgwarden/direct", direct, "reported", None, r.get("spread"))


def lookup_rows(result: dict[str, Any]) -> Iterator[Row]:
    for r in result.get("results", []):
        where = f"masked look-up by {r['variant']:<5} {r['mode']:<8} {r['clients']:>2} clients"
        ratio = r["ratios"].get("pgwarden/pgbouncer")
        yield _row(
            f"{where} pgwarden/pgbouncer", ratio, ">= 0.8", _at_least(ratio, 0.8), r.get("spread")
        )
        for key in ("pgwarden/no-records", "budgets/no-records"):  # record accounting's cost
            if (ratio := r["ratios"].get(key)) is not None:
                yield _row(f"{where} {key}", ratio, "reported", None, r.get("spread"))


def bulk_rows(result: dict[str, Any]) -> Iterator[Row]:
    rows = result.get("settings", {}).get("rows")
    size = f"{rows:,} rows" if rows else "bulk"
    for r in result.get("results", []):
        where = f"bulk read {r['method']:<6} {size}"
        for name, label in (("pgwarden", "unrestricted"), ("masked", "masked+cap reject")):
            ratio = r["ratios"].get(f"{name}/direct")
            yield _row(
                f"{where} {label} {name}/direct",
                ratio,
                ">= 0.85",
                _at_least(ratio, 0.85),
                r.get("spread"),
            )
        for key in ("truncate/direct", "masked/rewritten", "rewritten/direct"):
            if (ratio := r["ratios"].get(key)) is not None:
                yield _row(f"{where} {key}", ratio, "reported", None, r.get("spread"))


def engine_rows(result: dict[str, Any]) -> Iterator[Row]:
    o = result.get("overall", {})
    glot = result.get("settings", {}).get("sqlglot", {})
    compiled = "sqlglotc" if glot.get("sqlglotc_active") else "pure-Python sqlglot"
    hit = o.get("hit_worst_us")
    yield _row("verdict cache hit, worst statement (us)", hit, "< 5", _below(hit, 5.0))
    cold = o.get("cold_median_us")
    yield _row(
        f"cold analysis median, 10 statements (us, {compiled})",
        cold,
        "< 2000",
        _below(cold, 2000.0),
    )
    worst = o.get("cold_worst_median_us")
    yield _row("cold analysis, worst statement's median (us)", worst, "reported", None)


def alloc_rows(result: dict[str, Any]) -> Iterator[Row]:
    for name, m in result.get("results", {}).items():
        value = m.get("bytes_per_row")
        if name == "unrestricted":
            yield _row(
                "bytes allocated per DataRow, fast path", value, "~0 (< 1)", _below(value, 1.0)
            )
        else:
            yield _row(f"bytes allocated per DataRow, {name}", value, "reported", None)


def idle_rows(result: dict[str, Any]) -> Iterator[Row]:
    results = result.get("results", {})
    count = result.get("settings", {}).get("connections", "?")
    for name in ("pgwarden", "pgbouncer"):
        if (m := results.get(name)) is None:
            continue
        value = m.get("kb_per_connection")
        ok = _below(value, 30.0) if name == "pgwarden" else None
        goal = "< 30" if name == "pgwarden" else "reported"
        yield _row(f"KB per idle connection, {name} ({count} clients)", value, goal, ok)


EXTRACT: dict[str, Callable[[dict[str, Any]], Iterator[Row]]] = {
    "select": select_rows,
    "lookup": lookup_rows,
    "bulk": bulk_rows,
    "engine": engine_rows,
    "alloc": alloc_rows,
    "idle": idle_rows,
}


def target_rows(scenarios: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name, entry in scenarios.items():
        if "result" in entry:
            rows += list(EXTRACT[name](entry["result"]))
        if "error" in entry:
            rows.append(_row(f"{name}: {entry['error']}", None, "", None))
    return rows


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:,.0f}"


def render(doc: dict[str, Any]) -> str:
    rows = doc["targets"]
    width = max((len(r["figure"]) for r in rows), default=20) + 2
    lines = [
        f"pgwarden benchmarks, {doc['mode']} run, {doc['started']} -> {doc['finished']}; "
        f"{doc['host']['cpus']} CPUs, load average {doc['host']['load_before']} before, "
        f"{doc['host']['load_after']} after",
        "ratios are medians of the rounds of one run; noise = widest (max-min)/median of a "
        "target's rounds",
        "",
        f"{'figure':<{width}}{'value':>10}  {'target':<10}{'verdict':<10}{'noise':>6}",
    ]
    for r in rows:
        noise = "" if r["noise"] is None else f"{r['noise']:.0%}"
        lines.append(
            f"{r['figure']:<{width}}{_value(r['value']):>10}  {r['goal']:<10}{r['verdict']:<10}"
            f"{noise:>6}"
        )
    met = sum(r["verdict"] == "met" for r in rows)
    missed = sum(r["verdict"] == "MISSED" for r in rows)
    lines += ["", f"targets met: {met}, missed: {missed}"]
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.render is not None:
        print(render(json.loads(opts.render.read_text())))
        return 0
    doc: dict[str, Any] = {
        "mode": "quick" if opts.quick else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "load_before": load_average()},
        "scenarios": {},
    }
    code = 0
    try:
        for name in opts.only:
            doc["scenarios"][name] = entry = run_scenario(name, opts.quick)
            if "error" in entry:
                progress(f"{name}: {entry['error']}")
                code = 1
    except Interrupted as stopped:
        doc["scenarios"][name] = stopped.entry
        progress("interrupted; writing what was measured")
        doc["interrupted"] = True
        code = 130
    except KeyboardInterrupt:  # between two scenarios
        progress("interrupted; writing what was measured")
        doc["interrupted"] = True
        code = 130
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    doc["host"]["load_after"] = load_average()
    doc["targets"] = target_rows(doc["scenarios"])
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(render(doc))
    progress(f"results written to {opts.output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
