"""The registration workflow against the emulator over HTTP, on one ManualClock (no sleeping).

Each test reads as what an operator would see: the request's state, the notifications the front
end got, the devices that exist on the platform afterwards, and the audit trail.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.domain import Outcome, State
from bot.aliyun.client import Credentials, IotClient, RetryPolicy
from bot.aliyun.ratelimit import RateLimiter
from bot.config import DEFAULT_QPS
from bot.standins.emulator import Emulator, FaultPlan
from bot.jobs import InlineJobs
from bot.leases import LEASE_SECONDS
from bot.policy import Policy
from bot.domain import Conflict, NotAllowed, NotFound, Timing, WorkflowError
from bot.registration import Workflow
from bot.store import StoreUnavailable
from bot.store.sqlite import SqliteStore
from bot.domain import Event

ALICE, BOB, CAROL = "U0ALICE", "U0BOB", "U0CAROL"


@dataclass
class RecordingNotifier:
    """A front end that writes down what it is told, and can be made to fail."""

    events: list[Event] = field(default_factory=list)
    failures_left: int = 0

    def deliver(self, event: Event) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("front end unreachable")
        self.events.append(event)

    def kinds(self, request_id: int | None = None) -> list[str]:
        return [e.kind for e in self.events if request_id is None or e.request_id == request_id]


@dataclass
class Harness:
    emulator: Emulator
    db_path: Path
    timing: Timing
    notifier: RecordingNotifier = field(default_factory=RecordingNotifier)
    policy: Policy = field(default_factory=Policy)
    #: What the workflow sees of the store (a test may put something between them).
    wrap: Callable[[SqliteStore], Any] = lambda store: store

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        """(Re)build the bot's side over the same database file: what a restart does."""
        clock = self.emulator.clock
        self.client = IotClient(
            self.emulator.endpoint,
            Credentials(self.emulator.access_key_id, self.emulator.access_key_secret),
            clock=clock,
            limiter=RateLimiter(DEFAULT_QPS, clock),
            retry=RetryPolicy(max_attempts=4, deadline=30),
        )
        self.store = SqliteStore(self.db_path)
        self.workflow = Workflow(
            self.wrap(self.store), self.client, clock, self.timing,
            notifier=lambda _: self.notifier, jobs=lambda steps: InlineJobs(clock, steps), policy=self.policy,
        )
        self.jobs = self.workflow.jobs

    def restart(self) -> int:
        self.store.close()
        self.client.close()
        self.start()
        return self.workflow.resume()

    @property
    def clock(self):
        return self.emulator.clock

    def state(self, request_id: int) -> str:
        return self.store.get(request_id).state

    def run_until(self, request_id: int, *states: str) -> str:
        self.jobs.run_until(lambda: self.state(request_id) in states)
        self.jobs.run_due()  # deliver what the last step enqueued
        return self.state(request_id)

    def register_calls(self, request_id: int) -> list[int]:
        return [self.emulator.backend.application(c.apply_id).register_calls for c in self.store.chunks(request_id)]

    def platform_devices(self) -> set[str]:
        return {d.device_name for d in self.emulator.backend.devices(self.emulator.product_key)}


@pytest.fixture
def harness(emulator, tmp_path) -> Harness:
    return Harness(emulator, tmp_path / "iotreg.db", Timing(poll_interval=1.0, poll_max_interval=4.0, approval_ttl=3600, phase_timeout=600))


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(1, n + 1)]


