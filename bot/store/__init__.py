"""Durable state: requests, their devices and chunks, the audit trail, and the outbox of events.

:class:`Store` is the interface the core writes to; two implementations pass one contract test
suite (``tests/test_store_contract.py``):

* :class:`bot.store.sqlite.SqliteStore`: one SQLite file, the embedded default (WAL,
  ``synchronous=FULL``, ``BEGIN IMMEDIATE``). One process at a time.
* :class:`bot.store.postgres.PostgresStore`: PostgreSQL through a psycopg connection pool, for
  platforms whose disk is wiped at every restart and for more than one process.

What every store promises:

* State changes are compare-and-set: :meth:`Store.transition` moves a request from one of the
  expected states to the next, or changes nothing and returns ``False``; when two approvers click
  at once, exactly one of them gets ``True``.
* Each transition writes its audit row and its outbox event in the same transaction, so a crash
  can never leave a state change without its record, or a record without its change.
* A register call is claimed (:meth:`Store.claim_register`) before it is sent, by compare-and-set.
* The schema is built by numbered migrations applied at start, safe when two processes start at
  once; a database written by an older iotreg is brought up to date in place.
* Each IoT Platform call's slot is booked in one atomic step (:meth:`Store.book_slot`) against the
  quotas stored there, on the database's clock: processes on one database share the account's quotas.

:func:`open_store` picks the implementation from ``IOTREG_DB``'s value: a file path, or a
``postgresql://`` / ``postgres://`` URL.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from bot.domain import (
    CREATION_ENDED,
    Approval,
    AuditEntry,
    Chunk,
    DeviceRow,
    Event,
    Kind,
    Origin,
    Outcome,
    RejectedLine,
    Request,
    Rule,
    State,
    Tally,
    Upload,
)

log = logging.getLogger(__name__)

__all__ = [
    "AlreadyRead", "CREATION_ENDED", "Figures", "Lease", "Slot", "StepTurn", "log_transition", "AlreadyRetried", "Store", "StoreBusy",
    "StoreUnavailable", "open_store", "is_url", "redact_url",
]

POSTGRES_SCHEMES = ("postgresql", "postgres")


class StoreUnavailable(Exception):
    """The database cannot be reached (or stopped answering). The message names it, never a password."""


class StoreBusy(Exception):
    """Another process already serves from this store, and the store cannot be shared (SQLite)."""


class AlreadyRead(Exception):
    """An upload was read into a request already (by another process): nothing was created."""

    def __init__(self, upload_id: int) -> None:
        super().__init__(f"upload #{upload_id} was read already")
        self.upload_id = upload_id


class AlreadyRetried(Exception):
    """A failed check's valid names were retried already (by request ``retried_as``)."""

    def __init__(self, request_id: int, retried_as: int | None) -> None:
        super().__init__(f"request #{request_id} was retried already as #{retried_as}")
        self.request_id = request_id
        self.retried_as = retried_as


@dataclasses.dataclass(frozen=True)
class Figures:
    """What :meth:`Store.figures` counts: requests by state, undelivered events, devices created."""

    requests_by_state: dict[State, int]
    outbox_pending: int
    devices_created: int


@dataclasses.dataclass(frozen=True)
class Slot:
    """A call's turn, booked by :meth:`Store.book_slot`: ``wait`` seconds from now, at ``start`` (seconds
    on the database's clock), under a quota of ``qps``; ``retaken``: a late holder's slot moved to
    now rather than a new one; ``ticket``: the slot's number (see :mod:`bot.slots`)."""

    wait: float
    start: float
    qps: float
    retaken: bool = False
    ticket: int = 0


@dataclasses.dataclass(frozen=True)
class Lease:
    """Who holds a piece of shared work (``request:42``: its steps; ``outbox:42``: its notifications), until when."""

    name: str
    owner: str
    until: datetime


@dataclasses.dataclass(frozen=True)
class StepTurn:
    """What :meth:`Store.begin_request_step` found: whether the step is due (and if not, when it
    is), and how many wakes the request had had."""

    due: bool
    due_at: datetime | None
    wakes: int


def log_transition(request_id: int, product: str, state: str, event: str, devices: int, rejected: int, actor: str) -> None:
    """One INFO line per request created or moved (every store logs its own), its fields also
    given apart (for JSON logs)."""
    fields = {"request_id": request_id, "product": product, "state": str(state), "event": event,
              "devices": devices, "rejected": rejected, "actor": actor}
    log.info("request #%d (%s): %s (%s), %d device(s), %d rejected, by %s", *fields.values(), extra=fields)


