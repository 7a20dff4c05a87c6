"""docs/policy.md is executed: its policies load, its commands print what it shows.

(The README's example policy is loaded too.)

Strategy: the page is split into fenced blocks, and each block's info string says
what it is. The blocks are replayed in page order in one scratch folder that holds
a copy of policies/ (so `policies/example.yaml` means what it means in a checkout):

    ```yaml                       a complete policy: the real loader must accept it
    ```yaml same-as=FILE          a complete policy, identical to FILE (less its header
                                  comment)
    ```yaml fragment              part of a policy or config: must be valid YAML only
    ```yaml file=NAME             written to NAME; a policy (NAME not *.tests.yaml)
                                  must load, a tests file is run by a later command
    ```yaml invalid file=NAME     written to NAME; the loader must reject it (a later
                                  `pgwarden check` shows why)
    ```sql database=NAME          run as the superuser in a new database NAME of the
                                  session's PostgreSQL (the tutorial's schema)
    ```console                    commands and their output, run and compared
    <!-- doctest: masks hash_key=KEY -->
                                  the table that follows: every row's rule, applied
                                  to its value by PostgreSQL, gives the shown result

In a console block a line starting with `$ ` is a command (a trailing `\\`
continues it), run with bash in the scratch folder with .venv/bin first on PATH and
no PG* or PGWARDEN_* variables; every line up to the next command is its expected
output (stdout and stderr). A line holding only `...` stands for one or more lines.
The exit code must be what the output says: explain 0 for allow and 1 for refuse,
check 1 when it printed an error, test 1 when a case failed, else 0.

Commands that read a database use `postgresql://pgwarden_svc@127.0.0.1:5432/...`
in the page; the test points them at the session's PostgreSQL (fixture pg) with
the service account's password in PGPASSWORD. Every other fence is prose (```text,
```sql without database=) and may not hold a `$ pgwarden` command, so no example
escapes the test. The console blocks depend on the files and databases written
before them: they are replayed in page order (a console block run alone with -k
first replays the earlier blocks' files, databases and `pgwarden schema` commands).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import SVC_PASSWORD, SVC_USER

from proxy.analysis.masks import mask_sql
from proxy.pgserver import PgServer
from proxy.policy.loader import PolicyError, parse_policy

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "policy.md"
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
DOC_HOSTPORT = "127.0.0.1:5432"
FENCE = re.compile(r"^```(?P<info>[^`]*)$")
MASKS_MARK = re.compile(r"<!-- doctest: masks hash_key=(?P<key>\S+) -->")
KNOWN_KINDS = {"yaml", "sql", "console", "text"}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    kind: str  # yaml | sql | console | text
    flags: frozenset[str]  # fragment, invalid
    options: dict[str, str]  # file=..., database=...
    body: str

    @property
    def label(self) -> str:
        return f"policy.md:{self.line}"


def parse_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        words = match["info"].split()
        end = lines.index("```", i + 1)
        options = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        flags = frozenset(w for w in words[1:] if "=" not in w)
        kind = words[0] if words else ""
        blocks.append(Block(i + 1, kind, flags, options, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


BLOCKS = parse_blocks(DOC.read_text(encoding="utf-8"))
CONSOLE = [b for b in BLOCKS if b.kind == "console"]


# --- the page's shape -----------------------------------------------------------------


def test_every_block_is_of_a_known_kind() -> None:
    unknown = [f"{b.label}: ```{b.kind}" for b in BLOCKS if b.kind not in KNOWN_KINDS]
    assert not unknown, "fences need an info string the test knows: " + ", ".join(unknown)
    stray = [b.label for b in BLOCKS if b.kind != "console" and "$ pgwarden" in b.body]
    assert not stray, f"commands outside ```console blocks are not tested: {stray}"
    assert len(CONSOLE) >= 10, "the page lost its examples"


# --- policies -------------------------------------------------------------------------


def policy_blocks() -> Iterator[Block]:
    return (b for b in BLOCKS if b.kind == "yaml")


@pytest.mark.parametrize("block", list(policy_blocks()), ids=lambda b: b.label)
def test_yaml_block(block: Block) -> None:
    data = yaml.safe_load(block.body)
    name = block.options.get("file", "")
    if "fragment" in block.flags or name.endswith(".tests.yaml"):
        assert isinstance(data, dict | list), f"{block.label}: not a YAML mapping or list"
        return
    source = Path(name or block.label)
    if "invalid" in block.flags:
        with pytest.raises(PolicyError):
            parse_policy(block.body.encode(), source=source)
        return
    try:
        parse_policy(block.body.encode(), source=source)
    except PolicyError as exc:
        pytest.fail(f"{block.label}: the policy does not load:\n{exc}")
    if "same-as" in block.options:
        lines = (ROOT / block.options["same-as"]).read_text(encoding="utf-8").splitlines()
        while lines and lines[0].startswith("#"):  # the file's header comment
            lines.pop(0)
        assert block.body == "\n".join(lines) + "\n", f"{block.label} differs from the file"


def test_readme_policy_loads() -> None:
    """The README's short policy is a real one (its ```yaml config block is pgwarden.yaml)."""
    blocks = parse_blocks(README.read_text(encoding="utf-8"))
    policies = [b for b in blocks if b.kind == "yaml" and not b.flags]
    assert policies, "the README lost its example policy"
    for block in policies:
        parse_policy(block.body.encode(), source=Path("README.md"))
    for block in (b for b in blocks if b.kind == "yaml" and "config" in b.flags):
        assert isinstance(yaml.safe_load(block.body), dict)


