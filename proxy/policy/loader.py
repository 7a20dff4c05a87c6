"""Policy loader: read a policy file and validate it into frozen objects.

Strategy: the bytes are decoded and composed with positions (`marked`), the
`validate.Checker` walks the plain data collecting every fault as
`file:line:col: dotted.key: message`, and only a fault-free document becomes
a `Policy`. Collecting every fault before raising lets `pgwarden check` show
them all at once; a reload that fails leaves the old policy in place.

Rules:
* No I/O beyond reading the one file; `parse_policy` does none at all.
* `version_hash` is the first 16 hex digits of the SHA-256 of the exact bytes,
  so a comment change is a new version in the logs.
* The YAML helpers are re-exported here for proxy/settings.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import MappingProxyType

from proxy.errors import ConfigError
from proxy.policy.marked import (
    MarkedDocument,
    Position,
    YamlError,
    YamlPath,
    compose_marked,
    dotted,
    where,
)
from proxy.policy.model import ColumnRule, Limits, Policy, Role
from proxy.policy.validate import SUPPORTED_VERSION, Checker

__all__ = [
    "SUPPORTED_VERSION",
    "ColumnRule",
    "Limits",
    "MarkedDocument",
    "Policy",
    "PolicyError",
    "Position",
    "Role",
    "YamlError",
    "YamlPath",
    "compose_marked",
    "dotted",
    "load_marked",
    "load_policy",
    "parse_policy",
    "where",
]


class PolicyError(ConfigError):
    """A policy file is invalid; `errors` holds one `file:line:col: message` per fault."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("policy", "; ".join(errors))
        self.errors = list(errors)
        self.message = "\n".join(self.errors)

    def __str__(self) -> str:
        return self.message


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; raises PolicyError listing every fault."""
    return load_marked(path)[0]


def load_marked(path: Path) -> tuple[Policy, MarkedDocument]:
    """Like load_policy, also returning the positions (for `pgwarden check --schema`)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return _parse(raw, path)


def parse_policy(raw: bytes, *, source: Path) -> Policy:
    """Validate policy bytes read from `source` (named in messages); no I/O."""
    return _parse(raw, source)[0]


def _parse(raw: bytes, source: Path) -> tuple[Policy, MarkedDocument]:
    try:
        doc = compose_marked(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    except YamlError as exc:
        raise PolicyError([f"{where(source, exc.position)}: {exc.message}"]) from None
    checker = Checker(source, doc)
    classify, roles = checker.check()
    if checker.errors:
        raise PolicyError(checker.errors)
    policy = Policy(
        source=source,
        version_hash=hashlib.sha256(raw).hexdigest()[:16],
        roles=MappingProxyType(roles),
        version=SUPPORTED_VERSION,
        classify=MappingProxyType({t: MappingProxyType(c) for t, c in classify.items()}),
        decoys=MappingProxyType(dict(checker.decoys)),
    )
    return policy, doc
