"""The registration workflow: from a list of names to registered devices, one durable step at a time.

::

    checking ──► check_failed                      (a new request can retry the valid names)
        │
        ▼
    awaiting_approval ──► rejected | cancelled | expired
        │ approve (not the requester)
        ▼
    approved ──► registering ──► done | failed

The workflow knows nothing of Slack. Front ends (the Slack app, the CLI) call :meth:`submit`,
:meth:`approve`, :meth:`reject`, … and hear back through a :class:`Notifier`, fed from the
store's outbox, so a notification is never lost and never precedes the state it reports.

All progress happens in :meth:`Workflow.advance`, a reconciler: it reads the request's state from
the database, does the next step, stores the result, and asks the :class:`Jobs` to wake it again
when there is more to do. Because every decision comes from stored state, a process killed at any
moment picks up where it stopped when :meth:`resume` runs at start.

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
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from bot import store as st
from bot import wiring
from bot.aliyun import errors
from bot.aliyun.client import MAX_COUNT_PER_REGISTER, ApplyStatus, BatchStatus, IotClient
from bot.aliyun.ratelimit import SlotLater, deferring
from bot.clock import Clock
from bot.config import Settings
from bot.store import Event, Request, Store

log = logging.getLogger(__name__)

SYSTEM = "iotreg"  # the actor of automatic steps in the audit trail
MAX_DELIVERY_ATTEMPTS = 30
CREATE_FINAL = frozenset({ApplyStatus.CREATE_SUCCESS.value, ApplyStatus.CREATE_FAILED.value})
#: A chunk status of our own: its register call may or may not have reached the platform.
UNKNOWN = "UNKNOWN"
#: A check or a status poll that would wait longer than this for its rate-limit slot books the slot
#: and ends the step, which is woken again just before the slot's time: scheduler workers do not
#: sleep through a queue of checks or polls while other requests' steps have calls of their own to
#: make. (Register calls and the pages of a finished creation still wait in the limiter: they are
#: the work the quota is for, and a register call is claimed before it is sent.)
SLOT_PATIENCE = 0.1


class Notifier(Protocol):
    """What a front end implements to hear about requests. Raise to have the event retried later."""

    def deliver(self, event: Event) -> None: ...


class Jobs(Protocol):
    """Runs :meth:`Workflow.advance` and :meth:`Workflow.deliver_events` when asked."""

    def wake(self, request_id: int, at: datetime | None = None) -> None: ...

    def wake_outbox(self, at: datetime | None = None) -> None: ...


class WorkflowError(Exception):
    """A front-end action that cannot be done; the message is for the person who asked."""


class NotFound(WorkflowError):
    pass


class NotAllowed(WorkflowError):
    pass


class Conflict(WorkflowError):
    """The request is no longer in a state where this makes sense (already decided, finished…)."""

    def __init__(self, message: str, request: Request) -> None:
        super().__init__(message)
        self.request = request


@dataclasses.dataclass(frozen=True)
class Timing:
    """How the workflow paces itself. Defaults follow the settings' defaults."""

    poll_interval: float = 5.0
    poll_max_interval: float = 60.0
    phase_timeout: float = 3600.0
    approval_ttl: float = 24 * 3600.0
    max_errors: int = 3
    chunk_size: int = 10_000
    #: How long another process's register call may be in flight before it counts as crashed:
    #: longer than the client can spend on one call (IOT_RETRY_DEADLINE plus IOT_TIMEOUT).
    claim_lease: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Timing:
        return cls(
            poll_interval=settings.poll_interval,
            poll_max_interval=max(settings.poll_interval, settings.poll_max_interval),
            phase_timeout=settings.poll_timeout,
            approval_ttl=settings.approval_ttl,
            chunk_size=min(settings.chunk_size, MAX_COUNT_PER_REGISTER),
            claim_lease=settings.retry_deadline + settings.timeout * 2 + 30,
        )

    def next_poll(self, polls: int) -> float:
        """Back off by half again per poll without news, up to the cap."""
        return min(self.poll_max_interval, self.poll_interval * 1.5**polls)


@dataclasses.dataclass(frozen=True)
class Summary:
    """What became of a request's devices."""

    request: Request
    created: int
    failed: int
    invalid: int
    pending: int
    rejected_locally: int

    @property
    def total(self) -> int:
        return self.created + self.failed + self.invalid + self.pending


