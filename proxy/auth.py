"""Authentication: SCRAM-SHA-256 for staff, and pgwarden's own upstream login.

Strategy: sans-IO. `ScramServerExchange` takes the client's SASL payloads and
returns the server's; `UpstreamAuthenticator` takes the server's
AuthenticationRequest bodies and returns the bytes to send. The network layer
moves the bytes. The SCRAM arithmetic is scramp's; this module only adapts it
to PostgreSQL's dialect of SCRAM and to pgbouncer's users-file format.

Rules:
* The users file holds SCRAM secrets only. pgwarden never stores a recoverable
  password: a plaintext entry is the password itself, and an md5 entry is a
  password equivalent (the hash alone logs in to md5 auth). A SCRAM secret
  (StoredKey, ServerKey) can verify a password but cannot be replayed as one.
* Unknown users run the same exchange against a mock secret derived from a
  per-process random key, so replies and timing do not tell whether a user
  exists; the exchange always fails at the end, with the same message.
* No channel binding: only SCRAM-SHA-256 is advertised, a client that
  requires binding (gs2 flag `p=`) is refused, and the upstream login never
  picks -PLUS.
* The user name inside SCRAM messages is ignored, as PostgreSQL does: the name
  comes from the startup packet, and libpq sends an empty one (`n=,r=...`),
  which scramp rejects. We hand scramp a placeholder name and restore the
  message as the client sent it, since the client signed those exact bytes.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from scramp import ScramClient, ScramException, ScramMechanism
from scramp.utils import ServerError

from proxy.errors import AuthFailed, ConfigError, UpstreamUnavailable
from proxy.wire import frontend as fe

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
# scramp's bounds: fewer than 4096 iterations is refused by it as too weak.
MIN_ITERATIONS = 4096
MAX_ITERATIONS = 10_000_000
_KEY_LEN = 32
_MIN_SALT_LEN = 12
_B64 = r"([A-Za-z0-9+/]+={0,2})"
_SECRET_RE = re.compile(rf"SCRAM-SHA-256\$(\d{{1,9}}):{_B64}\${_B64}:{_B64}")
_MD5_RE = re.compile(r"md5[0-9a-f]{32}")
_USER_LINE_RE = re.compile(r'\s*"((?:[^"]|"")*)"\s+"((?:[^"]|"")*)"\s*')
_MOCK_KEY = secrets.token_bytes(32)

_AUTH_OK, _AUTH_CLEARTEXT, _AUTH_MD5 = 0, 3, 5
_AUTH_SASL, _AUTH_SASL_CONTINUE, _AUTH_SASL_FINAL = 10, 11, 12
_UNSUPPORTED_METHODS = {2: "Kerberos V5", 6: "SCM credentials", 7: "GSSAPI", 8: "GSSAPI", 9: "SSPI"}


# --- secrets and the users file ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """A SCRAM-SHA-256 verifier: enough to check a password, not to recover it."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


def format_secret(secret: ScramSecret) -> str:
    """`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as PostgreSQL writes it."""
    salt, stored, server = (
        base64.b64encode(b).decode("ascii")
        for b in (secret.salt, secret.stored_key, secret.server_key)
    )
    return f"{MECHANISM}${secret.iterations}:{salt}${stored}:{server}"


