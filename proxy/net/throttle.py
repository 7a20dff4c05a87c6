"""Failed-login throttling: a client address that keeps failing is refused up front.

Strategy: each failed password (wrong password or unknown user; a user with
no role is not a guess) is recorded against the client's address with its
monotonic time. An address with `max_failures` failures within the last
`window_s` seconds is refused at its next connections before any SCRAM
exchange (cheap for pgwarden, useless for a guesser) until the oldest of those
failures leaves the window. Only addresses are counted, not user names: a
guesser must not be able to lock a colleague out by failing in their name.

Memory stays bounded: addresses whose failures have all left the window are
dropped by `prune` (run by the server's housekeeping), and at most
MAX_ADDRESSES are tracked (past that, the oldest entries go first). The count
is per process: with `--workers N` each worker keeps its own.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

MAX_ADDRESSES = 100_000


class LoginThrottle:
    """Failed logins per client address within a sliding window."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def failed(self, address: str, now: float | None = None) -> None:
        """A login from `address` failed on its password."""
        at = time.monotonic() if now is None else now
        times = self._failures.get(address)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.max_failures)
            if len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(address)
        times.append(at)

    def retry_in(self, address: str, now: float | None = None) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        times = self._failures.get(address)
        if times is None or len(times) < self.max_failures:
            return 0.0
        at = time.monotonic() if now is None else now
        return max(0.0, times[0] + self.window_s - at)

    def prune(self, now: float | None = None) -> None:
        """Forget addresses whose every failure has left the window."""
        at = time.monotonic() if now is None else now
        stale = [a for a, times in self._failures.items() if times[-1] + self.window_s <= at]
        for address in stale:
            del self._failures[address]
