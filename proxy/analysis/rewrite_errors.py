"""The refusal raised anywhere in analysis (kept apart to avoid import cycles)."""

from __future__ import annotations

DEFAULT_HINT = (
    "Restricted roles may read their tables through the policy's masks and run session "
    "commands; `pgwarden explain` shows why a statement is refused."
)


class Refusal(Exception):
    """The statement is refused; `message` is safe to show (no literal, no value)."""

    def __init__(
        self,
        message: str,
        hint: str = "",
        *,
        sqlstate: str = "42501",
        unknown_relation: bool = False,
    ) -> None:
        super().__init__(message)
        self.unknown_relation = unknown_relation
        self.message = message
        self.hint = hint or DEFAULT_HINT
        self.sqlstate = sqlstate