class Store(Protocol):
    """Everything the core keeps. Times go in and come out as aware UTC ``datetime``\\ s."""

    #: Where the data is, safe to show (a file path, or a URL without its password).
    location: str
    #: Whether a read costs no more than a few microseconds in this process (an embedded file),
    #: rather than a round trip to a server: only then is a command answered in its ack.
    reads_in_process: bool
    #: Whether several iotreg processes may serve from it at once (they then share the IoT Platform
    #: quotas through it: :meth:`book_slot`).
    many_processes: bool

    def close(self) -> None: ...

    def schema_version(self) -> list[str]: ...

    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers."""

    def hold(self, purpose: str) -> None:
        """Claim the store for this process's ``purpose`` (``"serve"``) until it closes.

        Raises :class:`StoreBusy` when a store that cannot be shared is already held for it by
        another process; a store made for many processes (PostgreSQL) accepts every claim.
        """

    # -- requests

    def create_request(
        self,
        *,
        product_key: str,
        requester: str,
        origin: Origin,
        kind: Kind,
        count: int,
        state: State,
        now: datetime,
        channel: str = "",
        origin_data: dict[str, Any] | None = None,
        rejected: Sequence[tuple[int, str, str] | tuple[int, str, str, str | None]] = (),
        rejected_count: int = 0,
        devices: Iterable[tuple[str, str | None, int | None]] = (),
        chunks: Sequence[int] = (),
        chunk_size: int = 10_000,
        retry_of: int | None = None,
        expires_at: datetime | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
        upload_id: int | None = None,
        rule: Rule | None = None,
        justification: str | None = None,
        decided_by: str | None = None,
        audit: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> int:
        """Insert a request with its devices ``(name, nickname, line)``, chunks and rejected lines
        ``(line, value, reason[, nickname])``, its ``requested`` audit row (and the ``audit`` rows
        after it, by ``decided_by``), its first event, and mark the upload it came from as read.

        With ``retry_of``: in the same transaction, set that request's ``retried_as`` to the new
        one only if it has none yet; otherwise write nothing and raise :class:`AlreadyRetried`.
        With ``upload_id``: only if that upload is unread; otherwise write nothing and raise
        :class:`AlreadyRead` (two processes read one list: one request). A new unfinished
        request's next step is due at once."""

    def get(self, request_id: int) -> Request | None: ...

    def requests(
        self,
        *,
        states: Iterable[State] | None = None,
        channel: str | None = None,
        origins: Iterable[Origin] | None = None,
        limit: int | None = 20,
        requester: str | None = None,
    ) -> list[Request]:
        """Newest first (``limit`` of them, or all with ``None``)."""

    def state_counts(self) -> dict[State, int]:
        """How many requests are in each state (states with none are left out)."""

    def figures(self) -> Figures:
        """Counts for the metrics, read from the database so that every replica reports the same."""

    def transition(
        self,
        request_id: int,
        *,
        from_states: Iterable[State],
        to_state: State,
        actor: str,
        event: str,
        now: datetime,
        detail: dict[str, Any] | None = None,
        notify: tuple[str, dict[str, Any]] | None = None,
        **fields: Any,
    ) -> bool:
        """Compare-and-set the state; with it, the audit row, the outbox event and ``fields``."""

    def add_approval(self, request_id: int, *, approver: str, now: datetime, needed: int, reason: str | None = None) -> Tally:
        """Count one approval, in one transaction: nothing unless the request waits for approval
        (:attr:`Tally.CLOSED`); insert it, or nothing if this approver was counted before
        (:attr:`Tally.ALREADY_COUNTED`); with its ``approval`` audit row; then either an
        ``approval`` event (:attr:`Tally.COUNTED`) or, when the count reaches ``needed``, the
        compare-and-set to approved with ``decided_by``/``decided_at``, its ``approved`` audit row and
        ``approved`` event (:attr:`Tally.QUORUM`). Under concurrent calls exactly one gets QUORUM."""

    def approvals(self, request_id: int) -> list[Approval]:
        """Who approved, oldest first."""

    def add_reminder(self, request_id: int, *, sent: int, now: datetime, payload: dict[str, Any]) -> bool:
        """Compare-and-set ``reminders_sent`` from ``sent - 1`` to ``sent`` while the request waits for
        approval, with a ``reminded`` audit row and a ``reminder`` event; ``False`` changes nothing."""

    def update_request(self, request_id: int, **fields: Any) -> None:
        """Book-keeping that is not a state change (poll counters, error counts)."""

    def update_origin_data(self, request_id: int, **values: Any) -> None:
        """Merge ``values`` into the request's ``origin_data`` (``None`` removes a key)."""

    # -- chunks and devices

    def chunks(self, request_id: int) -> list[Chunk]: ...

    def update_chunk(self, request_id: int, chunk_no: int, **fields: Any) -> None: ...

    def claim_register(
        self, request_id: int, chunk_no: int, owner: str, now: datetime, *, replacing: datetime | None = None
    ) -> bool:
        """Claim a chunk's register call before sending it; ``False`` if another claim got there
        first, or if ``owner`` does not hold the request's lease (``request:<id>``) at ``now``: a
        process that lost its lease can never claim a call another process may be making.

        With ``replacing``, take over a claim whose ``register_sent_at`` is that time, and only that one.
        """

    def release_register(self, request_id: int, chunk_no: int, owner: str) -> None:
        """Give up a claim whose call certainly did not reach the platform."""

    def chunk_for_apply_id(self, apply_id: int) -> Chunk | None: ...

    def device_names(self, request_id: int, chunk_no: int | None = None) -> list[tuple[str, str | None]]:
        """``(name, nickname)`` in the order they were given."""

    def devices(self, request_id: int, *, outcome: Outcome | None = None, limit: int | None = None) -> list[DeviceRow]:
        """In the order they were given (devices named by the platform: in the order recorded)."""

    def outcome_counts(self, request_id: int) -> dict[Outcome, int]: ...

    def add_devices(self, request_id: int, chunk_no: int, rows: Iterable[tuple[str, Outcome, str]]) -> None:
        """Devices named by the platform (``BatchRegisterDevice``): ``(name, outcome, iot_id)``;
        one already recorded is left as it is."""

    def set_outcomes(self, request_id: int, rows: Iterable[tuple[str, Outcome, str | None, str | None]]) -> None:
        """Record ``(name, outcome, reason, iot_id)`` for devices of a request."""

    def set_reasons(self, request_id: int, outcome: Outcome, reason: str) -> None:
        """Give every device of ``outcome`` that has no reason yet this one."""

    def rejected_lines(self, request_id: int) -> list[RejectedLine]: ...

    # -- uploads

    def add_upload(
        self, *, user: str, channel: str, product_key: str, pasted: str, origin_data: dict[str, Any], now: datetime
    ) -> int: ...

    def finish_upload(self, upload_id: int, now: datetime) -> None:
        """An upload that made no request (its list was refused, and the uploader told)."""

    def upload(self, upload_id: int) -> Upload | None:
        """An upload not read yet."""

    def unread_uploads(self) -> list[Upload]: ...

    # -- audit

    def audit(self, request_id: int | None = None, *, limit: int = 500) -> list[AuditEntry]:
        """The audit trail, oldest first (of one request, or of all)."""

    def record(self, request_id: int, actor: str, event: str, now: datetime, detail: dict[str, Any] | None = None) -> None:
        """An audit row that goes with no state change (a denied click, an API error)."""

    # -- outbox

    def enqueue(self, request_id: int, kind: str, payload: dict[str, Any], now: datetime) -> None: ...

    def pending_events(self, origins: Iterable[Origin] | None = None) -> Iterator[Event]:
        """Every undelivered event (of requests from ``origins``, if given), oldest first."""

    def pending_count(self, origins: Iterable[Origin] | None = None) -> int:
        """How many events wait in the outbox."""

    def next_event_time(self, origins: Iterable[Origin] | None = None) -> datetime | None:
        """When the next event can go: the earliest among the first undelivered event of each request."""

    def mark_delivered(self, event_id: int, now: datetime) -> None: ...

    def mark_failed(self, event_id: int, error: str, next_at: datetime) -> None: ...

    def step_done(self, event_id: int, step: str) -> bool:
        """Whether a step of delivering an event was done already (so a redelivery repeats none)."""

    def mark_step(self, event_id: int, step: str) -> None: ...

    def begin_step(self, event_id: int, step: str, now: datetime) -> datetime | None:
        """Record that a step which posts has begun (before it posts); return when an earlier attempt
        began it, or None if this is the first, so a redelivery knows to look for what it posted."""

    def delivered_events(self, request_id: int) -> list[Event]: ...

    def next_event(self, request_id: int) -> Event | None:
        """The request's oldest undelivered event, read afresh (the one its delivery must do next)."""

    # -- leases and due steps: which process does what, when several share the database

    def take_lease(self, name: str, owner: str, now: datetime, until: datetime) -> bool:
        """Hold the lease ``name`` for ``owner`` until ``until``: ``True`` if it was free, had run
        out by ``now``, or was ``owner``'s already; ``False`` if another owner holds it. Atomic."""

    def renew_leases(self, owner: str, until: datetime) -> set[str]:
        """Extend every lease ``owner`` holds to ``until``; return their names."""

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease back, if ``owner`` holds it."""

    def release_leases(self, owner: str) -> int:
        """Give back every lease ``owner`` holds (a process stopping); return how many."""

    def leases(self) -> list[Lease]:
        """Every lease held, by name."""

    def wake_request(self, request_id: int, at: datetime) -> None:
        """Ask for the request's next step at ``at`` or earlier (an earlier due time stays)."""

    def begin_request_step(self, request_id: int, now: datetime, fallback: datetime) -> StepTurn:
        """Under the request's lease, before its step: whether the step is due by ``now``. When it
        is, its due time becomes ``fallback`` (when the step is due again if this process dies in
        it) and the turn carries the count of wakes, for :meth:`end_request_step`."""

    def end_request_step(self, request_id: int, turn: StepTurn, at: datetime | None) -> datetime | None:
        """After the step: the next one is due at ``at`` (``None``: none), or earlier if the
        request was woken while the step ran (an approval on another replica). Returns when it is
        due, as stored."""

    def due_requests(self, now: datetime, *, origins: Iterable[Origin] | None = None, limit: int = 100) -> list[int]:
        """Requests whose next step is due by ``now`` and whose lease nobody holds, the most overdue first."""


    # -- IotIds read after the result

    def set_iot_ids(self, request_id: int, chunk_no: int, rows: Iterable[tuple[str, str]], now: datetime) -> int:
        """Give the created devices of a request their IotIds ``(name, iot_id)``, touching neither
        outcome nor reason, and mark chunk ``chunk_no``'s IotIds read at ``now``, in one transaction.
        Returns how many devices got one (a name that is no created device of the request is skipped)."""

    def unread_iot_ids(self, origins: Iterable[Origin] | None = None) -> list[int]:
        """Final requests (from ``origins``, if given) with a chunk whose creation ended
        (:data:`CREATION_ENDED`) and whose IotIds are not read yet, oldest first."""
    # -- the IoT Platform quotas, shared by every process of the database

    def quotas(self) -> dict[str, float]:
        """The stored QPS quota of each action."""

    def set_quotas(self, quotas: Mapping[str, float], *, replace: bool = True) -> dict[str, tuple[float | None, float]]:
        """Store ``quotas`` (``replace=False``: only for actions that have none yet); return those
        that changed, ``action: (before, after)``. A quota must be above 0."""

    def book_slot(self, action: str, margin: float, retake: int | None = None, spacing: float = 0.0) -> Slot | None:
        """Reserve the next slot of ``action`` in one atomic step, on the database's clock, by the rule
        of :mod:`bot.slots` (its :meth:`~bot.slots.Schedule.book`); ``None`` when ``action`` has no
        quota.

        Each slot is a ticket in one of ``calls = max(1, floor(qps))`` lanes: the lane that has room
        soonest, at least a window of ``calls / qps * (1 + margin)`` seconds after that lane's last
        slot, and, with a ``spacing`` above 0, no sooner than that share of a slot's time (``window
        / calls``) after the last ticket as it was booked. Slots are handed out in the order the
        bookings come. ``retake``: the ticket of a slot whose holder comes late; late by less than
        :data:`bot.slots.MOVE_WITHIN` of a window, it moves to now (``retaken``), with the later
        slots of its lane as far as they must; later than that, a new one is reserved.
        """

    def slot_of(self, action: str, ticket: int) -> Slot | None:
        """Ticket ``ticket``'s slot of ``action`` as it stands now (a late holder may have moved it),
        waiting for a booking being made; ``None`` when it is no longer kept (too old to move)."""

    def slot_went(self, action: str, ticket: int, at: float, margin: float) -> None:
        """Ticket ``ticket``'s call of ``action`` went at ``at`` (seconds on the database's clock),
        later than its slot: count the slot from then, and move its lane's later slots as far as
        they must (:meth:`bot.slots.Schedule.went`). Nothing if it is no longer kept."""


def is_url(location: str) -> bool:
    """Whether ``IOTREG_DB`` names a PostgreSQL server rather than a file."""
    return location.split("://", 1)[0].lower() in POSTGRES_SCHEMES and "://" in location


def redact_url(url: str) -> str:
    """A database URL fit for a log line or an error: its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparsable database URL)"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[-1]}"))


def open_store(location: str) -> Store:
    """The store at ``location``: a SQLite file path, or a PostgreSQL URL.

    Raises :class:`StoreUnavailable` with a one-line message when it cannot be opened.
    """
    if is_url(location):
        from bot.store.postgres import PostgresStore

        return PostgresStore(location)
    from bot.store.sqlite import SqliteStore

    return SqliteStore(location)
