"""Settings: pgwarden.yaml loaded once into frozen, validated dataclasses.

Strategy: the file is composed with positions (proxy.policy.loader's
`compose_marked`), its shape is checked against the table of known keys, and
each value goes through one small pure validator. A fault becomes a
ConfigError that names the dotted key and where it is written:

    pgwarden.yaml:3:8: upstream.tls: must be one of disable, prefer, require, verify-full

Command-line overrides (--listen, --upstream, --policy, --workers) go through
the same validators; their errors name the flag instead of a line.

Rules:
* Unknown keys are errors, never ignored: a typo must not silently fall back
  to a default.
* Relative paths in the file are relative to the file's folder; paths given
  on the command line are relative to the working directory. Every file named
  must exist when the settings load.
* No secret is ever part of a message or a repr: the stored DSN has its
  password removed, and the password field is hidden from repr.

Keys beyond the product contract (PRODUCT.md, Configuration):
* upstream.passfile (null): a libpq passfile (host:port:db:user:password); null
  means env PGPASSFILE if set. Like libpq, a file with group or world access is
  refused.
* upstream.connect_timeout_s (5): time allowed to reach and log into PostgreSQL.
* limits.max_message_bytes (16 MiB): the largest client message accepted.
* limits.shutdown_timeout_s (30): on SIGTERM, how long running statements may
  finish before their sessions are cancelled.
* workers (1, at most 64): processes sharing the listening port (docs/operations.md).
* auth.max_failures (10), auth.failure_window_s (60): a client address with that
  many failed logins within the window is refused at its next connections,
  before any password exchange, until the window has moved past them.

The upstream password is taken from env PGWARDEN_UPSTREAM_PASSWORD, else the
passfile, else the DSN itself (accepted, but discouraged: the config file then
holds a secret); none means the upstream trusts the service account.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from proxy.errors import ConfigError
from proxy.policy.loader import MarkedDocument, YamlError, YamlPath, compose_marked, dotted, where

T = TypeVar("T")

PASSWORD_ENV = "PGWARDEN_UPSTREAM_PASSWORD"  # noqa: S105 - a variable name, not a password
PASSFILE_ENV = "PGPASSFILE"
DEFAULT_DSN = "postgresql://pgwarden_svc@127.0.0.1:5432/shop"
TLS_MODES = ("disable", "prefer", "require", "verify-full")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
DSN_PARAMS = ("application_name",)
_DSN_HINTS = {
    "sslmode": "set upstream.tls instead",
    "sslrootcert": "set upstream.ca_file instead",
    "connect_timeout": "set upstream.connect_timeout_s instead",
    "password": "use env PGWARDEN_UPSTREAM_PASSWORD or upstream.passfile",
    "passfile": "set upstream.passfile instead",
}

_SECTIONS: Mapping[str, tuple[str, ...]] = {
    "upstream": ("dsn", "tls", "ca_file", "passfile", "connect_timeout_s"),
    "tls": ("cert_file", "key_file", "required"),
    "auth": ("users_file", "max_failures", "failure_window_s"),
    "log": ("format", "level"),
    "limits": (
        "max_connections",
        "max_connections_per_user",
        "startup_timeout_s",
        "idle_timeout_s",
        "max_message_bytes",
        "shutdown_timeout_s",
    ),
}
_SCALARS = ("listen", "policy", "state_dsn", "metrics_listen", "hash_key_file", "workers")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """The PostgreSQL pgwarden logs into as its service account."""

    dsn: str  # the DSN without its password: safe to log
    host: str
    port: int
    user: str
    database: str
    password: str | None = field(repr=False)
    tls: str
    ca_file: Path | None
    connect_timeout_s: float
    application_name: str | None = None


@dataclass(frozen=True, slots=True)
class ClientTLSSettings:
    """TLS offered to clients; `required` refuses plaintext clients."""

    cert_file: Path | None
    key_file: Path | None
    required: bool


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Connection, message size and timing limits."""

    max_connections: int
    max_connections_per_user: int
    startup_timeout_s: float
    idle_timeout_s: float
    max_message_bytes: int
    shutdown_timeout_s: float


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Failed-login throttling per client address."""

    max_failures: int
    failure_window_s: float


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `pgwarden serve` needs, validated."""

    source: Path
    listen_host: str
    listen_port: int
    upstream: UpstreamSettings
    tls: ClientTLSSettings
    users_file: Path
    policy: Path
    state_dsn: str | None = field(repr=False)
    metrics_host: str | None
    metrics_port: int | None
    log_format: str
    log_level: str
    limits: LimitSettings
    hash_key_file: Path | None
    workers: int
    auth: AuthSettings = AuthSettings(10, 60.0)


