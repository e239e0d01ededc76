"""The client-side limiter keeps every window of a second within the quota, across threads."""

import random
import threading
from collections.abc import Callable

import pytest

from bot.aliyun.ratelimit import BOOKING_TTL, RateLimiter, SlotLater, deferring
from bot.clock import ManualClock


def calls_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_bursts_up_to_the_quota_then_waits_for_the_window():
    clock = ManualClock()
    limiter = RateLimiter({"BatchCheckDeviceNames": 10}, clock, margin=0, spacing=0)
    times = []
    for _ in range(35):
        limiter.acquire("BatchCheckDeviceNames")
        times.append(clock.monotonic())
    assert times[:10] == [0.0] * 10
    assert calls_in_any_window(times, 1.0) == 10
    assert times[-1] == pytest.approx(3.0)  # 35 calls at 10/s: the last at t=3 s, no sooner, no later


def test_a_burst_is_spread_over_a_fifth_of_its_window_once_and_the_rate_stays_the_quota():
    """Slots a fifth of a slot's time apart: the first window's ten calls go over 0.19 s, not at one
    instant, and every later window is as full as without the spacing."""
    clock = ManualClock()
    limiter = RateLimiter({"BatchCheckDeviceNames": 10}, clock)  # the default margin 0.05 and spacing 0.2
    times = []
    for _ in range(35):
        limiter.acquire("BatchCheckDeviceNames")
        times.append(clock.monotonic())
    assert times[:10] == pytest.approx([0.021 * k for k in range(10)])  # a slot's time is 1.05 / 10 s
    assert times[10:12] == pytest.approx([1.05, 1.071])
    assert calls_in_any_window(times, 1.0) == 10  # the platform's second
    assert times[-1] == pytest.approx(3 * 1.05 + 0.084)  # the first window's spread, once


def test_actions_have_separate_quotas_and_unknown_actions_pass():
    clock = ManualClock()
    limiter = RateLimiter({"BatchCheckDeviceNames": 1, "QueryPageByApplyId": 50}, clock, margin=0)
    limiter.acquire("BatchCheckDeviceNames")
    assert limiter.acquire("QueryPageByApplyId") == 0
    assert limiter.acquire("SomethingElse") == 0
    assert limiter.acquire("BatchCheckDeviceNames") == pytest.approx(1.0)


def test_fractional_quota_means_one_call_per_period():
    clock = ManualClock()
    limiter = RateLimiter({"BatchRegisterDevice": 0.5}, clock, margin=0)
    assert limiter.acquire("BatchRegisterDevice") == 0
    assert limiter.acquire("BatchRegisterDevice") == pytest.approx(2.0)
    assert limiter.quota("BatchRegisterDevice") == pytest.approx(0.5)


def test_margin_stretches_the_window():
    clock = ManualClock()
    limiter = RateLimiter({"QueryBatchRegisterDeviceStatus": 2}, clock, margin=0.1, spacing=0)
    limiter.acquire("QueryBatchRegisterDeviceStatus")
    limiter.acquire("QueryBatchRegisterDeviceStatus")
    assert limiter.acquire("QueryBatchRegisterDeviceStatus") == pytest.approx(1.1)


class FrozenClock(ManualClock):
    """Time stands still and sleeping returns at once: each slot a limiter hands out is now + wait."""

    def sleep(self, seconds: float) -> None:
        pass


