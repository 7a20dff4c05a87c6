"""Authentication: SCRAM server exchange, secrets, the users file, upstream login.

The other end of each exchange is real: scramp's client and server, or an
independent RFC 5802 client written here with hashlib (as libpq words it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import struct
from pathlib import Path

import pytest
from scramp import ScramClient, ScramMechanism

from proxy.auth import (
    ScramFailed,
    ScramSecret,
    ScramServerExchange,
    UpstreamAuthenticator,
    load_users,
    make_secret,
    parse_secret,
    parse_users,
    passwd_main,
)
from proxy.errors import AuthFailed, ConfigError, UpstreamUnavailable

SCRAM = "SCRAM-SHA-256"


def secret_for(password: str) -> ScramSecret:
    return parse_secret(make_secret(password))


def scramp_login(exchange: ScramServerExchange, password: str) -> bytes:
    client = ScramClient([SCRAM], "whoever", password)
    first = exchange.client_first(SCRAM, client.get_client_first().encode())
    client.set_server_first(first.decode())
    final = exchange.client_final(client.get_client_final().encode())
    client.set_server_final(final.decode())  # raises unless the server proved the key
    return final


def rfc5802_final(password: str, bare: str, server_first: str, gs2: str) -> tuple[str, bytes]:
    """Client-final message and the expected server signature, from first principles."""
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_signature = hmac.digest(hmac.digest(salted, b"Server Key", "sha256"), auth, "sha256")
    return f"{without_proof},p={base64.b64encode(proof).decode()}", server_signature


def libpq_login(exchange: ScramServerExchange, password: str, gs2: str = "n,,") -> bytes:
    bare = "n=,r=fyko+d2lbbFgONRv9qkxdawL"  # libpq leaves the name empty
    first = exchange.client_first(SCRAM, f"{gs2}{bare}".encode()).decode()
    final, server_signature = rfc5802_final(password, bare, first, gs2)
    reply = exchange.client_final(final.encode())
    assert reply == b"v=" + base64.b64encode(server_signature)
    return reply


# --- secrets ------------------------------------------------------------------------------


def test_make_secret_has_postgresql_form_and_keys() -> None:
    text = make_secret("correct horse", iterations=5000)
    assert text.startswith("SCRAM-SHA-256$5000:")
    secret = parse_secret(text)
    assert (secret.iterations, len(secret.salt)) == (5000, 16)
    salted = hashlib.pbkdf2_hmac("sha256", b"correct horse", secret.salt, 5000)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    assert secret.stored_key == hashlib.sha256(client_key).digest()
    assert secret.server_key == hmac.digest(salted, b"Server Key", "sha256")
    assert make_secret("correct horse") != make_secret("correct horse")  # fresh salt


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("md5" + "0" * 32, "not a SCRAM-SHA-256"),
        ("SCRAM-SHA-256$4096:c2FsdA==$a", "not a SCRAM-SHA-256"),
        (
            "SCRAM-SHA-256$100:" + "QUJDREVGR0hJSktMTU5PUA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
            "iteration count",
        ),
        ("SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=", "wrong length"),
        ("SCRAM-SHA-256$4096:QUJDREVGR0hJSktMTU5PUA==$A:B", "bad base64"),
    ],
)
def test_parse_secret_refuses_bad_secrets(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        parse_secret(text)


def test_secret_repr_hides_keys() -> None:
    secret = secret_for("pw")
    assert base64.b64encode(secret.stored_key).decode() not in repr(secret)
    assert "stored_key" not in repr(secret)


# --- the server exchange --------------------------------------------------------------------


def test_exchange_with_scramp_client_right_password() -> None:
    exchange = ScramServerExchange("alice", secret_for("s3cret"))
    assert scramp_login(exchange, "s3cret").startswith(b"v=")


def test_exchange_with_libpq_style_empty_user_name() -> None:
    libpq_login(ScramServerExchange("alice", secret_for("s3cret")), "s3cret")


def test_exchange_accepts_client_that_supports_but_does_not_use_binding() -> None:
    libpq_login(ScramServerExchange("alice", secret_for("s3cret")), "s3cret", gs2="y,,")


def test_wrong_password_fails_with_postgresql_wording() -> None:
    exchange = ScramServerExchange("alice", secret_for("s3cret"))
    with pytest.raises(AuthFailed) as info:
        scramp_login(exchange, "guess")
    exc = info.value
    assert exc.message == 'password authentication failed for user "alice"'
    assert exc.sqlstate == "28P01"
    assert isinstance(exc, ScramFailed)
    assert exc.reason == "wrong password"


def server_first_shape(exchange: ScramServerExchange) -> tuple[int, int, int]:
    first = exchange.client_first(SCRAM, b"n,,n=,r=abcdef").decode()
    attrs = dict(part.split("=", 1) for part in first.split(","))
    return len(first.split(",")), len(base64.b64decode(attrs["s"])), int(attrs["i"])


def test_unknown_user_looks_like_a_known_one_and_always_fails() -> None:
    known = ScramServerExchange("alice", secret_for("s3cret"))
    unknown = ScramServerExchange("mallory", None)
    assert server_first_shape(known) == server_first_shape(unknown)
    with pytest.raises(AuthFailed) as wrong:
        scramp_login(ScramServerExchange("mallory", secret_for("s3cret")), "guess")
    with pytest.raises(AuthFailed) as missing:
        scramp_login(ScramServerExchange("mallory", None), "s3cret")
    assert missing.value.message == wrong.value.message
    assert missing.value.sqlstate == wrong.value.sqlstate
    assert isinstance(missing.value, ScramFailed)
    assert missing.value.reason == "unknown user"


def salt_of(exchange: ScramServerExchange) -> str:
    first = exchange.client_first(SCRAM, b"n,,n=,r=abcdef").decode()
    return first.split(",")[1]


def test_unknown_user_salt_is_stable_per_user() -> None:
    assert salt_of(ScramServerExchange("mallory", None)) == salt_of(
        ScramServerExchange("mallory", None)
    )
    assert salt_of(ScramServerExchange("mallory", None)) != salt_of(
        ScramServerExchange("trudy", None)
    )
    key = b"k" * 32
    assert salt_of(ScramServerExchange("mallory", None, mock_key=key)) == salt_of(
        ScramServerExchange("mallory", None, mock_key=key)
    )


@pytest.mark.parametrize(
    ("mechanism", "data", "reason"),
    [
        ("SCRAM-SHA-256-PLUS", b"n,,n=,r=abc", "was not offered"),
        ("SCRAM-SHA-1", b"n,,n=,r=abc", "was not offered"),
        (SCRAM, b"p=tls-server-end-point,,n=,r=abc", "requires channel binding"),
        (SCRAM, b"n,,r=abc", "bad client-first"),
        (SCRAM, b"garbage", "no GS2 header"),
        (SCRAM, b"n,,n=,r=abc,m=ext", "bad client-first"),
        (SCRAM, b"\xff\xfe", "bad client-first"),
        (SCRAM, b"", "no GS2 header"),
    ],
)
def test_bad_client_first_is_refused(mechanism: str, data: bytes, reason: str) -> None:
    exchange = ScramServerExchange("alice", secret_for("pw"))
    with pytest.raises(
        ScramFailed, match=r'^password authentication failed for user "alice"$'
    ) as e:
        exchange.client_first(mechanism, data)
    assert reason in e.value.reason


def test_bad_client_final_and_out_of_order_calls_are_refused() -> None:
    exchange = ScramServerExchange("alice", secret_for("pw"))
    with pytest.raises(ScramFailed):
        exchange.client_final(b"c=biws,r=abc,p=AAAA")
    exchange = ScramServerExchange("alice", secret_for("pw"))
    exchange.client_first(SCRAM, b"n,,n=,r=abc")
    with pytest.raises(ScramFailed) as info:
        exchange.client_final(b"c=biws,r=not-our-nonce,p=AAAA")
    assert info.value.reason.startswith("bad client-final message")


# --- the users file -------------------------------------------------------------------------


def test_parse_users_pgbouncer_format() -> None:
    alice, bob = make_secret("a-pw"), make_secret("b-pw")
    text = "\n".join(
        [
            "; a pgbouncer comment",
            "# another comment",
            "",
            f'"alice" "{alice}"',
            f'  "say ""hi"""   "{bob}"  ',
        ]
    )
    users = parse_users(text, source="users.txt")
    assert users == {"alice": parse_secret(alice), 'say "hi"': parse_secret(bob)}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('"alice" "hunter2"', 'users.txt:2: user "alice" has a plaintext password; only'),
        ('"alice" "md5' + "a" * 32 + '"', 'users.txt:2: user "alice" has an md5 secret; only'),
        ('"alice" "SCRAM-SHA-256$1:x"', 'users.txt:2: user "alice": not a SCRAM-SHA-256'),
        ("alice hunter2", "users.txt:2: expected a line"),
        ('"alice"', "users.txt:2: expected a line"),
        ('"" "x"', "users.txt:2: empty user name"),
    ],
)
def test_parse_users_refuses_anything_but_scram(line: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_users(f"# header\n{line}\n", source="users.txt")
    assert info.value.key == "auth.users_file"
    assert info.value.message.startswith(f"auth.users_file: {expected}")
    assert "hunter2" not in info.value.message


def test_parse_users_refuses_duplicates() -> None:
    secret = make_secret("pw")
    with pytest.raises(ConfigError, match=r'users\.txt:2: user "alice" is listed twice'):
        parse_users(f'"alice" "{secret}"\n"alice" "{secret}"\n', source="users.txt")


def test_load_users_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    path.write_text(f'"carol" "{make_secret("c")}"\n', encoding="utf-8")
    assert set(load_users(path)) == {"carol"}
    with pytest.raises(ConfigError, match=r"cannot read .*No such file"):
        load_users(tmp_path / "absent.txt")


def test_passwd_main_prints_a_line_that_logs_in() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert passwd_main('o"brien', io.StringIO("pa ss\n"), out, stderr=err) == 0
    assert err.getvalue() == ""
    users = parse_users(out.getvalue(), source="stdout")
    libpq_login(ScramServerExchange('o"brien', users['o"brien']), "pa ss")


def test_passwd_main_refuses_empty_password_and_bad_user() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert passwd_main("alice", io.StringIO("\n"), out, stderr=err) == 1
    assert passwd_main("alice", io.StringIO(""), out, stderr=err) == 1
    assert passwd_main("al\nice", io.StringIO("pw\n"), out, stderr=err) == 2
    assert out.getvalue() == ""
    assert "empty password refused" in err.getvalue()


# --- the upstream login ---------------------------------------------------------------------


def unframe(message: bytes) -> bytes:
    assert message[:1] == b"p"
    (length,) = struct.unpack("!i", message[1:5])
    assert length == len(message) - 1
    return message[5:]


def test_upstream_ok_and_cleartext() -> None:
    auth = UpstreamAuthenticator("svc", "pw")
    assert auth.on_request(0, b"") is None
    assert auth.on_request(3, b"") == b"p\x00\x00\x00\x07pw\x00"


def test_upstream_md5_matches_known_value() -> None:
    reply = UpstreamAuthenticator("postgres", "secret").on_request(5, b"\x01\x02\x03\x04")
    assert reply is not None
    # md5(md5("secret" + "postgres").hex + salt), checked with md5sum
    assert unframe(reply) == b"md5bb41a296aab6baccb36ff243a562abff\x00"


def test_upstream_scram_against_scramp_server() -> None:
    server = ScramMechanism(SCRAM).make_server(
        lambda _user: ScramMechanism(SCRAM).make_auth_info("svc-pw", salt=b"s" * 16)
    )
    auth = UpstreamAuthenticator("svc", "svc-pw")
    initial = unframe(auth.on_request(10, b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00") or b"")
    mechanism, _, rest = initial.partition(b"\x00")
    assert mechanism == b"SCRAM-SHA-256"
    (length,) = struct.unpack("!i", rest[:4])
    assert length == len(rest) - 4
    assert rest[4:].startswith(b"n,,")  # never channel binding
    server.set_client_first(rest[4:].decode())
    response = auth.on_request(11, server.get_server_first().encode())
    server.set_client_final(unframe(response or b"").decode())
    assert auth.on_request(12, server.get_server_final().encode()) is None
    assert auth.on_request(0, b"") is None


def test_upstream_scram_refuses_a_server_that_cannot_prove_the_key() -> None:
    auth = UpstreamAuthenticator("svc", "svc-pw")
    client_first = unframe(auth.on_request(10, b"SCRAM-SHA-256\x00\x00") or b"")
    nonce = client_first.split(b",r=")[1].decode()
    salt = base64.b64encode(b"s" * 16).decode()
    auth.on_request(11, f"r={nonce}xyz,s={salt},i=4096".encode())
    forged = "v=" + base64.b64encode(b"f" * 32).decode()
    with pytest.raises(UpstreamUnavailable, match="SCRAM login to the upstream failed"):
        auth.on_request(12, forged.encode())


def test_upstream_ok_before_scram_finished_is_refused() -> None:
    auth = UpstreamAuthenticator("svc", "pw")
    auth.on_request(10, b"SCRAM-SHA-256\x00\x00")
    with pytest.raises(UpstreamUnavailable, match="skipped the end of SCRAM"):
        auth.on_request(0, b"")


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        (2, b"", "Kerberos V5"),
        (7, b"", "GSSAPI"),
        (9, b"", "SSPI"),
        (42, b"", "authentication method 42"),
        (10, b"SCRAM-SHA-256-PLUS\x00\x00", "offers SASL SCRAM-SHA-256-PLUS"),
        (10, b"\x00", "offers SASL nothing"),
        (11, b"r=x,s=y,i=4096", "SASLContinue before SASL"),
        (12, b"v=x", "SASLFinal before SASL"),
        (5, b"\x01\x02", "malformed MD5"),
    ],
)
def test_upstream_refuses_what_it_cannot_do(code: int, body: bytes, expected: str) -> None:
    with pytest.raises(UpstreamUnavailable, match=expected) as info:
        UpstreamAuthenticator("svc", "pw").on_request(code, body)
    assert info.value.sqlstate == "08006"


@pytest.mark.parametrize(("code", "body"), [(3, b""), (5, b"salt"), (10, b"SCRAM-SHA-256\x00\x00")])
def test_upstream_needs_a_password_for_password_methods(code: int, body: bytes) -> None:
    with pytest.raises(UpstreamUnavailable, match="none is configured"):
        UpstreamAuthenticator("svc", None).on_request(code, body)
