"""The reconciler: every request's next step, done from stored state, one durable step at a time.

All progress happens in :meth:`Reconciler.advance`: it reads the request's state from the database,
does the step its phase calls for (:attr:`Reconciler.PHASES`), stores the result, and asks the
:class:`~bot.registration.Jobs` to wake it again when there is more to do. Because every decision
comes from stored state, a process killed at any moment picks up where it stopped when
:meth:`resume` runs at start.

Crash between "API call sent" and "result stored":

* BatchCheckDeviceNames: the ApplyId is stored right after the answer. A crash before that means
  the check is sent again on resume; the first application is orphaned, and an application nobody
  registers creates no device.
* BatchRegisterDeviceWithApplyId: ``register_sent_at`` is stored *before* the call. On resume a
  chunk with that mark but no confirmation is first looked up with QueryBatchRegisterDeviceStatus:
  still ``CHECK_SUCCESS`` means the call never took effect and it is sent (once more); ``CREATE…``
  means it did, and the workflow only polls. The platform itself refuses to register one ApplyId
  twice, so even a race cannot create devices twice.
* BatchRegisterDevice (auto-named): there is no ApplyId to look up before the answer, and sending
  it again would create a second batch. A chunk marked as sent with no ApplyId is never resent:
  the request fails with a reason that says so and asks for a look at the console.

The result before the IotIds: for named devices the final QueryBatchRegisterDeviceStatus answer
already says which were created and which failed (InvalidList and its reasons), so the request ends
(and its result is posted) as soon as every chunk's creation has ended, and the devices' IotIds are
read from QueryPageByApplyId afterwards, a chunk at a time (``iot_ids_read_at``), by the same
step of a final request (:meth:`Reconciler._read_iot_ids`); :meth:`Reconciler.resume` wakes final
requests whose IotIds are still unread, so a crash in between only delays them. Reading them is
retried on API errors and never changes the request's outcome; when it has not succeeded within
``phase_timeout`` of the result, iotreg stops trying, logs it and records ``iot_ids_not_read``: the
devices exist and are known by ProductKey and DeviceName, and ``iotreg credentials`` lists their
IotIds from the platform at any time. Devices named by the platform (BatchRegisterDevice) are only
known from the pages, so their pages are still read before the result.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

from bot.aliyun import errors
from bot.aliyun.client import ApplyStatus, BatchStatus, IotClient
from bot.aliyun.ratelimit import SlotLater, deferring
from bot.clock import Clock
from bot.domain import ACTIVE_STATES, CREATION_ENDED, SYSTEM, Chunk, Kind, NotFound, Origin, Outcome, Request, Rule, State, Timing
from bot.leases import Leases
from bot.store import Store, StoreUnavailable

if TYPE_CHECKING:
    from bot.registration import Jobs

log = logging.getLogger(__name__)
_T = TypeVar("_T")

CREATE_FINAL = frozenset(CREATION_ENDED)
#: A chunk status of our own: its register call may or may not have reached the platform.
UNKNOWN = "UNKNOWN"
#: The platform's answer for an ApplyId it does not know (any more).
APPLY_GONE = "iot.device.DeviceApplyIsNotFound"
CHECK = "BatchCheckDeviceNames"
# A check or a status poll that would wait longer than its patience for its rate-limit slot
# (:func:`~bot.aliyun.ratelimit.deferring`) books the slot and ends the step, which is woken again a
# little before the slot's time (the lead, which covers the step's own work before its call):
# scheduler workers do not sleep through a queue of checks or polls while other requests' steps have
# calls of their own to make. (Register calls and the pages of a finished creation still wait in the
# limiter: they are the work the quota is for, and a register call is claimed before it is sent.)
#: A request of several chunks sends this many of their checks at once (each in its own slot of the
#: quota): the platform takes up to ten a second, and a check of 10,000 names is a large request.
CHECKS_AT_ONCE = 4
#: ... and reads the IotIds of this many chunks at once (each page in its own slot of the quota): a
#: single reader waits a round trip for every page of 50.
PAGE_READERS = 4
#: How often a step that found the database unreachable is tried again.
DATABASE_RETRY = 5.0
#: How often each process looks for due steps that no process holds (:meth:`Reconciler.sweep`).
SWEEP_INTERVAL = 1.0
#: ... and how long a step must have been due (and its lease gone) before a sweep takes it: the
#: process that made it due wakes it itself at its time, and a sweep racing that wake would take
#: the step away from the process that holds its booked rate-limit slot (a slot lost).
SWEEP_GRACE = 1.0


class LeaseLost(Exception):
    """This process may no longer hold the lease of the request whose step it runs."""


class Reconciler:
    """Moves every unfinished request on, one step at a time."""

    #: What a step does in each unfinished state (filled in below the class).
    PHASES: ClassVar[dict[State, Callable[[Reconciler, Request], None]]]

    def __init__(
        self,
        store: Store,
        client: IotClient,
        clock: Clock,
        timing: Timing,
        jobs: Jobs,
        expire: Callable[[Request], None],
        *,
        origins: frozenset[Origin] | None = None,
        remind: Callable[[Request], datetime | None] = lambda request: None,
        rule_of: Callable[[Request], Rule] = lambda request: request.rule or Rule(),
        leases: Leases | None = None,
    ) -> None:
        """``expire``: the request service's rule for a request whose approval time ran out;
        ``remind``: its reminders (returns when the next is due); ``rule_of``: a request's rule."""
        self.store = store
        self.client = client
        self.clock = clock
        self.timing = timing
        self.jobs = jobs
        self.requests_expire = expire
        self.requests_remind = remind
        self.rule_of = rule_of
        self.origins = origins
        self.leases = leases or Leases(store, clock)
        self.owner = self.leases.owner
        self._locks: dict[int, threading.Lock] = {}
        self._polls: dict[int, set[int]] = {}  # see _poll_round
        self._round_due: dict[int, datetime] = {}  # when an interrupted round goes on
        self._locks_guard = threading.Lock()
        self._step_state = threading.local()  # .told: the running step wrote an event for the outbox

    def resume(self) -> int:
        """At start: wake every unfinished request and the outbox. Returns how many were woken.

        Each step first looks at its due time in the database (:meth:`_advance`), so a request
        whose next poll is a minute away is only scheduled for then, here or on any replica.
        """
        unfinished = self.store.requests(states=ACTIVE_STATES, origins=self.origins, limit=100_000)
        for request in unfinished:
            self.jobs.wake(request.id)
        unread = self.store.unread_iot_ids(origins=self.origins)  # finished, but IotIds still to read
        for request_id in unread:
            self.jobs.wake(request_id)
        self.jobs.wake_outbox()
        return len(unfinished) + len(unread)

    def sweep(self, limit: int = 100) -> int:
        """Wake here the steps that are due and that no process holds: the ones whose process died
        (its lease ran out), stopped, or was asked for them by a replica that could not take them.
        Every replica sweeps every :data:`SWEEP_INTERVAL` for steps due (and not leased) for
        :data:`SWEEP_GRACE`; the leases decide who runs each step. Returns how many steps were woken
        (the outbox counts as one)."""
        now = self.clock.now()
        due = self.store.due_requests(now - timedelta(seconds=SWEEP_GRACE), origins=self.origins, limit=limit)
        for request_id in due:
            self.jobs.wake(request_id)
        next_event = self.store.next_event_time(self.origins)
        if next_event is not None and next_event <= now:
            self.jobs.wake_outbox()
            return len(due) + 1
        return len(due)

    def advance(self, request_id: int) -> None:
        """Do the next step of a request, then schedule the one after. Safe to call at any time.

        While the database cannot be reached the step is tried again every :data:`DATABASE_RETRY`
        seconds: every step is written so that stopping it anywhere and doing it again repeats
        nothing that matters (the crash windows above), and a lost database is one more such stop.
        """
        try:
            self._advance(request_id)
        except StoreUnavailable as exc:
            log.warning("request #%d waits for the database: %s", request_id, exc)
            self.jobs.wake(request_id, self.clock.now() + timedelta(seconds=DATABASE_RETRY))

    def _advance(self, request_id: int) -> None:
        lease = f"request:{request_id}"
        with self._lock(request_id):
            if not self.leases.take(lease):
                # Another process runs this step. It wakes the next one; should it die, its lease
                # runs out, and this process (or any replica's sweep) takes the step over then.
                self.jobs.wake(request_id, self.clock.now() + timedelta(seconds=self.leases.seconds))
                return
            try:
                self._advance_leased(request_id)
            finally:
                self.leases.release(lease)

    def _advance_leased(self, request_id: int) -> None:
        now = self.clock.now()
        # Due at its time, not before: a step woken for a booked slot has its lead in the time it
        # stored, and a poll sent early can find a check or a creation a moment before its end.
        turn = self.store.begin_request_step(request_id, now, now + timedelta(seconds=self.leases.seconds))
        if not turn.due:
            # Another process did this step since this wake was asked for: not again, only when due.
            if turn.due_at is not None:
                self.jobs.wake(request_id, turn.due_at)
            return
        if self._round_due.pop(request_id, None) != turn.due_at:
            self._polls.pop(request_id, None)  # another process stepped it since: its round is not ours to go on with
        request = self.store.get(request_id)
        if request is None or request.final:
            self._polls.pop(request_id, None)
            # Should reading fail unexpectedly, it is tried again at the next poll.
            at = None if request is None else self.clock.now() + timedelta(seconds=self.timing.next_poll(request.polls))
            try:
                at = self._read_iot_ids(request) if request is not None else None
            finally:
                at = self.store.end_request_step(request_id, turn, at)
                if at is not None:
                    self.jobs.wake(request_id, at)
            return
        later: SlotLater | None = None
        lost = False
        self._step_state.told = False
        try:
            self._step(request)
        except SlotLater as exc:
            later = exc  # a call's slot is booked: the step goes on at its time
        except LeaseLost as exc:
            log.warning("%s", exc)
            lost = True
        except errors.IotError as exc:
            self._api_error(request, exc)
        except Exception:
            # Not the platform's refusal but a fault of ours or of the wire: back off, keep
            # the request scheduled, and let the job's error listener report it.
            self.store.update_request(request_id, polls=request.polls + 1)
            raise
        finally:
            if lost:
                request = None  # the new holder says what is next
            elif later is None or self._step_state.told:
                request = self.store.get(request_id)
            # else: cut short by a booked slot, with nothing to tell: still the unfinished request it was
            at: datetime | None = None
            if request is not None and not request.final:
                if later is None:
                    at = self._next_wake(request)
                else:  # a little early: a late step would miss its slot, an early one waits out the rest
                    at = self.clock.now() + timedelta(seconds=later.come_back)
                    self._round_due[request_id] = at  # the round goes on at that step, if it is this process's
            elif request is not None and self._unread_chunks(request_id):
                # It ended in this step: its result goes out now (the outbox, below), and its IotIds
                # are read at the next step, due now in the database (any replica, should this die).
                at = self.clock.now()
            if not lost:
                # Woken meanwhile (an approval on another replica, whose own wake found the step
                # leased): the earlier time stands, and this process wakes it then.
                at = self.store.end_request_step(request_id, turn, at)
            if at is not None:
                self.jobs.wake(request_id, at)
            if self._step_state.told:
                # Only then: most steps are polls that tell nobody anything. An event written by
                # a path that does not say so is still found by the next sweep, within a second.
                self.jobs.wake_outbox()

    def _step(self, request: Request) -> None:
        if self._phase_overdue(request):
            return
        self.PHASES[request.state](self, request)

    def _approved(self, request: Request) -> None:
        self._transition(request, State.APPROVED, State.REGISTERING, "registering", notify=("registering", {}))
        self._advance_register(self._get(request.id))

    def _awaiting_approval(self, request: Request) -> None:
        self._step_state.told = True  # an expiry or a reminder is news
        self.requests_expire(request)
        self.requests_remind(self._get(request.id))

    def _advance_check(self, request: Request) -> None:
        with deferring(request.id):  # checks and polls: nothing is lost by doing them later
            self._check_and_poll(request)

    def _check_and_poll(self, request: Request) -> None:
        unchecked = [c for c in self.store.chunks(request.id) if c.apply_id is None and c.status is None]
        submitted = self._submit_checks(request, unchecked)
        if submitted is None:
            return
        polled = self._poll_round(request.id)
        for chunk in self.store.chunks(request.id):
            # A check sent a moment ago cannot have ended: poll it at the next step, not now
            # (half the status calls, and the quota they would take).
            if chunk.status == ApplyStatus.CHECK and chunk.chunk_no not in submitted and chunk.chunk_no not in polled:
                status = self.client.query_batch_register_device_status(request.product_key, chunk.apply_id)
                polled.add(chunk.chunk_no)
                if status.status == ApplyStatus.CHECK_FAILED:
                    self._record_invalid(request.id, status)
                self.store.update_chunk(request.id, chunk.chunk_no, status=status.status.value)
        self._polls.pop(request.id, None)  # the round is complete
        self._reset_errors(request)
        statuses = [c.status for c in self.store.chunks(request.id)]
        if any(s == ApplyStatus.CHECK for s in statuses):
            self.store.update_request(request.id, polls=request.polls + 1)
            return
        counts = self.store.outcome_counts(request.id)
        if ApplyStatus.CHECK_FAILED in statuses:
            invalid = counts.get(Outcome.INVALID, 0)
            self._transition(
                request, State.CHECKING, State.CHECK_FAILED, "check_failed",
                detail={"invalid": invalid}, reason=f"{invalid} name(s) did not pass the platform's check",
                notify=("check_failed", {"invalid": invalid, "valid": sum(counts.values()) - invalid}),
            )
        elif self.rule_of(request).auto_approves(request.count):
            rule = self.rule_of(request)
            by_policy = {"by_policy": rule.auto_approve_max, "rule": rule.source}
            self._transition(
                request, State.CHECKING, State.APPROVED, "approved",
                detail={"apply_ids": [c.apply_id for c in self.store.chunks(request.id)], **by_policy},
                decided_by=SYSTEM, decided_at=self.clock.now(), notify=("approved", by_policy),
            )
        else:
            self._transition(
                request, State.CHECKING, State.AWAITING_APPROVAL, "checked",
                detail={"apply_ids": [c.apply_id for c in self.store.chunks(request.id)]},
                expires_at=self.clock.now() + timedelta(seconds=self.timing.approval_ttl),
                notify=("awaiting_approval", {}),
            )

    def _submit_checks(self, request: Request, chunks: list[Chunk]) -> set[int] | None:
        """Send the checks of ``chunks``, :data:`CHECKS_AT_ONCE` at a time; each is recorded as soon as
        it is answered. Returns the chunks whose check went out, or ``None`` if the request failed.

        Once every check sent has been recorded, an error of one is raised (the first, in chunk
        order), else the :class:`SlotLater` of the one that comes back soonest: the others of those
        chunks keep their booked slots for that step."""
        outcomes = self._each_chunk(request, chunks, self._submit_check_caught, CHECKS_AT_ONCE)
        if errors_ := [o for o in outcomes if isinstance(o, Exception)]:
            raise errors_[0]
        if later := [o for o in outcomes if isinstance(o, _Later)]:
            # Each was raised a while ago: the step comes back for the slot that is soonest now.
            now = self.clock.monotonic()
            soonest = min(later, key=lambda o: o.exc.wait - o.raised_at)
            raise SlotLater(CHECK, soonest.exc.wait - (now - soonest.raised_at), soonest.exc.lead)
        for outcome in outcomes:
            if isinstance(outcome, str):
                self._fail(request, outcome)
                return None
        return {chunk.chunk_no for chunk, outcome in zip(chunks, outcomes) if outcome is True}

    @staticmethod
    def _each_chunk(request: Request, chunks: list[Chunk], work: Callable[[Request, Chunk], _T], at_once: int) -> list[_T]:
        """``work(request, chunk)`` of each chunk, up to ``at_once`` at a time (in this thread when
        there is one), in chunk order. Once every one has ended, the first error is raised."""
        if len(chunks) <= 1:
            return [work(request, chunk) for chunk in chunks]
        with ThreadPoolExecutor(min(at_once, len(chunks)), thread_name_prefix=f"chunks-{request.id}") as pool:
            futures = [pool.submit(work, request, chunk) for chunk in chunks]
        return [future.result() for future in futures]

    def _submit_check_caught(self, request: Request, chunk: Chunk) -> bool | str | _Later | Exception:
        try:
            return self._submit_check(request, chunk)
        except SlotLater as exc:
            return _Later(exc, self.clock.monotonic())
        except Exception as exc:  # noqa: BLE001 - raised by the step once every check is recorded
            return exc

    def _submit_check(self, request: Request, chunk: Chunk) -> bool | str:
        """One chunk's check: ``True`` if it went out, ``False`` if its names were refused at once,
        or why the request must fail (its ApplyId held by another request)."""
        with deferring((request.id, chunk.chunk_no)):
            self.client.limiter.hold(CHECK)  # its slot first: a step that must come back later reads nothing
            names = self.store.device_names(request.id, chunk.chunk_no)
            try:
                answer = self.client.batch_check_device_names(request.product_key, names)
            except errors.NamesRefused as exc:
                # Refused at once, no ApplyId: the same outcome as an asynchronous CHECK_FAILED.
                self.store.set_outcomes(request.id, [(d.name, Outcome.INVALID, d.reason, None) for d in exc.invalid])
                self.store.update_chunk(request.id, chunk.chunk_no, status=ApplyStatus.CHECK_FAILED.value)
                return False
        if held := self._held_elsewhere(request, answer.apply_id):
            return held
        self.store.update_chunk(request.id, chunk.chunk_no, apply_id=answer.apply_id, status=ApplyStatus.CHECK.value)
        self.store.record(request.id, SYSTEM, "check_submitted", self.clock.now(), {"chunk": chunk.chunk_no, "apply_id": answer.apply_id})
        return True

    def _advance_register(self, request: Request) -> None:
        sent: set[int] = set()
        for chunk in self.store.chunks(request.id):
            if chunk.register_confirmed_at is None and chunk.status != UNKNOWN:
                if request.kind == Kind.NAMES:
                    self._register_checked_chunk(request, chunk)
                else:
                    self._register_counted_chunk(request, chunk)
                sent.add(chunk.chunk_no)
        progressed = False
        polled = self._poll_round(request.id)
        try:
            for chunk in self.store.chunks(request.id):
                # As with checks: a creation submitted in this very step is polled at the next one.
                due = chunk.register_confirmed_at is not None and chunk.status not in CREATE_FINAL
                if due and chunk.chunk_no not in sent and chunk.chunk_no not in polled:
                    with deferring(request.id):
                        status = self.client.query_batch_register_device_status(request.product_key, chunk.apply_id)
                    polled.add(chunk.chunk_no)
                    # Only CREATE_* is final here: a platform that still says CHECK_SUCCESS just after
                    # the register call has not started creating yet.
                    if status.status in CREATE_FINAL:
                        self._collect(request, chunk, status)
                        progressed = True
        finally:
            # Also when a later chunk's poll is deferred: the chunks that ended are news now.
            chunks = self.store.chunks(request.id)
            settled = [c for c in chunks if c.status in CREATE_FINAL or c.status == UNKNOWN]
            if progressed and len(settled) < len(chunks):
                self.store.enqueue(request.id, "progress", {"chunks_done": len(settled), "chunks": len(chunks)}, self.clock.now())
                self._step_state.told = True
        self._polls.pop(request.id, None)  # the round is complete
        self._reset_errors(request)
        if len(settled) < len(chunks):
            self.store.update_request(request.id, polls=request.polls + 1)
            return
        unknown = [c for c in chunks if c.status == UNKNOWN]
        counts = self.store.outcome_counts(request.id)
        if unknown:
            self._fail(request, "; ".join(c.error or "" for c in unknown))
        elif counts.get(Outcome.CREATED, 0):
            self._transition(request, State.REGISTERING, State.DONE, "registered", detail=counts, notify=("finished", {}))
        else:
            self._fail(request, "the platform created none of the devices")

    def _claim(self, request: Request, chunk: Chunk) -> str:
        """Whose turn it is to act on a chunk's register call: "send", "resolve" or "wait".

        "resolve" means a call went out earlier and its effect is unknown: ours (an answer that
        settled nothing) or a crashed process's (its lease ran out).
        """
        now = self.clock.now()
        if chunk.register_sent_at is None:
            return "send" if self.store.claim_register(request.id, chunk.chunk_no, self.owner, now) else "wait"
        # Ours, or a process's that lost this request's lease (every step runs under it): the call
        # may be in flight no more, so its effect is looked up rather than waited for.
        return "resolve"

    def _register_checked_chunk(self, request: Request, chunk: Chunk) -> None:
        turn = self._claim(request, chunk)
        if turn == "wait":
            return
        if turn == "resolve":
            # Sent before, outcome unknown: ask the platform what happened before sending anything.
            status = self.client.query_batch_register_device_status(request.product_key, chunk.apply_id)
            if status.status != ApplyStatus.CHECK_SUCCESS:
                self.store.update_chunk(request.id, chunk.chunk_no, register_confirmed_at=self.clock.now(), status=ApplyStatus.CREATE.value)
                self.store.record(request.id, SYSTEM, "register_confirmed", self.clock.now(), {"apply_id": chunk.apply_id, "status": status.status.value})
                return
            if not self.store.claim_register(request.id, chunk.chunk_no, self.owner, self.clock.now(), replacing=chunk.register_sent_at):
                return  # someone else took it over at the same moment
        self._still_ours(request)
        self.client.batch_register_device_with_apply_id(request.product_key, chunk.apply_id)
        self.store.update_chunk(request.id, chunk.chunk_no, register_confirmed_at=self.clock.now(), status=ApplyStatus.CREATE.value)
        self.store.record(request.id, SYSTEM, "register_submitted", self.clock.now(), {"chunk": chunk.chunk_no, "apply_id": chunk.apply_id})

    def _register_counted_chunk(self, request: Request, chunk: Chunk) -> None:
        # Before the claim: a claimed auto-named call is never sent again by anyone, so it must go.
        self._still_ours(request)
        turn = self._claim(request, chunk)
        if turn == "wait":
            return
        if turn == "resolve":
            # No ApplyId to look up, and sending again could create a second batch: never resend.
            reason = (
                f"the call to create {chunk.size:,} device(s) (part {chunk.chunk_no + 1}) may or may not have "
                "reached the platform, and it is not sent again to avoid creating them twice; "
                f"check product {request.product_key} in the IoT Platform console"
            )
            self.store.update_chunk(request.id, chunk.chunk_no, status=UNKNOWN, error=reason)
            self.store.record(request.id, SYSTEM, "register_unknown", self.clock.now(), {"chunk": chunk.chunk_no})
            return
        try:
            apply_id = self.client.batch_register_device(request.product_key, chunk.size)
        except errors.IotError as exc:
            if not exc.may_have_taken_effect:
                # The platform did not act on it (refused, throttled, rejected): safe to try later.
                self.store.release_register(request.id, chunk.chunk_no, self.owner)
            raise
        if held := self._held_elsewhere(request, apply_id):
            # Created, but under an ApplyId this database cannot hold twice: the part ends unknown.
            reason = f"{held}; part {chunk.chunk_no + 1} was created under it: `iotreg status {apply_id} -p {request.product_key}`"
            self.store.update_chunk(request.id, chunk.chunk_no, status=UNKNOWN, error=reason)
            self.store.record(request.id, SYSTEM, "register_unknown", self.clock.now(), {"chunk": chunk.chunk_no, "apply_id": apply_id})
            return
        self.store.update_chunk(
            request.id, chunk.chunk_no, apply_id=apply_id, register_confirmed_at=self.clock.now(), status=ApplyStatus.CREATE.value
        )
        self.store.record(request.id, SYSTEM, "register_submitted", self.clock.now(), {"chunk": chunk.chunk_no, "apply_id": apply_id})

    def _still_ours(self, request: Request) -> None:
        """Right before a call that must not be made twice: raise :class:`LeaseLost` unless this
        process surely still holds the request's lease (its renewals may have failed, or the
        process is stopping and handed it back)."""
        if not self.leases.fresh(f"request:{request.id}"):
            raise LeaseLost(f"request #{request.id}: its lease may have run out; the call is left to whoever holds it now")

    def _held_elsewhere(self, request: Request, apply_id: int) -> str | None:
        """Why ``apply_id`` cannot be this request's, when another request already holds it.

        The platform never hands out an ApplyId twice; a platform that was reset (an emulator
        started again beside a kept database) may. Storing it would break the one-ApplyId-one-part
        rule, so the request that got it fails, and the holder keeps its own.
        """
        holder = self.store.chunk_for_apply_id(apply_id)
        if holder is None or holder.request_id == request.id:
            return None
        return (
            f"IoT Platform gave ApplyId {apply_id}, which request #{holder.request_id} already holds: the platform "
            "(or its emulator) was reset while iotreg kept its database; submit the names again"
        )

    def _give_up_registering(
        self,
        request: Request,
        reason: str,
        pending: str = "not confirmed: the platform had not finished when iotreg stopped waiting; see `iotreg status`",
    ) -> None:
        """Fail a registration, but first record every device the platform did create by now;
        ``pending`` is what the others are told."""
        for chunk in self.store.chunks(request.id):
            if chunk.apply_id is None or chunk.register_confirmed_at is None and chunk.register_sent_at is None:
                continue
            if chunk.status in CREATE_FINAL:
                continue
            try:
                status = self.client.query_batch_register_device_status(request.product_key, chunk.apply_id)
                if status.status in CREATE_FINAL:
                    self._collect(request, chunk, status)
                    continue
                self._collect_partial(request, chunk)
            except errors.IotError as exc:
                log.warning("request #%d: could not collect ApplyId %s before giving up: %s", request.id, chunk.apply_id, exc)
        self.store.set_reasons(request.id, Outcome.PENDING, pending)
        self._fail(request, reason)

    def _collect_partial(self, request: Request, chunk: Chunk) -> None:
        """The devices a still-running creation has made so far."""
        created = [(d.name, d.iot_id) for d in self.client.iter_devices_by_apply_id(chunk.apply_id)]
        if request.kind == Kind.COUNT:
            self.store.add_devices(request.id, chunk.chunk_no, ((name, Outcome.CREATED, iot_id) for name, iot_id in created))
        else:
            self.store.set_outcomes(request.id, [(name, Outcome.CREATED, None, iot_id) for name, iot_id in created])

    def _collect(self, request: Request, chunk: Chunk, status: BatchStatus) -> None:
        """Record each device's outcome for a chunk whose creation has ended, then its status.

        Outcomes first, status after: a crash in between only repeats the collection. Named
        devices: from ``status`` alone (CREATE_SUCCESS: all of them; CREATE_FAILED: InvalidList
        failed, with its reasons, and ValidList was created), their IotIds read after the result
        (:meth:`_read_iot_ids`). Devices named by the platform are only known from the pages.
        """
        if request.kind == Kind.COUNT:
            created = [(d.name, Outcome.CREATED, d.iot_id) for d in self.client.iter_devices_by_apply_id(chunk.apply_id)]
            self.store.add_devices(request.id, chunk.chunk_no, created)
            self.store.update_chunk(request.id, chunk.chunk_no, status=status.status.value, iot_ids_read_at=self.clock.now())
            return
        reasons = {d.name: d.reason for d in status.details}
        failed, valid = set(status.invalid), set(status.valid)
        rows: list[tuple[str, Outcome, str | None, str | None]] = []
        for name, _ in self.store.device_names(request.id, chunk.chunk_no):
            if name in failed:
                rows.append((name, Outcome.NOT_CREATED, reasons.get(name) or "creation failed", None))
            elif status.status == ApplyStatus.CREATE_SUCCESS or name in valid:
                rows.append((name, Outcome.CREATED, None, None))
            else:
                rows.append((name, Outcome.NOT_CREATED, "not reported as created by the platform", None))
        self.store.set_outcomes(request.id, rows)
        self.store.update_chunk(request.id, chunk.chunk_no, status=status.status.value)

    def _unread_chunks(self, request_id: int) -> list[Chunk]:
        return [c for c in self.store.chunks(request_id) if c.iot_ids_unread]

    def _read_iot_ids(self, request: Request) -> datetime | None:
        """The step of a final request: read the IotIds of its created devices, :data:`PAGE_READERS`
        chunks at a time, each chunk's pages in order.

        Never changes the request's state or its outcomes. On an API error it is tried again at
        the poll back-off (the time returned); given up ``phase_timeout`` after the result (see the
        module docstring).
        """
        unread = self._unread_chunks(request.id)
        if not unread:
            return None
        now = self.clock.now()
        if request.updated_at is not None and (now - request.updated_at).total_seconds() > self.timing.phase_timeout:
            for chunk in unread:
                self.store.set_iot_ids(request.id, chunk.chunk_no, (), now)
            why = f"not read within {_duration(self.timing.phase_timeout)} of the result"
            log.warning("request #%d: gave up reading the IotIds of %d part(s): %s", request.id, len(unread), why)
            self.store.record(request.id, SYSTEM, "iot_ids_not_read", now, {"chunks": [c.chunk_no for c in unread], "reason": why})
            return None
        try:
            self._each_chunk(request, unread, self._read_chunk_iot_ids, PAGE_READERS)
        except errors.IotError as exc:
            log.warning("request #%d: IotIds not read yet, trying again: %s", request.id, exc)
            self.store.record(request.id, SYSTEM, "api_error", self.clock.now(), {"code": exc.code, "message": exc.message, "request_id": exc.request_id})
            self.store.update_request(request.id, polls=request.polls + 1)
            return self.clock.now() + timedelta(seconds=self.timing.next_poll(request.polls))
        return None

    def _read_chunk_iot_ids(self, request: Request, chunk: Chunk) -> None:
        listed = [(d.name, d.iot_id) for d in self.client.iter_devices_by_apply_id(chunk.apply_id)]
        matched = self.store.set_iot_ids(request.id, chunk.chunk_no, listed, self.clock.now())
        if matched < len(listed):
            log.warning(
                "request #%d: ApplyId %s lists %d device(s) its status did not report as created",
                request.id, chunk.apply_id, len(listed) - matched,
            )

    def _record_invalid(self, request_id: int, status: BatchStatus) -> None:
        reasons = {d.name: d.reason for d in status.details}
        self.store.set_outcomes(
            request_id, [(name, Outcome.INVALID, reasons.get(name) or "refused by the platform's check", None) for name in status.invalid]
        )

    def _get(self, request_id: int) -> Request:
        request = self.store.get(request_id)
        if request is None:
            raise NotFound(f"there is no request #{request_id}")
        return request

    def _poll_round(self, request_id: int) -> set[int]:
        """The chunks already polled in the request's round of polls in progress.

        A round that a deferred poll (SlotLater) interrupts goes on from where it stopped at the
        next step, instead of polling the first chunks again and never reaching the last; only a
        complete round counts as a poll for the back-off. Kept in memory: after a restart a round
        starts afresh. Called under the request's lock.
        """
        return self._polls.setdefault(request_id, set())

    def _lock(self, request_id: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(request_id, threading.Lock())

    def _transition(self, request: Request, from_state: State, to_state: State, event: str, **kwargs: Any) -> bool:
        """A workflow-made transition; starting a new phase resets the poll back-off."""
        now = self.clock.now()
        self._step_state.told = True  # every workflow-made transition has its event
        return self.store.transition(
            request.id, from_states=[from_state], to_state=to_state, actor=SYSTEM, event=event, now=now,
            polls=0, errors_in_row=0, phase_started_at=now, **kwargs,
        )

    def _fail(self, request: Request, reason: str) -> None:
        self._step_state.told = True
        self.store.transition(
            request.id, from_states=[request.state], to_state=State.FAILED, actor=SYSTEM, event="failed",
            now=self.clock.now(), detail={"reason": reason}, reason=reason, notify=("finished", {"reason": reason}),
        )

    def _phase_overdue(self, request: Request) -> bool:
        if request.state not in (State.CHECKING, State.REGISTERING) or request.phase_started_at is None:
            return False
        waited = (self.clock.now() - request.phase_started_at).total_seconds()
        if waited <= self.timing.phase_timeout:
            return False
        if request.state == State.CHECKING:
            self._fail(request, f"the check did not finish within {_duration(self.timing.phase_timeout)}; gave up waiting")
        else:
            self._give_up_registering(
                request, f"the registration did not finish within {_duration(self.timing.phase_timeout)}; gave up waiting"
            )
        return True

    def _api_error(self, request: Request, exc: errors.IotError) -> None:
        request = self.store.get(request.id) or request  # the step may have moved it on (approved -> registering)
        # The client retried until IOT_RETRY_DEADLINE already: a platform it could not even connect
        # to (refused, unresolvable) counts as an error in a row, not as a passing hiccup.
        unreachable = isinstance(exc, errors.TransportError) and not exc.may_have_taken_effect
        errors_in_row = request.errors_in_row + (0 if exc.retryable and not unreachable else 1)
        self.store.record(request.id, SYSTEM, "api_error", self.clock.now(), {"code": exc.code, "message": exc.message, "request_id": exc.request_id})
        # A check the platform refuses outright (no such product, malformed key, credentials it
        # does not accept), or that cannot reach it at all, will not get better by waiting: nothing
        # is registered while checking, so it ends at once and says why. Nor will an ApplyId the
        # platform no longer knows, in any state.
        gone = exc.code == APPLY_GONE
        final_at_once = gone or request.state == State.CHECKING and (
            unreachable or isinstance(exc, errors.AuthError) or isinstance(exc, errors.BusinessError) and not exc.retryable
        )
        reason = self._gone(request) if gone else _explain(exc, request)
        if request.state == State.REGISTERING and gone:
            self._give_up_registering(request, reason, "not created: IoT Platform no longer knows the ApplyId")
        elif request.state == State.REGISTERING and errors_in_row >= self.timing.max_errors:
            self._give_up_registering(request, reason)
        elif final_at_once or errors_in_row >= self.timing.max_errors:
            self._fail(request, reason)
        else:
            log.warning("request #%d: %s", request.id, exc)
            self.store.update_request(request.id, errors_in_row=errors_in_row, polls=request.polls + 1)

    def _gone(self, request: Request) -> str:
        """The reason for a request one of whose ApplyIds the platform no longer knows."""
        apply_ids = ", ".join(str(c.apply_id) for c in self.store.chunks(request.id) if c.apply_id) or "(none)"
        return (
            f"IoT Platform no longer knows ApplyId {apply_ids} of this request ({APPLY_GONE}): the platform (or its "
            "emulator) was reset, or the application expired, since the names were checked; submit the names again"
        )

    def _reset_errors(self, request: Request) -> None:
        if request.errors_in_row:
            self.store.update_request(request.id, errors_in_row=0)

    def _next_wake(self, request: Request) -> datetime:
        now = self.clock.now()
        if request.state == State.AWAITING_APPROVAL and request.expires_at:
            reminder = self.requests_remind(request)  # nothing is due now: when the next one is
            return min(request.expires_at, reminder) if reminder else request.expires_at
        if request.state == State.APPROVED:
            return now
        return now + timedelta(seconds=self.timing.next_poll(max(0, request.polls - 1)))




Reconciler.PHASES = {
    State.CHECKING: Reconciler._advance_check,
    State.AWAITING_APPROVAL: Reconciler._awaiting_approval,
    State.APPROVED: Reconciler._approved,
    State.REGISTERING: Reconciler._advance_register,
}
assert set(Reconciler.PHASES) == ACTIVE_STATES, "every unfinished state needs a phase"


class _Later(NamedTuple):
    """A check of a chunk that books its slot for later, and when it said so."""

    exc: SlotLater
    raised_at: float


def may_be_alive(owner: str | None) -> bool:
    """Whether the process behind an owner token (``host:pid:nonce``) may still be running.

    Only a process on this host can be seen to be gone; one elsewhere is given its lease.
    """
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _explain(exc: errors.IotError, request: Request) -> str:
    if exc.code == "iot.prod.NotExistedProduct":
        return f"product {request.product_key} does not exist (check the ProductKey, the region and IOT_INSTANCE_ID)"
    if isinstance(exc, errors.TransportError) and not exc.may_have_taken_effect:
        return f"IoT Platform could not be reached: {exc.message} (check IOT_ENDPOINT or IOT_REGION_ID, and the network)"
    if isinstance(exc, errors.AuthError):
        return f"IoT Platform did not accept iotreg's credentials ({exc.code}): check the AccessKey settings"
    return f"IoT Platform answered {exc.code or type(exc).__name__}: {exc.message}"


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"