def test_threads_share_the_quota():
    clock = FrozenClock()
    limiter = RateLimiter({"QueryBatchRegisterDeviceStatus": 30}, clock, margin=0, spacing=0)
    slots: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker():
        start.wait()
        for _ in range(25):
            wait = limiter.acquire("QueryBatchRegisterDeviceStatus")
            with lock:
                slots.append(wait)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 200 calls from 8 threads at 30/s: 30 in each second, and the last 20 in the seventh.
    assert len(slots) == 200
    assert calls_in_any_window(slots, 1.0) == 30
    assert sorted(slots) == [float(k // 30) for k in range(200)]


def test_quota_must_be_positive():
    with pytest.raises(ValueError, match="above 0"):
        RateLimiter({"BatchRegisterDevice": 0})


CHECK = "BatchCheckDeviceNames"


def test_a_deferring_caller_books_its_slot_and_takes_it_later_instead_of_sleeping():
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 2}, clock, margin=0, spacing=0)
    limiter.acquire(CHECK)
    limiter.acquire(CHECK)  # the quota of the first second is spent
    booked = {}
    for holder in ("r1", "r2", "r3"):
        with deferring(holder, patience=0.1), pytest.raises(SlotLater) as later:
            limiter.acquire(CHECK)
        booked[holder] = later.value.wait
    assert clock.monotonic() == 0.0  # nobody slept
    assert booked == {"r1": 1.0, "r2": 1.0, "r3": 2.0}  # booked in order, two to a second

    clock.advance(0.5)
    with deferring("r1", patience=0.1), pytest.raises(SlotLater) as early:
        limiter.acquire(CHECK)
    assert early.value.wait == pytest.approx(0.5)  # came back early: the same slot, still ahead

    clock.advance(0.45)
    sent = [0.0, 0.0]
    with deferring("r1", patience=0.1):
        assert limiter.acquire(CHECK) == pytest.approx(0.05)  # back a little early: waits out the rest
    sent.append(clock.monotonic())
    with deferring("r2", patience=0.1):
        assert limiter.acquire(CHECK) == 0.0
    sent.append(clock.monotonic())
    # Someone who waits gets the slot after the booked ones, not one of theirs.
    assert limiter.acquire(CHECK) == pytest.approx(1.0)
    sent.append(clock.monotonic())
    with deferring("r3", patience=0.1):
        assert limiter.acquire(CHECK) == 0.0
    sent.append(clock.monotonic())
    assert sent == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert calls_in_any_window(sent, 1.0) == 2


def test_a_short_wait_within_patience_is_slept_not_booked():
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 1}, clock, margin=0)
    limiter.acquire(CHECK)
    clock.advance(0.95)
    with deferring("r1", patience=0.1):
        assert limiter.acquire(CHECK) == pytest.approx(0.05)
    assert clock.monotonic() == pytest.approx(1.0)


def test_a_booking_missed_by_more_than_half_a_window_is_replaced_by_a_new_slot():
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 1}, clock, margin=0.1)  # one call in any 1.1 s
    limiter.acquire(CHECK)
    with deferring("r1", patience=0.1), pytest.raises(SlotLater) as later:
        limiter.acquire(CHECK)
    assert later.value.wait == pytest.approx(1.1)
    clock.advance(1.1 + 0.04)  # late, but within half the margin: still its slot
    with deferring("r1", patience=0.1):
        assert limiter.acquire(CHECK) == 0.0
    with deferring("r2", patience=0.1), pytest.raises(SlotLater):
        limiter.acquire(CHECK)  # booked for 2.2
    with deferring("r3", patience=0.1), pytest.raises(SlotLater):
        limiter.acquire(CHECK)  # booked for 3.3, counted from r2's slot
    clock.advance(2.8 - 1.14)  # at 2.8: 0.6 s past r2's slot, more than half a window: too late to move it
    with deferring("r2", patience=0.1), pytest.raises(SlotLater) as again:
        limiter.acquire(CHECK)
    assert again.value.wait == pytest.approx(4.4 - 2.8)  # the missed slot still counts; a new one after r3's
    assert limiter.missed == {CHECK: 1} and limiter.moved == {}


def test_a_holder_late_by_under_half_a_window_takes_its_slot_late():
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 1}, clock, margin=0.1)
    limiter.acquire(CHECK)
    with deferring("r1", patience=0.1), pytest.raises(SlotLater):
        limiter.acquire(CHECK)  # booked for 1.1
    clock.advance(1.6)
    with deferring("r1", patience=0.1):
        assert limiter.acquire(CHECK) == 0.0  # 0.5 s late, under half the window (0.55 s): it goes now
    assert limiter.missed == {} and limiter.moved == {CHECK: 1}
    assert limiter.acquire(CHECK) == pytest.approx(1.1)  # the next one counts from when it went


