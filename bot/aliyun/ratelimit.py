"""Client-side QPS limiting, so that iotreg stays inside IoT Platform's per-account quotas.

The platform counts calls per action per account and refuses the excess with ``Throttling.User``.
Waiting here costs less than being refused: a refused call has to be retried after a back-off that
is longer than the wait would have been.

:class:`RateLimiter` keeps, per action, the times of the last *N* calls it let through, and lets a
new one through only when the oldest of them is at least a window old: so no window of that length
ever holds more than *N* calls, whatever the threads do. Callers reserve their slot under the lock
and wait outside it, so waiting threads queue in order and do not spin.

One limiter serves the whole process: :func:`shared_limiter` hands every client for the same
account the same instance.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping

from bot.clock import Clock, SystemClock

#: Requests leave the client in order but reach the server with a little jitter; counting a window as
#: a little longer than a second keeps two calls from landing in the same server-side second.
DEFAULT_MARGIN = 0.05


class RateLimiter:
    """At most ``quotas[action]`` calls per second for each action, across all threads."""

    def __init__(self, quotas: Mapping[str, float], clock: Clock | None = None, *, margin: float = DEFAULT_MARGIN) -> None:
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._slots: dict[str, tuple[int, float]] = {}
        self._granted: dict[str, deque[float]] = {}
        for action, qps in quotas.items():
            if qps <= 0:
                raise ValueError(f"the quota for {action} must be above 0, not {qps}")
            # A quota under 1/s (0.5) means one call per 2 s; above it, N calls in any second.
            calls = max(1, math.floor(qps))
            self._slots[action] = (calls, calls / qps * (1 + margin))
            self._granted[action] = deque()

    def quota(self, action: str) -> float | None:
        """Calls per second allowed for ``action``, or ``None`` if it is not limited."""
        if action not in self._slots:
            return None
        calls, window = self._slots[action]
        return calls / window

    def acquire(self, action: str) -> float:
        """Wait until a call of ``action`` may go; return how long it waited (0 if not at all)."""
        if action not in self._slots:
            return 0.0
        calls, window = self._slots[action]
        with self._lock:
            now = self._clock.monotonic()
            granted = self._granted[action]
            start = now if len(granted) < calls else max(now, granted[0] + window)
            granted.append(start)
            if len(granted) > calls:
                granted.popleft()
        wait = start - now
        if wait > 0:
            self._clock.sleep(wait)
        return wait


_shared: dict[tuple[str, str], RateLimiter] = {}
_shared_lock = threading.Lock()


def shared_limiter(account: str, endpoint: str, quotas: Mapping[str, float], clock: Clock | None = None) -> RateLimiter:
    """The process-wide limiter for ``account`` at ``endpoint`` (created with ``quotas`` on first use)."""
    key = (account, endpoint)
    with _shared_lock:
        limiter = _shared.get(key)
        if limiter is None:
            limiter = _shared[key] = RateLimiter(quotas, clock)
        return limiter
