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

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Protocol

from bot.aliyun.client import IotClient
from bot.clock import Clock
from bot.domain import Event, Origin, Timing
from bot.outbox import Outbox
from bot.policy import Policy
from bot.reconciler import Reconciler
from bot.service import RequestService
from bot.leases import Leases
from bot.store import Store, StoreUnavailable

log = logging.getLogger(__name__)


class Notifier(Protocol):
    """What a front end implements to hear about requests. Raise to have the event retried later."""

    def deliver(self, event: Event) -> None: ...


class Jobs(Protocol):
    """Runs :meth:`Workflow.advance` and :meth:`Workflow.deliver_events` when asked."""

    def wake(self, request_id: int, at: datetime | None = None) -> None: ...

    def wake_outbox(self, at: datetime | None = None) -> None: ...


class Steps(Protocol):
    """What jobs run: the workflow's two kinds of step, and the sweep for due ones."""

    def advance(self, request_id: int) -> None: ...

    def deliver_events(self) -> int: ...

    def sweep(self) -> int: ...


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
        self.leases = Leases(store, clock)
        self._running = 0
        self._stopping = False
        self._idle = threading.Condition()
        self.jobs = jobs(self)
        self.requests = RequestService(store, client, clock, self.timing, self.jobs, policy or Policy(), leases=self.leases)
        self.reconciler = Reconciler(
            store, client, clock, self.timing, self.jobs, self.requests.expire_if_due, origins=origins,
            remind=self.requests.remind_if_due, rule_of=self.requests.rule_of, leases=self.leases,
        )
        self.outbox = Outbox(store, notifier(self.requests), clock, self.jobs, origins=origins, leases=self.leases)

    def advance(self, request_id: int) -> None:
        with self._working() as go:
            if go:
                self.reconciler.advance(request_id)

    def deliver_events(self) -> int:
        with self._working() as go:
            return self.outbox.deliver_events() if go else 0

    def sweep(self) -> int:
        """Wake the due steps no process holds (see :meth:`Reconciler.sweep`)."""
        with self._working() as go:
            if not go:
                return 0
            try:
                return self.reconciler.sweep()
            except StoreUnavailable as exc:
                log.debug("sweep skipped: %s", exc)  # /healthz says so; the next sweep tries again
                return 0

    def stop(self, grace: float) -> bool:
        """Stop taking steps, let the running ones finish for up to ``grace`` seconds, then give
        every lease back at once, so other replicas carry on now rather than when the leases run
        out. Returns whether every step finished (if not, the caller must not let them go on)."""
        with self._idle:
            self._stopping = True
            finished = self._idle.wait_for(lambda: self._running == 0, timeout=grace)
        if not finished:
            log.warning("%d step(s) still running after %g s: handing their leases back", self._running, grace)
        self.leases.hand_back()
        return finished

    @contextmanager
    def _working(self) -> Iterator[bool]:
        with self._idle:
            if self._stopping:
                go = False
            else:
                self._running += 1
                go = True
        try:
            yield go
        finally:
            if go:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

    def resume(self) -> int:
        """At start: wake every unfinished request and the outbox. Returns how many were woken."""
        return self.reconciler.resume()

    def close(self) -> None:
        self.leases.hand_back()
        if self.client is not None:
            self.client.close()
        self.store.close()
