"""Policy loader: the foundation subset (version, classify, roles, membership)."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.policy import Policy, PolicyError, Role, load_policy
from proxy.policy.loader import YamlError, compose_marked, dotted

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
    assert policy.role_of("alice") == Role("support", False, frozenset({"alice", "carol"}))
    assert policy.role_of("carol") is policy.roles["support"]
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
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    exc = info.value
    assert isinstance(exc, PolicyError)
    assert exc.errors == [
        f"{path}:2:1: colour: unknown key (known: version, classify, roles)",
        f"{path}:1:10: version: unsupported version (this pgwarden reads 1)",
        f"{path}:6:5: roles.support.colour: unknown key "
        "(known: members, statements, tables, columns, limits, unrestricted, mode)",
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
          analyst:
            members:
              - bob
              - alice
        """,
    )
    assert errors_of(path) == [
        f'{path}:8:9: roles.analyst.members[1]: user "alice" is already a member of role "support"'
    ]


def test_a_user_listed_twice_in_one_role_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nroles:\n  r:\n    members: [a, a]\n")
    assert errors_of(path) == [f'{path}:4:18: roles.r.members[1]: user "a" is listed twice']


def test_member_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        roles:
          nobody: {}
          scalar: {members: alice}
          odd: {members: [alice, 7, ""]}
          notmap: yes
          flag: {members: [zed], unrestricted: "true"}
        """,
    )
    assert errors_of(path) == [
        f"{path}:3:11: roles.nobody: missing key members (a list of user names)",
        f"{path}:4:21: roles.scalar.members: must be a list of user names",
        f"{path}:5:26: roles.odd.members[1]: must be a user name (a non-empty string)",
        f"{path}:5:29: roles.odd.members[2]: must be a user name (a non-empty string)",
        f"{path}:6:11: roles.notmap: must be a mapping with members",
        f"{path}:7:40: roles.flag.unrestricted: must be true or false",
    ]


def test_role_sections_are_accepted_as_written_for_now(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        roles:
          r:
            members: [a]
            statements: whatever
            tables: 3
            columns: [x]
            limits: {}
            mode: anything
        """,
    )
    assert load_policy(path).roles["r"] == Role("r", False, frozenset({"a"}))


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
