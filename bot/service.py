"""The request service: what front ends may ask of the core (commands) and learn from it (queries).

Slack and the CLI call this and nothing below it: no front end touches the store. Every command
checks the :class:`~bot.policy.Policy` on the server, records refusals in the audit trail, and
changes state only by compare-and-set, so two clicks at once get one winner and one answer each.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from bot.aliyun.client import MAX_COUNT_PER_REGISTER, IotClient, ProductInfo
from bot.clock import Clock
from bot.domain import (
    APPROVED_STATES,
    SYSTEM,
    Action,
    Approval,
    AuditEntry,
    Chunk,
    Conflict,
    DeviceRow,
    Kind,
    NotAllowed,
    NotFound,
    Origin,
    Outcome,
    RejectedLine,
    Request,
    Rule,
    State,
    Summary,
    Tally,
    Timing,
    Upload,
    WorkflowError,
)
from bot.leases import Leases
from bot.policy import Policy
from bot.reconciler import may_be_alive
from bot.store import AlreadyRetried, Figures, Store, StoreUnavailable

if TYPE_CHECKING:
    from bot.registration import Jobs


@dataclasses.dataclass(frozen=True)
class Health:
    """Whether the database answers, and how many notifications wait."""

    ok: bool
    outbox_pending: int = 0
    problem: str = ""


class ReasonRequired(WorkflowError):
    """The product's rule asks the requester for a reason, and none was given."""


