"""Client-side QPS limiting, so that iotreg stays inside IoT Platform's per-account quotas.

The platform counts calls per action per account and refuses the excess with ``Throttling.User``.
Waiting here costs less than being refused: a refused call has to be retried after a back-off that
is longer than the wait would have been.

Both limiters keep, per action, the starts of the last *N* slots handed out, and give a new one only
when the oldest of them is at least a window old: so no window of that length ever holds more than
*N* calls, whatever the threads do. (A booked slot, below, may be used up to half the margin late:
then the guarantee is for a window of a second and half the margin, still longer than the
platform's second.) Callers reserve their slot and wait outside any lock, so waiting threads queue
in order and do not spin.

* :class:`RateLimiter` keeps the slots in this process: the quotas of one process (SQLite, the CLI).
* :class:`SharedRateLimiter` books each slot in the database that several replicas share
  (PostgreSQL): one atomic statement reserves the next slot on the database's clock and answers how
  long to wait, with the quota stored there (IOT_QPS of any replica), so N replicas together stay
  within the account's quotas, served first come, first served.

A caller with better things to do than wait can say so with :func:`deferring`: a call that would
wait longer than the caller's patience books its slot and raises :class:`SlotLater` instead of
sleeping, and the same caller's call of that action at the booked time takes the booked slot. The
workflow's steps do this, so that a scheduler worker never sleeps through a queue of checks while
other requests have calls to make. The booking is kept in the process: its slot is counted already.
Its holder comes back :attr:`SlotLater.lead` seconds before the slot and waits out the rest: the
lead covers what a step does before its call (a scheduler's wake, a lease, a few reads) on a busy
machine, so that the call still goes within half the margin of its slot. By default the patience is
the time of :data:`PATIENCE_SLOTS` slots of the action (at most :data:`MAX_PATIENCE`), and the lead
half of it: at most that many calls' worth of waiting per action across every replica.

Slots of one action are at least :data:`SPACING` of a slot's time apart: the first window's calls
do not all go at the same instant (where a busy machine would send some of them late, and the
platform could count them in the next window), at the cost of a fraction of one slot's time once.

One in-process limiter serves the whole process: :func:`shared_limiter` hands every client for the
same account the same instance. Name the account by something that does not change: temporary (STS)
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
from typing import TYPE_CHECKING, NamedTuple, Protocol

from bot.clock import Clock, SystemClock

if TYPE_CHECKING:
    from bot.store import Slot

#: Requests leave the client in order but reach the server with a little jitter; counting a window as
#: a little longer than a second keeps two calls from landing in the same server-side second.
DEFAULT_MARGIN = 0.05

#: How often a call woken too late for its slot books another before it goes all the same.
WAKE_ATTEMPTS = 3

#: A booking not taken up within this many seconds of its time is forgotten (its holder went away).
BOOKING_TTL = 60.0

#: A deferring caller's default patience: the time of this many of the action's slots...
PATIENCE_SLOTS = 5
#: ... but no more than this many seconds (checks at 10 QPS: 0.5 s, woken 0.25 s before the slot).
MAX_PATIENCE = 0.5

#: Two slots of one action start at least this share of a slot's time (window / calls) apart.
SPACING = 0.2

#: The database's clock is read against this process's from the fastest of the latest this many
#: bookings ...
OFFSET_SAMPLES = 32
#: ... made within this many seconds (clocks drift; NTP slews them).
OFFSET_SAMPLES_FOR = 60.0

_deferring: ContextVar[tuple[Hashable, float | None] | None] = ContextVar("iotreg_deferring", default=None)

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


class _Booking(NamedTuple):
    """A reserved slot: ``at`` on this process's monotonic clock, ``ref`` as its keeper knows it."""

    at: float
    ref: float
    retaken: bool = False


class SlotLater(Exception):
    """A call would have waited ``wait`` seconds for its slot; the slot is booked for its holder, who
    should come back ``lead`` seconds before it (and wait out the rest)."""

    def __init__(self, action: str, wait: float, lead: float = 0.0) -> None:
        super().__init__(f"{action}: next slot in {wait:.2f}s")
        self.action = action
        self.wait = wait
        self.lead = lead

    @property
    def come_back(self) -> float:
        """Seconds from now when the holder should call again."""
        return max(0.0, self.wait - self.lead)


@contextlib.contextmanager
def deferring(holder: Hashable, patience: float | None = None) -> Iterator[None]:
    """Within this block, a call that would wait over ``patience`` seconds raises :class:`SlotLater`
    (by default the action's own: :data:`PATIENCE_SLOTS` slots, at most :data:`MAX_PATIENCE`).

    ``holder`` names who comes back for the booked slot (a request): one booking per holder and action.
    """
    token = _deferring.set((holder, patience))
    try:
        yield
    finally:
        _deferring.reset(token)


