"""The client-side limiter keeps every window of a second within the quota, across threads."""

import threading

import pytest

from bot.aliyun.ratelimit import RateLimiter
from bot.clock import ManualClock


def calls_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_bursts_up_to_the_quota_then_waits_for_the_window():
    clock = ManualClock()
    limiter = RateLimiter({"BatchCheckDeviceNames": 10}, clock, margin=0)
    times = []
    for _ in range(35):
        limiter.acquire("BatchCheckDeviceNames")
        times.append(clock.monotonic())
    assert times[:10] == [0.0] * 10
    assert calls_in_any_window(times, 1.0) == 10
    assert times[-1] == pytest.approx(3.0)  # 35 calls at 10/s: the last at t=3 s, no sooner, no later


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
    limiter = RateLimiter({"QueryBatchRegisterDeviceStatus": 2}, clock, margin=0.1)
    limiter.acquire("QueryBatchRegisterDeviceStatus")
    limiter.acquire("QueryBatchRegisterDeviceStatus")
    assert limiter.acquire("QueryBatchRegisterDeviceStatus") == pytest.approx(1.1)


class FrozenClock(ManualClock):
    """Time stands still and sleeping returns at once: each slot a limiter hands out is now + wait."""

    def sleep(self, seconds: float) -> None:
        pass


def test_threads_share_the_quota():
    clock = FrozenClock()
    limiter = RateLimiter({"QueryBatchRegisterDeviceStatus": 30}, clock, margin=0)
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
