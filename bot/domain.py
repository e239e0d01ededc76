"""The domain's nouns: states, outcomes, kinds, origins and events, and the records the store keeps.

Everything else (the store, the workflow, the Slack blocks, the CLI, the report) reads these. In
particular :data:`STATES` is the one table of states: its labels are what every front end shows,
``final`` is what the reconciler stops at, and ``next`` says what a person can still do, so adding a
state is one row here and one branch in the reconciler's table of phases.

::

    checking ──► check_failed                      (a new request can retry the valid names)
        │
        ▼
    awaiting_approval ──► rejected | cancelled | expired
        │ approve (not the requester)
        ▼
    approved ──► registering ──► done | failed
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any


class State(enum.StrEnum):
    """Where a request stands."""

    CHECKING = "checking"
    CHECK_FAILED = "check_failed"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    REGISTERING = "registering"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def info(self) -> StateInfo:
        return STATES[self]

    @property
    def final(self) -> bool:
        return STATES[self].final

    @property
    def label(self) -> str:
        return STATES[self].label


class Action(enum.StrEnum):
    """What a person can do to a request."""

    APPROVE = "approve"
    REJECT = "reject"
    CANCEL = "cancel"
    RETRY = "retry"
    CREDENTIALS = "credentials"


@dataclasses.dataclass(frozen=True)
class StateInfo:
    """How a state reads and what it allows. ``line`` is the sentence a request's message shows."""

    label: str
    final: bool
    line: str
    emoji: str
    next: frozenset[Action] = frozenset()


#: The one table of states.
STATES: dict[State, StateInfo] = {
    State.CHECKING: StateInfo(
        "checking", False, "Checking the names with IoT Platform…", ":hourglass_flowing_sand:", frozenset({Action.CANCEL})
    ),
    State.CHECK_FAILED: StateInfo(
        "check failed", True, "Some names failed IoT Platform's check: nothing will be registered. See the thread.", ":x:",
        frozenset({Action.RETRY, Action.CANCEL}),
    ),
    State.AWAITING_APPROVAL: StateInfo(
        "awaiting approval", False, "Waiting for approval.", ":raised_hand:",
        frozenset({Action.APPROVE, Action.REJECT, Action.CANCEL}),
    ),
    State.APPROVED: StateInfo("approved", False, "Approved; registration is starting.", ":white_check_mark:"),
    State.REGISTERING: StateInfo("registering", False, "Registering…", ":gear:"),
    State.DONE: StateInfo("done", True, "Registration finished.", ":white_check_mark:", frozenset({Action.CREDENTIALS})),
    State.FAILED: StateInfo("failed", True, "Registration failed.", ":x:", frozenset({Action.CREDENTIALS})),
    State.REJECTED: StateInfo("rejected", True, "Rejected: nothing was registered.", ":no_entry_sign:"),
    State.CANCELLED: StateInfo("cancelled", True, "Cancelled: nothing was registered.", ":heavy_multiplication_x:"),
    State.EXPIRED: StateInfo("expired", True, "Expired without approval: nothing was registered.", ":hourglass:"),
}

FINAL_STATES = frozenset(s for s, info in STATES.items() if info.final)
ACTIVE_STATES = frozenset(s for s, info in STATES.items() if not info.final)
#: States in which someone approved the request (it went on to register).
APPROVED_STATES = frozenset({State.APPROVED, State.REGISTERING, State.DONE, State.FAILED})


class Outcome(enum.StrEnum):
    """What became of one device."""

    PENDING = "pending"
    CREATED = "created"
    INVALID = "invalid"  # refused by the platform's check
    NOT_CREATED = "not_created"  # checked, but creation failed

    @property
    def label(self) -> str:
        return OUTCOME_LABELS[self]


#: How each outcome reads to an operator (the report's Outcome column, the CLI).
OUTCOME_LABELS: dict[Outcome, str] = {
    Outcome.CREATED: "registered",
    Outcome.NOT_CREATED: "failed",
    Outcome.INVALID: "refused by check",
    Outcome.PENDING: "pending",
}
REJECTED_LABEL = "rejected locally"


class Kind(enum.StrEnum):
    """How the devices of a request are named."""

    NAMES = "names"  # a list of names, checked by the platform first
    COUNT = "count"  # a number of devices the platform names


class Origin(enum.StrEnum):
    """The front end a request came from: it is the one told about it."""

    SLACK = "slack"
    CLI = "cli"


class EventKind(enum.StrEnum):
    """What the core announces to a request's front end (through the outbox)."""

    CREATED = "created"
    AWAITING_APPROVAL = "awaiting_approval"
    CHECK_FAILED = "check_failed"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REGISTERING = "registering"
    PROGRESS = "progress"
    FINISHED = "finished"
    APPROVAL = "approval"  # one approval counted, the quorum not reached yet
    REMINDER = "reminder"  # a request still waits: its approvers are reminded


class Tally(enum.StrEnum):
    """What became of one approval (see :meth:`bot.store.Store.add_approval`)."""

    COUNTED = "counted"  # recorded; more approvals are needed
    QUORUM = "quorum"  # recorded, and it completed the quorum: the request is approved
    ALREADY_COUNTED = "already counted"  # this person approved before; it does not count again
    CLOSED = "closed"  # the request no longer waits for approval


#: The actor of automatic steps in the audit trail.
SYSTEM = "iotreg"