def test_a_holder_that_never_comes_back_is_forgotten():
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 100}, clock, margin=0)
    for _ in range(100):
        limiter.acquire(CHECK)
    for k in range(100):
        with deferring(f"gone-{k}", patience=0.1), pytest.raises(SlotLater):
            limiter.acquire(CHECK)
    clock.advance(BOOKING_TTL + 5)
    for k in range(10):
        with deferring(f"new-{k}", patience=0.1):
            limiter.acquire(CHECK)
    assert len(limiter._booked) == 0  # noqa: SLF001 - the stale bookings went with the next call


class Oversleeping(ManualClock):
    """Each sleep lasts ``extra`` seconds longer than asked, the way a busy machine wakes a thread
    late; ``meanwhile`` runs during the next sleep (another thread's call)."""

    def __init__(self, extra: float) -> None:
        super().__init__()
        self.extra = extra
        self.woken: list[float] = []
        self.meanwhile: Callable[[], None] | None = None

    def sleep(self, seconds: float) -> None:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()
        self.advance(seconds + self.extra)
        self.woken.append(self.monotonic())


def test_a_call_woken_too_late_for_its_slot_moves_it_and_its_lanes_next_slot_after_it():
    clock = Oversleeping(extra=0.3)
    limiter = RateLimiter({CHECK: 1}, clock, margin=0.1)
    limiter.acquire(CHECK)

    def step_books_the_next_slot() -> None:
        with deferring("r1", patience=0.1), pytest.raises(SlotLater):
            limiter.acquire(CHECK)

    clock.meanwhile = step_books_the_next_slot  # while the call waits for its slot at 1.1, r1 books 2.2
    limiter.acquire(CHECK)
    # Woken at 1.4: sent then, it would put two calls in the second before r1's. It goes, its slot
    # counted from 1.4, and r1's moves to 2.5: the lateness costs 0.3 s, not a slot.
    assert clock.woken[-1] == pytest.approx(1.4)
    assert limiter.missed == {} and limiter.moved == {CHECK: 1}
    clock.advance(2.2 - clock.monotonic())
    with deferring("r1", patience=0.1), pytest.raises(SlotLater) as later:
        limiter.acquire(CHECK)  # r1 comes for its slot as booked and reads it again
    assert later.value.wait == pytest.approx(0.3)


def test_a_late_holder_whose_slot_is_among_the_latest_moves_it_to_now_and_loses_no_slot():
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 3}, clock, margin=0, spacing=0)
    sent = [clock.monotonic() for _ in range(3) if limiter.acquire(CHECK) == 0.0]
    for holder in ("r1", "r2", "r3"):
        with deferring(holder, patience=0.1), pytest.raises(SlotLater):
            limiter.acquire(CHECK)  # all three booked for 1.0
    clock.advance(1.0)
    for holder in ("r2", "r3"):
        with deferring(holder, patience=0.1):
            assert limiter.acquire(CHECK) == 0.0  # on time
        sent.append(clock.monotonic())
    clock.advance(0.2)  # r1 comes 0.2 s late, after two slots were handed out after its own
    with deferring("r1", patience=0.1):
        assert limiter.acquire(CHECK) == 0.0  # its slot moves to now
    sent.append(clock.monotonic())
    assert limiter.missed == {} and limiter.moved == {CHECK: 1}
    # The next ones count from the slots as they went: r2's and r3's 1.0, and r1's 1.2.
    booked = []
    for holder in ("r4", "r5", "r6"):
        with deferring(holder, patience=0.1), pytest.raises(SlotLater) as later:
            limiter.acquire(CHECK)
        booked.append(clock.monotonic() + later.value.wait)
    assert sorted(booked) == pytest.approx([2.0, 2.0, 2.2])
    assert calls_in_any_window(sent + booked, 1.0) == 3


