"""`pgwarden trace`: whose per-user hash key produced the hashes found in a leaked file.

Strategy: a column that a role shows as `{mask: hash, per_user: true}` is hashed
under a key derived from the configured key and the user's name
(proxy/analysis/masks.py, `per_user_key`). Given the hashes found in a file (any
text: every run of exactly 16 hex digits is a candidate), the raw values of those
columns (read by the command line as the service account) and the candidate users,
each user's hash of each raw value is computed and looked up in the set of leaked
hashes. The user whose key explains most of them is the likely source.

Rules:
* Pure: no I/O here; the command line reads the file and the database.
* Raw values never leave this module: the result holds counts and column names only.
* Hashes are compared as their 8 raw bytes (`hmac.digest`, no hex per value):
  68,000 values x 20 users is about 1.4 million HMACs, a second or two.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.analysis.masks import per_user_key
from proxy.policy.model import ANY_TAG, Policy

_TOKEN = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{16}(?![0-9A-Fa-f])")


def hashes_in(text: str) -> set[bytes]:
    """Every 16-hex-digit token of `text`, as the 8 bytes it stands for."""
    return {bytes.fromhex(token) for token in _TOKEN.findall(text)}


def per_user_columns(policy: Policy) -> list[str]:
    """`schema.table.column` of every column some role hashes per user, sorted."""
    found: set[str] = set()
    for role in policy.roles.values():
        for table, columns in policy.classify.items():
            for column, tag in columns.items():
                rule = role.columns.get(tag) or role.columns.get(ANY_TAG)
                if rule is not None and rule.mask == "hash" and rule.per_user:
                    found.add(f"{table}.{column}")
    return sorted(found)


def candidates(policy: Policy) -> list[str]:
    """Members of every role with a per-user hash, sorted."""
    users = {
        user
        for role in policy.roles.values()
        if any(rule.per_user for rule in role.columns.values())
        for user in role.members
    }
    return sorted(users)


@dataclass
class Attribution:
    """How many of the leaked hashes one user's key produced, and from which columns."""

    user: str
    matched: int = 0
    by_column: dict[str, int] = field(default_factory=dict)


def attribute(
    leaked: set[bytes],
    values: Mapping[str, Sequence[bytes]],
    users: Iterable[str],
    key: bytes,
) -> list[Attribution]:
    """Each user's matches (users with none included), best first."""
    results = []
    for user in users:
        user_key = per_user_key(key, user)
        seen: set[bytes] = set()
        result = Attribution(user)
        for column, raw in values.items():
            hits = 0
            for value in raw:
                digest = hmac.digest(user_key, value, "sha256")[:8]
                if digest in leaked and digest not in seen:
                    seen.add(digest)
                    hits += 1
            if hits:
                result.by_column[column] = hits
        result.matched = len(seen)
        results.append(result)
    return sorted(results, key=lambda r: (-r.matched, r.user))


def report(results: Sequence[Attribution], leaked: int) -> list[str]:
    """The lines `pgwarden trace` prints: matching users, best first, then what is left."""
    lines = []
    explained: int = 0
    for result in results:
        if not result.matched:
            continue
        columns = ", ".join(f"{c}: {n}" for c, n in sorted(result.by_column.items()))
        lines.append(f"{result.user}: {result.matched} of {leaked} hashed values ({columns})")
        explained += result.matched
    unmatched = max(leaked - explained, 0)
    lines.append(f"unattributed: {unmatched} of {leaked} hashed values")
    return lines
