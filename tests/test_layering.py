"""Dependencies point one way: net -> session -> wire (STYLE.md principle 1).

The imports of every module under proxy/ are read with ast (nothing is
imported), including imports inside functions, so a lazy import cannot slip
past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parent.parent / "proxy"
EVENT_LOOPS = {"asyncio", "uvloop"}  # uvloop is asyncio's loop, so the same rule holds

# Modules outside proxy/net that may import asyncio, each with its reason.
ASYNCIO_ALLOWED = {
    "proxy/pgserver.py": "runs the embedded PostgreSQL for the demo and tests, not the proxy core",
    "proxy/demo.py": "the demo command orchestrates PostgreSQL and the server; no protocol code",
    "proxy/cli.py": "the command line starts the event loop that proxy/net runs on",
}


def modules() -> list[Path]:
    return sorted(PROXY.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(PROXY.parent).as_posix()


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(PROXY.parent).with_suffix("").parts[:-1])


def imported(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..errors import y
                package = package_of(path).split(".")
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def under(path: Path, package: str) -> bool:
    return rel(path).startswith(f"proxy/{package}/")


def test_the_walker_sees_imports() -> None:
    # Guards against a vacuous pass: the network layer does import asyncio.
    assert "asyncio" in {top(n) for n in imported(PROXY / "net" / "server.py")}
    assert "proxy.errors" in imported(PROXY / "wire" / "buffer.py")
    assert any(under(p, "wire") for p in modules())
    assert any(under(p, "session") for p in modules())


def wire_may_import(name: str) -> bool:
    """proxy.errors, and the codec's own modules; nothing else of the package."""
    return name in ("proxy", "proxy.errors", "proxy.wire") or name.startswith(
        ("proxy.errors.", "proxy.wire.")
    )


@pytest.mark.parametrize("path", [p for p in modules() if under(p, "wire")], ids=rel)
def test_wire_imports_nothing_from_the_package_but_errors(path: Path) -> None:
    ours = {n for n in imported(path) if top(n) == "proxy"}
    assert {n for n in ours if not wire_may_import(n)} == set()


@pytest.mark.parametrize(
    "path",
    [p for p in modules() if not under(p, "net") and rel(p) not in ASYNCIO_ALLOWED],
    ids=rel,
)
def test_only_the_network_layer_imports_asyncio(path: Path) -> None:
    assert not {top(n) for n in imported(path)} & EVENT_LOOPS


def test_asyncio_exceptions_name_real_modules() -> None:
    assert {rel(p) for p in modules()} >= set(ASYNCIO_ALLOWED)


@pytest.mark.parametrize("path", [p for p in modules() if under(p, "session")], ids=rel)
def test_session_does_no_io(path: Path) -> None:
    assert not {top(n) for n in imported(path)} & (EVENT_LOOPS | {"socket", "ssl", "selectors"})


@pytest.mark.parametrize("path", [p for p in modules() if not under(p, "analysis")], ids=rel)
def test_only_analysis_imports_sqlglot(path: Path) -> None:
    assert not {top(n) for n in imported(path)} & {"sqlglot", "sqlglotc"}


@pytest.mark.parametrize("path", [p for p in modules() if not under(p, "analysis")], ids=rel)
def test_only_analysis_imports_pglast(path: Path) -> None:
    assert "pglast" not in {top(n) for n in imported(path)}


@pytest.mark.parametrize("path", [p for p in modules() if under(p, "analysis")], ids=rel)
def test_analysis_does_no_io(path: Path) -> None:
    io = EVENT_LOOPS | {"asyncpg", "socket", "ssl", "selectors", "subprocess", "structlog"}
    assert not {top(n) for n in imported(path)} & io
