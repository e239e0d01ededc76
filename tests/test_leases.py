"""Two processes on one database: each step runs once, each notification is delivered once, a dead
process's work is taken over when its lease runs out, and a stopping one hands it back at once.

Two workflows here stand for two replicas: each has its own store connection, IoT client, jobs and
lease owner, on one database (SQLite and PostgreSQL) and one emulator, on one manual clock. The
tests with real `iotreg serve` processes are in tests/test_replicas.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest

from bot.aliyun.client import Credentials, IotClient, RetryPolicy
from bot.aliyun.ratelimit import RateLimiter
from bot.config import DEFAULT_QPS
from bot.domain import Event, Outcome, State, Timing
from bot.jobs import InlineJobs
from bot.leases import LEASE_SECONDS
from bot.reconciler import SWEEP_GRACE
from bot.registration import Workflow
from bot.store import AlreadyRead, StoreUnavailable, open_store

ALICE, BOB = "U0ALICE", "U0BOB"
STATUS = "QueryBatchRegisterDeviceStatus"


@dataclass
class Notes:
    """A front end shared by the replicas: what each delivered, and a gate to hold a delivery open."""

    delivered: list[tuple[str, int]] = field(default_factory=list)
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)

    def for_replica(self, name: str):
        notes = self

        class Notifier:
            def deliver(self, event: Event) -> None:
                if notes.gate is not None and name == "a":
                    notes.entered.set()
                    assert notes.gate.wait(timeout=30)
                notes.delivered.append((name, event.id))

        return Notifier()


class Replica:
    def __init__(self, name: str, location: str, emulator, notes: Notes, timing: Timing) -> None:
        clock = emulator.clock
        self.store = open_store(location)
        self.client = IotClient(
            emulator.endpoint, Credentials(emulator.access_key_id, emulator.access_key_secret), clock=clock,
            limiter=RateLimiter(DEFAULT_QPS, clock), retry=RetryPolicy(max_attempts=4, deadline=30),
        )
        self.workflow = Workflow(
            self.store, self.client, clock, timing,
            notifier=lambda _: notes.for_replica(name), jobs=lambda steps: InlineJobs(clock, steps),
        )
        self.jobs: InlineJobs = self.workflow.jobs

    def close(self) -> None:
        self.workflow.close()


@pytest.fixture
def replicas(emulator, store_location):
    notes = Notes()
    timing = Timing(poll_interval=1.0, poll_max_interval=4.0, approval_ttl=3600, phase_timeout=600)
    a, b = Replica("a", store_location, emulator, notes, timing), Replica("b", store_location, emulator, notes, timing)
    yield a, b, notes
    a.close()
    b.close()


@contextmanager
def posting_held_open(replica: Replica, notes: Notes) -> Iterator[None]:
    """Replica a delivering in a thread, held inside its first post until the block ends."""
    notes.gate = threading.Event()
    delivering = threading.Thread(target=replica.workflow.deliver_events)
    delivering.start()
    try:
        assert notes.entered.wait(timeout=30)
        yield
    finally:
        notes.gate.set()
        delivering.join(timeout=30)


def run_both(a: Replica, b: Replica, done, clock, timeout: float = 3600) -> bool:
    """Run both replicas' due jobs, a first, moving the clock to the next one, until ``done()``."""
    deadline = clock.monotonic() + timeout
    while not done() and clock.monotonic() < deadline:
        a.jobs.run_due()
        b.jobs.run_due()
        if done():
            break
        upcoming = min([*a.jobs.scheduled().values(), *b.jobs.scheduled().values()], default=None)
        if upcoming is None:
            break
        clock.sleep(max(0.0, (upcoming - clock.now()).total_seconds()))
    return done()


