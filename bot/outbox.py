"""The outbox: stored events handed to the front end that made the request, in order, at least once.

Several processes may deliver: each request's events go through one of them at a time, under
the request's ``outbox:<id>`` lease (:mod:`bot.leases`), so two replicas never post the same
notification at once.

A transition writes its event in the same transaction as the state change, so a notification is
never lost and never precedes the state it reports. The front end records each step of delivering
an event as it goes (:meth:`bot.service.RequestService.mark_step`), so an event delivered again
after a crash repeats nothing.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from bot.clock import Clock
from bot.domain import Origin
from bot.leases import Leases
from bot.reconciler import DATABASE_RETRY
from bot.store import Store, StoreUnavailable

if TYPE_CHECKING:
    from bot.registration import Jobs, Notifier

log = logging.getLogger(__name__)

MAX_DELIVERY_ATTEMPTS = 30
#: Seconds before looking again at events another process was delivering.
ELSEWHERE_RETRY = 1.0


class Outbox:
    """Delivers the events of the requests from ``origins`` (all, with ``None``)."""

    def __init__(
        self, store: Store, notifier: Notifier, clock: Clock, jobs: Jobs, *, origins: frozenset[Origin] | None = None,
        leases: Leases | None = None,
    ) -> None:
        """``leases``: whose turn it is to deliver a request's events when several processes
        share the database (each request's events are delivered by one at a time, in order)."""
        self.store = store
        self.leases = leases or Leases(store, clock)
        self.notifier = notifier
        self.clock = clock
        self.jobs = jobs
        self.origins = origins
        self._lock = threading.Lock()

    def deliver_events(self) -> int:
        """Hand due events to the notifier, in order per request. Returns how many were delivered.

        While the database cannot be reached, delivery is tried again every ``DATABASE_RETRY``
        seconds; an event whose delivery was cut short is delivered again, its steps done once.
        """
        try:
            return self._deliver_events()
        except StoreUnavailable as exc:
            log.warning("notifications wait for the database: %s", exc)
            self.jobs.wake_outbox(self.clock.now() + timedelta(seconds=DATABASE_RETRY))
            return 0

    def _deliver_events(self) -> int:
        delivered = 0
        with self._lock:
            now = self.clock.now()
            due: dict[int, None] = {}  # requests whose oldest undelivered event is due, oldest first
            seen: set[int] = set()
            for event in self.store.pending_events(self.origins):
                if event.request_id not in seen:
                    seen.add(event.request_id)
                    if event.next_at <= now:
                        due[event.request_id] = None
            elsewhere = False
            for request_id in due:
                lease = f"outbox:{request_id}"
                if not self.leases.take(lease):
                    elsewhere = True  # another process is delivering this request's events
                    continue
                try:
                    delivered += self._deliver_request(request_id, now)
                finally:
                    self.leases.release(lease)
        next_at = self.store.next_event_time(self.origins)
        if next_at is not None:
            if elsewhere:  # not at once again: the other process is at it (and if it dies, its lease runs out)
                next_at = max(next_at, self.clock.now() + timedelta(seconds=ELSEWHERE_RETRY))
            self.jobs.wake_outbox(next_at)
        return delivered

    def _deliver_request(self, request_id: int, now: datetime) -> int:
        """Deliver the request's due events in order, under its outbox lease; returns how many.

        Each event is read again under the lease: another process may have delivered it since
        the list was read."""
        delivered = 0
        while (event := self.store.next_event(request_id)) is not None and event.next_at <= now:
            try:
                self.notifier.deliver(event)
            except Exception as exc:  # noqa: BLE001 - the front end's failure must not lose the event
                if event.attempts + 1 >= MAX_DELIVERY_ATTEMPTS:
                    # About two hours of trying: a fault that outlasts that would otherwise hold
                    # back every later event of the request. Kept in the outbox, with its error.
                    log.error("giving up on %s of request #%d after %d attempts: %s", event.kind, event.request_id, event.attempts + 1, exc)
                    self.store.mark_failed(event.id, f"gave up: {type(exc).__name__}: {exc}", now)
                    self.store.mark_delivered(event.id, now)
                    continue
                delay = min(300.0, 2.0 ** min(event.attempts, 8))
                log.warning("delivering %s of request #%d failed (%s); again in %.0fs", event.kind, event.request_id, exc, delay)
                self.store.mark_failed(event.id, f"{type(exc).__name__}: {exc}", now + timedelta(seconds=delay))
                return delivered
            self.store.mark_delivered(event.id, self.clock.now())
            delivered += 1
        return delivered
