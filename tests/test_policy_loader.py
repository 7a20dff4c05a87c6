"""Policy loader: the policy language validated into frozen objects, every fault with line:col."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.policy import ColumnRule, Limits, Policy, PolicyError, load_policy
from proxy.policy.loader import YamlError, compose_marked, dotted
from proxy.policy.model import STATEMENT_KINDS, pattern_matches
from proxy.policy.validate import LIMIT_KEYS, ROLE_KEYS

EXAMPLE = """\
version: 1

classify:
  public.customers:
    full_name: name
    email: email
  public.support_tickets:
    body: free_text

roles:
  support:
    members: [alice, carol]
    statements: [select]
    tables: [public.customers, public.support_tickets]
    columns:
      name: allow
      email: {mask: email, lookup: equality}
      free_text: redact
    limits:
      rows_per_query: 50
      on_exceed: reject
  analyst:
    members: [bob]
    statements: [select]
    tables: [public.*]
    columns: {"*": hash}
  dba:
    members: [dora]
    unrestricted: true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value.errors


def test_example_policy_loads(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    policy = load_policy(path)
    assert isinstance(policy, Policy)
    assert policy.source == path
    assert set(policy.roles) == {"support", "analyst", "dba"}
    support = policy.role_of("alice")
    assert support is not None
    assert support.name == "support"
    assert not support.unrestricted
    assert support.members == frozenset({"alice", "carol"})
    assert policy.role_of("carol") is support
    dba = policy.role_of("dora")
    assert dba is not None
    assert dba.unrestricted
    assert policy.role_of("mallory") is None


def test_version_hash_is_short_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    first = load_policy(path).version_hash
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    path.write_text(EXAMPLE + "# a comment changes the bytes\n", encoding="utf-8")
    assert load_policy(path).version_hash != first


def test_policy_error_is_a_config_error_listing_every_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 2
        colour: blue
        roles:
          support:
            members: [alice]
            colour: red
            unrestricted: true
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    exc = info.value
    assert isinstance(exc, PolicyError)
    assert exc.errors == [
        f"{path}:2:1: colour: unknown key (known: version, classify, decoys, roles)",
        f"{path}:1:10: version: unsupported version (this pgwarden reads 1)",
        f"{path}:6:5: roles.support.colour: unknown key (known: {', '.join(ROLE_KEYS)})",
    ]
    assert str(exc) == "\n".join(exc.errors)
    assert exc.message == str(exc)


@pytest.mark.parametrize("version", ['"1"', "true", "1.0", "null"])
def test_version_must_be_the_integer_1(tmp_path: Path, version: str) -> None:
    path = write(tmp_path, f"version: {version}\nroles: {{}}\n")
    assert errors_of(path) == [f"{path}:1:10: version: unsupported version (this pgwarden reads 1)"]


def test_version_and_roles_are_required(tmp_path: Path) -> None:
    path = write(tmp_path, "classify: {}\n")
    assert errors_of(path) == [
        f"{path}:1:1: missing key version (write `version: 1`)",
        f"{path}:1:1: missing key roles",
    ]


@pytest.mark.parametrize("text", ["", "- a list\n", "just text\n"])
def test_the_document_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    [error] = errors_of(path)
    assert error.startswith(f"{path}:1:1: a policy is a mapping")


def test_roles_and_classify_must_be_mappings(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nclassify: [x]\nroles: [support]\n")
    assert errors_of(path) == [
        f"{path}:2:11: classify: must be a mapping of table to {{column: tag}}",
        f"{path}:3:8: roles: must be a mapping of role name to role",
    ]


def test_a_user_in_two_roles_is_refused_where_listed_second(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        roles:
          support:
            members: [alice, carol]
            unrestricted: true
          analyst:
            unrestricted: true
            members:
              - bob
              - alice
        """,
    )
    assert errors_of(path) == [
        f'{path}:10:9: roles.analyst.members[1]: user "alice" is already a member of role "support"'
    ]


def test_a_user_listed_twice_in_one_role_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path, "version: 1\nroles:\n  r:\n    members: [a, a]\n    unrestricted: true\n"
    )
    assert errors_of(path) == [f'{path}:4:18: roles.r.members[1]: user "a" is listed twice']


def test_member_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        roles:
          nobody: {unrestricted: true}
          scalar: {members: alice, unrestricted: true}
          odd: {members: [alice, 7, ""], unrestricted: true}
          notmap: yes
          flag: {members: [zed], unrestricted: "true"}
          empty: {members: [], unrestricted: true}
        """,
    )
    assert errors_of(path) == [
        f"{path}:3:11: roles.nobody: missing key members (a list of user names)",
        f"{path}:4:21: roles.scalar.members: must be a list of user names",
        f"{path}:5:26: roles.odd.members[1]: must be a user name (a non-empty string)",
        f"{path}:5:29: roles.odd.members[2]: must be a user name (a non-empty string)",
        f"{path}:6:11: roles.notmap: must be a mapping with members",
        f"{path}:7:40: roles.flag.unrestricted: must be true or false",
        f"{path}:8:20: roles.empty.members: must list at least one user",
    ]


def test_the_example_becomes_frozen_model_objects(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, EXAMPLE))
    assert policy.version == 1
    assert dict(policy.classify["public.customers"]) == {"full_name": "name", "email": "email"}
    assert policy.classified_columns() == 3
    support = policy.roles["support"]
    assert support.statements == frozenset({"select"})
    assert support.tables == ("public.customers", "public.support_tickets")
    assert dict(support.columns) == {
        "name": ColumnRule("allow"),
        "email": ColumnRule("mask", mask="email", lookup="equality"),
        "free_text": ColumnRule("redact"),
    }
    assert support.limits == Limits(rows_per_query=50, on_exceed="reject")
    analyst = policy.roles["analyst"]
    assert analyst.columns["*"] == ColumnRule("mask", mask="hash")
    assert analyst.limits is None
    dba = policy.roles["dba"]
    assert (dba.statements, dba.tables, dict(dba.columns), dba.limits) == (
        frozenset(),
        (),
        {},
        None,
    )
    assert policy.uses_hash()
    with pytest.raises(AttributeError):
        support.name = "x"  # type: ignore[misc]


def test_normalised_forms(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        classify: {public.people: {name: name, card: card, note: note}}
        roles:
          r:
            members: [a]
            statements: [all]
            tables: [public.*, "*.audit_*"]
            columns:
              name: initials
              card: {mask: partial, first: 0, last: 4}
              note: {mask: redact}
            limits: {rows_per_day: 10, on_exceed: truncate}
        """,
    )
    role = load_policy(path).roles["r"]
    assert role.statements == frozenset(STATEMENT_KINDS)
    assert role.tables == ("public.*", "*.audit_*")
    assert role.columns["name"] == ColumnRule("mask", mask="initials")
    assert role.columns["card"] == ColumnRule("mask", mask="partial", first=0, last=4)
    assert role.columns["note"] == ColumnRule("redact")
    assert role.limits == Limits(rows_per_day=10, on_exceed="truncate")
    assert not load_policy(path).uses_hash()


@pytest.mark.parametrize(
    ("pattern", "table", "matches"),
    [
        ("public.*", "public.customers", True),
        ("public.*", "sales.customers", False),
        ("*.audit_*", "ops.audit_log", True),
        ("public.cust*", "public.customers", True),
        ("public.customers", "public.customers2", False),
        ("*", "public.customers", False),
    ],
)
def test_table_patterns(pattern: str, table: str, matches: bool) -> None:
    assert pattern_matches(pattern, table) is matches


HEAD = """\
version: 1
classify:
  public.customers: {email: email, full_name: name}
roles:
  support:
    members: [alice]
"""
BODY = "    statements: [select]\n    tables: [public.customers]\n"
RULE = HEAD + BODY + "    columns:\n      email: "
MASKS = "masks: email, last4, initials, hash, partial, redact"
ACTIONS = "actions: allow, deny, redact; masks: email, last4, initials, hash, partial"


C = "10:14: roles.support.columns.email"


@pytest.mark.parametrize(
    ("rule", "where", "message"),
    [
        ("show", C, f'unknown action or mask "show" ({ACTIONS})'),
        (
            "{mask: scramble}",
            "10:21: roles.support.columns.email.mask",
            f'unknown mask "scramble" ({MASKS})',
        ),
        ("[hash]", C, "must be allow, deny, redact, a mask name, or {mask: KIND, ...}"),
        ("partial", C, "mask partial needs first and last: {mask: partial, first: 2, last: 2}"),
        ("{mask: partial, first: 2}", C, "mask partial needs last (a non-negative integer)"),
        (
            "{mask: partial, first: -1, last: 2}",
            "10:37: roles.support.columns.email.first",
            "must be a non-negative integer",
        ),
        (
            "{mask: last4, first: 2}",
            "10:28: roles.support.columns.email.first",
            "applies to mask partial only, not last4",
        ),
        (
            "{mask: email, lookup: fuzzy}",
            "10:36: roles.support.columns.email.lookup",
            "must be none or equality",
        ),
        (
            "{mask: redact, lookup: equality}",
            "10:29: roles.support.columns.email.lookup",
            "applies to masks only (redact returns NULL, there is nothing to look up)",
        ),
        (
            "{mask: email, lookp: equality}",
            "10:28: roles.support.columns.email.lookp",
            "unknown key (known: mask, lookup, first, last, per_user)",
        ),
        ("{lookup: equality}", C, "missing key mask (a mask name)"),
    ],
)
def test_column_rule_errors(tmp_path: Path, rule: str, where: str, message: str) -> None:
    path = write(tmp_path, RULE + rule + "\n")
    assert errors_of(path) == [f"{path}:{where}: {message}"]


POSITIVE = "must be a positive integer (leave it out for no cap)"
NOTHING = "a restricted role with no {0} could do nothing (list {0}, or set unrestricted: true)"


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        (
            "    statements: [select, merge]\n    tables: [public.customers]\n",
            ["7:26: roles.support.statements[1]: unknown statement kind (known: select, insert, "
             "update, delete, copy_out, copy_in, ddl, utility, all)"],
        ),
        (
            "    statements: [select]\n"
            '    tables: ["public.cust?mers", "public.[ab]", public., a.b.c, 7]\n',
            ['8:14: roles.support.tables[0]: "public.cust?mers": only * is a glob (no ?, no [...])',
             '8:34: roles.support.tables[1]: "public.[ab]": only * is a glob (no ?, no [...])',
             '8:49: roles.support.tables[2]: "public.": schema and table may not be empty',
             '8:58: roles.support.tables[3]: "a.b.c": must be schema.table (globs: public.*)',
             "8:65: roles.support.tables[4]: "
             "must be a table pattern such as public.customers or public.*"],
        ),
        (
            BODY + "    columns: {phone: allow}\n",
            ['9:15: roles.support.columns.phone: tag "phone" is not defined in classify'],
        ),
        (
            BODY + "    limits: {rows_per_query: 0, rows_per_hour: "
            '"50", rows_per_day: true, on_exceed: drop}\n',
            [f"9:30: roles.support.limits.rows_per_query: {POSITIVE}",
             f"9:48: roles.support.limits.rows_per_hour: {POSITIVE}",
             f"9:68: roles.support.limits.rows_per_day: {POSITIVE}",
             "9:85: roles.support.limits.on_exceed: must be reject or truncate"],
        ),
        (
            "    statements: [select]\n    tables: [public.customers]\n    limits: {burst: 5}\n",
            ["9:14: roles.support.limits.burst: unknown key "
             f"(known: {', '.join(LIMIT_KEYS)})"],
        ),
        (
            "    unrestricted: true\n    statements: [all]\n    columns: {email: allow}\n",
            ["8:5: roles.support.statements: contradicts unrestricted: true (an unrestricted role "
             "passes everything; remove statements or unrestricted)",
             "9:5: roles.support.columns: contradicts unrestricted: true (an unrestricted role "
             "passes everything; remove columns or unrestricted)"],
        ),
        ("    tables: [public.*]\n", [f"6:5: roles.support: {NOTHING.format('statements')}"]),
        (
            "    statements: []\n    tables: []\n",
            [f"7:17: roles.support.statements: {NOTHING.format('statements')}",
             f"8:13: roles.support.tables: {NOTHING.format('tables')}"],
        ),
    ],
)  # fmt: skip
def test_role_errors(tmp_path: Path, body: str, errors: list[str]) -> None:
    path = write(tmp_path, HEAD + body)
    assert errors_of(path) == [f"{path}:{error}" for error in errors]


def test_classify_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        classify:
          public.customers: {email: email, "e-mail": x, phone: "a b"}
          customers: {email: email}
          public.orders: [total]
        roles: {}
        """,
    )
    assert errors_of(path) == [
        f"{path}:3:36: classify.public.customers.e-mail: column name must be an identifier",
        f"{path}:3:56: classify.public.customers.phone: tag must be an identifier "
        "(such as email or free_text)",
        f"{path}:4:3: classify.customers: must be schema.table (two identifiers, no globs)",
        f"{path}:5:18: classify.public.orders: must be a mapping of column to tag",
    ]


def test_every_fault_is_reported_not_just_the_first(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD.replace("version: 1", "version: 3") + "    statements: [selec]\n")
    assert [e.split(": ", 2)[1] for e in errors_of(path)] == [
        "version",
        "roles.support.statements[0]",
        "roles.support",
    ]


def test_yaml_syntax_error_has_a_position(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nroles:\n  r: [a\n")
    [error] = errors_of(path)
    assert error.startswith(f"{path}:4:1: invalid YAML: ")


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nroles: {}\nversion: 1\n")
    assert errors_of(path) == [f"{path}:3:1: duplicate key 'version'"]


def test_unsafe_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "version: !!python/object/apply:os.system ['true']\nroles: {}\n")
    assert errors_of(path) == [
        f"{path}:1:10: unsupported tag tag:yaml.org,2002:python/object/apply:os.system"
    ]
    path = write(tmp_path, "version: !!python/name:os.system\nroles: {}\n")
    [error] = errors_of(path)
    assert error.startswith(f"{path}:1:10: invalid YAML: could not determine a constructor")


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert errors_of(missing) == [f"{missing}: cannot read: No such file or directory"]
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: 1\n\xff\n")
    assert errors_of(binary) == [f"{binary}: not UTF-8 text (byte 11)"]


def test_compose_marked_keeps_positions_and_raw_keys() -> None:
    doc = compose_marked("a:\n  on: [x, {y: 2}]\n")
    assert doc.data == {"a": {"on": ["x", {"y": 2}]}}
    assert doc.position(("a", "on", 1, "y")) == (2, 15)
    assert doc.position(("a", "on"), key=True) == (2, 3)
    assert doc.position(("a", "missing", 3)) == (2, 3)
    assert dotted(("a", "on", 1, "y")) == "a.on[1].y"


def test_compose_marked_refuses_merge_keys_and_alias_bombs() -> None:
    with pytest.raises(YamlError, match="no `<<` merges"):
        compose_marked("base: &b {x: 1}\nderived:\n  <<: *b\n")
    # eight levels of ten aliases each: 10**8 values if expanded
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [
        f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 10)}]"
        for i in range(1, 8)
    ]
    with pytest.raises(YamlError, match="too large"):
        compose_marked("\n".join(bomb))