def test_two_replicas_carry_a_request_through_each_step_once(replicas, emulator):
    a, b, notes = replicas
    request = a.workflow.requests.submit(emulator.product_key, ALICE, [f"twin-{i}" for i in range(3)], origin="cli")
    b.workflow.resume()  # b has it on its timer too, as a replica started earlier would after a sweep
    polled_at = []
    for replica in (a, b):
        real = replica.client.query_batch_register_device_status

        def poll(*args, real=real, **kwargs):
            polled_at.append(emulator.clock.now())
            return real(*args, **kwargs)

        replica.client.query_batch_register_device_status = poll
    checking = lambda: a.store.get(request.id).state == State.AWAITING_APPROVAL  # noqa: E731
    assert run_both(a, b, checking, emulator.clock)
    # One check, and one status poll per due time, though both replicas' timers fired at each.
    assert emulator.gateway.calls["BatchCheckDeviceNames"] == 1
    assert emulator.gateway.calls[STATUS] == len(polled_at) == len(set(polled_at))

    b.workflow.requests.approve(request.id, BOB)  # the click reaches the other replica
    finished = lambda: a.store.get(request.id).state in (State.DONE, State.FAILED)  # noqa: E731
    assert run_both(a, b, finished, emulator.clock)
    a.jobs.run_due()
    b.jobs.run_due()
    assert a.store.get(request.id).state == State.DONE
    chunk = a.store.chunks(request.id)[0]
    assert emulator.backend.application(chunk.apply_id).register_calls == 1
    assert {d.name for d in a.store.devices(request.id, outcome=Outcome.CREATED)} == {f"twin-{i}" for i in range(3)}
    delivered = [event_id for _, event_id in notes.delivered]
    assert sorted(delivered) == sorted(set(delivered))  # no event twice, whichever replica delivered it
    assert [e.id for e in a.store.delivered_events(request.id)] == sorted(delivered)


def test_a_step_done_by_one_replica_is_not_done_again_by_the_other(replicas, emulator):
    a, b, _ = replicas
    request = a.workflow.requests.submit(emulator.product_key, ALICE, ["solo-1"], origin="cli")
    a.jobs.run_due()  # the check goes out; the first poll is due a second later
    b.jobs.wake(request.id)
    b.jobs.run_due()  # b's timer fires early: not due, so no call, only a timer for when it is
    assert emulator.gateway.calls[STATUS] == 0
    assert b.jobs.scheduled()[f"request-{request.id}"] == a.jobs.scheduled()[f"request-{request.id}"]
    emulator.clock.advance(1.0)
    a.jobs.run_due()
    b.jobs.run_due()  # both fire at the due time: one poll
    assert emulator.gateway.calls[STATUS] == 1


def test_a_dead_replicas_step_is_taken_over_when_its_lease_runs_out(replicas, emulator):
    a, b, _ = replicas
    request = a.workflow.requests.submit(emulator.product_key, ALICE, ["orphan-1"], origin="cli")
    # A replica took the step's lease and died in it (SIGKILL: nothing given back).
    now = emulator.clock.now()
    assert a.store.take_lease(f"request:{request.id}", "gone-host:99:dead", now, now + timedelta(seconds=LEASE_SECONDS))
    a.store.wake_request(request.id, now)
    key = f"request-{request.id}"
    b.workflow.sweep()
    assert key not in b.jobs.scheduled()  # due, but held
    b.workflow.advance(request.id)  # a wake that comes anyway leaves the step to its holder ...
    assert emulator.gateway.calls["BatchCheckDeviceNames"] == 0
    assert b.jobs.scheduled()[key] == now + timedelta(seconds=LEASE_SECONDS)  # ... and looks again when it runs out
    b.jobs._due.pop(key)  # (a replica that did not hear of it at all)
    emulator.clock.advance(LEASE_SECONDS)
    b.workflow.sweep()
    assert key not in b.jobs.scheduled()  # just run out: its holder may yet wake it
    emulator.clock.advance(SWEEP_GRACE)
    b.workflow.sweep()  # any replica's sweep finds it a moment later
    assert b.jobs.scheduled()[key] <= emulator.clock.now()
    b.jobs.run_due()
    assert emulator.gateway.calls["BatchCheckDeviceNames"] == 1
    assert run_both(a, b, lambda: a.store.get(request.id).state == State.AWAITING_APPROVAL, emulator.clock, timeout=60)