class RequestService:
    """Commands and queries on requests, for every front end."""

    def __init__(
        self, store: Store, client: IotClient | None, clock: Clock, timing: Timing, jobs: Jobs, policy: Policy,
        *, leases: Leases | None = None,
    ) -> None:
        self.store = store
        self.leases = leases or Leases(store, clock)
        self.client = client
        self.clock = clock
        self.timing = timing
        self.jobs = jobs
        self.policy = policy

    # -- commands -----------------------------------------------------------------------------

    def submit(
        self,
        product_key: str,
        requester: str,
        devices: Sequence[Any],
        *,
        origin: Origin,
        channel: str = "",
        rejected: Sequence[Any] = (),
        rejected_count: int | None = None,
        retry_of: int | None = None,
        upload_id: int | None = None,
        reason: str = "",
        rule: Rule | None = None,
        read_as: str | None = None,
    ) -> Request:
        """Open a request for ``devices`` (objects with ``name``/``nickname``/``line``, or names).

        ``rejected`` holds the lines refused locally (objects with ``line``/``value``/``reason``);
        they are kept for the report. The check starts at once. The product's rule is decided now
        and kept with the request (``rule``: one decided before, for a retry); ``reason`` is the
        requester's, refused with :class:`ReasonRequired` when the rule needs one and it is empty.
        ``read_as``: the legacy encoding a list was read in (said in the ``created`` event).
        """
        # A list read from a file hands over its rows as kept; anything else is turned into rows here.
        rows = list(devices.rows()) if hasattr(devices, "rows") else [_device_row(d) for d in devices]
        if not rows:
            raise WorkflowError("there are no valid device names to register")
        rule = rule or self.checked_rule(product_key, reason)
        size = self.timing.chunk_size
        chunks = [min(size, len(rows) - start) for start in range(0, len(rows), size)]
        request_id = self.store.create_request(
            product_key=product_key,
            requester=requester,
            origin=origin,
            channel=channel,
            kind=Kind.NAMES,
            count=len(rows),
            state=State.CHECKING,
            now=self.clock.now(),
            rejected=[(r.line, r.value, r.reason, getattr(r, "nickname", None)) for r in rejected],
            rejected_count=len(rejected) if rejected_count is None else rejected_count,
            devices=rows,
            chunks=chunks,
            chunk_size=size,
            retry_of=retry_of,
            event=("created", {"read_as": read_as} if read_as else {}),
            upload_id=upload_id,
            rule=rule,
            justification=reason.strip() or None,
        )
        self._kick(request_id)
        return self.require(request_id)

    def rule_for(self, product_key: str) -> Rule:
        """The rule a request for ``product_key`` submitted now gets."""
        return self.policy.rule_for(product_key)

    def checked_rule(self, product_key: str, reason: str = "") -> Rule:
        """:meth:`rule_for`, or :class:`ReasonRequired` if it needs a reason and ``reason`` is empty."""
        rule = self.policy.rule_for(product_key)
        if rule.reason_required and not reason.strip():
            raise ReasonRequired(f"requests for product {product_key} need a reason: say why these devices are needed")
        return rule

    def submit_count(
        self, product_key: str, requester: str, count: int, *, origin: Origin, channel: str = "", reason: str = "",
        retry_of: int | None = None, rule: Rule | None = None,
    ) -> Request:
        """Open a request for ``count`` devices named by the platform. Nothing to check: it waits
        for approval, or is approved at once when its rule approves so few devices by itself."""
        if count < 1:
            raise WorkflowError("the number of devices must be at least 1")
        rule = rule or self.checked_rule(product_key, reason)
        size = min(self.timing.chunk_size, MAX_COUNT_PER_REGISTER)
        chunks = [min(size, count - start) for start in range(0, count, size)]
        now = self.clock.now()
        common: dict[str, Any] = dict(
            product_key=product_key, requester=requester, origin=origin, channel=channel, kind=Kind.COUNT, count=count,
            now=now, chunks=chunks, rule=rule, justification=reason.strip() or None, retry_of=retry_of,
        )
        if rule.auto_approves(count):
            request_id = self.store.create_request(
                **common, state=State.APPROVED, decided_by=SYSTEM, event=("approved", _by_policy(rule)),
                audit=[("approved", _by_policy(rule))],
            )
            self._kick(request_id)
        else:
            request_id = self.store.create_request(
                **common, state=State.AWAITING_APPROVAL, expires_at=now + timedelta(seconds=self.timing.approval_ttl),
                event=("awaiting_approval", {}),
            )
            self._kick(request_id)  # its first step works out when the first reminder or the expiry is due
        return self.require(request_id)

    def approve(self, request_id: int, actor: str, reason: str = "") -> Request:
        """Count ``actor``'s approval. The request is approved when its rule's number of distinct
        approvers is reached: exactly one approval completes it, however many arrive at once.

        :class:`Conflict` for a request that no longer waits, and for an approver counted already.
        """
        request = self.require(request_id)
        self._allowed(Action.APPROVE, request, actor, audit="approval_denied")
        self.expire_if_due(request)
        rule = self.policy.rule_of(request)
        tally = self.store.add_approval(request_id, approver=actor, now=self.clock.now(), needed=rule.approvals, reason=reason.strip() or None)
        if tally is Tally.CLOSED:
            request = self.require(request_id)
            raise Conflict(_already(request), request)
        if tally is Tally.ALREADY_COUNTED:
            count = len(self.store.approvals(request_id))
            raise Conflict(
                f"you approved request #{request_id} already, and an approval counts once per person "
                f"({count} of {rule.approvals} so far)",
                self.require(request_id),
            )
        self._kick(request_id)
        return self.require(request_id)

    def approvals(self, request_id: int) -> list[Approval]:
        """Who approved a request so far, oldest first."""
        return self.store.approvals(request_id)

    def rule_of(self, request: Request) -> Rule:
        return self.policy.rule_of(request)

    def may(self, action: Action, request: Request, actor: str) -> bool:
        """Whether ``actor`` may do ``action`` now (for showing buttons; every command checks again)."""
        return self.policy.check(action, request, actor) is None

    def reject(self, request_id: int, actor: str, reason: str = "") -> Request:
        """Turn a request down; it never registers anything. The requester's Reject cancels it."""
        request = self.require(request_id)
        self._allowed(Action.REJECT, request, actor)
        if self.policy.withdraws(request, actor):
            return self.cancel(request_id, actor)
        self.expire_if_due(request)
        return self._decide(
            request_id, [State.AWAITING_APPROVAL], State.REJECTED, actor, ("rejected", {"by": actor, "reason": reason}),
            detail={"reason": reason}, reason=reason or None,
        )

    def cancel(self, request_id: int, actor: str) -> Request:
        """Withdraw a request before it is approved (the requester, or an approver)."""
        request = self.require(request_id)
        self._allowed(Action.CANCEL, request, actor)
        return self.stop(request_id, actor)

    def stop(self, request_id: int, actor: str) -> Request:
        """Cancel on the system's own account (a front end that cannot reach its people any more)."""
        return self._decide(
            request_id, [State.CHECKING, State.AWAITING_APPROVAL, State.CHECK_FAILED], State.CANCELLED, actor,
            ("cancelled", {"by": actor}),
        )

    def _decide(
        self, request_id: int, from_states: list[State], to_state: State, actor: str, notify: tuple[str, dict[str, Any]],
        **fields: Any,
    ) -> Request:
        """``actor``'s decision, by compare-and-set (the event named after it): :class:`Conflict`
        for a request no longer in ``from_states``."""
        now = self.clock.now()
        if not self.store.transition(
            request_id, from_states=from_states, to_state=to_state, actor=actor, event=notify[0], now=now,
            decided_by=actor, decided_at=now, notify=notify, **fields,
        ):
            request = self.require(request_id)
            raise Conflict(_already(request), request)
        self._kick(request_id)
        return self.require(request_id)

    def retry_valid(self, request_id: int, actor: str) -> Request:
        """A new request with only the names that passed the failed check (the platform never repairs one)."""
        request = self.require(request_id)
        self._allowed(Action.RETRY, request, actor)
        if request.state != State.CHECK_FAILED:
            raise Conflict(f"request #{request_id} is {request.state.label}, not a failed check", request)
        valid = [d for d in self.store.devices(request_id) if d.outcome != Outcome.INVALID]
        if not valid:
            raise WorkflowError(f"request #{request_id} has no valid name left to retry")
        return self._retry(request, actor, valid)

    def retry_failed(self, request_id: int, actor: str) -> Request:
        """A new request with the devices a finished registration did not create: one check, one approval.

        Devices whose creation failed, and those still unconfirmed when the registration gave up
        (the check of the new request refuses any that the platform did create after all).
        """
        request = self.require(request_id)
        self._allowed(Action.RETRY, request, actor)
        if request.state not in (State.DONE, State.FAILED):
            raise Conflict(f"request #{request_id} is {request.state.label}, not a finished registration", request)
        if request.kind == Kind.COUNT:
            missing = request.count - self.created_count(request_id)
            if missing <= 0:
                raise WorkflowError(f"every device of request #{request_id} was registered: nothing to retry")
            return self._retry(request, actor, missing)
        failed = [d for d in self.store.devices(request_id) if d.outcome in (Outcome.NOT_CREATED, Outcome.PENDING)]
        if not failed:
            raise WorkflowError(f"every device of request #{request_id} was registered: nothing to retry")
        return self._retry(request, actor, failed)

    def _retry(self, request: Request, actor: str, devices: list[DeviceRow] | int) -> Request:
        """The one retry of ``request`` (a second, however close behind, gets :class:`Conflict`).

        The retry is still the original requester's request, under the same rule: whoever clicked,
        they may not approve it themselves, and the clicker is kept in the audit trail.
        """
        if request.retried_as is not None:
            raise Conflict(_retried(request.id, request.retried_as), request)
        common: dict[str, Any] = dict(
            origin=request.origin, channel=request.channel, retry_of=request.id,
            reason=request.justification or "", rule=self.policy.rule_of(request),
        )
        try:
            if isinstance(devices, int):
                new = self.submit_count(request.product_key, request.requester, devices, **common)
            else:
                new = self.submit(request.product_key, request.requester, devices, **common)
        except AlreadyRetried as exc:
            raise Conflict(_retried(request.id, exc.retried_as), request) from None
        self.store.record(request.id, actor, "retried", self.clock.now(), {"new_request": new.id})
        self.store.record(new.id, actor, "retry_of", self.clock.now(), {"request": request.id})
        return new

    def drive(self, request_id: int, driver: str) -> str | None:
        """Say that the process ``driver`` (a ``host:pid:nonce`` token) is moving the request on in
        front of a person (a terminal that shows its progress, or asks for its approval).

        Returns the token of another process that still runs and drives it, and then changes
        nothing; ``None`` when ``driver`` now does. The mark is kept in the request's
        ``origin_data`` (``driver``) until :meth:`let_go`, or until its process is gone.
        """
        current = self.driven_by(self.require(request_id))
        if current is not None and current != driver:
            return current
        self.store.update_origin_data(request_id, driver=driver)
        return None

    def let_go(self, request_id: int, driver: str) -> None:
        """``driver`` no longer drives the request (it finished, or its person left)."""
        request = self.get(request_id)
        if request is not None and request.origin_data.get("driver") == driver:
            self.store.update_origin_data(request_id, driver=None)

    @staticmethod
    def driven_by(request: Request) -> str | None:
        """The process driving the request right now, if it still runs (see :meth:`drive`)."""
        driver = request.origin_data.get("driver")
        return driver if driver and may_be_alive(driver) else None

    def credentials(self, request_id: int, actor: str, *, apply_id: int | None = None) -> Iterator[tuple[str, str, str, str]]:
        """``(ProductKey, DeviceName, DeviceSecret, IotId)`` of every created device, fetched fresh.

        Checked first: raises :class:`NotAllowed` (and records it) for someone not entitled.
        Secrets are never stored by iotreg: they come from QueryPageByApplyId each time.
        ``apply_id``: only the devices of that one of the request's ApplyIds.
        """
        request = self.require(request_id)
        self._allowed(Action.CREDENTIALS, request, actor, audit="credentials_denied")
        return self._credentials(request, apply_id)

    def _credentials(self, request: Request, apply_id: int | None = None) -> Iterator[tuple[str, str, str, str]]:
        assert self.client is not None, "credentials need the IoT client"
        for chunk in self.store.chunks(request.id):
            # Every chunk the platform took: even one iotreg gave up waiting for may have devices.
            if chunk.apply_id and chunk.register_confirmed_at is not None and apply_id in (None, chunk.apply_id):
                for device in self.client.iter_devices_by_apply_id(chunk.apply_id):
                    yield request.product_key, device.name, device.device_secret, device.iot_id

    def record(self, request_id: int, actor: str, event: str, detail: dict[str, Any] | None = None) -> None:
        """An audit row a front end adds (credentials sent, a channel that refused the bot…)."""
        self.store.record(request_id, actor, event, self.clock.now(), detail)

    def set_origin_data(self, request_id: int, **values: Any) -> None:
        """Keep the front end's own data about a request (``None`` removes a key)."""
        self.store.update_origin_data(request_id, **values)

    def move_channel(self, request_id: int, channel: str) -> None:
        """Where the request's messages now are (a front end's channel id as it reported it)."""
        self.store.update_request(request_id, channel=channel)

    def expire_if_due(self, request: Request) -> None:
        if request.state == State.AWAITING_APPROVAL and request.expires_at and self.clock.now() >= request.expires_at:
            self.store.transition(
                request.id, from_states=[State.AWAITING_APPROVAL], to_state=State.EXPIRED, actor="iotreg", event="expired",
                now=self.clock.now(), notify=("expired", {}),
            )

    def remind_if_due(self, request: Request) -> datetime | None:
        """Queue the reminders of a waiting request whose time has come (``Timing.reminders``,
        counted from when it started waiting); return when the next one is due, if any."""
        if request.state != State.AWAITING_APPROVAL:
            return None
        started = request.phase_started_at or request.created_at
        sent = request.reminders_sent
        for number, after in enumerate(self.timing.reminders, start=1):
            if number <= sent:
                continue
            due = started + timedelta(seconds=after)
            if self.clock.now() < due:
                return due
            waiting = {a.approver for a in self.store.approvals(request.id)}
            self.store.add_reminder(
                request.id, sent=number, now=self.clock.now(),
                payload={"number": number, "after": after, "approved_by": sorted(waiting)},
            )
            sent = number
        return None

    def products(self) -> list[ProductInfo]:
        """The account's products (QueryProductList, every page), for choosing one."""
        return list(self.client.iter_products())

    def last_product(self, channel: str) -> str | None:
        """The product of the newest request in ``channel``."""
        newest = self.store.requests(channel=channel, limit=1)
        return newest[0].product_key if newest else None

    def waiting_for(self, user: str, *, limit: int = 20) -> list[Request]:
        """Requests waiting for approval that ``user`` may approve and has not approved yet."""
        waiting = self.store.requests(states=[State.AWAITING_APPROVAL], limit=200)
        found = []
        for request in waiting:
            if self.may(Action.APPROVE, request, user) and user not in {a.approver for a in self.store.approvals(request.id)}:
                found.append(request)
        return found[:limit]

    def requested_by(self, user: str, *, limit: int = 10) -> list[Request]:
        """``user``'s own newest requests."""
        return self.store.requests(requester=user, limit=limit)

    # -- uploads: lists submitted, recorded before the submission is acknowledged ----------------

    def add_upload(self, *, user: str, channel: str, product_key: str, pasted: str, origin_data: dict[str, Any]) -> int:
        return self.store.add_upload(
            user=user, channel=channel, product_key=product_key, pasted=pasted, origin_data=origin_data, now=self.clock.now()
        )

    def finish_upload(self, upload_id: int) -> None:
        """An upload that made no request (its list was refused, and the uploader told)."""
        self.store.finish_upload(upload_id, self.clock.now())

    def upload(self, upload_id: int) -> Upload | None:
        return self.store.upload(upload_id)

    @contextmanager
    def reading_upload(self, upload_id: int) -> Iterator[Upload | None]:
        """The upload while this process reads it, under its lease (``upload:<id>``), so that no
        other replica reads it at the same time; ``None`` when another one is reading it, or it
        has been read."""
        lease = f"upload:{upload_id}"
        if not self.leases.take(lease):
            yield None
            return
        try:
            yield self.store.upload(upload_id)
        finally:
            self.leases.release(lease)

    def unread_uploads(self) -> list[Upload]:
        return self.store.unread_uploads()

    # -- queries ------------------------------------------------------------------------------

    def get(self, request_id: int) -> Request | None:
        return self.store.get(request_id)

    def require(self, request_id: int) -> Request:
        request = self.store.get(request_id)
        if request is None:
            raise NotFound(f"there is no request #{request_id}")
        return request

    def find(self, ref: str) -> Request | None:
        """A request by its number (``12``, ``#12``) or by one of its ApplyIds."""
        match = re.fullmatch(r"#?([0-9]{1,18})", ref.strip())
        if not match:
            return None
        number = int(match.group(1))
        chunk = self.store.chunk_for_apply_id(number)
        if chunk is not None:
            return self.store.get(chunk.request_id)
        return self.store.get(number)

    def chunks(self, request_id: int) -> list[Chunk]:
        return self.store.chunks(request_id)

    def apply_ids(self, request_id: int) -> list[int]:
        return [c.apply_id for c in self.store.chunks(request_id) if c.apply_id]

    def summary(self, request_id: int) -> Summary:
        request = self.require(request_id)
        counts = self.store.outcome_counts(request_id)
        pending = counts.get(Outcome.PENDING, 0)
        if request.kind == Kind.COUNT:
            # Platform-named devices are only known once created.
            pending = max(0, request.count - sum(counts.values()))
        return Summary(
            request=request,
            created=counts.get(Outcome.CREATED, 0),
            failed=counts.get(Outcome.NOT_CREATED, 0),
            invalid=counts.get(Outcome.INVALID, 0),
            pending=pending,
            rejected_locally=request.rejected_count,
            iot_ids_pending=any(c.iot_ids_unread for c in self.store.chunks(request_id)),
        )

    def devices(self, request_id: int, *, outcome: Outcome | None = None, limit: int | None = None) -> list[DeviceRow]:
        return self.store.devices(request_id, outcome=outcome, limit=limit)

    def rejected_lines(self, request_id: int) -> list[RejectedLine]:
        return self.store.rejected_lines(request_id)

    def requests(
        self, *, states: Sequence[State] | None = None, channel: str | None = None,
        origins: Sequence[Origin] | None = None, limit: int | None = 20, requester: str | None = None,
    ) -> list[Request]:
        return self.store.requests(states=states, channel=channel, origins=origins, limit=limit, requester=requester)

    def created_count(self, request_id: int) -> int:
        return self.store.outcome_counts(request_id).get(Outcome.CREATED, 0)

    def audit(self, request_id: int | None = None, *, limit: int = 500) -> list[AuditEntry]:
        return self.store.audit(request_id, limit=limit)

    def figures(self) -> Figures:
        """Counts for the metrics: requests by state, notifications waiting, devices created."""
        return self.store.figures()

    @property
    def reads_in_process(self) -> bool:
        """Whether a query is a few reads in this process (SQLite), not round trips to a server."""
        return self.store.reads_in_process

    def health(self, origins: Sequence[Origin] | None = None) -> Health:
        try:
            self.store.ping()
            return Health(True, self.store.pending_count(origins))
        except StoreUnavailable as exc:
            return Health(False, problem=str(exc))

    # -- delivery steps, so that a notification delivered again repeats nothing -----------------

    def step_done(self, event_id: int, step: str) -> bool:
        return self.store.step_done(event_id, step)

    def mark_step(self, event_id: int, step: str) -> None:
        self.store.mark_step(event_id, step)

    def begin_step(self, event_id: int, step: str) -> datetime | None:
        """Record that a step which posts is about to post; when an earlier attempt began it (and
        may have posted before it was cut short), return when, else None."""
        return self.store.begin_step(event_id, step, self.clock.now())

    # -- helpers ------------------------------------------------------------------------------

    def _allowed(self, action: Action, request: Request, actor: str, *, audit: str | None = None) -> None:
        denial = self.policy.check(action, request, actor)
        if denial is None:
            return
        if audit:
            self.store.record(request.id, actor, audit, self.clock.now(), {"why": str(denial.why)})
        if denial.detail:
            message = denial.detail
        elif action is Action.APPROVE:
            message = "you asked for this registration, so someone else has to approve it"
        else:
            message = f"you may not {action} request #{request.id} ({denial.why})"
        raise NotAllowed(message, denial)

    def _kick(self, request_id: int, at: Any = None) -> None:
        """Run the request's next step and its notifications here soon. The transaction that
        called for it (a new request, an approval) made the step due in the database already,
        where every replica's sweep sees it: this process's timer only saves the sweep's wait."""
        self.jobs.wake(request_id, at)
        self.jobs.wake_outbox()


def _by_policy(rule: Rule) -> dict[str, Any]:
    return {"by_policy": rule.auto_approve_max, "rule": rule.source}


def _device_row(device: Any) -> tuple[str, str | None, int | None]:
    if isinstance(device, str):
        return device, None, None
    return device.name, getattr(device, "nickname", None), getattr(device, "line", None)


def _retried(request_id: int, retried_as: int | None) -> str:
    return f"request #{request_id} was retried already: request #{retried_as} carries the retry"


def _already(request: Request) -> str:
    state = request.state.label
    if request.decided_by and request.state in APPROVED_STATES | {State.REJECTED, State.CANCELLED}:
        verb = {State.REJECTED: "rejected", State.CANCELLED: "cancelled"}.get(request.state, "approved")
        return f"request #{request.id} was already {verb} by {request.decided_by}; it is {state} now"
    return f"request #{request.id} is {state}"
