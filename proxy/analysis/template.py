"""Literal templates: one analysis for statements that differ only in their values.

Strategy: psql and simple-protocol applications inline their values
(`WHERE email = 'ann@example.com'`), so each text is new to the verdict cache
and would cost a full analysis. For a single SELECT, the literals that stand
in *value positions* (one side of a comparison with a column: `=`, `<>`, `<`,
`>`, `<=`, `>=`, LIKE/ILIKE, or the list of `col IN (...)`) are replaced by
parameters `$1..$n`, giving the *template*. The engine analyses the template
once, exactly as it analyses an extended-protocol statement with parameters,
and the rewritten text it would send is kept as segments around its `$k`.
A later statement with the same template gets that rewrite with its own
literals spliced back in, without analysis.

Why this cannot widen what a role may do: the template's verdict (rewrite,
verification) was reached without knowing the parameters' values, so it holds
for every value; a literal in a parameter's place is one such value, in the
same syntactic slot. Literals anywhere else (function arguments, casts such as
`'customers'::regclass`, LIMIT, SET, ...) may matter to the analysis, so they
stay part of the template's text and are analysed as they are. A statement
that already holds parameters, holds more than one statement, or is not a
SELECT is not templated. A template the engine refuses is not used: the
statement is analysed with its literals (its own verdict, refusal or not).

Offsets: libpg_query's parse tree gives byte offsets, its scanner (through
pglast) gives character offsets; both are taken as characters after mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from pglast import parser

# Comparison operators whose constant operand is a plain value.
_VALUE_OPERATORS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">=", "~~", "!~~", "~~*", "!~~*"})
_OPERATOR_KINDS = frozenset({"AEXPR_OP", "AEXPR_LIKE", "AEXPR_ILIKE"})
_LITERAL_TOKENS = frozenset({"SCONST", "ICONST", "FCONST"})
_VALUE_KEYS = ("sval", "ival", "fval")  # a NULL or boolean constant is not templated


@dataclass(frozen=True, slots=True)
class Shape:
    """A statement split into its template text and its value literals (source text)."""

    template: str
    literals: tuple[str, ...]


def shape_of(sql: str) -> Shape | None:
    """The template of `sql`, or None when it has no value literal or is not templated."""
    try:
        tree = orjson.loads(parser.parse_sql_json(sql))
    except (parser.ParseError, ValueError):
        return None
    stmts = tree.get("stmts") or []
    if len(stmts) != 1 or "SelectStmt" not in stmts[0].get("stmt", {}):
        return None
    locations: list[int] = []
    if not _collect(tree, locations) or not locations:
        return None
    starts = _char_offsets(sql, locations)
    tokens = {t.start: t.end for t in parser.scan(sql) if t.name in _LITERAL_TOKENS}
    pieces: list[str] = []
    literals: list[str] = []
    at = 0
    for start in sorted(set(starts)):
        end = tokens.get(start)
        if end is None:  # e.g. a negative number (its location is the sign): left as it is
            continue
        pieces.append(sql[at:start])
        literals.append(sql[start : end + 1])
        pieces.append(f"${len(literals)}")
        at = end + 1
    if not literals:
        return None
    pieces.append(sql[at:])
    return Shape("".join(pieces), tuple(literals))


def _collect(node: Any, found: list[int]) -> bool:
    """Add the locations of value literals under `node`; False if it holds a parameter."""
    if isinstance(node, list):
        return all(_collect(item, found) for item in node)
    if not isinstance(node, dict):
        return True
    if "ParamRef" in node:
        return False
    expr = node.get("A_Expr")
    if expr is not None:
        found.extend(_value_literals(expr))
    return all(_collect(value, found) for value in node.values())


def _value_literals(expr: dict[str, Any]) -> Iterator[int]:
    names = expr.get("name") or []
    if len(names) != 1 or names[0].get("String", {}).get("sval") not in _VALUE_OPERATORS:
        return
    left, right = expr.get("lexpr"), expr.get("rexpr")
    if expr.get("kind") in _OPERATOR_KINDS:
        for const, other in ((left, right), (right, left)):
            location = _value_const(const)
            if location is not None and isinstance(other, dict) and "ColumnRef" in other:
                yield location
    elif expr.get("kind") == "AEXPR_IN" and isinstance(left, dict) and "ColumnRef" in left:
        items = (right or {}).get("List", {}).get("items", [])
        locations = [_value_const(item) for item in items]
        if items and all(loc is not None for loc in locations):
            yield from (loc for loc in locations if loc is not None)


def _value_const(node: object) -> int | None:
    const = node.get("A_Const") if isinstance(node, dict) else None
    if not isinstance(const, dict) or not any(k in const for k in _VALUE_KEYS):
        return None
    location = const.get("location")
    return location if isinstance(location, int) else None


def _char_offsets(sql: str, byte_offsets: list[int]) -> list[int]:
    if sql.isascii():
        return byte_offsets
    raw = sql.encode()
    return [len(raw[:offset].decode(errors="replace")) for offset in byte_offsets]


@dataclass(frozen=True, slots=True)
class Filler:
    """A rewritten template as text segments around parameter numbers."""

    segments: tuple[str, ...]  # len(params) + 1 pieces
    params: tuple[int, ...]  # 1-based parameter number between segments[i] and segments[i+1]

    def fill(self, literals: tuple[str, ...]) -> str:
        out = [self.segments[0]]
        for number, segment in zip(self.params, self.segments[1:], strict=True):
            out.append(literals[number - 1])
            out.append(segment)
        return "".join(out)


def filler_of(rewritten: str, count: int) -> Filler | None:
    """Split the rewrite of a template with `count` parameters; None if it is not usable."""
    segments: list[str] = []
    params: list[int] = []
    at = 0
    for token in parser.scan(rewritten):
        if token.name != "PARAM":
            continue
        number = int(rewritten[token.start + 1 : token.end + 1])
        if not 1 <= number <= count:
            return None
        segments.append(rewritten[at : token.start])
        params.append(number)
        at = token.end + 1
    segments.append(rewritten[at:])
    return Filler(tuple(segments), tuple(params))