def test_a_request_notifications_go_through_one_replica_at_a_time(replicas, emulator):
    a, b, notes = replicas
    request = a.workflow.requests.submit(emulator.product_key, ALICE, ["said-1"], origin="cli")
    with posting_held_open(a, notes):  # a is posting the request's first notification
        assert b.workflow.deliver_events() == 0  # b leaves the request to a, and posts nothing
        assert f"request-{request.id}" not in b.jobs.scheduled() and b.jobs.scheduled()["outbox"] > emulator.clock.now()
    assert [who for who, _ in notes.delivered] == ["a"]
    assert b.workflow.deliver_events() == 0
    assert notes.delivered == [("a", e.id) for e in a.store.delivered_events(request.id)]


def test_a_stopping_replica_hands_its_leases_back_at_once(replicas, emulator):
    a, b, notes = replicas
    request = a.workflow.requests.submit(emulator.product_key, ALICE, ["handed-1"], origin="cli")
    with posting_held_open(a, notes):
        assert [lease.name for lease in a.store.leases()] == [f"outbox:{request.id}"]
        assert a.workflow.stop(grace=0.05) is False  # the delivery outlived the grace ...
        assert a.store.leases() == []  # ... and its lease is back, with no wait for it to run out
        assert b.workflow.leases.take(f"outbox:{request.id}")
        b.workflow.leases.release(f"outbox:{request.id}")
    # A stopped replica starts no step.
    a.workflow.advance(request.id)
    assert emulator.gateway.calls["BatchCheckDeviceNames"] == 0
    emulator.clock.advance(SWEEP_GRACE)
    b.workflow.sweep()  # the other replica carries it on
    b.jobs.run_due()
    assert emulator.gateway.calls["BatchCheckDeviceNames"] == 1


def test_a_replica_stopping_between_steps_finishes_at_once(replicas, emulator):
    a, _, _ = replicas
    a.workflow.requests.submit(emulator.product_key, ALICE, ["quiet-1"], origin="cli")
    a.jobs.run_due()
    assert a.workflow.stop(grace=5) is True
    assert a.store.leases() == []


def test_a_held_lease_is_renewed_while_its_work_runs(store):
    from support import wait_until

    from bot.clock import SystemClock
    from bot.leases import Leases

    leases = Leases(store, SystemClock(), seconds=2.0)
    other = Leases(store, SystemClock(), seconds=2.0)
    assert leases.take("request:1")
    first = store.leases()[0].until
    assert wait_until(lambda: store.leases()[0].until > first + timedelta(seconds=0.5), timeout=10)
    assert not other.take("request:1")  # renewed, so never run out, though its first term has
    leases.release("request:1")
    assert store.leases() == [] and other.take("request:1")
    other.hand_back()
    assert store.leases() == []


def test_handing_back_waits_for_a_renewal_under_way(store):
    """The store is closed right after the leases are handed back (a stopping process, the CLI at
    its end): a renewal still running then would use a closed connection, which on SQLite can take
    the whole process down. Handing back waits for it, and gives back after it."""
    from bot.clock import SystemClock
    from bot.leases import Leases

    leases = Leases(store, SystemClock(), seconds=0.3)  # a heartbeat every 0.1 s
    renewing, go_on, order = threading.Event(), threading.Event(), []
    renew_leases, release_leases = store.renew_leases, store.release_leases

    def slow_renewal(owner, until):
        renewing.set()
        go_on.wait(10)
        order.append("renewed")
        return renew_leases(owner, until)

    def release(owner):
        order.append("released")
        return release_leases(owner)

    store.renew_leases, store.release_leases = slow_renewal, release
    assert leases.take("request:1")
    assert renewing.wait(10)  # the heartbeat is inside a renewal
    handed_back = threading.Event()
    threading.Thread(target=lambda: (leases.hand_back(), handed_back.set()), daemon=True).start()
    assert not handed_back.wait(0.5)  # still waiting for the renewal
    go_on.set()
    assert handed_back.wait(10)
    assert order == ["renewed", "released"] and store.leases() == []