@dataclass(frozen=True, slots=True)
class Dsn:
    """A parsed postgresql:// URI."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False)
    application_name: str | None = None

    def redacted(self) -> str:
        """The URI again, without the password."""
        host = f"[{self.host}]" if ":" in self.host else quote(self.host, safe="")
        uri = f"postgresql://{quote(self.user, safe='')}@{host}:{self.port}/"
        uri += quote(self.database, safe="")
        if self.application_name is not None:
            uri += f"?application_name={quote(self.application_name, safe='')}"
        return uri


# --- pure validators: each takes a raw YAML value and raises Invalid -------------


class Invalid(ValueError):
    """A setting's value is wrong; the message says what is expected."""


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be a non-empty string")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}")
        return str(value)

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise Invalid("must be a positive integer")
    return value


def _positive_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid("must be a positive number (seconds)")
    if not math.isfinite(value) or value <= 0:
        raise Invalid("must be a positive number (seconds)")
    return float(value)


def _optional(check: Callable[[object], T]) -> Callable[[object], T | None]:
    def optional(value: object) -> T | None:
        return None if value is None else check(value)

    return optional


def _existing_file(base: Path) -> Callable[[object], Path]:
    def check(value: object) -> Path:
        path = base / Path(_text(value)).expanduser()
        if not path.is_file():
            raise Invalid(f"not a file: {path}" if path.exists() else f"file not found: {path}")
        return path

    return check


