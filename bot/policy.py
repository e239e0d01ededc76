"""Who may do what to a request, and what is announced at each event: decided here, for every front end.

Front ends ask and render the answer; none of them decides. Whether someone is an approver is a
question for a :class:`Membership` (the Slack front end answers it from user ids and user groups,
the CLI from the person at the terminal): the rules built on that answer are the core's.

* Approve: an approver, and not the requester unless self-approval is allowed.
* Reject: an approver; the requester's Reject withdraws (cancels) their own request, unless
  self-approval is allowed.
* Cancel, retry the valid names: the requester or an approver.
* Receive device credentials: the requester, whoever decided, or an approver (when approvers are named).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol

from bot.domain import Action, Event, EventKind, Request


class Membership(Protocol):
    """Whether someone is an approver."""

    @property
    def anyone(self) -> bool:
        """No approver is named: anyone may approve."""

    def why_not(self, user: str) -> str | None:
        """``None`` if ``user`` is an approver; otherwise why not, in words for them."""


class Everyone:
    """The membership where anyone is an approver (the CLI's person at the terminal)."""

    anyone = True

    def why_not(self, user: str) -> str | None:
        return None


class Why(enum.StrEnum):
    """Why an action was refused; front ends word it."""

    REQUESTER = "requester"  # the requester may not approve their own request
    NOT_APPROVER = "not an approver"
    NOT_REQUESTER_OR_APPROVER = "not the requester or an approver"
    NOT_ENTITLED = "not entitled to the credentials"


@dataclasses.dataclass(frozen=True)
class Denial:
    """A refusal: ``why``, and ``detail`` from the membership when it had something to say."""

    action: Action
    why: Why
    detail: str | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
    approvers: Membership = dataclasses.field(default_factory=Everyone)
    allow_self_approval: bool = False

    def check(self, action: Action, request: Request, actor: str) -> Denial | None:
        """``None`` when ``actor`` may do ``action`` to ``request``; otherwise the :class:`Denial`."""
        if action is Action.APPROVE:
            detail = self.approvers.why_not(actor)
            if detail is not None:
                return Denial(action, Why.NOT_APPROVER, detail)
            if actor == request.requester and not self.allow_self_approval:
                return Denial(action, Why.REQUESTER)
            return None
        if action is Action.REJECT:
            if self.withdraws(request, actor):
                return None
            detail = self.approvers.why_not(actor)
            return None if detail is None else Denial(action, Why.NOT_APPROVER, detail)
        if action in (Action.CANCEL, Action.RETRY):
            if actor == request.requester or self.approvers.why_not(actor) is None:
                return None
            return Denial(action, Why.NOT_REQUESTER_OR_APPROVER)
        if action is Action.CREDENTIALS:
            if actor in (request.requester, request.decided_by):
                return None
            if not self.approvers.anyone and self.approvers.why_not(actor) is None:
                return None
            return Denial(action, Why.NOT_ENTITLED)
        raise ValueError(f"no rule for {action}")

    def withdraws(self, request: Request, actor: str) -> bool:
        """The requester's Reject means they withdraw their own request: it is cancelled (unless
        they may decide on it themselves, when it is a rejection like anyone's)."""
        return actor == request.requester and not self.allow_self_approval


class Announcement(enum.StrEnum):
    """What a front end announces about a request. Each is carried out once per event."""

    MESSAGE = "anchor"  # the request's own message, posted once and kept current
    SKIPPED_LINES = "skipped"  # the lines of the list refused locally
    CHECK_FAILED = "check_failed"  # the names the platform refused, and a way to retry the rest
    RESULT = "result"  # what became of every device
    RESULT_FILE = "result_file"  # the same as a file, when the list is long
    NOTICE = "notice"  # one line in the team's channel


def announcements(event: Event, request: Request) -> list[Announcement]:
    """What is announced at ``event``, in order."""
    said = [Announcement.MESSAGE]
    if event.kind is EventKind.CREATED and request.rejected_count:
        said.append(Announcement.SKIPPED_LINES)
    if event.kind is EventKind.CHECK_FAILED:
        said.append(Announcement.CHECK_FAILED)
    if event.kind is EventKind.FINISHED:
        said += [Announcement.RESULT, Announcement.RESULT_FILE, Announcement.NOTICE]
    return said