def test_holders_coming_back_late_at_random_never_crowd_a_window_and_lose_no_slot():
    """Steps that book their slots and come back late by up to 0.45 s (a busy machine), at random:
    every window keeps to the quota, and no slot is lost while the lateness stays under half a
    window (:data:`bot.slots.MOVE_WITHIN`): each late one moves its slot and its lane's later ones."""
    for seed in range(5):
        rng = random.Random(seed)
        clock = ManualClock()
        limiter = RateLimiter({CHECK: 5}, clock, margin=0, spacing=0)
        due = [(0.0, k) for k in range(200)]  # (when the holder calls, holder)
        sent: list[float] = []
        lates: list[float] = []
        while due:
            due.sort()
            at, holder = due.pop(0)
            clock.advance(max(0.0, at - clock.monotonic()))
            try:
                with deferring(holder, patience=0):
                    limiter.acquire(CHECK)
            except SlotLater as later:
                late = 0.0 if rng.random() < 0.8 else rng.uniform(0, 0.45)
                lates.append(late)
                due.append((clock.monotonic() + later.wait + late, holder))
            else:
                sent.append(clock.monotonic())
        assert len(sent) == 200
        assert calls_in_any_window(sent, 1.0 - 1e-9) == 5
        assert limiter.missed == {} and limiter.moved[CHECK] > 20
        # Each late one costs its own lane the time it was late, not a slot (a window here):
        # 40 windows, and no more than the lateness of them all.
        assert 39.0 < max(sent) <= 39.0 + sum(lates) < 39.0 + sum(late > 0 for late in lates)


def test_a_call_answered_over_half_the_margin_after_its_slot_has_its_slot_counted_from_the_answer():
    """The platform counted the call at some moment before its answer: when that can have been
    later than half the margin after its slot, the call's lane keeps a full window, less half the
    margin, from the answer."""
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 1}, clock, margin=0.1)  # one call in any 1.1 s
    limiter.acquire(CHECK)
    clock.advance(0.04)
    limiter.went(CHECK)  # answered within half the margin (0.05 s): nothing to count again
    with deferring("r1", patience=0.1), pytest.raises(SlotLater):
        limiter.acquire(CHECK)  # booked for 1.1
    clock.advance(1.13 - clock.monotonic())
    with deferring("r1", patience=0.1):
        assert limiter.acquire(CHECK) == 0.0  # 30 ms late: within half the margin, it goes
    clock.advance(0.04)  # the answer takes 40 ms
    # ... and comes 70 ms after the slot: the platform may have counted it as late as that, more than
    # the margin allows for; the slot counts from half the margin before the answer, 1.12.
    limiter.went(CHECK)
    with deferring("r2", patience=0.1), pytest.raises(SlotLater) as later:
        limiter.acquire(CHECK)
    assert clock.monotonic() + later.value.wait == pytest.approx(1.12 + 1.1)
    assert limiter.missed == {} and limiter.moved == {}


