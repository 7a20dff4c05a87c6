"""docs/compatibility.md stays what a complete run of tests/compat renders.

Strategy: conftest.py keeps every compat test's outcome in memory and moves the
test marked `compat_matrix_check` after all others, so when it runs, the whole
matrix is known. It renders the page and compares it with the committed one. It
only judges a complete run: when some compat module was not collected or a test
was deselected (`pytest tests/compat/test_psql.py`, `-k`, `--lf`), when a cell
failed (that failure already fails the run), or when a cell was skipped because a
toolchain is missing on this machine (then the page would describe this machine,
not CI); with PGWARDEN_COMPAT_STRICT=1 (CI) a skipped cell fails instead, as issue
7 asks that no cell be skipped there. A stale page is written to
build/compatibility.md next to the results, ready to copy.
"""

from __future__ import annotations

import pytest

from .conftest import DOC_PATH, RESULTS_PATH, compat_results, complete_run, strict_matrix
from .matrix import cells, render

SAMPLE = [
    {"nodeid": "a", "client": "psql", "feature": "login", "role": "support", "outcome": "passed"},
    {"nodeid": "b", "client": "psql", "feature": "login", "role": "dba", "outcome": "passed"},
    {
        "nodeid": "c",
        "client": "psql",
        "feature": "listen_notify",
        "role": "support",
        "outcome": "passed",
        "refused": "42501: support may not run utility statements",
    },
    {
        "nodeid": "d",
        "client": "zz-new",
        "feature": "custom_x",
        "role": "-",
        "outcome": "xfailed",
        "reason": "not yet",
    },
    {"nodeid": "e", "client": "psql", "feature": "login", "role": "dba", "outcome": "failed"},
]


def test_render_folds_cells_and_lists_remarks() -> None:
    grid = cells(SAMPLE)
    assert grid["psql", "login", "dba"].outcome == "failed"  # the worst test of a cell wins
    assert grid["psql", "login", "dba"].tests == 2
    page = render(SAMPLE)
    assert "| `login` | ✅ ❌ | · |" in page
    assert "| `listen_notify` | ⛔ · | · |" in page
    assert "| `custom_x` | · | ⚠️ |" in page  # unknown clients and features come last
    assert "* psql, `listen_notify`, support: refused by design, 42501: support may" in page
    assert "* zz-new, `custom_x`: known limitation: not yet" in page
    assert "failing: e" in page
    assert render(list(reversed(SAMPLE))) == page  # no dependence on the order of tests


@pytest.mark.compat_matrix_check
def test_compatibility_page_is_current(request: pytest.FixtureRequest) -> None:
    complete, why = complete_run(request.session)
    if not complete:
        if strict_matrix() and why.startswith("not collected"):  # a module skipped whole
            pytest.fail(f"PGWARDEN_COMPAT_STRICT=1: compat modules {why}")
        pytest.skip(f"partial run of tests/compat ({why}): the page is not compared")
    results = compat_results(request.config)
    failed = [r["nodeid"] for r in results if r["outcome"] in ("failed", "error")]
    if failed:
        pytest.skip(f"{len(failed)} compat tests failed: the page is not compared")
    skipped = [r for r in results if r["outcome"] == "skipped"]
    if skipped:
        reasons = sorted({f"{r['client']}: {r['reason']}" for r in skipped})
        message = f"{len(skipped)} compat cells skipped: " + "; ".join(reasons)
        if strict_matrix():
            pytest.fail(message + " (PGWARDEN_COMPAT_STRICT=1: no cell may be skipped)")
        pytest.skip(message + ": the page is not compared")
    page = render(sorted(results, key=lambda r: str(r["nodeid"])))
    if DOC_PATH.exists() and DOC_PATH.read_text() == page:
        return
    fresh = RESULTS_PATH.parent / "compatibility.md"
    fresh.parent.mkdir(parents=True, exist_ok=True)
    fresh.write_text(page)
    pytest.fail(
        f"{DOC_PATH.relative_to(DOC_PATH.parents[1])} is not what this run renders: "
        f"copy {fresh} there (or run .venv/bin/python tests/compat/matrix.py --write)",
        pytrace=False,
    )