def make_secret(password: str, *, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A new SCRAM-SHA-256 secret for `password`, with a random 16-byte salt."""
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be {MIN_ITERATIONS} to {MAX_ITERATIONS}")
    mechanism = ScramMechanism(MECHANISM)
    try:
        salt, stored, server, count = mechanism.make_auth_info(
            password, iteration_count=iterations, salt=secrets.token_bytes(16)
        )
    except ScramException:
        # scramp's message may quote the offending character; never echo a password
        raise ValueError("the password has characters SASLprep prohibits") from None
    return format_secret(ScramSecret(int(count), bytes(salt), bytes(stored), bytes(server)))


def parse_secret(text: str) -> ScramSecret:
    """Parse `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`; raises ValueError."""
    match = _SECRET_RE.fullmatch(text)
    if match is None:
        raise ValueError("not a SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> secret")
    iterations = int(match[1])
    try:
        salt, stored, server = (base64.b64decode(g, validate=True) for g in match.groups()[1:])
    except binascii.Error:
        raise ValueError("bad base64 in the SCRAM secret") from None
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iteration count must be {MIN_ITERATIONS} to {MAX_ITERATIONS}")
    if len(salt) < _MIN_SALT_LEN or len(stored) != _KEY_LEN or len(server) != _KEY_LEN:
        raise ValueError("salt or key of the wrong length in the SCRAM secret")
    return ScramSecret(iterations, salt, stored, server)


def load_users(path: Path) -> dict[str, ScramSecret]:
    """Read a pgbouncer-style users file (`"user" "SCRAM-SHA-256$..."` lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("auth.users_file", f"cannot read {path}: {reason}") from None
    return parse_users(text, source=path)


def parse_users(text: str, *, source: object) -> dict[str, ScramSecret]:
    """Parse users-file text; `source` names the file in errors. No I/O."""
    users: dict[str, ScramSecret] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        at = f"{source}:{number}"
        entry = _user_line(line, at)
        if entry is None:
            continue
        if entry[0] in users:
            raise _users_error(at, f'user "{entry[0]}" is listed twice')
        users[entry[0]] = entry[1]
    return users


def _user_line(line: str, at: str) -> tuple[str, ScramSecret] | None:
    stripped = line.strip()
    if not stripped or stripped[0] in ";#":
        return None
    match = _USER_LINE_RE.fullmatch(line)
    if match is None:
        raise _users_error(at, 'expected a line "user" "SCRAM-SHA-256$..."')
    user, secret = (group.replace('""', '"') for group in match.groups())
    if not user:
        raise _users_error(at, "empty user name")
    return user, _user_secret(user, secret, at)


def _user_secret(user: str, secret: str, at: str) -> ScramSecret:
    if secret.startswith(f"{MECHANISM}$"):
        try:
            return parse_secret(secret)
        except ValueError as exc:
            raise _users_error(at, f'user "{user}": {exc}') from None
    kind = "an md5 secret" if _MD5_RE.fullmatch(secret) else "a plaintext password"
    raise _users_error(
        at,
        f'user "{user}" has {kind}; only SCRAM-SHA-256 secrets are accepted '
        f"(make one with `pgwarden passwd {user}`)",
    )


def _users_error(at: str, message: str) -> ConfigError:
    return ConfigError("auth.users_file", f"{at}: {message}")


def users_file_line(user: str, secret: str) -> str:
    """One users-file line, quoting as pgbouncer does (`"` doubled)."""
    quoted = user.replace('"', '""')
    return f'"{quoted}" "{secret}"'


def passwd_main(user: str, stdin: TextIO, stdout: TextIO, *, stderr: TextIO | None = None) -> int:
    """`pgwarden passwd USER`: read a password, print its users-file line."""
    err = stderr if stderr is not None else sys.stderr
    if not user or any(c in user for c in "\r\n\0"):
        err.write("pgwarden passwd: the user name must be non-empty and on one line\n")
        return 2
    password = _read_password(user, stdin)
    if not password:
        err.write("pgwarden passwd: empty password refused\n")
        return 1
    try:
        secret = make_secret(password)
    except ValueError as exc:
        err.write(f"pgwarden passwd: {exc}\n")
        return 1
    stdout.write(users_file_line(user, secret) + "\n")
    return 0


def _read_password(user: str, stdin: TextIO) -> str:
    if stdin.isatty():
        return getpass.getpass(f"Password for {user}: ")
    return stdin.readline().removesuffix("\n").removesuffix("\r")


# --- the server side: staff logging in to pgwarden ------------------------------


class ScramFailed(AuthFailed):
    """AuthFailed carrying the reason for the log; the client sees only the message."""

    def __init__(self, user: str, reason: str) -> None:
        super().__init__(f'password authentication failed for user "{user}"')
        self.reason = reason


def _mock_secret(user: str, key: bytes) -> ScramSecret:
    def derive(label: bytes) -> bytes:
        data = label + user.encode("utf-8", "surrogatepass")
        return hmac.new(key, data, hashlib.sha256).digest()

    return ScramSecret(
        DEFAULT_ITERATIONS, derive(b"salt:")[:16], derive(b"stored:"), derive(b"server:")
    )


def _split_gs2(text: str) -> tuple[str, str]:
    first = text.find(",")
    second = text.find(",", first + 1) if first >= 0 else -1
    if second < 0:
        raise ValueError("client-first message has no GS2 header")
    return text[: second + 1], text[second + 1 :]


def _placeholder_user(bare: str) -> str:
    if not bare.startswith("n="):
        return bare  # scramp reports the malformed message
    _, comma, rest = bare.partition(",")
    return f"n=*{comma}{rest}"


class ScramServerExchange:
    """Server side of SCRAM-SHA-256 for one login attempt.

    `secret` None means the user is unknown: the exchange runs against a mock
    secret and fails at the end exactly like a wrong password. Workers that
    fork after import share the mock key; pass `mock_key` to share it otherwise.
    """

    MECHANISMS: tuple[str, ...] = (MECHANISM,)

    def __init__(
        self, user: str, secret: ScramSecret | None, *, mock_key: bytes | None = None
    ) -> None:
        self.user = user
        self._known = secret is not None
        self._secret = secret if secret is not None else _mock_secret(user, mock_key or _MOCK_KEY)
        self._server: Any = ScramMechanism(MECHANISM).make_server(self._lookup)

    def _lookup(self, _name: str) -> tuple[bytes, bytes, bytes, int]:
        s = self._secret
        return s.salt, s.stored_key, s.server_key, s.iterations

    def client_first(self, mechanism: str, data: bytes) -> bytes:
        """Take SASLInitialResponse's mechanism and data; return server-first bytes."""
        try:
            return self._first(mechanism, data)
        except (ValueError, ScramException) as exc:
            raise ScramFailed(self.user, f"bad client-first message: {exc}") from None

    def _first(self, mechanism: str, data: bytes) -> bytes:
        if mechanism not in self.MECHANISMS:
            raise ValueError(f"mechanism {mechanism!r} was not offered")
        gs2, bare = _split_gs2(data.decode("utf-8"))
        if gs2.startswith("p="):
            raise ValueError("client requires channel binding, which is not offered")
        self._server.set_client_first(gs2 + _placeholder_user(bare))
        self._server.client_first_bare = bare  # the client signed its own bytes
        return str(self._server.get_server_first()).encode("utf-8")

    def client_final(self, data: bytes) -> bytes:
        """Take SASLResponse data; return server-final bytes, or raise ScramFailed."""
        try:
            self._server.set_client_final(data.decode("utf-8"))
            final = str(self._server.get_server_final())
        except (ValueError, ScramException) as exc:
            raise ScramFailed(self.user, self._reason(exc)) from None
        if not self._known:
            raise ScramFailed(self.user, "unknown user")
        return final.encode("utf-8")

    def _reason(self, exc: Exception) -> str:
        if not self._known:
            return "unknown user"
        if getattr(exc, "server_error", None) is ServerError.INVALID_PROOF:
            return "wrong password"
        return f"bad client-final message: {exc}"


# --- the client side: pgwarden logging in to PostgreSQL -------------------------


class UpstreamAuthenticator:
    """pgwarden's login as the service account: AuthenticationRequest in, reply out."""

    def __init__(self, user: str, password: str | None) -> None:
        self._user = user
        self._password = password
        self._scram: Any = None
        self._scram_done = False

    def on_request(self, code: int, body: bytes) -> bytes | None:
        """Reply to one AuthenticationRequest (`body` follows the int32 code).

        Returns the message to send, or None when there is nothing to send.
        Raises UpstreamUnavailable for a method pgwarden cannot do.
        """
        try:
            return self._dispatch(code, body)
        except (ValueError, ScramException) as exc:
            raise UpstreamUnavailable(f"SCRAM login to the upstream failed: {exc}") from None

    def _dispatch(self, code: int, body: bytes) -> bytes | None:
        if code == _AUTH_OK:
            self._ok()
            return None
        if code == _AUTH_CLEARTEXT:
            return fe.encode_password(self._need_password().encode("utf-8") + b"\0")
        if code == _AUTH_MD5:
            return self._md5(body)
        if code == _AUTH_SASL:
            return self._sasl_start(body)
        if code == _AUTH_SASL_CONTINUE:
            return self._sasl_continue(body)
        if code == _AUTH_SASL_FINAL:
            self._sasl_final(body)
            return None
        method = _UNSUPPORTED_METHODS.get(code, f"authentication method {code}")
        raise UpstreamUnavailable(
            f"the upstream asks for {method}, which pgwarden does not support; "
            "give the service account scram-sha-256 in pg_hba.conf"
        )

    def _need_password(self) -> str:
        if self._password is None:
            raise UpstreamUnavailable(
                f'the upstream wants a password for "{self._user}" but none is configured '
                "(set env PGWARDEN_UPSTREAM_PASSWORD or upstream.passfile)"
            )
        return self._password

    def _ok(self) -> None:
        if self._scram is not None and not self._scram_done:
            raise UpstreamUnavailable("the upstream skipped the end of SCRAM: server unverified")

    def _md5(self, salt: bytes) -> bytes:
        if len(salt) != 4:
            raise UpstreamUnavailable("malformed MD5 password request from the upstream")
        secret = (self._need_password() + self._user).encode("utf-8")
        # MD5 is what this protocol mandates; the flag keeps it usable on FIPS builds.
        inner = hashlib.md5(secret, usedforsecurity=False).hexdigest().encode("ascii")
        outer = hashlib.md5(inner + salt, usedforsecurity=False).hexdigest()
        return fe.encode_password(b"md5" + outer.encode("ascii") + b"\0")

    def _sasl_start(self, body: bytes) -> bytes:
        offered = [name.decode("utf-8", "replace") for name in body.split(b"\0") if name]
        if MECHANISM not in offered:
            raise UpstreamUnavailable(
                f"the upstream offers SASL {', '.join(offered) or 'nothing'}; "
                f"pgwarden speaks {MECHANISM} only"
            )
        # PostgreSQL ignores this name (the startup packet carries it); "*" as pgjdbc does
        self._scram = ScramClient([MECHANISM], "*", self._need_password())
        first = str(self._scram.get_client_first()).encode("utf-8")
        return fe.encode_sasl_initial(MECHANISM, first)

    def _sasl_continue(self, body: bytes) -> bytes:
        if self._scram is None:
            raise UpstreamUnavailable("the upstream sent SASLContinue before SASL")
        self._scram.set_server_first(body.decode("utf-8"))
        return fe.encode_password(str(self._scram.get_client_final()).encode("utf-8"))

    def _sasl_final(self, body: bytes) -> None:
        if self._scram is None:
            raise UpstreamUnavailable("the upstream sent SASLFinal before SASL")
        self._scram.set_server_final(body.decode("utf-8"))
        self._scram_done = True
