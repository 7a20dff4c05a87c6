"""The schema snapshot: what relations and columns exist upstream, frozen.

Strategy: the network layer reads the upstream catalog once (proxy/net/catalog.py)
and builds a `Snapshot`; analysis resolves every relation name against it and never
against the client's session. A reload swaps the whole snapshot.

Rules:
* Name resolution is pinned: an unqualified name is looked up in pg_catalog first
  (as PostgreSQL does) and then in `search_path`, never in pg_temp or a schema the
  client chose. Rewritten statements name every relation with its schema, so the
  client's search_path cannot change what a statement reads.
* Catalog relations (pg_catalog, information_schema) are known by name only; user
  relations also carry their columns (in attnum order) and primary key.
* A snapshot serialises to JSON and back, so `pgwarden explain` and `pgwarden test`
  can run without a database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

CATALOG_SCHEMAS = ("pg_catalog", "information_schema")
DEFAULT_SEARCH_PATH = ("public",)

# relkind letters of pg_class that a statement can read from
KIND_NAMES = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
}


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    attnum: int
    type: str  # format_type() text, e.g. "text", "numeric(10,2)"


@dataclass(frozen=True, slots=True)
class Relation:
    schema: str
    name: str
    kind: str  # a pg_class relkind letter, see KIND_NAMES
    oid: int = 0
    columns: tuple[Column, ...] = ()
    primary_key: tuple[str, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, name: str) -> Column | None:
        for column in self.columns:
            if column.name == name:
                return column
        return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    relations: Mapping[tuple[str, str], Relation]
    search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH
    # names of functions defined outside the catalog schemas: an unqualified call of
    # such a name might not reach the built-in, so it is refused
    user_functions: frozenset[str] = frozenset()
    _by_oid: Mapping[int, Relation] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_oid = {r.oid: r for r in self.relations.values() if r.oid}
        object.__setattr__(self, "relations", MappingProxyType(dict(self.relations)))
        object.__setattr__(self, "_by_oid", MappingProxyType(by_oid))

    @classmethod
    def of(
        cls,
        relations: Iterable[Relation],
        search_path: Iterable[str] = DEFAULT_SEARCH_PATH,
        user_functions: Iterable[str] = (),
    ) -> Snapshot:
        return cls(
            {(r.schema, r.name): r for r in relations},
            tuple(search_path),
            frozenset(user_functions),
        )

    def resolve(self, schema: str | None, name: str) -> Relation | None:
        """The relation a (possibly unqualified) name denotes under the pinned path."""
        if schema is not None:
            return self.relations.get((schema, name))
        for candidate in ("pg_catalog", *self.search_path):
            found = self.relations.get((candidate, name))
            if found is not None:
                return found
        return None

    def by_oid(self, oid: int) -> Relation | None:
        return self._by_oid.get(oid)

    def user_relations(self) -> list[Relation]:
        return [r for r in self.relations.values() if r.schema not in CATALOG_SCHEMAS]

    # --- JSON ------------------------------------------------------------------

    def to_json(self) -> str:
        """Deterministic JSON, one relation per line, sorted (snapshot files diff well)."""
        rows = []
        for r in sorted(self.relations.values(), key=lambda r: (r.schema, r.name)):
            row: dict[str, Any] = {"schema": r.schema, "name": r.name, "kind": r.kind}
            if r.oid:
                row["oid"] = r.oid
            if r.columns:
                row["columns"] = [[c.name, c.attnum, c.type] for c in r.columns]
            if r.primary_key:
                row["primary_key"] = list(r.primary_key)
            rows.append(json.dumps(row, ensure_ascii=False))
        head = json.dumps(list(self.search_path))
        functions = json.dumps(sorted(self.user_functions))
        body = ",\n  ".join(rows)
        return (
            f'{{"search_path": {head},\n "user_functions": {functions},\n'
            f' "relations": [\n  {body}\n ]}}\n'
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        data: dict[str, Any] = json.loads(text)
        rels = [
            Relation(
                schema=str(r["schema"]),
                name=str(r["name"]),
                kind=str(r["kind"]),
                oid=int(r.get("oid", 0)),
                columns=tuple(Column(str(n), int(a), str(t)) for n, a, t in r.get("columns", ())),
                primary_key=tuple(str(c) for c in r.get("primary_key", ())),
            )
            for r in data["relations"]
        ]
        return cls.of(
            rels,
            data.get("search_path", DEFAULT_SEARCH_PATH),
            (str(f) for f in data.get("user_functions", ())),
        )