def test_a_lease_not_renewed_for_two_thirds_of_its_term_is_not_trusted(store):
    from bot.clock import ManualClock
    from bot.leases import Leases

    clock = ManualClock(datetime(2026, 11, 26, tzinfo=timezone.utc))
    leases = Leases(store, clock, seconds=9.0)
    assert leases.take("request:1") and leases.fresh("request:1")
    clock.advance(5.9)
    assert leases.fresh("request:1")
    clock.advance(0.2)  # the heartbeat failed twice: the database may give it away in 2.9 s
    assert not leases.fresh("request:1")
    assert leases.renew() == 1 and leases.fresh("request:1")
    leases.hand_back()
    assert not leases.fresh("request:1")  # a stopping process's steps make no more calls that must not be repeated
    assert not leases.take("request:2")  # nor take new work


def test_a_lease_given_back_during_a_renewal_leaves_the_others_trusted_and_one_taken_away_does_not(store, caplog):
    """The heartbeat renews what it held when it started; a step that ends meanwhile gives its
    lease back. That is no lost lease: the others stay trusted, and nothing is logged. A lease
    another process took (it had run out) is named, and only it stops being trusted."""
    from bot.clock import ManualClock
    from bot.leases import Leases

    clock = ManualClock(datetime(2026, 11, 26, tzinfo=timezone.utc))
    leases = Leases(store, clock, seconds=9.0)
    for name in ("request:1", "request:2", "request:3"):
        assert leases.take(name)
    renew_leases = store.renew_leases

    def renewing_while_a_step_ends(owner, until):
        leases.release("request:1")  # between the heartbeat's list and its statement
        return renew_leases(owner, until)

    store.renew_leases = renewing_while_a_step_ends
    clock.advance(5.9)
    assert leases.renew() == 2
    clock.advance(0.2)
    assert leases.fresh("request:2") and leases.fresh("request:3") and not leases.held() & {"request:1"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    store.renew_leases = renew_leases
    store.release_lease("request:3", leases.owner)  # ran out, and another process took it
    assert store.take_lease("request:3", "other-host:1:x", clock.now(), clock.now() + timedelta(seconds=9))
    clock.advance(3.0)
    assert leases.renew() == 1
    clock.advance(3.0)
    assert leases.fresh("request:2") and not leases.fresh("request:3")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "1 lease(s) ran out before they were renewed; their work may run elsewhere too: request:3"]
    leases.hand_back()


def test_a_step_that_may_have_lost_its_lease_sends_no_register_call(replicas, emulator, monkeypatch):
    a, b, _ = replicas
    request = a.workflow.requests.submit(emulator.product_key, ALICE, ["fenced-1"], origin="cli")
    assert run_both(a, b, lambda: a.store.get(request.id).state == State.AWAITING_APPROVAL, emulator.clock)
    a.workflow.requests.approve(request.id, BOB)
    monkeypatch.setattr(a.workflow.leases, "fresh", lambda name: False)  # its renewals have been failing
    a.jobs.run_due()
    chunk = a.store.chunks(request.id)[0]
    assert emulator.backend.application(chunk.apply_id).register_calls == 0 and chunk.claimed_by == a.workflow.leases.owner
    monkeypatch.undo()
    # The replica that takes the request over looks the ApplyId up, and sends the call once.
    emulator.clock.advance(LEASE_SECONDS + SWEEP_GRACE)
    b.workflow.sweep()
    assert run_both(b, a, lambda: a.store.get(request.id).state == State.DONE, emulator.clock, timeout=600)
    assert emulator.backend.application(chunk.apply_id).register_calls == 1


def test_an_approval_is_carried_out_by_another_replica_when_the_one_that_took_the_click_dies(replicas, emulator, monkeypatch):
    a, b, _ = replicas
    request = a.workflow.requests.submit(emulator.product_key, ALICE, ["late-1"], origin="cli")
    assert run_both(a, b, lambda: a.store.get(request.id).state == State.AWAITING_APPROVAL, emulator.clock)
    monkeypatch.setattr(a.jobs, "wake", lambda *args, **kwargs: None)  # a dies right after the approval's commit
    a.workflow.requests.approve(request.id, BOB)
    b.workflow.sweep()
    assert f"request-{request.id}" not in b.jobs.scheduled()  # left to the replica that took the click, for a moment
    emulator.clock.advance(SWEEP_GRACE)
    b.workflow.sweep()  # the approval made the step due in its own transaction
    b.jobs.run_due()
    assert a.store.get(request.id).state in (State.REGISTERING, State.DONE)