def test_a_request_goes_from_names_to_registered_devices(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("meter", 5), origin="cli")
    assert request.state == State.CHECKING
    assert harness.run_until(request.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    assert harness.notifier.kinds() == ["created", "awaiting_approval"]
    assert harness.platform_devices() == set()  # nothing exists before approval

    harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert harness.notifier.kinds() == ["created", "awaiting_approval", "approved", "registering", "finished"]
    assert harness.platform_devices() == set(names("meter", 5))
    created = harness.store.devices(request.id, outcome=Outcome.CREATED)
    assert [d.name for d in created] == names("meter", 5) and all(d.iot_id for d in created)
    assert harness.register_calls(request.id) == [1]
    summary = harness.workflow.requests.summary(request.id)
    assert (summary.created, summary.failed, summary.invalid, summary.pending) == (5, 0, 0, 0)
    trail = [(e.actor, e.event) for e in harness.store.audit(request.id)]
    assert trail[0] == (ALICE, "requested") and (BOB, "approved") in trail and trail[-1] == ("iotreg", "registered")
    assert harness.store.get(request.id).decided_by == BOB


def test_more_names_than_a_chunk_take_one_approval_and_one_apply_id_per_chunk(harness):
    harness.timing = Timing(poll_interval=1.0, chunk_size=4)
    harness.start()
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("cam", 10), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    chunks = harness.store.chunks(request.id)
    assert [c.size for c in chunks] == [4, 4, 2] and len({c.apply_id for c in chunks}) == 3
    harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert harness.register_calls(request.id) == [1, 1, 1]
    assert harness.platform_devices() == set(names("cam", 10))
    assert harness.notifier.kinds().count("awaiting_approval") == 1 and harness.notifier.kinds().count("finished") == 1


def test_the_checks_of_a_many_part_request_are_sent_at_once(harness):
    """A request of several chunks does not wait for each check's answer before it sends the next:
    two of them are in the platform's hands at the same time (on the old, one-at-a-time code the
    first would wait at the barrier alone)."""
    harness.timing = Timing(poll_interval=1.0, chunk_size=4)
    harness.start()
    together = threading.Barrier(2, timeout=10)
    real = harness.client.batch_check_device_names

    def meet(*args, **kwargs):
        answer = real(*args, **kwargs)
        together.wait()  # returns once a second check has been answered meanwhile
        return answer

    harness.client.batch_check_device_names = meet
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("pair", 8), origin="cli")
    assert harness.run_until(request.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    chunks = harness.store.chunks(request.id)
    assert len(chunks) == 2 and all(c.apply_id for c in chunks) and chunks[0].apply_id != chunks[1].apply_id
    sent = [e.detail["chunk"] for e in harness.store.audit(request.id) if e.event == "check_submitted"]
    assert sorted(sent) == [0, 1]


def test_a_request_of_more_chunks_than_a_seconds_checks_sends_the_rest_in_their_slots(harness):
    """Twelve chunks at ten checks a second: ten go in the first second and the other two are booked
    for the next, the step coming back for them, with no check refused for the quota."""
    harness.timing = Timing(poll_interval=1.0, chunk_size=1)
    harness.start()
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("dozen", 12), origin="cli")
    started = harness.clock.monotonic()
    harness.jobs.run_due()
    assert harness.emulator.gateway.calls["BatchCheckDeviceNames"] == 10
    assert sum(1 for c in harness.store.chunks(request.id) if c.apply_id) == 10
    due = harness.jobs.scheduled()[f"request-{request.id}"]
    assert harness.clock.now() < due < harness.clock.now() + timedelta(seconds=1.1)  # back for the next second's slots
    assert harness.run_until(request.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    assert harness.emulator.gateway.calls["BatchCheckDeviceNames"] == 12
    assert all(c.apply_id for c in harness.store.chunks(request.id))
    assert not any(code == "Throttling.User" for (_, code) in harness.emulator.gateway.outcomes)
    assert harness.clock.monotonic() - started < 4  # the second second's checks, their check and a poll


def test_a_failed_check_keeps_the_reasons_and_offers_the_valid_names_again(harness):
    for existing in ("gate-0002", "gate-0004"):
        harness.emulator.backend.add_device(harness.emulator.product_key, existing)
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("gate", 5), origin="cli")
    assert harness.run_until(request.id, State.CHECK_FAILED, State.AWAITING_APPROVAL) == State.CHECK_FAILED
    invalid = harness.store.devices(request.id, outcome=Outcome.INVALID)
    assert [d.name for d in invalid] == ["gate-0002", "gate-0004"]
    assert all(d.reason for d in invalid)
    event = harness.notifier.events[-1]
    assert event.kind == "check_failed" and event.payload == {"invalid": 2, "valid": 3}

    retry = harness.workflow.requests.retry_valid(request.id, ALICE)
    assert retry.retry_of == request.id and retry.count == 3
    assert harness.run_until(retry.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    harness.workflow.requests.approve(retry.id, BOB)
    assert harness.run_until(retry.id, State.DONE) == State.DONE
    assert harness.platform_devices() == set(names("gate", 5))
    with pytest.raises(Conflict):
        harness.workflow.requests.retry_valid(retry.id, ALICE)


def test_names_refused_at_once_end_in_a_failed_check_with_reasons(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, ["good-0001", "bad#name", "good-0002"], origin="cli")
    assert harness.run_until(request.id, State.CHECK_FAILED, State.AWAITING_APPROVAL) == State.CHECK_FAILED
    assert [d.name for d in harness.store.devices(request.id, outcome=Outcome.INVALID)] == ["bad#name"]


def test_a_step_wakes_the_notifications_only_when_it_has_news(harness):
    """Most steps are polls that change nothing anyone is told: they leave the outbox alone (its
    listing of pending events is not free), and a step that does have news wakes it at once."""
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("quiet", 2), origin="cli")
    harness.jobs.run_due()  # the check goes out; "created" is delivered
    assert harness.notifier.kinds(request.id) == ["created"]
    polls = 0
    while True:
        harness.clock.advance(0.5)
        harness.workflow.advance(request.id)
        if harness.state(request.id) != State.CHECKING:
            break
        polls += 1  # a poll while the check runs: nothing to tell
        assert "outbox" not in harness.jobs.scheduled()
    assert polls >= 2 and harness.state(request.id) == State.AWAITING_APPROVAL  # the check has ended: news
    assert harness.jobs.scheduled()["outbox"] <= harness.clock.now()