def parse_listen(value: object) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` -> (host, port); port 0 asks for a free port."""
    text = _text(value)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise Invalid("must be HOST:PORT, e.g. 127.0.0.1:6432 or [::1]:6432")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise Invalid("an IPv6 address goes in brackets: [::1]:6432")
    if not host or any(c.isspace() for c in host):
        raise Invalid("must be HOST:PORT with a host name or address")
    return host, _port(port_text, lowest=0)


def _port(text: str, *, lowest: int) -> int:
    if not text.isascii() or not text.isdigit() or not lowest <= int(text) <= 65535:
        raise Invalid(f"port must be a number from {lowest} to 65535")
    return int(text)


def parse_dsn(value: object) -> Dsn:
    """Parse a postgresql:// URI (one host, percent-decoded parts).

    Messages never repeat the URI, since it may hold a password.
    """
    try:
        return _parse_dsn(_text(value))
    except Invalid:
        raise
    except ValueError:  # urlsplit or percent-decoding; their text may quote the URI
        raise Invalid("is not a valid postgresql:// URI") from None


def _parse_dsn(text: str) -> Dsn:
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres") or not text.startswith(f"{parts.scheme}://"):
        raise Invalid("must be a postgresql:// URI")
    if parts.fragment:
        raise Invalid("a postgresql:// URI has no #fragment")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = (unquote(p, errors="strict") for p in userinfo.partition(":"))
    host, port = _dsn_host_port(hostport)
    if not user:
        raise Invalid("needs a user: postgresql://USER@HOST:PORT/DATABASE")
    database = unquote(parts.path.removeprefix("/"), errors="strict") or user
    params = _dsn_params(parts.query)
    return Dsn(host, port, user, database, password or None, params.get("application_name"))


def _dsn_host_port(hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = hostport.partition(":")
    host = unquote(host, errors="strict")
    if not host:
        raise Invalid("needs a host: postgresql://USER@HOST:PORT/DATABASE")
    if "," in host:
        raise Invalid("names one host only")
    return host, _port(port_text, lowest=1) if port_text else 5432


def _dsn_params(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise Invalid("has a malformed ?query") from None
    for name, _ in pairs:
        if name not in DSN_PARAMS:
            hint = _DSN_HINTS.get(name, f"allowed: {', '.join(DSN_PARAMS)}")
            raise Invalid(f"unsupported parameter {name!r} ({hint})")
    return dict(pairs)


def _state_dsn(value: object) -> str:
    text = _text(value)
    if not text.startswith(("postgresql://", "postgres://")):
        raise Invalid("must be a postgresql:// URI")
    return text


# --- libpq passfile (pure) -------------------------------------------------------


def passfile_password(text: str, dsn: Dsn) -> str | None:
    """The password for `dsn` from libpq passfile text, or None if no line matches.

    Lines are host:port:database:user:password; `*` matches anything, `\\:` and
    `\\\\` escape, lines starting with # are comments.
    """
    wanted = (dsn.host, str(dsn.port), dsn.database, dsn.user)
    for line in text.splitlines():
        parsed = None if line.startswith("#") else _passfile_fields(line)
        if parsed is None:
            continue
        patterns, password = parsed
        if all(p is None or p == w for p, w in zip(patterns, wanted, strict=True)):
            return password or None
    return None


def _passfile_fields(line: str) -> tuple[list[str | None], str] | None:
    fields: list[str | None] = []
    current: list[str] = []
    escaped = False
    chars = iter(line)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
            escaped = True
        elif ch == ":" and len(fields) < 4:
            text = "".join(current)
            fields.append(None if text == "*" and not escaped else text)
            current, escaped = [], False
        else:
            current.append(ch)
    return (fields, "".join(current)) if len(fields) == 4 else None


# --- reading the file ------------------------------------------------------------


class _Reader:
    def __init__(self, source: Path, doc: MarkedDocument) -> None:
        self.source = source
        self.doc = doc
        self.base = source.parent.absolute()

    def fail(self, path: YamlPath, message: str, *, key: bool = False) -> ConfigError:
        position = self.doc.position(path, key=key)
        return ConfigError(dotted(path) or "config", message, source=where(self.source, position))

    def raw(self, path: YamlPath, default: object) -> object:
        node = self.doc.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def given(self, path: YamlPath) -> bool:
        return self.raw(path, _MISSING) is not _MISSING

    def value(self, path: YamlPath, default: object, check: Callable[[object], T]) -> T:
        try:
            return check(self.raw(path, default))
        except ValueError as exc:
            suffix = "" if self.given(path) else f" (the default; set {dotted(path)})"
            raise self.fail(path, f"{exc}{suffix}") from None


_MISSING = object()


def _from_cli(flag: str, key: str, value: object, check: Callable[[object], T]) -> T:
    try:
        return check(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc), source=flag) from None


def _read_document(path: Path) -> MarkedDocument:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("config", f"cannot read {path}: {reason}") from None
    try:
        return compose_marked(text)
    except YamlError as exc:
        raise ConfigError("yaml", exc.message, source=where(path, exc.position)) from None


def _check_shape(r: _Reader) -> None:
    root = r.doc.data
    if root is None:
        return
    if not isinstance(root, dict):
        raise r.fail((), "the file must be a mapping of settings")
    for key, value in root.items():
        if key in _SECTIONS:
            _check_section(r, key, value)
        elif key not in _SCALARS:
            known = ", ".join([*_SCALARS, *_SECTIONS])
            raise r.fail((key,), f"unknown key (known: {known})", key=True)


def _check_section(r: _Reader, section: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise r.fail((section,), "must be a mapping")
    known = _SECTIONS[section]
    for key in value:
        if key not in known:
            raise r.fail((section, key), f"unknown key (known: {', '.join(known)})", key=True)


def load_settings(
    path: Path,
    *,
    listen: str | None = None,
    upstream_dsn: str | None = None,
    policy: str | None = None,
    workers: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    """Load and validate pgwarden.yaml; raises ConfigError naming the key and line.

    Keyword arguments are command-line overrides, validated like the file.
    """
    r = _Reader(path, _read_document(path))
    _check_shape(r)
    listen_at = _listen(r, listen)
    metrics = r.value(("metrics_listen",), "127.0.0.1:9187", _optional(parse_listen))
    return Settings(
        source=path,
        listen_host=listen_at[0],
        listen_port=listen_at[1],
        upstream=_upstream(r, upstream_dsn, environ),
        tls=_client_tls(r),
        users_file=r.value(("auth", "users_file"), "users.txt", _existing_file(r.base)),
        auth=AuthSettings(
            max_failures=r.value(("auth", "max_failures"), 10, _positive_int),
            failure_window_s=r.value(("auth", "failure_window_s"), 60, _positive_float),
        ),
        policy=_policy(r, policy),
        state_dsn=r.value(("state_dsn",), None, _optional(_state_dsn)),
        metrics_host=metrics[0] if metrics else None,
        metrics_port=metrics[1] if metrics else None,
        log_format=r.value(("log", "format"), "json", _choice(LOG_FORMATS)),
        log_level=r.value(("log", "level"), "info", _choice(LOG_LEVELS)),
        limits=_limits(r),
        hash_key_file=r.value(("hash_key_file",), None, _optional(_existing_file(r.base))),
        workers=_workers(r, workers),
    )


def _listen(r: _Reader, override: str | None) -> tuple[str, int]:
    if override is not None:
        return _from_cli("--listen", "listen", override, parse_listen)
    return r.value(("listen",), "127.0.0.1:6432", parse_listen)


def _policy(r: _Reader, override: str | None) -> Path:
    if override is not None:
        return _from_cli("--policy", "policy", override, _existing_file(Path.cwd()))
    return r.value(("policy",), "policies/example.yaml", _existing_file(r.base))


MAX_WORKERS = 64  # a BackendKeyData pid carries the worker's index in 7 bits


def _worker_count(value: object) -> int:
    count = _positive_int(value)
    if count > MAX_WORKERS:
        raise Invalid(f"must be at most {MAX_WORKERS}")
    return count


def _workers(r: _Reader, override: int | None) -> int:
    if override is not None:
        return _from_cli("--workers", "workers", override, _worker_count)
    return r.value(("workers",), 1, _worker_count)


def _upstream(r: _Reader, override: str | None, environ: Mapping[str, str]) -> UpstreamSettings:
    if override is not None:
        dsn = _from_cli("--upstream", "upstream.dsn", override, parse_dsn)
    else:
        dsn = r.value(("upstream", "dsn"), DEFAULT_DSN, parse_dsn)
    tls = r.value(("upstream", "tls"), "prefer", _choice(TLS_MODES))
    ca_file = r.value(("upstream", "ca_file"), None, _optional(_existing_file(r.base)))
    if tls == "verify-full" and ca_file is None:
        raise r.fail(("upstream", "ca_file"), "required when upstream.tls is verify-full")
    return UpstreamSettings(
        dsn=dsn.redacted(),
        host=dsn.host,
        port=dsn.port,
        user=dsn.user,
        database=dsn.database,
        password=_password(r, dsn, environ),
        tls=tls,
        ca_file=ca_file,
        connect_timeout_s=r.value(("upstream", "connect_timeout_s"), 5, _positive_float),
        application_name=dsn.application_name,
    )


def _password(r: _Reader, dsn: Dsn, environ: Mapping[str, str]) -> str | None:
    configured = r.value(("upstream", "passfile"), None, _optional(_existing_file(r.base)))
    if configured is not None:
        _check_passfile_mode(
            configured, source=where(r.source, r.doc.position(("upstream", "passfile")))
        )
    if environ.get(PASSWORD_ENV):
        return environ[PASSWORD_ENV]
    passfile = configured or _env_passfile(environ)
    found = passfile_password(_read_passfile(passfile), dsn) if passfile else None
    return found or dsn.password


def _env_passfile(environ: Mapping[str, str]) -> Path | None:
    name = environ.get(PASSFILE_ENV)
    if not name or not Path(name).expanduser().is_file():
        return None  # like libpq: a PGPASSFILE that does not exist is ignored
    path = Path(name).expanduser()
    _check_passfile_mode(path, source=PASSFILE_ENV)
    return path


def _check_passfile_mode(path: Path, *, source: str) -> None:
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            "upstream.passfile",
            f"{path} has group or world access; permissions should be u=rw (0600) or less",
            source=source,
        )


def _read_passfile(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("upstream.passfile", f"cannot read {path}: {reason}") from None


def _client_tls(r: _Reader) -> ClientTLSSettings:
    cert = r.value(("tls", "cert_file"), None, _optional(_existing_file(r.base)))
    key = r.value(("tls", "key_file"), None, _optional(_existing_file(r.base)))
    required = r.value(("tls", "required"), False, _boolean)
    if (cert is None) != (key is None):
        missing = "key_file" if key is None else "cert_file"
        raise r.fail(("tls", missing), "tls.cert_file and tls.key_file go together: set both")
    if required and cert is None:
        raise r.fail(("tls", "required"), "needs tls.cert_file and tls.key_file")
    return ClientTLSSettings(cert_file=cert, key_file=key, required=required)


def _limits(r: _Reader) -> LimitSettings:
    def get(name: str, default: float, check: Callable[[object], T]) -> T:
        return r.value(("limits", name), default, check)

    limits = LimitSettings(
        max_connections=get("max_connections", 1000, _positive_int),
        max_connections_per_user=get("max_connections_per_user", 4, _positive_int),
        startup_timeout_s=get("startup_timeout_s", 10, _positive_float),
        idle_timeout_s=get("idle_timeout_s", 3600, _positive_float),
        max_message_bytes=get("max_message_bytes", 16 * 1024 * 1024, _positive_int),
        shutdown_timeout_s=get("shutdown_timeout_s", 30, _positive_float),
    )
    if limits.max_connections_per_user > limits.max_connections:
        raise r.fail(("limits", "max_connections_per_user"), "must not exceed max_connections")
    return limits
