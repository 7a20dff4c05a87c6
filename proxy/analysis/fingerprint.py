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

import pglast
from pglast.parser import ParseError as PgParseError
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
    parts = []
    for token in tokens:  # pglast's scanner gives character offsets (not bytes)
        if token.name in _SKIP:
            continue
        parts.append("?" if token.name == "PARAM" else normalized[token.start : token.end + 1])
    return " ".join(parts)[:FINGERPRINT_MAX]


# --- replay: a fingerprint back into a statement with parameters -----------------------


def _not_a_statement(shape: str) -> str:
    if not shape:
        return "no fingerprint was recorded"
    if shape == UNPARSABLE:
        return "the statement could not be scanned when it was recorded"
    if len(shape) >= FINGERPRINT_MAX:
        return f"the fingerprint was cut at {FINGERPRINT_MAX} characters"
    return ""


def replay_text(shape: str) -> tuple[str, int] | str:
    """(the statement with `$1..$n` for each `?`, how many statements), or why not."""
    why = _not_a_statement(shape)
    if why:
        return why
    try:
        tokens = scan(shape)
    except PgParseError:
        return "the fingerprint cannot be scanned"
    pieces, at, n = [], 0, 0
    for token in tokens:  # character offsets
        if token.name == "Op" and shape[token.start : token.end + 1] == "?":
            n += 1
            pieces += [shape[at : token.start], f"${n}"]
            at = token.end + 1
    text = "".join(pieces) + shape[at:]
    try:
        statements = len(pglast.parse_sql(text))
    except PgParseError:
        return "a ? stands where no value can (an operator such as jsonb ?), or it does not parse"
    except RecursionError:
        return "the statement is nested too deeply"
    return text, statements
