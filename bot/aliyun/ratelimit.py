"""Client-side QPS limiting, so that iotreg stays inside IoT Platform's per-account quotas.

The platform counts calls per action per account and refuses the excess with ``Throttling.User``.
Waiting here costs less than being refused: a refused call has to be retried after a back-off that
is longer than the wait would have been.

Both limiters book by one rule (:mod:`bot.slots`): each slot a numbered ticket in one of *N* lanes,
each lane's slots a window apart, so that no window ever holds more than *N* calls, whatever the
threads do. (A call may be counted up to half the margin after its slot: then the guarantee is for
a window of a second and half the margin, still longer than the platform's second.) Callers
reserve their slot and wait outside any lock, so waiting threads queue in order and do not spin.

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

A holder woken later than that (a busy machine) moves its slot to now, and the later slots of its
lane move with it, rather than lose it (only a holder later than :data:`bot.slots.MOVE_WITHIN` of a
window books a new slot, :attr:`Limiter.missed`); a call answered later than half the margin after
its slot has its slot counted from the answer, less half the margin (:meth:`Limiter.went`); and a
call refused with ``Throttling.User``, which the platform did not count, takes its slot back for its
retry (:meth:`Limiter.refused`). Lateness costs a share of the time it lasted, not a slot. A slot
booked further ahead than :func:`bot.slots.settled_within` is read again once it is that close,
before it is used: a late call of its lane may have moved it.

Slots of one action are at least :data:`SPACING` of a slot's time apart: the first window's calls
do not all go at the same instant (where a busy machine would send some of them late, and the
platform could count them in the next window), at the cost of a fraction of one slot's time once.

One in-process limiter serves the whole process: :func:`shared_limiter` hands every client for the
same account the same instance. Name the account by something that does not change: temporary (STS)
credentials get a new AccessKeyId at every refresh, the account's quotas stay the same.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Hashable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple, Protocol

from bot.clock import Clock, SystemClock
from bot.slots import Schedule, settled_within, slack_of, window_of

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

log = logging.getLogger(__name__)

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
    """A reserved slot: ``at`` on this process's monotonic clock, ``ref`` its ticket; ``retaken``: a
    late holder's slot moved; ``settled``: read close enough to its time that it can no longer move."""

    at: float
    ref: int
    retaken: bool = False
    settled: bool = True


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

    def book_slot(self, action: str, margin: float, retake: int | None = None, spacing: float = 0.0) -> Slot | None:
        """Reserve the next slot of ``action`` (or move ticket ``retake``'s to now)."""

    def slot_of(self, action: str, ticket: int) -> Slot | None:
        """Ticket ``ticket``'s slot of ``action`` as it stands now (``None``: no longer kept)."""

    def slot_went(self, action: str, ticket: int, at: float, margin: float) -> None:
        """Ticket ``ticket``'s call went at ``at``, later than its slot (see :meth:`Limiter.went`)."""

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
        #: Slots whose call came late and moved them to its time instead, per action.
        self.moved: Counter[str] = Counter()
        self._calls = threading.local()  # this thread's last call (action, slot), and a refused one

    def quota(self, action: str) -> float | None:
        """Calls per second allowed for ``action``, or ``None`` if it is not limited."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the limiter holds (a database it opened)."""

    def patience(self, action: str) -> float:
        """How long a deferring caller waits for a slot of ``action`` before it books it for later."""
        qps = self.quota(action)
        return MAX_PATIENCE if qps is None else min(MAX_PATIENCE, PATIENCE_SLOTS / qps)

    def _reserve(self, action: str, retake: int | None) -> _Booking | None:
        """The next slot of ``action``, or ``None`` if it is not limited. ``retake``: the ticket of a
        booked slot whose holder is late; if it is late by less than :data:`bot.slots.MOVE_WITHIN` of
        a window, it moves to now and comes back with ``retaken``."""
        raise NotImplementedError

    def _confirm(self, action: str, booked: _Booking) -> _Booking:
        """``booked`` as its slot stands now (a late holder of its lane may have moved it); as it was
        if it is no longer kept."""
        raise NotImplementedError

    def _settle(self, action: str) -> float:
        """Seconds before its time from which a slot of ``action`` can no longer move."""
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
            settle = self._settle(action)
            if not slot.settled and wait > settle:
                # Booked far ahead: a late holder of its lane may still move it. Read it again once
                # it cannot (a millisecond after, so that it is settled when read).
                pause = wait - settle + 0.001
                self._clock.sleep(pause)
                waited += pause
                slot = self._confirm(action, slot)
                now = max(self._clock.monotonic(), now + pause)
                continue
            if wait > 0:
                self._clock.sleep(wait)
                waited += wait
            now, wakes = self._clock.monotonic(), wakes + 1
            if now - slot.at <= self._late(action) or wakes == WAKE_ATTEMPTS:
                self._calls.last = (action, slot)
                return waited
            # Woken too late (a busy machine): sent now, the call could crowd the next slot's
            # window. Its slot moves to now (its lane's later ones after it), or if it is too late
            # for that, it books a new one.
            late = slot
            slot = self._reserve(action, late.ref) or late
            self._count_missed(action, late, slot)

    def went(self, action: str) -> None:
        """This thread's last call of ``action`` has been answered (or has failed). The platform
        counted it at some moment before the answer: if the answer came more than half the margin
        after the slot (a busy machine, on either side), that moment may have been later than the
        margin allows for, so the slot is counted from the answer less half the margin, and its
        lane's later slots move as far as they must. The next call of its lane then keeps its window
        from the call itself. The client calls this after every call (one more write, only then)."""
        last = getattr(self._calls, "last", None)
        if last is None or last[0] != action:
            return
        slot, at = last[1], self._clock.monotonic() - self._late(action)
        if at <= slot.at:
            return
        try:
            self._went(action, slot, at)
        except Exception as exc:  # noqa: BLE001 - the call went and stands; its slot stays as booked
            log.warning("could not count %s's slot from when its call went: %s", action, exc)
        self._calls.last = (action, slot._replace(at=at))

    def _went(self, action: str, slot: _Booking, at: float) -> None:
        """Count ``slot`` from ``at`` (this clock) on."""
        raise NotImplementedError

    def refused(self, action: str) -> None:
        """The platform refused this thread's last call of ``action`` (``Throttling.User``): it did
        not count it, so the call's retry takes the same slot back, moved to its time, rather than a
        new one at the end of the queue."""
        last = getattr(self._calls, "last", None)
        if last is not None and last[0] == action:
            self._calls.refused, self._calls.last = (action, last[1]), None

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
        refused = getattr(self._calls, "refused", None)
        if refused is not None and refused[0] == action:
            booked, self._calls.refused = refused[1], None  # a retry: the refused call's slot
        if deferring_ is not None:
            holder, patience_ = deferring_
            booked = booked or self._booking(action, holder)
            if booked is not None and not booked.settled:
                booked = self._confirm(action, booked)  # a late holder of its lane may have moved it
        now = self._clock.monotonic()
        if booked is not None and now - booked.at <= self._late(action):
            slot = booked
        else:
            # A holder that comes later than that moves its slot to now, or books a new one if it
            # is too late to move it.
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
        if booked is not None:
            with self._lock:
                if slot.retaken:
                    self.moved[action] += 1
                else:
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
        for action, qps in quotas.items():
            if qps <= 0:
                raise ValueError(f"the quota for {action} must be above 0, not {qps}")
        self._qps = dict(quotas)
        self._schedules = {action: Schedule() for action in quotas}
        self._slots_lock = threading.Lock()

    def quota(self, action: str) -> float | None:
        if action not in self._qps:
            return None
        calls, window = window_of(self._qps[action], self.margin)
        return calls / window

    def _late(self, action: str) -> float:
        return slack_of(self._qps[action], self.margin)

    def _settle(self, action: str) -> float:
        return settled_within(self._qps[action], self.margin)

    def _reserve(self, action: str, retake: int | None) -> _Booking | None:
        if action not in self._qps:
            return None
        with self._slots_lock:
            now = self._clock.monotonic()
            booked = self._schedules[action].book(now, self._qps[action], self.margin, self.spacing, retake)
        return _Booking(booked.start, booked.ticket, booked.moved, booked.start - now <= self._settle(action))

    def _went(self, action: str, slot: _Booking, at: float) -> None:
        with self._slots_lock:
            self._schedules[action].went(slot.ref, at, self._qps[action], self.margin)

    def _confirm(self, action: str, booked: _Booking) -> _Booking:
        with self._slots_lock:
            now = self._clock.monotonic()
            start = self._schedules[action].slot_of(booked.ref)
        if start is None:
            return booked._replace(settled=True)
        return booked._replace(at=start, settled=start - now <= self._settle(action))


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
        return slack_of(self._quotas[action], self.margin)  # known: the booking came from a reservation

    def _settle(self, action: str) -> float:
        return settled_within(self._quotas[action], self.margin)

    def _reserve(self, action: str, retake: int | None) -> _Booking | None:
        asked = self._clock.monotonic()
        slot = self.keeper.book_slot(action, self.margin, retake, self.spacing)
        if slot is None:
            return None
        answered = self._clock.monotonic()
        self._quotas[action] = slot.qps
        settled = slot.wait <= self._settle(action)
        return _Booking(self._local_time(slot, asked, answered), slot.ticket, slot.retaken, settled)

    def _confirm(self, action: str, booked: _Booking) -> _Booking:
        asked = self._clock.monotonic()
        slot = self.keeper.slot_of(action, booked.ref)
        if slot is None:
            return booked._replace(settled=True)
        answered = self._clock.monotonic()
        self._quotas[action] = slot.qps
        settled = slot.wait <= self._settle(action)
        return booked._replace(at=self._local_time(slot, asked, answered), settled=settled)

    def _went(self, action: str, slot: _Booking, at: float) -> None:
        offset = self._offset(at)
        if offset is not None:
            self.keeper.slot_went(action, slot.ref, at + offset, self.margin)

    def _offset(self, now: float) -> float | None:
        """The database's clock less this one's, from the recent booking that came back fastest."""
        with self._offsets_lock:
            fresh = [o for o in self._offsets if o[2] >= now - OFFSET_SAMPLES_FOR]
        return min(fresh)[1] if fresh else None

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
        offset = self._offset(answered)
        if offset is None:  # not so: this booking is a fresh sample
            offset = server_now - (asked + answered) / 2
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