def test_an_approval_on_another_replica_during_a_step_is_carried_out_as_soon_as_the_step_ends(replicas, emulator, monkeypatch):
    """The click's replica finds the request's step running on another and leaves it to that one,
    which goes on at once when its step ends, not at its own next time or the next sweep."""
    a, b, _ = replicas
    request = a.workflow.requests.submit(emulator.product_key, ALICE, ["busy-1"], origin="cli")
    assert run_both(a, b, lambda: a.store.get(request.id).state == State.AWAITING_APPROVAL, emulator.clock)
    end_step = a.store.end_request_step

    def approved_meanwhile(*args):
        monkeypatch.undo()
        # The step has read the request (awaiting approval) and is about to end; b's wake for the
        # click finds it still leased.
        b.workflow.requests.approve(request.id, BOB)
        b.jobs.run_due()
        return end_step(*args)

    monkeypatch.setattr(a.store, "end_request_step", approved_meanwhile)
    a.store.wake_request(request.id, emulator.clock.now())  # a look at the wait (as for a reminder), due now
    a.jobs.wake(request.id)
    a.jobs.run_due()  # a step of the request, awaiting approval as far as it knew; then the next, at once
    assert a.store.get(request.id).state in (State.REGISTERING, State.DONE)
    assert emulator.backend.application(a.store.chunks(request.id)[0].apply_id).register_calls == 1


def test_a_request_whose_creator_died_before_waking_it_is_swept(replicas, emulator, monkeypatch):
    a, b, _ = replicas
    monkeypatch.setattr(a.workflow.requests, "_kick", lambda *args, **kwargs: None)  # died right after the insert
    request = a.workflow.requests.submit(emulator.product_key, ALICE, ["lost-1"], origin="cli")
    emulator.clock.advance(SWEEP_GRACE)
    b.workflow.sweep()
    b.jobs.run_due()
    assert emulator.gateway.calls["BatchCheckDeviceNames"] == 1
    assert a.store.get(request.id).state == State.CHECKING


def test_auto_named_requests_waiting_for_approval_are_reminded(emulator, store_location):
    notes = Notes()
    timing = Timing(poll_interval=1.0, approval_ttl=3600, reminders=(60.0,))
    a = Replica("a", store_location, emulator, notes, timing)
    try:
        request = a.workflow.requests.submit_count(emulator.product_key, ALICE, 3, origin="cli")
        reminders = lambda: [e for e in [*a.store.pending_events(), *a.store.delivered_events(request.id)] if e.kind == "reminder"]  # noqa: E731
        assert a.jobs.run_until(lambda: reminders(), timeout=120)
        assert emulator.clock.now() - request.created_at >= timedelta(seconds=60)
        assert len(reminders()) == 1
    finally:
        a.close()


def test_one_upload_read_by_two_replicas_makes_one_request(replicas, emulator):
    a, b, _ = replicas
    upload_id = a.workflow.requests.add_upload(user=ALICE, channel="C1", product_key=emulator.product_key, pasted="up-1", origin_data={})
    with a.workflow.requests.reading_upload(upload_id) as mine:
        assert mine is not None
        with b.workflow.requests.reading_upload(upload_id) as theirs:
            assert theirs is None  # a is reading it
        a.workflow.stop(grace=0)  # a stops while reading: its lease goes back at once ...
        with b.workflow.requests.reading_upload(upload_id) as theirs:
            assert theirs is not None  # ... and b reads it
            b.workflow.requests.submit(emulator.product_key, ALICE, ["up-1"], origin="slack", upload_id=upload_id)
        with pytest.raises(AlreadyRead):  # a's read, finishing late, makes nothing
            a.workflow.requests.submit(emulator.product_key, ALICE, ["up-1"], origin="slack", upload_id=upload_id)
    assert len(a.store.requests(limit=None)) == 1