class SlowAnswers:
    """A quota keeper (as the database) on its own clock, 1000 s ahead of the process's: each
    booking is a slot every 0.1 s, and its answer takes ``way_back`` seconds to come back."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.way_back = 0.0
        self.next_start = 1001.0
        self.starts: list[float] = []

    def quotas(self) -> dict[str, float]:
        return {CHECK: 10}

    def book_slot(self, action, margin, retake=None, spacing=0.0):
        from bot.store import Slot

        now = 1000.0 + self.clock.monotonic()
        start, self.next_start = self.next_start, self.next_start + 0.1
        self.starts.append(start)
        self.clock.advance(self.way_back)  # the answer on its way back
        return Slot(start - now, start, 10, False, len(self.starts))

    def slot_went(self, action, ticket, at, margin):
        self.starts[ticket - 1] = max(self.starts[ticket - 1], at)

    def slot_of(self, action, ticket):
        from bot.store import Slot

        start = self.starts[ticket - 1]
        return Slot(start - 1000.0 - self.clock.monotonic(), start, 10, False, ticket)

    def close(self) -> None:
        pass


def test_a_late_calls_slot_counted_on_the_databases_clock_and_a_database_gone_leaves_the_call_alone(caplog):
    from bot.aliyun.ratelimit import SharedRateLimiter
    from bot.store import StoreUnavailable

    clock = ManualClock()
    keeper = SlowAnswers(clock)
    limiter = SharedRateLimiter(keeper, clock, margin=0.1, spacing=0)
    with deferring("r1"), pytest.raises(SlotLater):
        limiter.acquire(CHECK)  # its slot at 1001.0 on the database's clock, 1.0 on this one
    clock.advance(1.02)  # 20 ms late: within half the margin
    with deferring("r1"):
        limiter.acquire(CHECK)
    clock.advance(0.06)
    limiter.went(CHECK)  # answered 80 ms after the slot
    assert keeper.starts[0] == pytest.approx(1001.03)  # the answer less half the margin, on the database's clock
    keeper.slot_went = lambda *args: (_ for _ in ()).throw(StoreUnavailable("the database is down"))
    with deferring("r2", patience=0.01), pytest.raises(SlotLater) as later:
        limiter.acquire(CHECK)
    clock.advance(later.value.wait)
    with deferring("r2", patience=0.01):
        limiter.acquire(CHECK)
    clock.advance(0.1)
    limiter.went(CHECK)  # the call went: a database gone meanwhile is a warning, not the call's failure
    assert "the database is down" in caplog.text


def test_a_slot_booked_in_the_database_is_placed_by_the_clocks_offset_not_by_a_slow_answers_arrival():
    """On a busy machine an answer can take as long as the margin to come back: a slot counted
    from its arrival would be sent that late. The offset of the two clocks comes from the fastest
    recent booking (as NTP does), so a slow answer's slot still starts on time."""
    from bot.aliyun.ratelimit import SharedRateLimiter

    clock = ManualClock()
    keeper = SlowAnswers(clock)
    limiter = SharedRateLimiter(keeper, clock, margin=0, spacing=0)
    with deferring("r1"), pytest.raises(SlotLater) as fast:
        limiter.acquire(CHECK)  # a prompt answer: the offset is known to within nothing
    assert fast.value.wait == pytest.approx(1.0)
    keeper.way_back = 0.04
    with deferring("r2"), pytest.raises(SlotLater) as slow:
        limiter.acquire(CHECK)  # said "in 1.1 s" 40 ms before the answer came
    assert clock.monotonic() == pytest.approx(0.04)
    assert slow.value.wait == pytest.approx(1.06)  # not 1.1: the slot is at 1.1 on this clock too
    clock.advance(1.06)
    with deferring("r2"):
        assert limiter.acquire(CHECK) == pytest.approx(0.0, abs=1e-9)  # on time for its slot: nothing missed
    assert limiter.missed == {}


def test_holding_a_slot_before_the_call_books_it_once_and_the_call_takes_that_slot():
    """A step asks for its check's slot before it reads the names to check: if the slot is later
    than its patience it comes back then, having read nothing; the call itself takes the held slot,
    not another one."""
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 1}, clock, margin=0, spacing=0)
    limiter.acquire(CHECK)  # the first second's one call
    with deferring("r1", patience=0.1), pytest.raises(SlotLater) as later:
        limiter.hold(CHECK)
    assert later.value.wait == pytest.approx(1.0)
    with deferring("r2", patience=0.1), pytest.raises(SlotLater) as after:
        limiter.hold(CHECK)
    assert after.value.wait == pytest.approx(2.0)  # r1's slot is taken
    clock.advance(0.95)
    with deferring("r1", patience=0.1):
        limiter.hold(CHECK)  # within its patience now: held, nothing raised
        assert limiter.acquire(CHECK) == pytest.approx(0.05)  # the held slot, not a new one at 3.0
    assert clock.monotonic() == pytest.approx(1.0) and limiter.missed == {}
    limiter.hold(CHECK)  # outside a deferring block: nothing to hold for anyone
    assert limiter.acquire(CHECK) == pytest.approx(2.0)  # after r2's slot at 2.0: r2 still holds it
