"""Client-side QPS limiting, so that iotreg stays inside IoT Platform's per-account quotas.

The platform counts calls per action per account and refuses the excess with ``Throttling.User``.
Waiting here costs less than being refused: a refused call has to be retried after a back-off that
is longer than the wait would have been.

:class:`RateLimiter` keeps, per action, the times of the last *N* calls it let through, and lets a
new one through only when the oldest of them is at least a window old: so no window of that length
ever holds more than *N* calls, whatever the threads do. (A booked slot, below, may be used up to
half the margin late: then the guarantee is for a window of a second and half the margin, still
longer than the platform's second.) Callers reserve their slot under the lock
and wait outside it, so waiting threads queue in order and do not spin.

A caller with better things to do than wait can say so with :func:`deferring`: a call that would
wait longer than the caller's patience books its slot and raises :class:`SlotLater` instead of
sleeping, and the same caller's call of that action at the booked time takes the booked slot. The
workflow's steps do this, so that a scheduler worker never sleeps through a queue of checks while
other requests have calls to make.

One limiter serves the whole process: :func:`shared_limiter` hands every client for the same
account the same instance. Name the account by something that does not change: temporary (STS)
credentials get a new AccessKeyId at every refresh, the account's quotas stay the same.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter, deque
from collections.abc import Hashable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType

from bot.clock import Clock, SystemClock

#: Requests leave the client in order but reach the server with a little jitter; counting a window as
#: a little longer than a second keeps two calls from landing in the same server-side second.
DEFAULT_MARGIN = 0.05

#: A booking not taken up within this many seconds of its time is forgotten (its holder went away).
BOOKING_TTL = 60.0

_deferring: ContextVar[tuple[Hashable, float] | None] = ContextVar("iotreg_deferring", default=None)

#: Per-account QPS quotas of the IoT Platform for the operations iotreg calls
#: (alibaba-iot-api.md, "Parameters and limits"). Every RAM user and process of an account shares them.
DEFAULT_QPS: Mapping[str, float] = MappingProxyType(
    {
        "BatchCheckDeviceNames": 10,
        "BatchRegisterDeviceWithApplyId": 500,
        "BatchRegisterDevice": 10,
        "QueryBatchRegisterDeviceStatus": 30,
        "QueryPageByApplyId": 50,
        "QueryProductList": 50,  # the product select of /devices register
    }
)


class SlotLater(Exception):
    """A call would have waited ``wait`` seconds for its slot; the slot is booked for its holder."""

    def __init__(self, action: str, wait: float) -> None:
        super().__init__(f"{action}: next slot in {wait:.2f}s")
        self.action = action
        self.wait = wait


@contextlib.contextmanager
def deferring(holder: Hashable, patience: float) -> Iterator[None]:
    """Within this block, a call that would wait over ``patience`` seconds raises :class:`SlotLater`.

    ``holder`` names who comes back for the booked slot (a request): one booking per holder and action.
    """
    token = _deferring.set((holder, patience))
    try:
        yield
    finally:
        _deferring.reset(token)


class RateLimiter:
    """At most ``quotas[action]`` calls per second for each action, across all threads."""

    def __init__(self, quotas: Mapping[str, float], clock: Clock | None = None, *, margin: float = DEFAULT_MARGIN) -> None:
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._slots: dict[str, tuple[int, float]] = {}
        self._granted: dict[str, deque[float]] = {}
        # How late a booked slot may still be used: half the margin, so that the call still lands
        # in its own server-side window. A holder that comes later books a new slot, unless its
        # slot is the last one handed out.
        self._late: dict[str, float] = {}
        self._booked: dict[tuple[str, Hashable], float] = {}
        #: Booked slots whose holder came back too late to use them, per action (each one a slot lost).
        self.missed: Counter[str] = Counter()
        for action, qps in quotas.items():
            if qps <= 0:
                raise ValueError(f"the quota for {action} must be above 0, not {qps}")
            # A quota under 1/s (0.5) means one call per 2 s; above it, N calls in any second.
            calls = max(1, math.floor(qps))
            self._slots[action] = (calls, calls / qps * (1 + margin))
            self._late[action] = calls / qps * margin / 2
            self._granted[action] = deque()

    def quota(self, action: str) -> float | None:
        """Calls per second allowed for ``action``, or ``None`` if it is not limited."""
        if action not in self._slots:
            return None
        calls, window = self._slots[action]
        return calls / window

    def acquire(self, action: str) -> float:
        """Wait until a call of ``action`` may go; return how long it waited (0 if not at all).

        Inside :func:`deferring`, raise :class:`SlotLater` instead of waiting longer than its patience.
        """
        if action not in self._slots:
            return 0.0
        deferring_ = _deferring.get()
        with self._lock:
            now = self._clock.monotonic()
            start = None
            if deferring_ is not None:
                holder, patience = deferring_
                start = self._take_booking(action, holder, now, patience)
            if start is None:
                start = self._reserve(action, now)
                if deferring_ is not None and start - now > patience:
                    self._booked[(action, holder)] = start
                    raise SlotLater(action, start - now)
        wait = start - now
        if wait > 0:
            self._clock.sleep(wait)
        return max(wait, 0.0)

    def _reserve(self, action: str, now: float) -> float:
        calls, window = self._slots[action]
        granted = self._granted[action]
        start = now if len(granted) < calls else max(now, granted[0] + window)
        granted.append(start)
        if len(granted) > calls:
            granted.popleft()
        return start

    def _take_booking(self, action: str, holder: Hashable, now: float, patience: float) -> float | None:
        """The holder's booked start, if it is usable now; raises SlotLater if it is still ahead."""
        if len(self._booked) > 64:
            for key in [k for k, at in self._booked.items() if at < now - BOOKING_TTL]:
                del self._booked[key]
        booked = self._booked.pop((action, holder), None)
        if booked is None:
            return None
        if now - booked > self._late[action]:
            granted = self._granted[action]
            if granted and granted[-1] == booked:
                granted[-1] = now  # no slot was handed out after it: it can simply move to now
                return now
            self.missed[action] += 1
            return None  # missed: its slot stays counted, and a new one is reserved
        if booked - now > patience:
            self._booked[(action, holder)] = booked
            raise SlotLater(action, booked - now)
        return booked


_shared: dict[tuple[str, str], RateLimiter] = {}
_shared_lock = threading.Lock()


def shared_limiter(account: str, endpoint: str, quotas: Mapping[str, float], clock: Clock | None = None) -> RateLimiter:
    """The process-wide limiter for ``account`` at ``endpoint`` (created with ``quotas`` on first use).

    ``account``: a stable name of the account (a long-lived AccessKeyId, or the credentials source)."""
    key = (account, endpoint)
    with _shared_lock:
        limiter = _shared.get(key)
        if limiter is None:
            limiter = _shared[key] = RateLimiter(quotas, clock)
        return limiter
