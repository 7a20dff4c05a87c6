"""Masks as SQL expressions built from PostgreSQL built-ins only.

Strategy: a mask is a SQL template over one raw column, `{c}`, that the rewrite
projects in place of the column inside the derived table. Nothing has to be
installed in the customer database. Every template maps NULL to NULL and returns
text (redact keeps the column's type).

Rules:
* email: first character of the local part, then `***@domain` (`j***@example.com`);
  a value without `@` becomes its first character and `***`.
* last4: `***` and the last four characters; values of four characters or fewer
  become `***` (they would be shown whole otherwise).
* initials: the first letter of every word followed by a dot (`J. S.`).
* partial {first: N, last: M}: N leading and M trailing characters around `***`,
  `***` alone when the value is not longer than N + M.
* hash: HMAC-SHA-256 of the UTF-8 text under the configured key, computed with
  the built-in sha256(); the first 16 hex digits (64 bits) are shown. Equal
  values hash equally, so joins and count(DISTINCT) still work. The key reaches
  the database only inside the statement text (as the HMAC inner and outer pads).
* hash with per_user: the same, under a key derived from the configured key and the
  user's name (`per_user_key`), so two users' hashes of one value differ and a
  leaked file of hashes names whose key made it (`pgwarden trace`).
"""

from __future__ import annotations

import hashlib
import hmac

from proxy.policy.model import ColumnRule

_BLOCK = 64  # SHA-256 block size


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text(column: str) -> str:
    return f"CAST({quote_ident(column)} AS TEXT)"


def hmac_pads(key: bytes) -> tuple[str, str]:
    """The HMAC inner and outer pads of `key`, as hex."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in key).hex(), bytes(b ^ 0x5C for b in key).hex()


def mask_sql(rule: ColumnRule, column: str, column_type: str, hash_key: bytes | None) -> str:
    """The SQL expression that replaces `column` for a role with `rule`."""
    c = _text(column)
    if rule.action == "redact":
        return f"CAST(NULL AS {column_type})"
    mask = rule.mask
    if mask == "email":
        # = REGEXP_REPLACE(c, '^(.)[^@]*', '\1***'), without a regular expression (3x
        # faster): the first character, ***, then everything from the first @ after it.
        # Written as sqlglot writes it back, so the verifier finds the mask it expects.
        at = f"POSITION('@' IN SUBSTRING({c} FROM 2))"
        return (
            f"CASE WHEN {c} = '' THEN {c} ELSE LEFT({c}, 1) || '***' || "
            f"CASE WHEN {at} = 0 THEN '' ELSE SUBSTRING({c} FROM {at} + 1) END END"
        )
    if mask == "last4":
        return (
            f"CASE WHEN LENGTH({c}) > 4 THEN '***' || RIGHT({c}, 4) "
            f"WHEN NOT {c} IS NULL THEN '***' END"
        )
    if mask == "initials":
        return f"REGEXP_REPLACE({c}, '(\\w)\\w*', '\\1.', 'g')"
    if mask == "partial":
        first, last = rule.first or 0, rule.last or 0
        return (
            f"CASE WHEN LENGTH({c}) > {first + last} THEN LEFT({c}, {first}) || '***' || "
            f"RIGHT({c}, {last}) WHEN NOT {c} IS NULL THEN '***' END"
        )
    if mask == "hash":
        if hash_key is None:
            raise ValueError("the hash mask needs a key")
        inner, outer = hmac_pads(hash_key)
        digest = (
            f"SHA256(CAST('\\x{outer}' AS BYTEA) || SHA256(CAST('\\x{inner}' AS BYTEA) || "
            f"CONVERT_TO({c}, 'UTF8')))"
        )
        return f"LEFT(ENCODE({digest}, 'hex'), 16)"
    raise ValueError(f"unknown mask {mask!r}")


PER_USER_CONTEXT = b"pgwarden per-user hash\0"


def per_user_key(key: bytes, user: str) -> bytes:
    """The hash key of `user` for `hash: {per_user: true}`: HMAC(key, context || user)."""
    return hmac.new(key, PER_USER_CONTEXT + user.encode(), hashlib.sha256).digest()


def hash_value(value: str, key: bytes) -> str:
    """What the hash mask shows for `value` (for tests and `pgwarden trace`)."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]
