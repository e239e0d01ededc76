"""The registration workflow: from a list of names to registered devices, one durable step at a time.

::

    checking ──► check_failed                      (a new request can retry the valid names)
        │
        ▼
    awaiting_approval ──► rejected | cancelled | expired
        │ approve (not the requester)
        ▼
    approved ──► registering ──► done | failed

The workflow knows nothing of Slack. It is three parts over one store and one IoT client:

* :class:`bot.service.RequestService`: what front ends ask (submit, approve, reject, cancel,
  retry, credentials) and learn (requests, summaries, the audit trail), with the policy of
  :mod:`bot.policy` checked at every command;
* :class:`bot.reconciler.Reconciler`: every unfinished request's next step (:meth:`advance`);
* :class:`bot.outbox.Outbox`: the events those produce, handed to the front end's
  :class:`Notifier`, so a notification is never lost and never precedes the state it reports.

:class:`Workflow` builds the three with their :class:`Jobs`, which run :meth:`Workflow.advance`
and :meth:`Workflow.deliver_events` when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from bot.aliyun.client import IotClient
from bot.clock import Clock
from bot.domain import Event, Origin, Timing
from bot.outbox import Outbox
from bot.policy import Policy
from bot.reconciler import Reconciler
from bot.service import RequestService
from bot.store import Store


class Notifier(Protocol):
    """What a front end implements to hear about requests. Raise to have the event retried later."""

    def deliver(self, event: Event) -> None: ...


class Jobs(Protocol):
    """Runs :meth:`Workflow.advance` and :meth:`Workflow.deliver_events` when asked."""

    def wake(self, request_id: int, at: datetime | None = None) -> None: ...

    def wake_outbox(self, at: datetime | None = None) -> None: ...


class Steps(Protocol):
    """What jobs run: the workflow's two kinds of step."""

    def advance(self, request_id: int) -> None: ...

    def deliver_events(self) -> int: ...


class Workflow:
    """The one registration workflow behind every front end."""

    def __init__(
        self,
        store: Store,
        client: IotClient | None,
        clock: Clock,
        timing: Timing | None = None,
        *,
        notifier: Callable[[RequestService], Notifier],
        jobs: Callable[[Steps], Jobs],
        policy: Policy | None = None,
        origins: frozenset[Origin] | None = None,
    ) -> None:
        """``notifier`` and ``jobs`` are factories: the front end's notifier is given the request
        service to answer from, and the jobs are given this workflow's steps to run.

        ``origins``: the front ends this workflow serves; ``None`` for all. Each process resumes
        and notifies only its own requests, so the bot and the CLI can share one database
        without delivering each other's messages.
        """
        self.store = store
        self.client = client
        self.clock = clock
        self.timing = timing or Timing()
        self.origins = origins
        self.jobs = jobs(self)
        self.requests = RequestService(store, client, clock, self.timing, self.jobs, policy or Policy())
        self.reconciler = Reconciler(
            store, client, clock, self.timing, self.jobs, self.requests.expire_if_due, origins=origins,
            remind=self.requests.remind_if_due, rule_of=self.requests.rule_of,
        )
        self.outbox = Outbox(store, notifier(self.requests), clock, self.jobs, origins=origins)

    def advance(self, request_id: int) -> None:
        self.reconciler.advance(request_id)

    def deliver_events(self) -> int:
        return self.outbox.deliver_events()

    def resume(self) -> int:
        """At start: wake every unfinished request and the outbox. Returns how many were woken."""
        return self.reconciler.resume()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.store.close()
