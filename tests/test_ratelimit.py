"""The client-side limiter keeps every window of a second within the quota, across threads."""

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


def test_a_booking_missed_by_more_than_the_margin_is_replaced_by_a_new_slot():
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 1}, clock, margin=0.1)
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
    clock.advance(1.5)  # at 2.64: far past r2's slot; sending now could crowd r3's window
    with deferring("r2", patience=0.1), pytest.raises(SlotLater) as again:
        limiter.acquire(CHECK)
    assert again.value.wait == pytest.approx(4.4 - 2.64)  # the missed slot still counts; a new one after r3's
    assert limiter.missed == {CHECK: 1}


def test_a_late_holder_whose_slot_is_the_last_one_handed_out_takes_it_late():
    clock = ManualClock()
    limiter = RateLimiter({CHECK: 1}, clock, margin=0.1)
    limiter.acquire(CHECK)
    with deferring("r1", patience=0.1), pytest.raises(SlotLater):
        limiter.acquire(CHECK)  # booked for 1.1
    clock.advance(1.6)
    with deferring("r1", patience=0.1):
        assert limiter.acquire(CHECK) == 0.0  # nobody was given a slot after it
    assert limiter.missed == {}
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


def test_a_call_woken_too_late_for_its_slot_takes_it_back_if_it_is_still_the_last_one():
    clock = Oversleeping(extra=0.3)
    limiter = RateLimiter({CHECK: 1}, clock, margin=0.1)
    limiter.acquire(CHECK)
    limiter.acquire(CHECK)  # its slot at 1.1, woken at 1.4: nobody has a slot after it, it goes
    assert clock.woken == [pytest.approx(1.4)] and limiter.missed == {}
    limiter.acquire(CHECK)  # the next one counts from when it went
    assert clock.woken[-1] == pytest.approx(1.4 + 1.1 + 0.3)


def test_a_call_woken_too_late_for_its_slot_books_another_rather_than_crowd_the_next_window():
    clock = Oversleeping(extra=0.3)
    limiter = RateLimiter({CHECK: 1}, clock, margin=0.1)
    limiter.acquire(CHECK)

    def step_books_the_next_slot() -> None:
        with deferring("r1", patience=0.1), pytest.raises(SlotLater):
            limiter.acquire(CHECK)

    clock.meanwhile = step_books_the_next_slot  # while the call sleeps for its slot at 1.1, r1 books 2.2
    limiter.acquire(CHECK)
    # Woken at 1.4, with r1's slot at 2.2 counted from its own: sent then, it would put two calls in
    # the second before r1's. It books 3.3 instead (woken at 3.6: late again, but the last slot).
    assert clock.woken == [pytest.approx(1.4), pytest.approx(3.6)]
    assert limiter.missed == {CHECK: 1}


class SlowAnswers:
    """A quota keeper (as the database) on its own clock, 1000 s ahead of the process's: each
    booking is a slot every 0.1 s, and its answer takes ``way_back`` seconds to come back."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.way_back = 0.0
        self.next_start = 1001.0

    def quotas(self) -> dict[str, float]:
        return {CHECK: 10}

    def book_slot(self, action, margin, retake=None, spacing=0.0):
        from bot.store import Slot

        now = 1000.0 + self.clock.monotonic()
        start, self.next_start = self.next_start, self.next_start + 0.1
        self.clock.advance(self.way_back)  # the answer on its way back
        return Slot(start - now, start, 10)

    def close(self) -> None:
        pass


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