class QuotaKeeper(Protocol):
    """Where every replica books its slots: a database that all of them share (see :class:`SharedRateLimiter`)."""

    def quotas(self) -> dict[str, float]:
        """The stored quotas, QPS per action."""

    def book_slot(self, action: str, margin: float, retake: float | None = None, spacing: float = 0.0) -> Slot | None:
        """Reserve the next slot of ``action`` (or take back ``retake``, the last one handed out)."""

    def close(self) -> None: ...


class Limiter:
    """What both limiters share: the bookings of :func:`deferring` callers, kept in this process.

    A subclass says how a slot is reserved (:meth:`_reserve`) and how late a booked one may be used.
    """

    def __init__(self, clock: Clock | None, margin: float, spacing: float) -> None:
        self._clock = clock or SystemClock()
        self.margin = margin
        self.spacing = spacing
        self._lock = threading.Lock()  # the bookings
        self._booked: dict[tuple[str, Hashable], _Booking] = {}
        #: Slots whose call came too late to use them (a booking's holder, or a call woken late), per
        #: action: each one a slot lost.
        self.missed: Counter[str] = Counter()

    def quota(self, action: str) -> float | None:
        """Calls per second allowed for ``action``, or ``None`` if it is not limited."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the limiter holds (a database it opened)."""

    def patience(self, action: str) -> float:
        """How long a deferring caller waits for a slot of ``action`` before it books it for later."""
        qps = self.quota(action)
        return MAX_PATIENCE if qps is None else min(MAX_PATIENCE, PATIENCE_SLOTS / qps)

    def _reserve(self, action: str, retake: float | None) -> _Booking | None:
        """The next slot of ``action``, or ``None`` if it is not limited. ``retake``: the ``ref`` of a
        booked slot whose holder is late; if no slot was handed out after it, it moves to now and
        comes back with ``retaken``."""
        raise NotImplementedError

    def _late(self, action: str) -> float:
        """How late a booked slot may still be used: half the margin, so that the call still lands
        in its own server-side window."""
        raise NotImplementedError

    def acquire(self, action: str) -> float:
        """Wait until a call of ``action`` may go; return how long it waited (0 if not at all).

        Inside :func:`deferring`, raise :class:`SlotLater` instead of waiting longer than its patience.
        """
        slot = self._take(action)
        if slot is None:
            return 0.0
        now = self._clock.monotonic()
        waited, wakes = 0.0, 0
        while True:
            wait = slot.at - now
            if wait > 0:
                self._clock.sleep(wait)
                waited += wait
            now, wakes = self._clock.monotonic(), wakes + 1
            if now - slot.at <= self._late(action) or wakes == WAKE_ATTEMPTS:
                return waited
            # Woken too late (a busy machine): sent now, the call could crowd the next slot's
            # window. It takes its slot back if none was handed out since, else a new one.
            late = slot
            slot = self._reserve(action, late.ref) or late
            self._count_missed(action, late, slot)

    def hold(self, action: str) -> None:
        """Inside :func:`deferring`: make sure the holder has a slot of ``action`` booked, and raise
        :class:`SlotLater` if it is further off than the patience. A step calls this before it
        prepares the call (reads the names), so that a step that must come back later has not read
        them for nothing; the call's own :meth:`acquire` then takes the booked slot."""
        deferring_ = _deferring.get()
        if deferring_ is None:
            return
        slot = self._take(action)
        if slot is not None:
            with self._lock:
                self._booked[(action, deferring_[0])] = slot

    def _take(self, action: str) -> _Booking | None:
        """The caller's slot of ``action`` (``None``: not limited): inside :func:`deferring`, its
        holder's booked one while it is still in time; else a new one. A slot further off than the
        holder's patience stays booked for it, and :class:`SlotLater` is raised."""
        deferring_ = _deferring.get()
        booked = None
        if deferring_ is not None:
            holder, patience_ = deferring_
            booked = self._booking(action, holder)
        now = self._clock.monotonic()
        if booked is not None and now - booked.at <= self._late(action):
            slot = booked
        else:
            # A holder that comes later than that books a new slot, unless its slot is the last
            # one handed out: then it simply moves to now.
            reserved = self._reserve(action, booked.ref if booked is not None else None)
            if reserved is None:
                return None
            slot = reserved
            self._count_missed(action, booked, slot)
            now = self._clock.monotonic()
        if deferring_ is not None:
            patience = self.patience(action) if patience_ is None else patience_
            if slot.at - now > patience:
                with self._lock:
                    self._booked[(action, holder)] = slot
                raise SlotLater(action, slot.at - now, patience / 2)
        return slot

    def _count_missed(self, action: str, booked: _Booking | None, slot: _Booking) -> None:
        if booked is not None and not slot.retaken:
            with self._lock:
                self.missed[action] += 1  # its slot stays counted, and a new one is reserved

    def _booking(self, action: str, holder: Hashable) -> _Booking | None:
        with self._lock:
            if len(self._booked) > 64:
                now = self._clock.monotonic()
                for key in [k for k, b in self._booked.items() if b.at < now - BOOKING_TTL]:
                    del self._booked[key]
            return self._booked.pop((action, holder), None)