# --- masks ----------------------------------------------------------------------------


def mask_rows() -> tuple[str, list[tuple[str, str | None, str | None]]]:
    """The hash key and the (rule, value, shown) rows of the marked table."""
    text = DOC.read_text(encoding="utf-8")
    mark = MASKS_MARK.search(text)
    assert mark is not None, "policy.md lost its table of mask outputs"
    rows = []
    for line in text[mark.end() :].lstrip("\n").splitlines():
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith(("rule", "---")):
            continue
        rows.append((_code(cells[0]), _value(cells[1]), _value(cells[2])))
    assert len(rows) >= 8
    return mark["key"], [(r, v, s) for r, v, s in rows if r is not None]


def _code(cell: str) -> str:
    assert cell.startswith("`"), f"not `code`: {cell}"
    assert cell.endswith("`"), f"not `code`: {cell}"
    return cell[1:-1]


def _value(cell: str) -> str | None:
    return None if cell == "NULL" else _code(cell)


def _sql_literal(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


MASK_POLICY = """\
version: 1
classify: {public.t: {v: tag}}
roles:
  r: {members: [u], statements: [select], tables: [public.t], columns: {tag: RULE}}
"""


def test_mask_outputs(pg: PgServer) -> None:
    key, rows = mask_rows()
    queries = []
    for rule_text, value, _ in rows:
        text = MASK_POLICY.replace("RULE", rule_text)
        policy = parse_policy(text.encode(), source=Path("mask.yaml"))
        expr = mask_sql(policy.roles["r"].columns["tag"], "v", "text", key.encode())
        value_sql = _sql_literal(value)
        select = f"SELECT quote_nullable(({expr})::text)"
        query = f"{select} FROM (SELECT {value_sql}::text AS v) s;"  # the page's values, quoted
        queries.append(query)
    got = pg.psql("\n".join(queries)).splitlines()
    want = [_sql_literal(shown) for _, _, shown in rows]
    wrong = [
        f"{rule} {value!r}: the page shows {w}, PostgreSQL gives {g}"
        for (rule, value, _), w, g in zip(rows, want, got, strict=True)
        if w != g
    ]
    assert not wrong, "\n".join(wrong)


# --- commands -------------------------------------------------------------------------


@dataclass
class Replay:
    """The scratch folder and how far the page has been replayed into it."""

    folder: Path
    done: int = 0  # blocks before this index are applied
    pg: PgServer | None = None


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    folder = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "policies", folder / "policies")
    return Replay(folder)