class Workflow:
    """The one registration workflow behind every front end."""

    def __init__(
        self,
        store: Store,
        client: IotClient,
        notifier: Notifier,
        jobs: Jobs,
        clock: Clock,
        timing: Timing | None = None,
        *,
        origins: frozenset[str] | None = None,
    ) -> None:
        """``origins``: the front ends this workflow serves ("slack", "cli"); ``None`` for all.

        Each process resumes and notifies only its own requests, so the bot and the CLI can share
        one database without delivering each other's messages.
        """
        self.origins = origins
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.store = store
        self.client = client
        self.notifier = notifier
        self.jobs = jobs
        self.clock = clock
        self.timing = timing or Timing()
        self._locks: dict[int, threading.Lock] = {}
        self._polls: dict[int, set[int]] = {}  # see _poll_round
        self._locks_guard = threading.Lock()
        self._outbox_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        notifier: Notifier,
        jobs: Jobs,
        clock: Clock,
        *,
        origins: frozenset[str] | None = None,
        client: IotClient | None = None,
    ) -> Workflow:
        """The workflow over the configured database and IoT Platform account."""
        return cls(
            Store(settings.db_path),
            client or wiring.iot_client(settings, clock=clock),
            notifier,
            jobs,
            clock,
            Timing.from_settings(settings),
            origins=origins,
        )

    def close(self) -> None:
        self.client.close()
        self.store.close()

    # -- front-end actions --------------------------------------------------------------------

    def submit(
        self,
        product_key: str,
        requester: str,
        devices: Sequence[Any],
        *,
        origin: str,
        channel: str = "",
        thread_ts: str = "",
        rejected: Sequence[Any] = (),
        rejected_count: int | None = None,
        retry_of: int | None = None,
        upload_id: int | None = None,
        read_as: str | None = None,
    ) -> Request:
        """Open a request for ``devices`` (objects with ``name``/``nickname``/``line``, or names).

        ``rejected`` holds the lines refused locally (objects with ``line``/``value``/``reason``);
        they are kept for the report. ``read_as`` names the legacy encoding the list was read in,
        told with the request's creation. The check starts at once.
        """
        rows = [_device_row(d) for d in devices]
        if not rows:
            raise WorkflowError("there are no valid device names to register")
        size = self.timing.chunk_size
        chunks = [min(size, len(rows) - start) for start in range(0, len(rows), size)]
        request_id = self.store.create_request(
            product_key=product_key,
            requester=requester,
            origin=origin,
            channel=channel,
            thread_ts=thread_ts,
            kind="names",
            count=len(rows),
            state=st.CHECKING,
            now=self.clock.now(),
            rejected=[(r.line, r.value, r.reason) for r in rejected],
            rejected_count=len(rejected) if rejected_count is None else rejected_count,
            devices=rows,
            chunks=chunks,
            chunk_size=size,
            retry_of=retry_of,
            event=("created", {"read_as": read_as} if read_as else {}),
            upload_id=upload_id,
        )
        self._kick(request_id)
        return self._get(request_id)

    def submit_count(
        self, product_key: str, requester: str, count: int, *, origin: str, channel: str = "", thread_ts: str = ""
    ) -> Request:
        """Open a request for ``count`` devices named by the platform. Nothing to check: it waits for approval."""
        if count < 1:
            raise WorkflowError("the number of devices must be at least 1")
        size = min(self.timing.chunk_size, MAX_COUNT_PER_REGISTER)
        chunks = [min(size, count - start) for start in range(0, count, size)]
        now = self.clock.now()
        request_id = self.store.create_request(
            product_key=product_key,
            requester=requester,
            origin=origin,
            channel=channel,
            thread_ts=thread_ts,
            kind="count",
            count=count,
            state=st.AWAITING_APPROVAL,
            now=now,
            chunks=chunks,
            expires_at=now + timedelta(seconds=self.timing.approval_ttl),
            event=("awaiting_approval", {}),
        )
        self._kick(request_id, at=now + timedelta(seconds=self.timing.approval_ttl))
        return self._get(request_id)

    def approve(self, request_id: int, actor: str, *, allow_self: bool = False) -> Request:
        """Approve a request that waits for it. Only one approval ever wins; the rest get :class:`Conflict`."""
        request = self._get(request_id)
        if actor == request.requester and not allow_self:
            self.store.record(request_id, actor, "approval_denied", self.clock.now(), {"why": "requester"})
            raise NotAllowed("you asked for this registration, so someone else has to approve it")
        self._expire_if_due(request)
        now = self.clock.now()
        won = self.store.transition(
            request_id,
            from_states=[st.AWAITING_APPROVAL],
            to_state=st.APPROVED,
            actor=actor,
            event="approved",
            now=now,
            decided_by=actor,
            decided_at=now,
            notify=("approved", {"by": actor}),
        )
        if not won:
            raise Conflict(_already(self._get(request_id)), self._get(request_id))
        self._kick(request_id)
        return self._get(request_id)

    def reject(self, request_id: int, actor: str, reason: str = "") -> Request:
        """Turn a request down; it never registers anything."""
        request = self._get(request_id)
        self._expire_if_due(request)
        now = self.clock.now()
        if not self.store.transition(
            request_id,
            from_states=[st.AWAITING_APPROVAL],
            to_state=st.REJECTED,
            actor=actor,
            event="rejected",
            now=now,
            detail={"reason": reason},
            decided_by=actor,
            decided_at=now,
            reason=reason or None,
            notify=("rejected", {"by": actor, "reason": reason}),
        ):
            raise Conflict(_already(self._get(request_id)), self._get(request_id))
        self._kick(request_id)
        return self._get(request_id)

    def cancel(self, request_id: int, actor: str) -> Request:
        """Withdraw a request before it is approved."""
        now = self.clock.now()
        if not self.store.transition(
            request_id,
            from_states=[st.CHECKING, st.AWAITING_APPROVAL, st.CHECK_FAILED],
            to_state=st.CANCELLED,
            actor=actor,
            event="cancelled",
            now=now,
            decided_by=actor,
            decided_at=now,
            notify=("cancelled", {"by": actor}),
        ):
            raise Conflict(_already(self._get(request_id)), self._get(request_id))
        self._kick(request_id)
        return self._get(request_id)

    def retry_valid(self, request_id: int, actor: str) -> Request:
        """A new request with only the names that passed the failed check (the platform never repairs one)."""
        request = self._get(request_id)
        if request.state != st.CHECK_FAILED:
            raise Conflict(f"request #{request_id} is {request.state.replace('_', ' ')}, not a failed check", request)
        valid = [d for d in self.store.devices(request_id) if d.outcome != st.INVALID]
        if not valid:
            raise WorkflowError(f"request #{request_id} has no valid name left to retry")
        # The retry is still the original requester's request: whoever clicked, they may not
        # approve it themselves, and the clicker is kept in the audit trail.
        new = self.submit(
            request.product_key,
            request.requester,
            valid,
            origin=request.origin,
            channel=request.channel,
            retry_of=request_id,
        )
        self.store.record(request_id, actor, "retried", self.clock.now(), {"new_request": new.id})
        self.store.record(new.id, actor, "retry_of", self.clock.now(), {"request": request_id})
        return new

    # -- queries ------------------------------------------------------------------------------

    def get(self, request_id: int) -> Request | None:
        return self.store.get(request_id)

    def summary(self, request_id: int) -> Summary:
        request = self._get(request_id)
        counts = self.store.outcome_counts(request_id)
        pending = counts.get(st.PENDING, 0)
        if request.kind == "count":
            # Platform-named devices are only known once created.
            pending = max(0, request.count - sum(counts.values()))
        return Summary(
            request=request,
            created=counts.get(st.CREATED, 0),
            failed=counts.get(st.NOT_CREATED, 0),
            invalid=counts.get(st.INVALID, 0),
            pending=pending,
            rejected_locally=request.rejected_count,
        )

    def credentials(self, request_id: int) -> Iterator[tuple[str, str, str, str]]:
        """``(ProductKey, DeviceName, DeviceSecret, IotId)`` of every created device, fetched fresh.

        Secrets are never stored by iotreg: they come from QueryPageByApplyId each time.
        """
        request = self._get(request_id)
        for chunk in self.store.chunks(request_id):
            # Every chunk the platform took: even one iotreg gave up waiting for may have devices.
            if chunk.apply_id and chunk.register_confirmed_at is not None:
                for device in self.client.iter_devices_by_apply_id(chunk.apply_id):
                    yield request.product_key, device.name, device.device_secret, device.iot_id

    # -- the reconciler -----------------------------------------------------------------------

    def resume(self) -> int:
        """At start: wake every unfinished request and the outbox. Returns how many were woken."""
        unfinished = self.store.requests(states=st.ACTIVE_STATES, origins=self.origins, limit=100_000)
        for request in unfinished:
            self.jobs.wake(request.id)
        self.jobs.wake_outbox()
        return len(unfinished)

    def advance(self, request_id: int) -> None:
        """Do the next step of a request, then schedule the one after. Safe to call at any time."""
        with self._lock(request_id):
            request = self.store.get(request_id)
            if request is None or request.final:
                self._polls.pop(request_id, None)
                return
            later: SlotLater | None = None
            try:
                self._step(request)
            except SlotLater as exc:
                later = exc  # a call's slot is booked: the step goes on at its time
            except errors.IotError as exc:
                self._api_error(request, exc)
            except Exception:
                # Not the platform's refusal but a fault of ours or of the wire: back off, keep
                # the request scheduled, and let the job's error listener report it.
                self.store.update_request(request_id, polls=request.polls + 1)
                raise
            finally:
                request = self.store.get(request_id)
                if request is not None and not request.final:
                    if later is None:
                        at = self._next_wake(request)
                    else:  # a little early: a late step would miss its slot, an early one waits out the rest
                        at = self.clock.now() + timedelta(seconds=max(0.0, later.wait - SLOT_PATIENCE / 2))
                    self.jobs.wake(request_id, at)
                self.jobs.wake_outbox()

    def _step(self, request: Request) -> None:
        if self._phase_overdue(request):
            return
        if request.state == st.CHECKING:
            self._advance_check(request)
        elif request.state == st.AWAITING_APPROVAL:
            self._expire_if_due(request)
        elif request.state == st.APPROVED:
            self._transition(request, st.APPROVED, st.REGISTERING, "registering", notify=("registering", {}))
            self._advance_register(self._get(request.id))
        elif request.state == st.REGISTERING:
            self._advance_register(request)

    def _advance_check(self, request: Request) -> None:
        with deferring(request.id, SLOT_PATIENCE):  # checks and polls: nothing is lost by doing them later
            self._check_and_poll(request)

    def _check_and_poll(self, request: Request) -> None:
        submitted: set[int] = set()
        for chunk in self.store.chunks(request.id):
            if chunk.apply_id is None and chunk.status is None:
                names = self.store.device_names(request.id, chunk.chunk_no)
                try:
                    answer = self.client.batch_check_device_names(request.product_key, names)
                except errors.NamesRefused as exc:
                    # Refused at once, no ApplyId: the same outcome as an asynchronous CHECK_FAILED.
                    self.store.set_outcomes(request.id, [(d.name, st.INVALID, d.reason, None) for d in exc.invalid])
                    self.store.update_chunk(request.id, chunk.chunk_no, status=ApplyStatus.CHECK_FAILED.value)
                    continue
                self.store.update_chunk(request.id, chunk.chunk_no, apply_id=answer.apply_id, status=ApplyStatus.CHECK.value)
                self.store.record(request.id, SYSTEM, "check_submitted", self.clock.now(), {"chunk": chunk.chunk_no, "apply_id": answer.apply_id})
                submitted.add(chunk.chunk_no)
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
            invalid = counts.get(st.INVALID, 0)
            self._transition(
                request, st.CHECKING, st.CHECK_FAILED, "check_failed",
                detail={"invalid": invalid}, reason=f"{invalid} name(s) did not pass the platform's check",
                notify=("check_failed", {"invalid": invalid, "valid": sum(counts.values()) - invalid}),
            )
        else:
            self._transition(
                request, st.CHECKING, st.AWAITING_APPROVAL, "checked",
                detail={"apply_ids": [c.apply_id for c in self.store.chunks(request.id)]},
                expires_at=self.clock.now() + timedelta(seconds=self.timing.approval_ttl),
                notify=("awaiting_approval", {}),
            )

    def _advance_register(self, request: Request) -> None:
        sent: set[int] = set()
        for chunk in self.store.chunks(request.id):
            if chunk.register_confirmed_at is None and chunk.status != UNKNOWN:
                if request.kind == "names":
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
                    with deferring(request.id, SLOT_PATIENCE):
                        status = self.client.query_batch_register_device_status(request.product_key, chunk.apply_id)
                    polled.add(chunk.chunk_no)
                    # Only CREATE_* is final here: a platform that still says CHECK_SUCCESS just after
                    # the register call has not started creating yet.
                    if status.status in CREATE_FINAL:
                        # Outcomes first, status after: a crash in between only repeats the collection.
                        self._collect(request, chunk, status)
                        self.store.update_chunk(request.id, chunk.chunk_no, status=status.status.value)
                        progressed = True
        finally:
            # Also when a later chunk's poll is deferred: the chunks that ended are news now.
            chunks = self.store.chunks(request.id)
            settled = [c for c in chunks if c.status in CREATE_FINAL or c.status == UNKNOWN]
            if progressed and len(settled) < len(chunks):
                self.store.enqueue(request.id, "progress", {"chunks_done": len(settled), "chunks": len(chunks)}, self.clock.now())
        self._polls.pop(request.id, None)  # the round is complete
        self._reset_errors(request)
        if len(settled) < len(chunks):
            self.store.update_request(request.id, polls=request.polls + 1)
            return
        unknown = [c for c in chunks if c.status == UNKNOWN]
        counts = self.store.outcome_counts(request.id)
        if unknown:
            self._fail(request, "; ".join(c.error or "" for c in unknown))
        elif counts.get(st.CREATED, 0):
            self._transition(request, st.REGISTERING, st.DONE, "registered", detail=counts, notify=("finished", {}))
        else:
            self._fail(request, "the platform created none of the devices")

    def _claim(self, request: Request, chunk: st.Chunk) -> str:
        """Whose turn it is to act on a chunk's register call: "send", "resolve" or "wait".

        "resolve" means a call went out earlier and its effect is unknown: ours (an answer that
        settled nothing) or a crashed process's (its lease ran out).
        """
        now = self.clock.now()
        if chunk.register_sent_at is None:
            return "send" if self.store.claim_register(request.id, chunk.chunk_no, self.owner, now) else "wait"
        if chunk.claimed_by == self.owner:
            return "resolve"
        if (now - chunk.register_sent_at).total_seconds() < self.timing.claim_lease and _may_be_alive(chunk.claimed_by):
            return "wait"  # another process may have the call in flight
        return "resolve"

    def _register_checked_chunk(self, request: Request, chunk: st.Chunk) -> None:
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
        self.client.batch_register_device_with_apply_id(request.product_key, chunk.apply_id)
        self.store.update_chunk(request.id, chunk.chunk_no, register_confirmed_at=self.clock.now(), status=ApplyStatus.CREATE.value)
        self.store.record(request.id, SYSTEM, "register_submitted", self.clock.now(), {"chunk": chunk.chunk_no, "apply_id": chunk.apply_id})

    def _register_counted_chunk(self, request: Request, chunk: st.Chunk) -> None:
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
        self.store.update_chunk(
            request.id, chunk.chunk_no, apply_id=apply_id, register_confirmed_at=self.clock.now(), status=ApplyStatus.CREATE.value
        )
        self.store.record(request.id, SYSTEM, "register_submitted", self.clock.now(), {"chunk": chunk.chunk_no, "apply_id": apply_id})

    def _give_up_registering(self, request: Request, reason: str) -> None:
        """Fail a registration, but first record every device the platform did create by now."""
        for chunk in self.store.chunks(request.id):
            if chunk.apply_id is None or chunk.register_confirmed_at is None and chunk.register_sent_at is None:
                continue
            if chunk.status in CREATE_FINAL:
                continue
            try:
                status = self.client.query_batch_register_device_status(request.product_key, chunk.apply_id)
                if status.status in CREATE_FINAL:
                    self._collect(request, chunk, status)
                    self.store.update_chunk(request.id, chunk.chunk_no, status=status.status.value)
                    continue
                self._collect_partial(request, chunk)
            except errors.IotError as exc:
                log.warning("request #%d: could not collect ApplyId %s before giving up: %s", request.id, chunk.apply_id, exc)
        self.store.set_reasons(
            request.id,
            st.PENDING,
            "not confirmed: the platform had not finished when iotreg stopped waiting; see `iotreg status`",
        )
        self._fail(request, reason)

    def _collect_partial(self, request: Request, chunk: st.Chunk) -> None:
        """The devices a still-running creation has made so far."""
        created = [(d.name, d.iot_id) for d in self.client.iter_devices_by_apply_id(chunk.apply_id)]
        if request.kind == "count":
            self.store.add_devices(request.id, chunk.chunk_no, ((name, st.CREATED, iot_id) for name, iot_id in created))
        else:
            self.store.set_outcomes(request.id, [(name, st.CREATED, None, iot_id) for name, iot_id in created])

    def _collect(self, request: Request, chunk: st.Chunk, status: BatchStatus) -> None:
        """Record each device's outcome for a chunk whose creation has ended."""
        created = [(d.name, d.iot_id) for d in self.client.iter_devices_by_apply_id(chunk.apply_id)]
        if request.kind == "count":
            self.store.add_devices(request.id, chunk.chunk_no, ((name, st.CREATED, iot_id) for name, iot_id in created))
            return
        reasons = {d.name: d.reason for d in status.details}
        created_names = {name for name, _ in created}
        rows: list[tuple[str, str, str | None, str | None]] = [(name, st.CREATED, None, iot_id) for name, iot_id in created]
        for name, _ in self.store.device_names(request.id, chunk.chunk_no):
            if name not in created_names:
                reason = reasons.get(name) or ("creation failed" if name in status.invalid else "not reported as created by the platform")
                rows.append((name, st.NOT_CREATED, reason, None))
        self.store.set_outcomes(request.id, rows)

    def _record_invalid(self, request_id: int, status: BatchStatus) -> None:
        reasons = {d.name: d.reason for d in status.details}
        self.store.set_outcomes(
            request_id, [(name, st.INVALID, reasons.get(name) or "refused by the platform's check", None) for name in status.invalid]
        )

    # -- the outbox ---------------------------------------------------------------------------

    def deliver_events(self) -> int:
        """Hand due events to the notifier, in order per request. Returns how many were delivered."""
        delivered = 0
        with self._outbox_lock:
            now = self.clock.now()
            blocked: set[int] = set()
            for event in self.store.pending_events(self.origins):
                if event.request_id in blocked:
                    continue
                blocked.add(event.request_id)  # later events of a request wait for this one
                if event.next_at > now:
                    continue
                try:
                    self.notifier.deliver(event)
                except Exception as exc:  # noqa: BLE001 - the front end's failure must not lose the event
                    if event.attempts + 1 >= MAX_DELIVERY_ATTEMPTS:
                        # About two hours of trying: a fault that outlasts that would otherwise hold
                        # back every later event of the request. Kept in the outbox, with its error.
                        log.error("giving up on %s of request #%d after %d attempts: %s", event.kind, event.request_id, event.attempts + 1, exc)
                        self.store.mark_failed(event.id, f"gave up: {type(exc).__name__}: {exc}", now)
                        self.store.mark_delivered(event.id, now)
                        blocked.discard(event.request_id)
                        continue
                    delay = min(300.0, 2.0 ** min(event.attempts, 8))
                    log.warning("delivering %s of request #%d failed (%s); again in %.0fs", event.kind, event.request_id, exc, delay)
                    self.store.mark_failed(event.id, f"{type(exc).__name__}: {exc}", now + timedelta(seconds=delay))
                    continue
                self.store.mark_delivered(event.id, self.clock.now())
                blocked.discard(event.request_id)
                delivered += 1
        next_at = self.store.next_event_time(self.origins)
        if next_at is not None:
            self.jobs.wake_outbox(next_at)
        return delivered

    # -- helpers ------------------------------------------------------------------------------

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

    def _kick(self, request_id: int, at: datetime | None = None) -> None:
        self.jobs.wake(request_id, at)
        self.jobs.wake_outbox()

    def _transition(self, request: Request, from_state: str, to_state: str, event: str, **kwargs: Any) -> bool:
        """A workflow-made transition; starting a new phase resets the poll back-off."""
        now = self.clock.now()
        return self.store.transition(
            request.id, from_states=[from_state], to_state=to_state, actor=SYSTEM, event=event, now=now,
            polls=0, errors_in_row=0, phase_started_at=now, **kwargs,
        )

    def _fail(self, request: Request, reason: str) -> None:
        self.store.transition(
            request.id, from_states=[request.state], to_state=st.FAILED, actor=SYSTEM, event="failed",
            now=self.clock.now(), detail={"reason": reason}, reason=reason, notify=("finished", {"reason": reason}),
        )

    def _expire_if_due(self, request: Request) -> None:
        if request.state == st.AWAITING_APPROVAL and request.expires_at and self.clock.now() >= request.expires_at:
            self.store.transition(
                request.id, from_states=[st.AWAITING_APPROVAL], to_state=st.EXPIRED, actor=SYSTEM, event="expired",
                now=self.clock.now(), notify=("expired", {}),
            )

    def _phase_overdue(self, request: Request) -> bool:
        if request.state not in (st.CHECKING, st.REGISTERING) or request.phase_started_at is None:
            return False
        waited = (self.clock.now() - request.phase_started_at).total_seconds()
        if waited <= self.timing.phase_timeout:
            return False
        if request.state == st.CHECKING:
            self._fail(request, f"the check did not finish within {_duration(self.timing.phase_timeout)}; gave up waiting")
        else:
            self._give_up_registering(
                request, f"the registration did not finish within {_duration(self.timing.phase_timeout)}; gave up waiting"
            )
        return True

    def _api_error(self, request: Request, exc: errors.IotError) -> None:
        errors_in_row = request.errors_in_row + (0 if exc.retryable else 1)
        self.store.record(request.id, SYSTEM, "api_error", self.clock.now(), {"code": exc.code, "message": exc.message, "request_id": exc.request_id})
        # A check the platform refuses outright (no such product, malformed key) will not get better.
        final_at_once = isinstance(exc, errors.BusinessError) and not exc.retryable and request.state == st.CHECKING
        if request.state == st.REGISTERING and errors_in_row >= self.timing.max_errors:
            self._give_up_registering(request, _explain(exc, request))
        elif final_at_once or errors_in_row >= self.timing.max_errors:
            self._fail(request, _explain(exc, request))
        else:
            log.warning("request #%d: %s", request.id, exc)
            self.store.update_request(request.id, errors_in_row=errors_in_row, polls=request.polls + 1)

    def _reset_errors(self, request: Request) -> None:
        if request.errors_in_row:
            self.store.update_request(request.id, errors_in_row=0)

    def _next_wake(self, request: Request) -> datetime:
        now = self.clock.now()
        if request.state == st.AWAITING_APPROVAL and request.expires_at:
            return request.expires_at
        if request.state == st.APPROVED:
            return now
        return now + timedelta(seconds=self.timing.next_poll(max(0, request.polls - 1)))


def _may_be_alive(owner: str | None) -> bool:
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


def _device_row(device: Any) -> tuple[str, str | None, int | None]:
    if isinstance(device, str):
        return device, None, None
    return device.name, getattr(device, "nickname", None), getattr(device, "line", None)


def _already(request: Request) -> str:
    state = request.state.replace("_", " ")
    if request.decided_by and request.state in (st.APPROVED, st.REJECTED, st.CANCELLED, st.REGISTERING, st.DONE, st.FAILED):
        verb = {"rejected": "rejected", "cancelled": "cancelled"}.get(request.state, "approved")
        return f"request #{request.id} was already {verb} by {request.decided_by}; it is {state} now"
    return f"request #{request.id} is {state}"


def _explain(exc: errors.IotError, request: Request) -> str:
    if exc.code == "iot.prod.NotExistedProduct":
        return f"product {request.product_key} does not exist (check the ProductKey, the region and IOT_INSTANCE_ID)"
    if isinstance(exc, errors.AuthError):
        return f"IoT Platform did not accept iotreg's credentials ({exc.code}): check the AccessKey settings"
    return f"IoT Platform answered {exc.code or type(exc).__name__}: {exc.message}"


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"