class RateLimiter(Limiter):
    """At most ``quotas[action]`` calls per second for each action, across the threads of this process."""

    def __init__(
        self, quotas: Mapping[str, float], clock: Clock | None = None, *, margin: float = DEFAULT_MARGIN, spacing: float = SPACING
    ) -> None:
        super().__init__(clock, margin, spacing)
        self._slots: dict[str, tuple[int, float]] = {}
        self._granted: dict[str, deque[float]] = {}
        self._slots_lock = threading.Lock()
        for action, qps in quotas.items():
            if qps <= 0:
                raise ValueError(f"the quota for {action} must be above 0, not {qps}")
            # A quota under 1/s (0.5) means one call per 2 s; above it, N calls in any second.
            calls = max(1, math.floor(qps))
            self._slots[action] = (calls, calls / qps * (1 + margin))
            self._granted[action] = deque()

    def quota(self, action: str) -> float | None:
        if action not in self._slots:
            return None
        calls, window = self._slots[action]
        return calls / window

    def _late(self, action: str) -> float:
        _, window = self._slots[action]
        return window / (1 + self.margin) * self.margin / 2

    def _reserve(self, action: str, retake: float | None) -> _Booking | None:
        if action not in self._slots:
            return None
        calls, window = self._slots[action]
        granted = self._granted[action]
        with self._slots_lock:
            now = self._clock.monotonic()
            if retake is not None and granted and granted[-1] == retake:
                granted[-1] = now  # no slot was handed out after it
                return _Booking(now, now, retaken=True)
            start = now if len(granted) < calls else max(now, granted[0] + window)
            if self.spacing > 0 and granted:
                start = max(start, granted[-1] + window / calls * self.spacing)
            granted.append(start)
            if len(granted) > calls:
                granted.popleft()
        return _Booking(start, start)


class SharedRateLimiter(Limiter):
    """The quotas of an account shared by every replica that books its slots in one ``keeper``.

    Each call books its slot in the keeper (one statement: one round trip to PostgreSQL), which
    counts the slots of every replica against the quotas stored there and answers how long to wait,
    on its own clock: replicas whose clocks disagree still agree on the schedule, and take their
    turns in the order they asked. A booking of :func:`deferring` is kept in this process, its slot
    being counted in the keeper already: a holder gone for good costs one slot, nothing more.
    """

    def __init__(
        self, keeper: QuotaKeeper, clock: Clock | None = None, *, margin: float = DEFAULT_MARGIN, spacing: float = SPACING,
        owns_keeper: bool = False,
    ) -> None:
        super().__init__(clock, margin, spacing)
        self.keeper = keeper
        self._owns_keeper = owns_keeper  # opened for this limiter alone: closed with it
        self._quotas: dict[str, float] = {}
        # The latest bookings' (round trip, database clock less this one's, when): see _local_time.
        self._offsets: deque[tuple[float, float, float]] = deque(maxlen=OFFSET_SAMPLES)
        self._offsets_lock = threading.Lock()

    def quota(self, action: str) -> float | None:
        """As of the last booking of ``action`` here (any replica may change the stored quota)."""
        if action not in self._quotas:
            self._quotas.update(self.keeper.quotas())
        qps = self._quotas.get(action)
        return None if qps is None else qps / (1 + self.margin)

    def close(self) -> None:
        if self._owns_keeper:
            self.keeper.close()

    def _late(self, action: str) -> float:
        qps = self._quotas[action]  # known: the booking came from a reservation
        return max(1, math.floor(qps)) / qps * self.margin / 2

    def _reserve(self, action: str, retake: float | None) -> _Booking | None:
        asked = self._clock.monotonic()
        slot = self.keeper.book_slot(action, self.margin, retake, self.spacing)
        if slot is None:
            return None
        answered = self._clock.monotonic()
        self._quotas[action] = slot.qps
        return _Booking(self._local_time(slot, asked, answered), slot.start, slot.retaken)

    def _local_time(self, slot: Slot, asked: float, answered: float) -> float:
        """When ``slot`` starts on this process's clock.

        The database said "in ``wait`` seconds" at a moment between ``asked`` and ``answered``:
        counting from ``answered`` would put every slot late by the answer's way back, which on a
        busy machine is as long as the margin. So, as NTP does, the offset between the two clocks
        is taken from the recent booking that came back fastest (its error at most half its round
        trip), and the slot is placed by it, within what this booking itself allows."""
        server_now = slot.start - slot.wait
        with self._offsets_lock:
            self._offsets.append((answered - asked, server_now - (asked + answered) / 2, answered))
            fresh = [o for o in self._offsets if o[2] >= answered - OFFSET_SAMPLES_FOR]
            _, offset, _ = min(fresh)
        return min(max(slot.start - offset, asked + slot.wait), answered + slot.wait)


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