def _database(request: pytest.FixtureRequest, replay: Replay) -> PgServer:
    if replay.pg is None:
        replay.pg = request.getfixturevalue("pg")
    return replay.pg


def _apply(block: Block, replay: Replay, request: pytest.FixtureRequest) -> None:
    """Write a file block; run a database block."""
    if block.kind == "yaml" and "file" in block.options:
        target = replay.folder / block.options["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.body, encoding="utf-8")
    elif block.kind == "console":  # skipped (run alone with -k): redo what writes files
        for command in commands(block):
            if "pgwarden schema" in command.line:
                _database(request, replay)
                run(command.line, replay)
    elif block.kind == "sql" and "database" in block.options:
        pg = _database(request, replay)
        name = block.options["database"]
        pg.psql(f'DROP DATABASE IF EXISTS "{name}"; CREATE DATABASE "{name}";')
        pg.psql(block.body, dbname=name)


@dataclass(frozen=True)
class Command:
    line: str
    expected: list[str]


def commands(block: Block) -> list[Command]:
    out: list[Command] = []
    pending: list[str] = []
    for line in block.body.splitlines():
        if pending and pending[-1].endswith("\\"):
            pending.append(line)
        elif line.startswith("$ "):
            if pending:
                out.append(Command("\n".join(pending), []))
            pending = [line[2:]]
        else:
            assert out or pending, f"{block.label}: output before the first command"
            if pending:
                out.append(Command("\n".join(pending), []))
                pending = []
            out[-1].expected.append(line)
    if pending:
        out.append(Command("\n".join(pending), []))
    return out


def matches(expected: list[str], got: list[str]) -> bool:
    """Line by line; a line `...` (any indentation) stands for one or more lines."""
    if not expected:
        return not got
    if expected[0].strip() == "...":
        return any(matches(expected[1:], got[i:]) for i in range(1, len(got) + 1))
    return bool(got) and expected[0] == got[0] and matches(expected[1:], got[1:])


def expected_exit(command: str, output: list[str]) -> int:
    if "pgwarden explain" in command:
        return 0 if output and output[0].startswith("verdict: allow") else 1
    if "pgwarden check" in command:
        errors = [ln for ln in output if re.match(r"\S+:\d+:\d+: (?!warning:)", ln)]
        return 1 if errors else 0
    if "pgwarden test" in command:
        return 0 if output and output[-1].endswith(" 0 failed") else 1
    return 0


def run(command: str, replay: Replay) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGWARDEN_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if replay.pg is not None:
        command = command.replace(DOC_HOSTPORT, f"{replay.pg.host}:{replay.pg.port}")
        env["PGPASSWORD"] = SVC_PASSWORD
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        env=env,
        cwd=replay.folder,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("block", CONSOLE, ids=lambda b: b.label)
def test_console_example(block: Block, replay: Replay, request: pytest.FixtureRequest) -> None:
    index = BLOCKS.index(block)
    for earlier in BLOCKS[replay.done : index]:
        _apply(earlier, replay, request)
    replay.done = index + 1
    for command in commands(block):
        if "postgresql://" in command.line:
            assert f"{SVC_USER}@{DOC_HOSTPORT}" in command.line, "use the doc's DSN form"
            _database(request, replay)
        done = run(command.line, replay)
        got = (done.stdout + done.stderr).splitlines()
        shown = "\n".join(command.expected)
        if not matches(command.expected, got):
            pytest.fail(
                f"{block.label}: `{command.line}` prints something else now.\n"
                f"--- shown in the page:\n{shown}\n--- printed:\n" + "\n".join(got)
            )
        want = expected_exit(command.line, command.expected)
        assert done.returncode == want, f"{block.label}: `{command.line}` exited {done.returncode}"
