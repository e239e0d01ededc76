"""The result of named devices comes as soon as the platform's creation has ended; the IotIds after.

The final QueryBatchRegisterDeviceStatus answer says which names were created and which failed,
and why: the request ends on it, and the pages of QueryPageByApplyId (one call per 50 devices)
are read after the result has gone out. Devices named by the platform are only known from the
pages, so their result still waits for them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from bot.domain import Event, Outcome, State, Timing
from bot.standins.emulator import FaultPlan
from bot.standins.emulator.backend import MSG_NAME_EXISTS
from test_workflow import ALICE, BOB, Harness, names


@dataclass
class ResultWatcher:
    """A front end that notes, when the result arrives, how many pages had been read and which
    IotIds were known by then."""

    harness: Harness
    events: list[Event] = field(default_factory=list)
    pages_at_result: int | None = None
    iot_ids_at_result: dict[str, str | None] = field(default_factory=dict)
    pending_at_result: bool | None = None

    def deliver(self, event: Event) -> None:
        self.events.append(event)
        if event.kind == "finished":
            self.pages_at_result = self.harness.emulator.gateway.calls["QueryPageByApplyId"]
            self.iot_ids_at_result = {d.name: d.iot_id for d in self.harness.store.devices(event.request_id, outcome=Outcome.CREATED)}
            self.pending_at_result = self.harness.workflow.requests.summary(event.request_id).iot_ids_pending


@pytest.fixture
def harness(emulator, tmp_path) -> Harness:
    harness = Harness(emulator, tmp_path / "iotreg.db", Timing(poll_interval=1.0, poll_max_interval=4.0, phase_timeout=600, chunk_size=40))
    harness.notifier = ResultWatcher(harness)  # type: ignore[assignment]
    harness.restart()  # the workflow takes its front end when it is built
    return harness


def approved(harness: Harness, devices: list[str]) -> int:
    request = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, devices, origin="cli")
    assert harness.run_until(request.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    harness.workflow.requests.approve(request.id, BOB)
    return request.id


class Crash(BaseException):
    """The process dies here (nothing catches it)."""


def crash_at_the_first_page(harness: Harness) -> None:
    """Make this process die when it is about to read a page (a restart builds a new client)."""

    def die(*args: object, **kwargs: object) -> None:
        raise Crash

    harness.client.iter_devices_by_apply_id = die  # type: ignore[method-assign]


#: IoT Platform failing every QueryPageByApplyId, and only those.
PAGES_FAIL = FaultPlan(error_rate=1.0, seed=1, actions=frozenset({"QueryPageByApplyId"}))


def platform_iot_ids(harness: Harness) -> dict[str, str]:
    return {d.device_name: d.iot_id for d in harness.emulator.backend.devices(harness.emulator.product_key)}


def test_the_result_is_posted_before_any_page_of_iot_ids_is_read(harness):
    request_id = approved(harness, names("meter", 100))  # three parts: 40, 40, 20
    harness.jobs.run_until(lambda: harness.notifier.pages_at_result is not None)
    watcher = harness.notifier

    assert harness.state(request_id) == State.DONE
    assert watcher.pages_at_result == 0
    assert set(watcher.iot_ids_at_result) == set(names("meter", 100))  # every name registered, from the status alone
    assert set(watcher.iot_ids_at_result.values()) == {None} and watcher.pending_at_result is True

    harness.jobs.run_due()  # the step after the result reads the pages
    assert harness.emulator.gateway.calls["QueryPageByApplyId"] == 3  # one per part: 40, 40 and 20 fit a page each
    assert {d.name: d.iot_id for d in harness.store.devices(request_id)} == platform_iot_ids(harness)
    assert harness.workflow.requests.summary(request_id).iot_ids_pending is False
    assert [c.iot_ids_read_at for c in harness.store.chunks(request_id)].count(None) == 0
    assert [e.kind for e in watcher.events].count("finished") == 1  # the IotIds are no news of their own


def test_the_iot_ids_of_several_parts_are_read_at_once(harness):
    """A reader waits a round trip for every page: the parts of a request are read side by side (on
    the old, one-part-at-a-time code the first part's reader would wait at the barrier alone)."""
    together = threading.Barrier(2, timeout=10)
    real = harness.client.iter_devices_by_apply_id

    def meet(apply_id, *args, **kwargs):
        devices = list(real(apply_id, *args, **kwargs))
        together.wait()  # returns once the other part has been read meanwhile
        return iter(devices)

    harness.client.iter_devices_by_apply_id = meet  # type: ignore[method-assign]
    request_id = approved(harness, names("duo", 80))  # two parts of 40
    read = lambda: harness.state(request_id) == State.DONE and not harness.workflow.requests.summary(request_id).iot_ids_pending  # noqa: E731
    harness.jobs.run_until(read)
    assert read()
    assert {d.name: d.iot_id for d in harness.store.devices(request_id)} == platform_iot_ids(harness)


def test_the_result_comes_when_the_platform_finishes_creating_not_after_the_pages(harness):
    """Measured on the injected clock: the result is one status poll away from the end of the platform's creation."""
    request_id = approved(harness, names("sensor", 2000))  # 50 parts of 40, 50 pages
    finished_at: list = []
    watcher = harness.notifier
    original = watcher.deliver

    def deliver(event: Event) -> None:
        if event.kind == "finished":
            finished_at.append(harness.clock.now())
        original(event)

    watcher.deliver = deliver  # type: ignore[method-assign]
    harness.jobs.run_until(lambda: bool(finished_at))
    submitted = max(e.at for e in harness.store.audit(request_id) if e.event == "register_submitted")
    created_at = submitted + timedelta(seconds=harness.emulator.backend.create_seconds)  # the platform's last part ends
    harness.jobs.run_until(lambda: not harness.workflow.requests.summary(request_id).iot_ids_pending)

    assert watcher.pages_at_result == 0 and harness.emulator.gateway.calls["QueryPageByApplyId"] == 50
    assert created_at <= finished_at[0] <= created_at + timedelta(seconds=harness.timing.poll_max_interval)  # one poll away
    assert len({d.iot_id for d in harness.store.devices(request_id)} - {None}) == 2000


def test_a_failed_creation_is_reported_per_device_from_its_status_alone(harness):
    request_id = approved(harness, names("node", 6))
    # Another application takes one of the names between the check and the creation.
    harness.emulator.backend.add_device(harness.emulator.product_key, "node-0003")
    harness.jobs.run_until(lambda: harness.notifier.pages_at_result is not None)

    assert harness.state(request_id) == State.DONE
    assert harness.notifier.pages_at_result == 0
    failed = harness.store.devices(request_id, outcome=Outcome.NOT_CREATED)
    assert [(d.name, d.reason, d.iot_id) for d in failed] == [("node-0003", MSG_NAME_EXISTS, None)]
    assert set(harness.notifier.iot_ids_at_result) == {"node-0001", "node-0002", "node-0004", "node-0005", "node-0006"}

    harness.jobs.run_due()
    created = {d.name: d.iot_id for d in harness.store.devices(request_id, outcome=Outcome.CREATED)}
    platform = platform_iot_ids(harness)
    assert created == {name: platform[name] for name in created} and None not in created.values()
    # Reading the IotIds changed no outcome and no reason.
    assert [(d.name, d.reason, d.iot_id) for d in harness.store.devices(request_id, outcome=Outcome.NOT_CREATED)] == [
        ("node-0003", MSG_NAME_EXISTS, None)
    ]


def test_iot_ids_left_unread_by_a_crash_are_read_after_a_restart(harness):
    request_id = approved(harness, names("gate", 90))
    crash_at_the_first_page(harness)
    with pytest.raises(Crash):
        harness.jobs.run_until(lambda: False)
    assert harness.state(request_id) == State.DONE and harness.notifier.pages_at_result == 0
    assert harness.emulator.gateway.calls["QueryPageByApplyId"] == 0

    assert harness.restart() == 1  # a new process on the same database: the finished request, for its IotIds
    # The dead process's step is taken up when it is due again (its lease would have run out by then).
    harness.jobs.run_until(lambda: not harness.store.unread_iot_ids())
    assert harness.state(request_id) == State.DONE
    assert {d.name: d.iot_id for d in harness.store.devices(request_id)} == platform_iot_ids(harness)
    assert harness.restart() == 0  # nothing left to read


def test_a_crash_between_two_parts_reads_only_the_rest_after_a_restart(harness):
    request_id = approved(harness, names("pump", 90))  # three parts
    crash_at_the_first_page(harness)
    with pytest.raises(Crash):
        harness.jobs.run_until(lambda: False)
    first = harness.store.chunks(request_id)[0]
    platform = platform_iot_ids(harness)
    listed = [(name, platform[name]) for name, _ in harness.store.device_names(request_id, first.chunk_no)]
    harness.store.set_iot_ids(request_id, first.chunk_no, listed, harness.clock.now())  # the process read one part, then died
    harness.emulator.gateway.reset_counts()

    assert harness.restart() == 1
    harness.jobs.run_until(lambda: not harness.store.unread_iot_ids())
    assert harness.emulator.gateway.calls["QueryPageByApplyId"] == 2
    assert {d.name: d.iot_id for d in harness.store.devices(request_id)} == platform_iot_ids(harness)


def test_pages_that_fail_are_read_again_later_and_the_request_stays_done(harness):
    request_id = approved(harness, names("door", 5))
    harness.emulator.gateway.faults = PAGES_FAIL
    harness.jobs.run_until(lambda: harness.emulator.gateway.outcomes[("QueryPageByApplyId", "InternalError")] > 0)
    harness.jobs.run_due()  # the page step fails after the client's retries
    assert harness.notifier.pages_at_result == 0
    assert harness.state(request_id) == State.DONE
    assert harness.workflow.requests.summary(request_id).iot_ids_pending is True
    assert any(e.event == "api_error" for e in harness.store.audit(request_id))

    harness.emulator.gateway.faults = FaultPlan()
    harness.jobs.run_until(lambda: not harness.workflow.requests.summary(request_id).iot_ids_pending)
    assert harness.state(request_id) == State.DONE
    assert {d.name: d.iot_id for d in harness.store.devices(request_id)} == platform_iot_ids(harness)


def test_iot_ids_that_cannot_be_read_within_the_phase_timeout_are_given_up_and_said_so(harness):
    request_id = approved(harness, names("lamp", 5))
    harness.emulator.gateway.faults = PAGES_FAIL
    harness.jobs.run_until(lambda: harness.state(request_id) == State.DONE and not harness.workflow.requests.summary(request_id).iot_ids_pending)

    assert harness.state(request_id) == State.DONE
    assert harness.clock.now() - harness.store.get(request_id).updated_at > timedelta(seconds=600)
    given_up = [e for e in harness.store.audit(request_id) if e.event == "iot_ids_not_read"]
    assert len(given_up) == 1 and "10 min" in given_up[0].detail["reason"]
    assert {d.iot_id for d in harness.store.devices(request_id)} == {None}
    assert harness.jobs.scheduled() == {}  # nothing keeps trying
    assert harness.restart() == 0


def test_auto_named_devices_still_get_their_names_and_iot_ids_before_the_result(harness):
    request = harness.workflow.requests.submit_count(harness.emulator.product_key, ALICE, 45, origin="cli")
    harness.workflow.requests.approve(request.id, BOB)
    harness.jobs.run_until(lambda: harness.notifier.pages_at_result is not None)

    assert harness.state(request.id) == State.DONE
    assert harness.notifier.pages_at_result == 2  # the pages name the devices: 40 and 5
    assert harness.notifier.iot_ids_at_result == platform_iot_ids(harness)
    assert harness.notifier.pending_at_result is False
