"""Statement fingerprints for the audit log: the statement's shape, never its values.

Strategy: libpg_query's normalize replaces every constant with a parameter; the
scanner then drops comments (free text that may hold anything) and every parameter
(the client's and the constants') is written `?`. The result is cached per text:
a client repeats its statements, and the log gets one per statement.

Rules: a text libpg_query cannot scan yields "<unparsable>", never the text itself.
The fingerprint is cut at FINGERPRINT_MAX characters.
"""

from __future__ import annotations

from functools import lru_cache

from pglast.parser import normalize, scan

FINGERPRINT_MAX = 2000
UNPARSABLE = "<unparsable>"
_SKIP = frozenset({"SQL_COMMENT", "C_COMMENT"})


@lru_cache(maxsize=4096)
def fingerprint(sql: str) -> str:
    """`sql` with literals and parameters as `?` and comments dropped."""
    try:
        normalized = normalize(sql)
        tokens = scan(normalized)
    except Exception:  # noqa: BLE001 - any failure: say nothing of the text
        return UNPARSABLE
    raw = normalized.encode()
    parts = []
    for token in tokens:
        if token.name in _SKIP:
            continue
        parts.append("?" if token.name == "PARAM" else raw[token.start : token.end + 1].decode())
    return " ".join(parts)[:FINGERPRINT_MAX]