@dataclasses.dataclass(frozen=True)
class Rule:
    """The approval rule a request is decided under: chosen at submit and kept with the request,
    so a later change of policy does not alter it. ``source`` says which rule it was."""

    approvers: tuple[str, ...] = ()  # who may approve (empty: anyone but the requester)
    approvals: int = 1  # distinct approvers needed
    self_approval: bool = False
    reason_required: bool = False  # the requester must give a reason
    auto_approve_max: int = 0  # requests of at most this many devices need no approval
    source: str = "default"

    def auto_approves(self, count: int) -> bool:
        return 0 < count <= self.auto_approve_max

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "approvers": list(self.approvers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["approvers"] = tuple(values.get("approvers", ()))
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Approval:
    """One approver's approval of a request."""

    approver: str
    at: datetime
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """A registration request as stored.

    ``origin_data`` is the front end's own data about the request (the Slack thread of its message,
    say): the core stores it and never reads it.
    """

    id: int
    product_key: str
    requester: str
    origin: Origin
    channel: str
    kind: Kind
    count: int
    rejected_count: int
    state: State
    reason: str | None
    decided_by: str | None
    decided_at: datetime | None
    expires_at: datetime | None
    retry_of: int | None
    polls: int
    phase_started_at: datetime | None
    errors_in_row: int
    created_at: datetime
    updated_at: datetime
    origin_data: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The rule it was submitted under (``None``: submitted before rules were kept; the current
    #: policy's rule for its product applies).
    rule: Rule | None = None
    justification: str | None = None  # the requester's reason for asking
    retried_as: int | None = None  # the request that retries its valid names
    reminders_sent: int = 0

    @property
    def final(self) -> bool:
        return self.state.final

    @property
    def auto_approved(self) -> bool:
        """Approved by its rule, not by a person (few enough devices)."""
        return self.rule is not None and self.rule.auto_approves(self.count) and self.decided_by == SYSTEM


#: The chunk statuses (the platform's ApplyStatus) after which a creation has ended and its devices
#: can be listed with their IotIds.
CREATION_ENDED = ("CREATE_SUCCESS", "CREATE_FAILED")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Up to 10,000 devices of a request that share one ApplyId."""

    request_id: int
    chunk_no: int
    size: int
    apply_id: int | None
    status: str | None  # the platform's ApplyStatus last seen, or UNKNOWN (see the reconciler)
    register_sent_at: datetime | None
    register_confirmed_at: datetime | None
    error: str | None
    claimed_by: str | None = None
    #: When the IotIds of the chunk's created devices were read from QueryPageByApplyId (or reading
    #: them was given up); ``None`` while a finished creation's IotIds are still to be read.
    iot_ids_read_at: datetime | None = None

    @property
    def iot_ids_unread(self) -> bool:
        """Its creation has ended, and its created devices' IotIds are still to be read."""
        return self.status in CREATION_ENDED and self.iot_ids_read_at is None


@dataclasses.dataclass(frozen=True)
class DeviceRow:
    """One device of a request and what became of it."""

    name: str
    nickname: str | None
    chunk_no: int
    line: int | None
    outcome: Outcome
    reason: str | None
    iot_id: str | None


@dataclasses.dataclass(frozen=True)
class RejectedLine:
    """A line of a list refused before any API call."""

    line: int
    value: str
    reason: str
    nickname: str | None = None


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    request_id: int
    at: datetime
    actor: str
    event: str
    detail: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Event:
    """A notification waiting in (or delivered from) the outbox."""

    id: int
    request_id: int
    kind: EventKind
    payload: dict[str, Any]
    attempts: int
    next_at: datetime | None = None


@dataclasses.dataclass(frozen=True)
class Upload:
    """A device list someone submitted, to be read (once) into a request.

    ``origin_data`` says where the list is (the Slack files, say): only its front end reads it.
    """

    id: int
    user: str
    channel: str
    product_key: str
    pasted: str
    origin_data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Summary:
    """What became of a request's devices."""

    request: Request
    created: int
    failed: int
    invalid: int
    pending: int
    rejected_locally: int
    #: Some created devices' IotIds are still being read from the platform (they come after the result).
    iot_ids_pending: bool = False

    @property
    def total(self) -> int:
        return self.created + self.failed + self.invalid + self.pending


@dataclasses.dataclass(frozen=True)
class Timing:
    """How the workflow paces itself. Defaults follow the settings' defaults."""

    poll_interval: float = 5.0
    poll_max_interval: float = 60.0
    phase_timeout: float = 3600.0
    approval_ttl: float = 24 * 3600.0
    max_errors: int = 3
    chunk_size: int = 10_000
    #: When approvers who have not acted are reminded: seconds after the request started waiting.
    reminders: tuple[float, ...] = ()

    def next_poll(self, polls: int) -> float:
        """Back off by half again per poll without news, up to the cap."""
        return min(self.poll_max_interval, self.poll_interval * 1.5**polls)


class WorkflowError(Exception):
    """A front-end action that cannot be done; the message is for the person who asked."""


class NotFound(WorkflowError):
    pass


class NotAllowed(WorkflowError):
    """The person may not do this; ``denial`` says why, for the front end to word."""

    def __init__(self, message: str, denial: Any = None) -> None:
        super().__init__(message)
        self.denial = denial


class Conflict(WorkflowError):
    """The request is no longer in a state where this makes sense (already decided, finished…)."""

    def __init__(self, message: str, request: Request) -> None:
        super().__init__(message)
        self.request = request