def test_a_wake_before_the_next_poll_is_due_leaves_the_poll_to_its_time(harness):
    """A status poll sent before its time can find the creation a moment before its end, and then
    waits out half again of the interval to hear of it. A wake that comes early (the retry of one
    that found two steps of its request running, a restart's resume) polls nothing."""
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("prompt", 2), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(request.id, BOB)
    harness.jobs.run_due()  # the register call; the first poll is due a poll interval later
    assert harness.state(request.id) == State.REGISTERING
    due = harness.jobs.scheduled()[f"request-{request.id}"]
    assert due == harness.clock.now() + timedelta(seconds=harness.timing.poll_interval)
    polls = harness.emulator.gateway.calls["QueryBatchRegisterDeviceStatus"]
    harness.clock.advance(harness.timing.poll_interval - 0.2)
    harness.workflow.advance(request.id)  # 0.2 s early
    assert harness.emulator.gateway.calls["QueryBatchRegisterDeviceStatus"] == polls
    assert harness.jobs.scheduled()[f"request-{request.id}"] == due
    harness.clock.advance(0.2)
    harness.jobs.run_due()
    assert harness.emulator.gateway.calls["QueryBatchRegisterDeviceStatus"] == polls + 1


def test_a_checked_request_is_not_held_up_behind_a_queue_of_other_requests_checks(harness):
    first = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("early", 3), origin="cli")
    harness.jobs.run_due()  # its check goes out now
    started = harness.clock.monotonic()
    # 60 more checks: six seconds of the check quota (10/s), booked in turn rather than slept through.
    crowd = [harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names(f"late{r:02d}", 3), origin="cli") for r in range(60)]
    harness.jobs.run_due()
    # No step sat through the queue: the only waits were the first window's slots, spread a fifth
    # of a slot apart (0.19 s in all), each well within a step's patience.
    assert harness.clock.monotonic() - started == pytest.approx(9 * 0.021)
    assert harness.run_until(first.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    assert harness.clock.monotonic() - started < 3.5  # its 2 s check and a poll, not the crowd's 6 s

    harness.jobs.run_until(lambda: all(harness.state(r.id) == State.AWAITING_APPROVAL for r in crowd))
    assert all(harness.state(r.id) == State.AWAITING_APPROVAL for r in crowd)
    # Every check sent once, none refused for the quota, none lost to a booking.
    assert harness.emulator.gateway.calls["BatchCheckDeviceNames"] == 61
    assert not any(code == "Throttling.User" for (_, code) in harness.emulator.gateway.outcomes)


def test_polls_of_a_many_part_request_go_round_every_part_and_back_off_when_the_quota_is_short(make_emulator, tmp_path):
    emulator = make_emulator(create_seconds=60.0)
    harness = Harness(emulator, tmp_path / "iotreg.db", Timing(poll_interval=1.0, poll_max_interval=30.0, chunk_size=2, phase_timeout=3600))
    # Six parts, and room for only two status calls a second: a round of polls takes three seconds.
    harness.client.limiter = RateLimiter({**DEFAULT_QPS, "QueryBatchRegisterDeviceStatus": 2}, harness.clock, margin=0)
    request = harness.workflow.requests.submit(emulator.product_key, ALICE, names("part", 12), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(request.id, BOB)
    before = emulator.gateway.calls["QueryBatchRegisterDeviceStatus"]
    started = harness.clock.monotonic()
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    took = harness.clock.monotonic() - started
    polls = emulator.gateway.calls["QueryBatchRegisterDeviceStatus"] - before
    assert harness.platform_devices() == set(names("part", 12))
    assert took < 60 + 30 + 3 + 1  # the creation, at most one back-off interval, one round
    # Rounds of six, backing off: not two calls every second of the minute the creation took.
    assert polls <= 6 * 9, polls
    # The parts that ended in a round the quota cut short were reported as they ended.
    assert harness.notifier.kinds(request.id).count("progress") >= 1


def test_the_requester_cannot_approve_their_own_request_unless_allowed(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("valve", 2), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    with pytest.raises(NotAllowed, match="someone else"):
        harness.workflow.requests.approve(request.id, ALICE)
    assert harness.state(request.id) == State.AWAITING_APPROVAL
    assert [e.event for e in harness.store.audit(request.id)][-1] == "approval_denied"
    harness.policy = Policy(allow_self_approval=True)  # a deployment that allows it from now on
    harness.restart()
    with pytest.raises(NotAllowed, match="someone else"):  # the request keeps the rule it was submitted under
        harness.workflow.requests.approve(request.id, ALICE)
    later = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("tap", 2), origin="cli")
    harness.run_until(later.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(later.id, ALICE)
    assert harness.run_until(later.id, State.DONE) == State.DONE


def test_two_approvers_at_once_register_exactly_once(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("pump", 3), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    results: dict[str, object] = {}
    start = threading.Barrier(8)

    def click(who: str) -> None:
        start.wait()
        try:
            results[who] = harness.workflow.requests.approve(request.id, who).state
        except Conflict as exc:
            results[who] = exc

    clickers = [threading.Thread(target=click, args=(f"U0APPROVER{i}",)) for i in range(8)]
    for t in clickers:
        t.start()
    for t in clickers:
        t.join()
    winners = [who for who, r in results.items() if r == State.APPROVED]
    assert len(winners) == 1
    losers = [r for r in results.values() if isinstance(r, Conflict)]
    assert len(losers) == 7 and all(f"already approved by {winners[0]}" in str(r) for r in losers)
    assert harness.run_until(request.id, State.DONE) == State.DONE
    assert harness.register_calls(request.id) == [1]
    assert harness.notifier.kinds(request.id).count("approved") == 1


def test_a_rejected_request_registers_nothing_and_later_clicks_are_told_why(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("door", 2), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.reject(request.id, BOB, "wrong product")
    harness.jobs.run_until(lambda: False, timeout=30)
    assert harness.state(request.id) == State.REJECTED and harness.store.get(request.id).reason == "wrong product"
    with pytest.raises(Conflict, match=f"already rejected by {BOB}"):
        harness.workflow.requests.approve(request.id, CAROL)
    assert harness.platform_devices() == set() and harness.register_calls(request.id) == [0]
    assert harness.notifier.events[-1].payload == {"by": BOB, "reason": "wrong product"}


def test_an_unanswered_request_expires_and_cannot_be_approved_after(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("light", 2), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    expires_at = harness.store.get(request.id).expires_at
    harness.clock.advance(3599)
    harness.jobs.run_due()
    assert harness.state(request.id) == State.AWAITING_APPROVAL
    assert harness.run_until(request.id, State.EXPIRED) == State.EXPIRED
    assert harness.clock.now() >= expires_at
    assert harness.notifier.kinds()[-1] == "expired"
    with pytest.raises(Conflict, match="expired"):
        harness.workflow.requests.approve(request.id, BOB)


def test_a_click_that_arrives_after_the_deadline_expires_the_request_itself(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("fan", 2), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.clock.advance(3601)  # the scheduler has not run yet
    with pytest.raises(Conflict, match="expired"):
        harness.workflow.requests.approve(request.id, BOB)
    assert harness.state(request.id) == State.EXPIRED


def test_cancel_before_approval_and_not_after(harness):
    first = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("tap", 2), origin="cli")
    harness.workflow.requests.cancel(first.id, ALICE)
    harness.jobs.run_until(lambda: False, timeout=30)
    assert harness.state(first.id) == State.CANCELLED and harness.platform_devices() == set()
    second = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("tap2", 2), origin="cli")
    harness.run_until(second.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(second.id, BOB)
    with pytest.raises(Conflict):
        harness.workflow.requests.cancel(second.id, ALICE)
    with pytest.raises(NotFound):
        harness.workflow.requests.cancel(9999, ALICE)


def test_auto_named_devices_follow_the_same_path(harness):
    harness.timing = Timing(poll_interval=1.0, chunk_size=10)
    harness.start()
    request = harness.workflow.requests.submit_count(harness.emulator.product_key, ALICE, 25, origin="cli")
    assert request.state == State.AWAITING_APPROVAL and [c.size for c in harness.store.chunks(request.id)] == [10, 10, 5]
    harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    created = harness.store.devices(request.id, outcome=Outcome.CREATED)
    assert len(created) == 25 and {d.name for d in created} == harness.platform_devices()
    assert harness.emulator.gateway.calls["BatchRegisterDevice"] == 3


def test_a_share_of_failed_creations_is_reported_per_device(make_emulator, tmp_path):
    emulator = make_emulator(create_failure_rate=0.3)
    harness = Harness(emulator, tmp_path / "db", Timing(poll_interval=1.0))
    request = harness.workflow.requests.submit(emulator.product_key, ALICE, names("node", 40), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    summary = harness.workflow.requests.summary(request.id)
    failed = harness.store.devices(request.id, outcome=Outcome.NOT_CREATED)
    assert summary.created + summary.failed == 40 and 0 < summary.failed < 40
    assert {d.name for d in failed}.isdisjoint(harness.platform_devices())
    assert all(d.reason and d.reason != "not reported as created by the platform" for d in failed)


def test_a_check_that_never_ends_fails_with_a_clear_reason(make_emulator, tmp_path):
    emulator = make_emulator(check_seconds=10 * 3600)
    harness = Harness(emulator, tmp_path / "db", Timing(poll_interval=1.0, poll_max_interval=30, phase_timeout=300))
    request = harness.workflow.requests.submit(emulator.product_key, ALICE, names("slow", 2), origin="cli")
    assert harness.run_until(request.id, State.FAILED) == State.FAILED
    assert harness.store.get(request.id).reason == "the check did not finish within 5 min; gave up waiting"
    polls = emulator.gateway.calls["QueryBatchRegisterDeviceStatus"]
    assert 10 <= polls <= 20  # backed off: one poll a second would have been 300


def test_an_unknown_product_fails_at_once_naming_the_product(harness):
    request = harness.workflow.requests.submit("a1NoSuchProd", ALICE, names("x", 2), origin="cli")
    assert harness.run_until(request.id, State.FAILED, State.AWAITING_APPROVAL) == State.FAILED
    assert "product a1NoSuchProd does not exist" in harness.store.get(request.id).reason
    assert harness.notifier.events[-1].kind == "finished" and harness.notifier.events[-1].payload["reason"]


def test_platform_faults_slow_a_request_down_but_it_completes(harness):
    harness.emulator.gateway.faults = FaultPlan(error_rate=0.3, throttle_rate=0.2, seed=3)
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("flaky", 30), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL, State.FAILED)
    harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert harness.platform_devices() == set(names("flaky", 30))
    assert harness.register_calls(request.id) == [1]
    assert sum(n for (action, code), n in harness.emulator.gateway.outcomes.items() if code != "Success") > 0


def test_notifications_that_fail_are_delivered_later_in_order(harness):
    harness.notifier.failures_left = 3
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("bell", 2), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.jobs.run_until(lambda: len(harness.notifier.events) == 2, timeout=120)
    assert harness.notifier.kinds() == ["created", "awaiting_approval"]


# -- restarts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_at", ["submitted", "check_sent", "awaiting_approval", "approved"])
def test_a_restart_at_any_state_finishes_the_request_once(harness, stop_at):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("boot", 4), origin="cli")
    if stop_at != "submitted":
        harness.jobs.run_due()  # the check goes out
    if stop_at in ("awaiting_approval", "approved"):
        harness.run_until(request.id, State.AWAITING_APPROVAL)
    if stop_at == "approved":
        harness.workflow.requests.approve(request.id, BOB)  # and the process dies before the step runs
    assert harness.restart() == 1
    if harness.state(request.id) == State.CHECKING or stop_at == "check_sent":
        harness.run_until(request.id, State.AWAITING_APPROVAL)
    if harness.state(request.id) == State.AWAITING_APPROVAL:
        harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert harness.register_calls(request.id) == [1]
    assert harness.platform_devices() == set(names("boot", 4))
    assert harness.notifier.kinds(request.id).count("finished") == 1


def test_a_crash_after_the_register_call_left_does_not_send_it_again(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("crash", 3), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(request.id, BOB)
    chunk = harness.store.chunks(request.id)[0]
    # The process wrote its intent, sent the call, and died before storing the answer.
    harness.store.update_chunk(request.id, 0, register_sent_at=harness.clock.now())
    harness.client.batch_register_device_with_apply_id(harness.emulator.product_key, chunk.apply_id)
    harness.store.transition(request.id, from_states=[State.APPROVED], to_state=State.REGISTERING, actor="iotreg", event="registering", now=harness.clock.now())
    harness.restart()
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert harness.register_calls(request.id) == [1]
    assert "register_confirmed" in [e.event for e in harness.store.audit(request.id)]


def test_a_crash_before_the_register_call_left_sends_it_once(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("early", 3), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(request.id, BOB)
    harness.store.update_chunk(request.id, 0, register_sent_at=harness.clock.now())  # intent, then death
    harness.restart()
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert harness.register_calls(request.id) == [1]


def test_an_auto_named_chunk_of_unknown_fate_is_never_sent_twice(harness):
    request = harness.workflow.requests.submit_count(harness.emulator.product_key, ALICE, 5, origin="cli")
    harness.workflow.requests.approve(request.id, BOB)
    harness.store.update_chunk(request.id, 0, register_sent_at=harness.clock.now())
    harness.restart()
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.FAILED
    assert "not sent again" in harness.store.get(request.id).reason
    assert harness.emulator.gateway.calls["BatchRegisterDevice"] == 0


def test_an_older_database_is_migrated_in_place_with_its_data(emulator, tmp_path):
    import sqlite3

    from sqlite_utils import Database

    path = tmp_path / "old.db"
    old = Database(sqlite3.connect(path))
    from bot.store.sqlite import migrations

    migrations.apply(old, stop_before="m002_register_claim_owner")  # as an older iotreg left it
    old["requests"].insert({"id": 7, "product_key": emulator.product_key, "requester": ALICE, "origin": "cli", "kind": "names",
                            "count": 2, "state": State.CHECKING, "created_at": "2026-01-05T09:00:00+00:00", "updated_at": "2026-01-05T09:00:00+00:00"})
    old["chunks"].insert({"request_id": 7, "chunk_no": 0, "size": 2})
    old["devices"].insert_all([{"request_id": 7, "name": n, "chunk_no": 0, "outcome": Outcome.PENDING} for n in names("legacy", 2)])
    # A request that ended before IotIds were read after the result: its were read before it.
    old["requests"].insert({"id": 6, "product_key": emulator.product_key, "requester": ALICE, "origin": "cli", "kind": "names",
                            "count": 1, "state": State.DONE, "created_at": "2026-01-04T09:00:00+00:00", "updated_at": "2026-01-04T09:05:00+00:00"})
    old["chunks"].insert({"request_id": 6, "chunk_no": 0, "size": 1, "apply_id": 1, "status": "CREATE_SUCCESS", "register_confirmed_at": "2026-01-04T09:04:00+00:00"})
    old["devices"].insert({"request_id": 6, "name": "old-0001", "chunk_no": 0, "outcome": Outcome.CREATED, "iot_id": "oldIotId000100"})
    old.conn.close()

    harness = Harness(emulator, path, Timing(poll_interval=1.0))
    assert harness.store.schema_version() == [
        "m001_initial", "m002_register_claim_owner", "m003_notification_steps", "m004_uploads", "m005_origin_data", "m006_approvals",
        "m007_rejected_nicknames", "m008_begun_steps", "m009_leases", "m010_iot_ids_read", "m011_quotas", "m012_slot_tickets",
    ]
    assert harness.store.chunks(6)[0].iot_ids_read_at is not None  # nothing to read again for the old result
    assert harness.workflow.resume() == 1  # the old request is picked up where it was
    assert harness.run_until(7, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    harness.workflow.requests.approve(7, BOB)
    assert harness.run_until(7, State.DONE, State.FAILED) == State.DONE
    assert harness.platform_devices() == set(names("legacy", 2))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lost_answers_to_register_calls_never_cause_a_second_registration(harness, seed):
    """5xx answers sent after the platform acted: the workflow asks for the status instead of resending."""
    harness.timing = Timing(poll_interval=1.0, chunk_size=3)
    harness.start()
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names(f"lost{seed}", 9), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.emulator.gateway.faults = FaultPlan(error_rate=0.5, errors_take_effect=1.0, seed=seed)
    harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert harness.register_calls(request.id) == [1, 1, 1]
    assert harness.platform_devices() == set(names(f"lost{seed}", 9))
    lost = harness.emulator.gateway.outcomes[("BatchRegisterDeviceWithApplyId", "InternalError")] + harness.emulator.gateway.outcomes[("BatchRegisterDeviceWithApplyId", "ServiceUnavailable")]
    confirmed = [e for e in harness.store.audit(request.id) if e.event == "register_confirmed"]
    assert lost >= 1 and len(confirmed) == lost  # every lost answer was settled by a status query


# -- what the review found: every created device is accounted for, whatever goes wrong ---------


def test_giving_up_on_a_slow_registration_still_records_the_devices_created_so_far(make_emulator, tmp_path):
    emulator = make_emulator(create_seconds=10 * 3600)
    harness = Harness(emulator, tmp_path / "db", Timing(poll_interval=1.0, poll_max_interval=30, phase_timeout=300))
    request = harness.workflow.requests.submit(emulator.product_key, ALICE, names("tardy", 3), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.FAILED
    assert "did not finish within 5 min" in harness.store.get(request.id).reason
    pending = harness.store.devices(request.id, outcome=Outcome.PENDING)
    assert [d.name for d in pending] == names("tardy", 3)
    assert all(d.reason.startswith("not confirmed") for d in pending)


def test_an_auto_named_part_of_unknown_fate_does_not_hide_the_parts_that_were_created(harness):
    harness.timing = Timing(poll_interval=1.0, chunk_size=5)
    harness.start()
    request = harness.workflow.requests.submit_count(harness.emulator.product_key, ALICE, 10, origin="cli")
    harness.workflow.requests.approve(request.id, BOB)
    # Part 2's call went out from a process that died before storing the answer.
    harness.store.update_chunk(request.id, 1, register_sent_at=harness.clock.now(), claimed_by="elsewhere:1:dead")
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.FAILED
    assert "part 2" in harness.store.get(request.id).reason and "not sent again" in harness.store.get(request.id).reason
    assert len(harness.store.devices(request.id, outcome=Outcome.CREATED)) == 5  # part 1, recorded
    assert harness.emulator.gateway.calls["BatchRegisterDevice"] == 1


def test_a_register_call_in_flight_in_another_process_is_left_to_it_until_its_lease_runs_out(harness):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("twin", 2), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(request.id, BOB)
    harness.store.transition(request.id, from_states=[State.APPROVED], to_state=State.REGISTERING, actor="iotreg", event="registering", now=harness.clock.now())
    # Another live process (on another host) runs the step: it holds the request's lease and
    # claimed the register call a moment ago.
    other = "other-host:4242:abcd"
    now = harness.clock.now()
    assert harness.store.take_lease(f"request:{request.id}", other, now, now + timedelta(seconds=LEASE_SECONDS))
    harness.store.update_chunk(request.id, 0, register_sent_at=now, claimed_by=other)
    harness.workflow.advance(request.id)
    assert harness.register_calls(request.id) == [0]
    assert harness.state(request.id) == State.REGISTERING
    # It dies before confirming: once its lease runs out, this process looks the ApplyId up and sends once.
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert harness.register_calls(request.id) == [1]
    assert harness.clock.now() - now >= timedelta(seconds=LEASE_SECONDS)


def test_an_unexpected_error_in_a_step_keeps_the_request_scheduled(harness, monkeypatch):
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("glitch", 2), origin="cli")
    real = harness.client.query_batch_register_device_status
    calls = {"n": 0}

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("invalid literal for int() with base 10: 'x'")
        return real(*args, **kwargs)

    monkeypatch.setattr(harness.client, "query_batch_register_device_status", broken_once)
    harness.jobs.run_due()  # submits the check
    harness.clock.advance(harness.timing.poll_interval)
    with pytest.raises(ValueError):
        harness.jobs.run_due()  # the first poll breaks
    assert f"request-{request.id}" in harness.jobs.scheduled()
    assert harness.run_until(request.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL


def test_a_status_that_lags_behind_the_register_call_is_not_taken_as_the_end(harness, monkeypatch):
    from bot.aliyun.client import ApplyStatus, BatchStatus

    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("lag", 2), origin="cli")
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    real = harness.client.query_batch_register_device_status
    lagging = {"left": 2}

    def lag(product_key, apply_id):
        if harness.emulator.backend.application(apply_id).register_calls and lagging["left"]:
            lagging["left"] -= 1
            return BatchStatus(ApplyStatus.CHECK_SUCCESS, (), (), (), "lagging")
        return real(product_key, apply_id)

    monkeypatch.setattr(harness.client, "query_batch_register_device_status", lag)
    harness.workflow.requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.DONE
    assert lagging["left"] == 0
    assert [d.name for d in harness.store.devices(request.id, outcome=Outcome.CREATED)] == names("lag", 2)


def test_a_retry_clicked_by_someone_else_is_still_the_requesters_and_they_cannot_approve_it(harness):
    harness.emulator.backend.add_device(harness.emulator.product_key, "own-0001")
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("own", 3), origin="cli")
    harness.run_until(request.id, State.CHECK_FAILED)
    retry = harness.workflow.requests.retry_valid(request.id, BOB)  # a colleague clicks Retry
    assert retry.requester == ALICE
    harness.run_until(retry.id, State.AWAITING_APPROVAL)
    with pytest.raises(NotAllowed):
        harness.workflow.requests.approve(retry.id, ALICE)
    assert ("U0BOB", "retry_of") in [(e.actor, e.event) for e in harness.store.audit(retry.id)]


class Outage:
    """The store as the workflow sees it, with a database that can be taken away and given back."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.down = False
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.store, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                self.refused += 1
                raise StoreUnavailable("the database at db.test:5432/iotreg does not answer")
            return attribute(*args, **kwargs)

        return call


def test_a_database_lost_while_running_delays_the_work_and_loses_nothing(emulator, tmp_path):
    outages: list[Outage] = []
    harness = Harness(
        emulator, tmp_path / "iotreg.db", Timing(poll_interval=1.0, poll_max_interval=4.0),
        wrap=lambda store: outages.append(Outage(store)) or outages[-1],
    )
    outage = outages[-1]
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("outage", 6), origin="cli")
    assert harness.run_until(request.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    harness.workflow.requests.approve(request.id, BOB)
    outage.down = True
    harness.jobs.run_due()  # the step finds the database gone…
    assert outage.refused
    assert f"request-{request.id}" in harness.jobs.scheduled()  # …and is tried again later, not dropped
    assert "outbox" in harness.jobs.scheduled()
    harness.clock.sleep(60)
    harness.jobs.run_due()  # still gone: it waits again
    assert f"request-{request.id}" in harness.jobs.scheduled()
    assert harness.state(request.id) == State.APPROVED  # nothing moved while it was away
    outage.down = False
    assert harness.run_until(request.id, State.DONE) == State.DONE
    assert harness.register_calls(request.id) == [1]
    assert harness.platform_devices() == set(names("outage", 6))
    assert harness.notifier.kinds(request.id).count("finished") == 1


def test_retry_failed_puts_the_devices_not_created_in_one_new_request_for_one_approval(make_emulator, tmp_path):
    emulator = make_emulator(create_failure_rate=1.0)
    harness = Harness(emulator, tmp_path / "db", Timing(poll_interval=1.0))
    requests = harness.workflow.requests
    request = requests.submit(emulator.product_key, ALICE, names("again", 4), origin="slack", channel="C1")
    with pytest.raises(Conflict, match="not a finished registration"):
        requests.retry_failed(request.id, ALICE)
    harness.run_until(request.id, State.AWAITING_APPROVAL)
    requests.approve(request.id, BOB)
    assert harness.run_until(request.id, State.DONE, State.FAILED) == State.FAILED
    emulator.backend.create_failure_rate = 0.0
    retry = requests.retry_failed(request.id, ALICE)
    assert (retry.retry_of, retry.count, retry.requester, retry.channel) == (request.id, 4, ALICE, "C1")
    assert [d.name for d in requests.devices(retry.id)] == names("again", 4)
    harness.run_until(retry.id, State.AWAITING_APPROVAL)
    requests.approve(retry.id, BOB)
    assert harness.run_until(retry.id, State.DONE, State.FAILED) == State.DONE
    assert harness.platform_devices() == set(names("again", 4))
    assert ("retried", {"new_request": retry.id}) in [(e.event, e.detail) for e in requests.audit(request.id)]
    with pytest.raises(WorkflowError, match="nothing to retry"):
        requests.retry_failed(retry.id, ALICE)


def test_a_request_driven_by_a_live_process_is_not_taken_by_another_until_let_go(harness):
    import socket
    import subprocess

    requests = harness.workflow.requests
    request = requests.submit(harness.emulator.product_key, ALICE, names("lease", 1), origin="cli")
    here = socket.gethostname()
    first, second = f"{here}:{os.getpid()}:aaaa", f"{here}:{os.getpid()}:bbbb"
    assert requests.drive(request.id, first) is None
    assert requests.drive(request.id, second) == first
    assert requests.driven_by(requests.require(request.id)) == first
    requests.let_go(request.id, second)  # not its mark: nothing changes
    assert requests.drive(request.id, second) == first
    requests.let_go(request.id, first)
    assert requests.drive(request.id, second) is None
    ended = subprocess.Popen(["true"])
    ended.wait()  # a process that has ended: its mark holds nothing
    harness.store.update_origin_data(request.id, driver=f"{here}:{ended.pid}:cccc")
    assert requests.driven_by(requests.require(request.id)) is None
    assert requests.drive(request.id, first) is None


def test_a_platform_that_cannot_be_reached_fails_the_check_at_once_naming_the_endpoint(harness):
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    harness.workflow.reconciler.client = IotClient(
        endpoint, Credentials("k", "s"), clock=harness.clock, retry=RetryPolicy(max_attempts=3, deadline=5)
    )
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("far", 2), origin="slack")
    assert harness.run_until(request.id, State.FAILED, State.AWAITING_APPROVAL) == State.FAILED
    reason = harness.store.get(request.id).reason
    assert reason.startswith(f"IoT Platform could not be reached: connection to {endpoint} failed: Connection refused")
    assert harness.notifier.events[-1].kind == "finished"


def test_credentials_the_platform_does_not_accept_fail_the_check_after_one_call(harness):
    harness.workflow.reconciler.client = IotClient(
        harness.emulator.endpoint, Credentials(harness.emulator.access_key_id, "not-the-secret"), clock=harness.clock
    )
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("sig", 2), origin="slack")
    assert harness.run_until(request.id, State.FAILED, State.AWAITING_APPROVAL) == State.FAILED
    assert "did not accept iotreg's credentials (SignatureDoesNotMatch)" in harness.store.get(request.id).reason
    assert harness.emulator.gateway.calls["BatchCheckDeviceNames"] == 1
