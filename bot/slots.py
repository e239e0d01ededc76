"""The schedule of one action's slots: the rule every limiter books by.

The in-process limiter (:class:`bot.aliyun.ratelimit.RateLimiter`) and the SQLite store keep a
:class:`Schedule` in memory or in a row; PostgreSQL's ``iotreg_book_ticket`` is its SQL twin, and the
stores' contract tests hold the two to the same answers.

Every slot is a numbered **ticket**, handed out in order. Under a quota of *N* calls per window,
the tickets fall into *N* lanes, each lane's slots at least a window apart, and a new ticket goes
into the lane that has room soonest. That is enough for the platform's count: any *N + 1* slots
include two of one lane, which are a window apart, so no window holds more than *N*.

A call counts from when it really went, not from when it was meant to:

* A holder woken late for its slot (a busy machine) **moves** the slot to now and goes at once, as
  long as it is less than :data:`MOVE_WITHIN` of a window late (later than that, its slot is lost
  and it books a new one).
* A call answered more than half the margin (:func:`slack_of`) after its slot may have been
  counted by the platform later than the margin allows for: its slot is counted from the answer,
  less half the margin (:meth:`Schedule.went`).

Either way the later slots of its lane move as far as they must to stay a window apart, and the
next tickets go to the lanes that have room sooner: lateness costs a share of the time it lasted,
not a slot, and the calls of its lane keep their window. A slot booked ahead is read again by its
holder (:meth:`Schedule.slot_of`) once it can no longer move: a move reaches it only from a slot of
its lane a window before it, at most ``MOVE_WITHIN`` of a window after that one's time, so a slot
read less than a window less that before its time is settled (:func:`settled_within`). (A call
whose answer comes later still moves its lane all the same, for the slots not yet settled.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

#: The latest start of a lane never used.
FREE = float("-inf")

#: A late holder moves its slot if it comes within this share of a window after the slot's time;
#: later than that, its slot is lost (still counted) and it books a new one.
MOVE_WITHIN = 0.5


def window_of(qps: float, margin: float) -> tuple[int, float]:
    """``(calls, seconds)``: at most ``calls`` slots in any window of ``seconds`` (a quota under 1/s,
    0.5, means one call per 2 s; above it, ``floor(qps)`` calls in any ``floor(qps) / qps``
    seconds: N calls in any second for a whole quota), lengthened by the ``margin``."""
    calls = max(1, math.floor(qps))
    return calls, calls / qps * (1 + margin)


def slack_of(qps: float, margin: float) -> float:
    """Half the margin of a window: how late a call may be counted after its slot's time."""
    _, window = window_of(qps, margin)
    return window / (1 + margin) * margin / 2


def settled_within(qps: float, margin: float) -> float:
    """Seconds before its time from which a slot can no longer move (see the module's docstring)."""
    return window_of(qps, margin)[1] * (1 - MOVE_WITHIN)


class Booked(NamedTuple):
    """A ticket's slot: it starts at ``start``; ``moved``: a late holder's slot moved to now, rather
    than a new ticket."""

    start: float
    ticket: int
    moved: bool = False


@dataclasses.dataclass
class Schedule:
    """The slots still of use of one action: ``starts`` of tickets ``last - len(starts) + 1`` to
    ``last``, in ticket order (every slot still to come or late enough to move), the ``lanes`` they
    are in, the latest start of each lane (``lane_last``, :data:`FREE` for a lane never used), and
    the start the last ticket was booked at (``spaced``)."""

    starts: list[float] = dataclasses.field(default_factory=list)
    last: int = 0
    lanes: list[int] = dataclasses.field(default_factory=list)
    lane_last: list[float] = dataclasses.field(default_factory=list)
    #: The start the last ticket was booked at (a move since does not count): the spacing's mark.
    spaced: float = FREE

    @property
    def first(self) -> int:
        return self.last - len(self.starts) + 1

    def book(self, now: float, qps: float, margin: float, spacing: float = 0.0, retake: int | None = None) -> Booked:
        """The next ticket's slot, in the lane that has room soonest; or ``retake``'s own moved to
        ``now`` if it is late by less than :data:`MOVE_WITHIN` of a window (its lane's later slots
        moved as far as they must).

        With a ``spacing`` above 0, a new slot starts no sooner than that share of a slot's time
        (``window / calls``) after the last ticket's, as it was booked: a lane moved since holds up
        only its own slots."""
        calls, window = window_of(qps, margin)
        self._fit(calls)
        self._forget(now - window)
        starts = self.starts
        if retake is not None and self.first <= retake <= self.last:
            i = retake - self.first
            if now <= starts[i] + window * MOVE_WITHIN:
                start = max(starts[i], now)
                self.went(retake, now, qps, margin)
                return Booked(start, retake, moved=True)
        lane = min(range(calls), key=self.lane_last.__getitem__)
        start = max(now, self.lane_last[lane] + window)
        if spacing > 0:
            start = max(start, self.spaced + window / calls * spacing)
        self.spaced = start
        starts.append(start)
        self.lanes.append(lane)
        self.lane_last[lane] = start
        self.last += 1
        return Booked(start, self.last)

    def went(self, ticket: int, at: float, qps: float, margin: float) -> bool:
        """Ticket ``ticket``'s call went at ``at``, later than its slot: the slot is counted from
        then, and its lane's later slots move as far as they must. ``False`` if it is no longer kept."""
        if not self.first <= ticket <= self.last:
            return False
        _, window = window_of(qps, margin)
        starts, lanes, i = self.starts, self.lanes, ticket - self.first
        if at <= starts[i]:
            return True
        starts[i] = previous = at
        for j in range(i + 1, len(starts)):
            if lanes[j] == lanes[i]:
                starts[j] = previous = max(starts[j], previous + window)
        if lanes[i] < len(self.lane_last):
            self.lane_last[lanes[i]] = max(self.lane_last[lanes[i]], previous)
        else:  # a lane of a quota since lowered: every lane waits for it
            self.lane_last = [max(last, previous) for last in self.lane_last]
        return True

    def slot_of(self, ticket: int) -> float | None:
        """When ``ticket``'s slot starts now, or ``None`` if it is no longer kept (too late to move)."""
        if self.first <= ticket <= self.last:
            return self.starts[ticket - self.first]
        return None

    def _fit(self, calls: int) -> None:
        """``calls`` lanes. A quota raised adds lanes, each busy until its latest kept slot (a lane
        of an earlier, higher quota may still hold some: every slot of the last window is kept); one
        lowered keeps the first ``calls`` lanes, each busy until the latest slot of any: the slots
        booked under the old quota go first."""
        if len(self.lane_last) < calls:
            for lane in range(len(self.lane_last), calls):
                self.lane_last.append(max((s for s, k in zip(self.starts, self.lanes) if k == lane), default=FREE))
        elif len(self.lane_last) > calls:
            self.lane_last = [max(self.lane_last)] * calls

    def _forget(self, before: float) -> None:
        """Drop the oldest slots that started before ``before``: a window ago, too old to move or
        to hold up a lane."""
        drop = 0
        while drop < len(self.starts) and self.starts[drop] < before:
            drop += 1
        if drop:
            del self.starts[:drop]
            del self.lanes[:drop]
