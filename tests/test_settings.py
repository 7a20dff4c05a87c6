"""Settings: defaults, every key, positions in errors, DSN and password resolution."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.settings import (
    ClientTLSSettings,
    Dsn,
    LimitSettings,
    load_settings,
    parse_dsn,
    parse_listen,
    passfile_password,
)

NO_ENV: dict[str, str] = {}


def make_config(tmp_path: Path, text: str = "") -> Path:
    """A config folder with the files the defaults name, and pgwarden.yaml."""
    (tmp_path / "users.txt").write_text("", encoding="utf-8")
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "example.yaml").write_text("version: 1\n", encoding="utf-8")
    path = tmp_path / "pgwarden.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV, **kwargs)  # type: ignore[arg-type]
    return info.value.message


def private_file(path: Path, text: str = "x") -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


# --- defaults and every key ---------------------------------------------------------


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    path = make_config(tmp_path)
    s = load_settings(path, environ=NO_ENV)
    assert s.source == path
    assert (s.listen_host, s.listen_port) == ("127.0.0.1", 6432)
    assert s.upstream.dsn == "postgresql://pgwarden_svc@127.0.0.1:5432/shop"
    assert (s.upstream.host, s.upstream.port) == ("127.0.0.1", 5432)
    assert (s.upstream.user, s.upstream.database) == ("pgwarden_svc", "shop")
    assert s.upstream.password is None
    assert (s.upstream.tls, s.upstream.ca_file, s.upstream.connect_timeout_s) == (
        "prefer",
        None,
        5.0,
    )
    assert s.tls == ClientTLSSettings(cert_file=None, key_file=None, required=False)
    assert s.users_file == tmp_path / "users.txt"
    assert s.policy == tmp_path / "policies" / "example.yaml"
    assert s.state_dsn is None
    assert (s.metrics_host, s.metrics_port) == ("127.0.0.1", 9187)
    assert (s.log_format, s.log_level) == ("json", "info")
    assert s.limits == LimitSettings(1000, 4, 10.0, 3600.0, 16 * 1024 * 1024, 30.0)
    assert s.hash_key_file is None
    assert s.workers == 1


def test_every_key_is_read(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem", "hash.key", "staff.txt", "p.yaml"):
        (tmp_path / name).write_text("x", encoding="utf-8")
    private_file(tmp_path / "pgpass", "db.internal:6543:shop:svc:from-passfile\n")
    path = make_config(
        tmp_path,
        """\
        listen: 10.1.2.3:7432
        upstream:
          dsn: postgres://svc@db.internal:6543/shop?application_name=warden
          tls: verify-full
          ca_file: ca.pem
          passfile: pgpass
          connect_timeout_s: 2.5
        tls: {cert_file: cert.pem, key_file: key.pem, required: true}
        auth: {users_file: staff.txt}
        policy: p.yaml
        state_dsn: postgresql://ledger@db2/state
        metrics_listen: null
        log: {format: console, level: debug}
        limits:
          max_connections: 50
          max_connections_per_user: 2
          startup_timeout_s: 3
          idle_timeout_s: 60
          max_message_bytes: 65536
          shutdown_timeout_s: 5
        hash_key_file: hash.key
        workers: 4
        """,
    )
    s = load_settings(path, environ=NO_ENV)
    assert (s.listen_host, s.listen_port) == ("10.1.2.3", 7432)
    up = s.upstream
    assert up.dsn == "postgresql://svc@db.internal:6543/shop?application_name=warden"
    assert (up.host, up.port, up.user, up.database) == ("db.internal", 6543, "svc", "shop")
    assert (up.password, up.tls, up.ca_file) == (
        "from-passfile",
        "verify-full",
        tmp_path / "ca.pem",
    )
    assert (up.connect_timeout_s, up.application_name) == (2.5, "warden")
    assert s.tls == ClientTLSSettings(tmp_path / "cert.pem", tmp_path / "key.pem", True)
    assert (s.users_file, s.policy) == (tmp_path / "staff.txt", tmp_path / "p.yaml")
    assert s.state_dsn == "postgresql://ledger@db2/state"
    assert (s.metrics_host, s.metrics_port) == (None, None)
    assert (s.log_format, s.log_level) == ("console", "debug")
    assert s.limits == LimitSettings(50, 2, 3.0, 60.0, 65536, 5.0)
    assert (s.hash_key_file, s.workers) == (tmp_path / "hash.key", 4)


def test_relative_paths_are_relative_to_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    make_config(folder, "auth: {users_file: users.txt}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_settings(Path("../etc/pgwarden.yaml"), environ=NO_ENV).users_file.samefile(
        folder / "users.txt"
    )


# --- errors name the key and the position ----------------------------------------------


def test_bad_choice_names_file_line_col_and_key(tmp_path: Path) -> None:
    path = make_config(tmp_path, "upstream:\n  dsn: postgresql://u@h/d\n  tls: allow\n")
    assert error_of(path) == (
        f"{path}:3:8: upstream.tls: must be one of disable, prefer, require, verify-full"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sslmode: require\n", "1:1: sslmode: unknown key (known: listen,"),
        ("upstream:\n  host: x\n", "2:3: upstream.host: unknown key (known: dsn, tls,"),
        ("limits: {max_conns: 3}\n", "1:10: limits.max_conns: unknown key"),
        ("log: json\n", "1:6: log: must be a mapping"),
        ("[1, 2]\n", "1:1: config: the file must be a mapping of settings"),
    ],
)
def test_unknown_keys_and_shapes(tmp_path: Path, text: str, expected: str) -> None:
    path = make_config(tmp_path, text)
    assert error_of(path).startswith(f"{path}:{expected}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: 6432", "1:9: listen: must be a non-empty string"),
        ("listen: localhost", "1:9: listen: must be HOST:PORT"),
        ("listen: '::1:6432'", "1:9: listen: an IPv6 address goes in brackets"),
        ("listen: 'h:70000'", "1:9: listen: port must be a number from 0 to 65535"),
        ("metrics_listen: 'h:'", "1:17: metrics_listen: port must be a number"),
        ("workers: 0", "1:10: workers: must be a positive integer"),
        ("workers: true", "1:10: workers: must be a positive integer"),
        ("workers: '2'", "1:10: workers: must be a positive integer"),
        ("workers: 65", "1:10: workers: must be at most 64"),
        ("limits: {max_connections: -1}", "1:27: limits.max_connections: must be a positive"),
        ("limits: {idle_timeout_s: .inf}", "1:26: limits.idle_timeout_s: must be a positive"),
        ("limits: {startup_timeout_s: 0}", "1:29: limits.startup_timeout_s: must be a positive"),
        ("limits: {max_message_bytes: 1.5}", "1:29: limits.max_message_bytes: must be a positive"),
        (
            "limits: {max_connections: 3, max_connections_per_user: 4}",
            "1:56: limits.max_connections_per_user: must not exceed max_connections",
        ),
        ("upstream: {connect_timeout_s: fast}", "1:31: upstream.connect_timeout_s: must be"),
        ("tls: {required: 'yes'}", "1:17: tls.required: must be true or false"),
        ("log: {format: text}", "1:15: log.format: must be one of json, console"),
        ("log: {level: verbose}", "1:14: log.level: must be one of debug, info, warning, error"),
        ("state_dsn: mysql://x", "1:12: state_dsn: must be a postgresql:// URI"),
        ("policy: ''", "1:9: policy: must be a non-empty string"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, expected: str) -> None:
    path = make_config(tmp_path, text + "\n")
    assert error_of(path).startswith(f"{path}:{expected}")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("auth: {users_file: staff.txt}", "1:20: auth.users_file"),
        ("policy: missing.yaml", "1:9: policy"),
        ("tls: {cert_file: c.pem, key_file: k.pem}", "1:18: tls.cert_file"),
        ("upstream: {ca_file: ca.pem}", "1:21: upstream.ca_file"),
        ("hash_key_file: secret.key", "1:16: hash_key_file"),
        ("upstream: {passfile: pgpass}", "1:22: upstream.passfile"),
    ],
)
def test_named_files_must_exist(tmp_path: Path, text: str, key: str) -> None:
    path = make_config(tmp_path, text + "\n")
    assert error_of(path).startswith(f"{path}:{key}: file not found: {tmp_path}/")


def test_a_missing_default_file_says_it_was_the_default(tmp_path: Path) -> None:
    path = make_config(tmp_path)
    (tmp_path / "users.txt").unlink()
    assert error_of(path) == (
        f"{path}: auth.users_file: file not found: {tmp_path / 'users.txt'} "
        "(the default; set auth.users_file)"
    )


def test_a_folder_is_not_a_file(tmp_path: Path) -> None:
    path = make_config(tmp_path, "policy: policies\n")
    assert error_of(path) == f"{path}:1:9: policy: not a file: {tmp_path / 'policies'}"


def test_client_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x", encoding="utf-8")
    path = make_config(tmp_path, "tls:\n  cert_file: c.pem\n")
    assert error_of(path) == (
        f"{path}:2:3: tls.key_file: tls.cert_file and tls.key_file go together: set both"
    )
    path = make_config(tmp_path, "tls:\n  required: true\n")
    assert error_of(path) == f"{path}:2:13: tls.required: needs tls.cert_file and tls.key_file"


def test_verify_full_needs_a_ca_file(tmp_path: Path) -> None:
    path = make_config(tmp_path, "upstream:\n  tls: verify-full\n")
    assert error_of(path) == (
        f"{path}:2:3: upstream.ca_file: required when upstream.tls is verify-full"
    )


def test_yaml_errors_and_duplicate_keys_have_positions(tmp_path: Path) -> None:
    path = make_config(tmp_path, "listen: [\n")
    assert error_of(path).startswith(f"{path}:2:1: yaml: invalid YAML: ")
    path = make_config(tmp_path, "workers: 1\nworkers: 2\n")
    assert error_of(path) == f"{path}:2:1: yaml: duplicate key 'workers'"


def test_unreadable_config(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"config: cannot read {missing}: No such file or directory"


# --- command-line overrides ------------------------------------------------------------


def test_cli_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_config(tmp_path, "listen: 127.0.0.1:1\nworkers: 2\n")
    other = tmp_path / "cwd"
    other.mkdir()
    (other / "mine.yaml").write_text("version: 1\n", encoding="utf-8")
    monkeypatch.chdir(other)
    s = load_settings(
        path,
        listen="[::1]:7000",
        upstream_dsn="postgresql://svc:pw@db:6000/app",
        policy="mine.yaml",
        workers=8,
        environ=NO_ENV,
    )
    assert (s.listen_host, s.listen_port, s.workers) == ("::1", 7000, 8)
    assert (s.upstream.host, s.upstream.port, s.upstream.password) == ("db", 6000, "pw")
    assert s.policy.samefile(other / "mine.yaml")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"listen": "nowhere"}, "--listen: listen: must be HOST:PORT"),
        ({"upstream_dsn": "mysql://x"}, "--upstream: upstream.dsn: must be a postgresql:// URI"),
        ({"policy": "nope.yaml"}, "--policy: policy: file not found: "),
        ({"workers": 0}, "--workers: workers: must be a positive integer"),
    ],
)
def test_cli_overrides_are_validated(
    tmp_path: Path, kwargs: dict[str, object], expected: str
) -> None:
    path = make_config(tmp_path)
    assert error_of(path, **kwargs).startswith(expected)


# --- DSN --------------------------------------------------------------------------------


def test_dsn_percent_decoding_and_defaults() -> None:
    dsn = parse_dsn("postgresql://svc%40corp:p%40ss%3Aw%2Frd@%2Ftmp%2Fpg/my%20db")
    assert dsn == Dsn("/tmp/pg", 5432, "svc@corp", "my db", "p@ss:w/rd")
    assert parse_dsn("postgres://svc@[::1]:6000") == Dsn("::1", 6000, "svc", "svc")
    assert parse_dsn("postgresql://svc@h/").database == "svc"


def test_dsn_redacted_drops_the_password() -> None:
    dsn = parse_dsn("postgresql://svc:hunter2@[::1]/shop?application_name=a%20b")
    assert dsn.redacted() == "postgresql://svc@[::1]:5432/shop?application_name=a%20b"
    assert "hunter2" not in repr(dsn)
    assert parse_dsn(dsn.redacted()) == Dsn("::1", 5432, "svc", "shop", None, "a b")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://svc@h/db", "must be a postgresql:// URI"),
        ("postgresql:svc@h/db", "must be a postgresql:// URI"),
        ("postgresql://h/db", "needs a user"),
        ("postgresql://svc@/db", "needs a host"),
        ("postgresql://svc@:5432/db", "needs a host"),
        ("postgresql://svc@a,b/db", "names one host only"),
        ("postgresql://svc@h:0/db", "port must be a number from 1 to 65535"),
        ("postgresql://svc@h:x/db", "port must be a number from 1 to 65535"),
        ("postgresql://svc@h/db#frag", "has no #fragment"),
        ("postgresql://svc@h/db?sslmode=require", "'sslmode' (set upstream.tls instead)"),
        ("postgresql://svc@h/db?connect_timeout=3", "set upstream.connect_timeout_s instead"),
        ("postgresql://svc@h/db?options=-c%20x", "'options' (allowed: application_name)"),
        ("postgresql://svc@h/db?password=hunter2", "use env PGWARDEN_UPSTREAM_PASSWORD"),
        ("postgresql://svc:hunter2@[::1/db", "is not a valid postgresql:// URI"),
        ("postgresql://svc:hunter2%ff@h/db", "is not a valid postgresql:// URI"),
    ],
)
def test_bad_dsns_never_echo_the_uri(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is checked below
        parse_dsn(text)
    assert expected in str(info.value)
    assert "hunter2" not in str(info.value)


def test_bad_dsn_in_the_file_names_the_key(tmp_path: Path) -> None:
    path = make_config(tmp_path, "upstream:\n  dsn: postgresql://svc:hunter2@h/db?sslmode=off\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2:8: upstream.dsn: unsupported parameter 'sslmode'")
    assert "hunter2" not in message


def test_listen_forms() -> None:
    assert parse_listen("127.0.0.1:6432") == ("127.0.0.1", 6432)
    assert parse_listen("[::1]:6432") == ("::1", 6432)
    assert parse_listen("db.example.com:0") == ("db.example.com", 0)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(":6432")


# --- the upstream password ----------------------------------------------------------------


def test_password_order_env_then_passfile_then_dsn(tmp_path: Path) -> None:
    private_file(tmp_path / "pgpass", "*:*:*:*:from-file\n")
    text = "upstream:\n  dsn: postgresql://svc:from-dsn@h/db\n"
    path = make_config(tmp_path, text + "  passfile: pgpass\n")
    env = {"PGWARDEN_UPSTREAM_PASSWORD": "from-env"}
    assert load_settings(path, environ=env).upstream.password == "from-env"
    assert load_settings(path, environ=NO_ENV).upstream.password == "from-file"
    private_file(tmp_path / "pgpass", "other:*:*:*:nope\n")
    assert load_settings(path, environ=NO_ENV).upstream.password == "from-dsn"
    path = make_config(tmp_path, "upstream:\n  dsn: postgresql://svc@h/db\n")
    assert load_settings(path, environ=NO_ENV).upstream.password is None


def test_password_is_hidden_from_repr(tmp_path: Path) -> None:
    path = make_config(tmp_path, "upstream: {dsn: 'postgresql://svc:hunter2@h/db'}\n")
    s = load_settings(path, environ=NO_ENV)
    assert s.upstream.password == "hunter2"
    assert "hunter2" not in repr(s)
    assert s.upstream.dsn == "postgresql://svc@h:5432/db"


def test_pgpassfile_env_is_honoured_and_ignored_when_missing(tmp_path: Path) -> None:
    passfile = private_file(tmp_path / "env.pgpass", "h:5432:db:svc:from-env-file\n")
    path = make_config(tmp_path, "upstream: {dsn: 'postgresql://svc@h/db'}\n")
    env = {"PGPASSFILE": str(passfile)}
    assert load_settings(path, environ=env).upstream.password == "from-env-file"
    env = {"PGPASSFILE": str(tmp_path / "absent")}
    assert load_settings(path, environ=env).upstream.password is None


def test_passfile_with_group_or_world_access_is_refused(tmp_path: Path) -> None:
    passfile = private_file(tmp_path / "pgpass", "*:*:*:*:pw\n")
    passfile.chmod(0o640)
    path = make_config(tmp_path, "upstream:\n  passfile: pgpass\n")
    assert error_of(path) == (
        f"{path}:2:13: upstream.passfile: {passfile} has group or world access; "
        "permissions should be u=rw (0600) or less"
    )
    path = make_config(tmp_path)
    with pytest.raises(ConfigError, match=r"^PGPASSFILE: upstream\.passfile: .* group or world"):
        load_settings(path, environ={"PGPASSFILE": str(passfile)})


def test_passfile_matching_wildcards_escapes_and_comments() -> None:
    dsn = Dsn("db:1", 5432, "svc", "shop")
    text = "\n".join(
        [
            "# db\\:1:5432:shop:svc:commented",
            "db\\:1:5433:shop:svc:wrong-port",
            "db\\:1:*:shop:\\*:wrong-user-literal-star",
            "too:few:fields",
            "db\\:1:*:shop:svc:p\\:w\\\\x:y",
            "*:*:*:*:later-line",
        ]
    )
    assert passfile_password(text, dsn) == "p:w\\x:y"
    assert passfile_password("*:*:*:*:first\n*:*:*:*:second", dsn) == "first"
    assert passfile_password("h:*:*:*:x", dsn) is None
    assert passfile_password("*:*:*:*:", dsn) is None
