"""When the workflow runs: APScheduler in the bot, a plain loop in the CLI and in tests.

Both implement :class:`bot.registration.Jobs` over the :class:`bot.registration.Steps` they are built with: ``wake(request_id, at)`` asks for
``Workflow.advance(request_id)`` at ``at`` (or now), and ``wake_outbox(at)`` for
``Workflow.deliver_events()``. An earlier wake always wins over a later one, so a poll scheduled
for a minute from now never pushes back the immediate step an approval asked for.

Nothing about the jobs is stored: the database says what every request needs next and when
(``next_step_at``), ``Workflow.resume()`` wakes each unfinished one at start, and every bot process
sweeps the database for due steps nobody holds (``Workflow.sweep()``, every second). So
APScheduler's in-memory job store is the right one: it is each process's local timer, and no two
schedulers ever share it (APScheduler's own rule). Which process runs a step is decided by the
database's leases (:mod:`bot.leases`), not by the timers.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from datetime import timedelta

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, JobEvent, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from bot.clock import Clock
from bot.reconciler import SWEEP_INTERVAL

if TYPE_CHECKING:
    from bot.registration import Steps

log = logging.getLogger(__name__)

OUTBOX = "outbox"
SWEEP = "sweep"


class _SkippedWakes(logging.Filter):
    """APScheduler warns of every wake skipped because two steps already run; iotreg reschedules
    those itself (``SchedulerJobs._on_skipped``), so the warning is noise in the bot's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


logging.getLogger("apscheduler.scheduler").addFilter(_SkippedWakes())


def advance_request(steps: Steps, request_id: int) -> None:
    """The job behind every request: one step of the workflow."""
    steps.advance(request_id)


def deliver_events(steps: Steps) -> None:
    """The job that hands stored events to the front end."""
    steps.deliver_events()


def sweep(steps: Steps) -> None:
    """The job that wakes due steps no process holds (a dead replica's, a stopped one's)."""
    steps.sweep()


class SchedulerJobs:
    """Runs the workflow's steps on an APScheduler ``BackgroundScheduler`` (one per deployment)."""

    def __init__(self, steps: Steps, workers: int = 8, *, sweep_every: float = SWEEP_INTERVAL) -> None:
        self.steps = steps
        self.sweep_every = sweep_every
        self._stopping = False
        self._lock = threading.Lock()
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(workers)},
            # max_instances=2: a wake that arrives while a step runs queues behind it (the workflow
            # serialises steps per request) instead of being skipped, so no wake is ever lost.
            job_defaults={"coalesce": True, "max_instances": 2, "misfire_grace_time": None},
            timezone=timezone.utc,
        )
        self.scheduler.add_listener(self._on_error, EVENT_JOB_ERROR)
        self.scheduler.add_listener(self._on_skipped, EVENT_JOB_MAX_INSTANCES)

    def start(self) -> None:
        self.scheduler.start()
        # Several replicas share the database: each looks every sweep_every seconds for due work
        # that nobody holds. At most one sweep at a time, and a late one is not made up for.
        self.scheduler.add_job(
            sweep, "interval", seconds=self.sweep_every, args=[self.steps], id=SWEEP, max_instances=1, coalesce=True,
        )

    def shutdown(self, wait: bool = True) -> None:
        # No wake from here on: APScheduler's shutdown holds its job store lock while it waits for
        # running jobs, so a step that scheduled its next wake then would wait for it forever.
        with self._lock:
            self._stopping = True
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)

    def wake(self, request_id: int, at: datetime | None = None) -> None:
        self._schedule(f"request-{request_id}", advance_request, [self.steps, request_id], at)

    def wake_outbox(self, at: datetime | None = None) -> None:
        self._schedule(OUTBOX, deliver_events, [self.steps], at)

    def _schedule(self, job_id: str, func: Callable[..., None], args: list, at: datetime | None) -> None:
        at = at or datetime.now(timezone.utc)
        with self._lock:
            if self._stopping:
                return  # the database has what is due; the next start (or another replica) takes it
            job = self.scheduler.get_job(job_id)
            # Before start() a job has no next_run_time attribute at all (APScheduler 3.x).
            next_run = getattr(job, "next_run_time", None)
            if next_run is not None and next_run <= at:
                return
            self.scheduler.add_job(func, "date", run_date=at, args=args, id=job_id, replace_existing=True)

    def _on_skipped(self, event: JobEvent) -> None:
        """A wake that came while two steps of its request were already running: try again shortly."""
        later = datetime.now(timezone.utc) + timedelta(seconds=1)
        if event.job_id == OUTBOX:
            self.wake_outbox(later)
        elif event.job_id.startswith("request-"):
            self.wake(int(event.job_id.removeprefix("request-")), later)

    @staticmethod
    def _on_error(event: JobExecutionEvent) -> None:
        # The edge where a step's unexpected failure is caught: logged here, and the request is
        # woken again by resume() at the next start, or by its next wake.
        log.error("job %s failed: %r", event.job_id, event.exception, exc_info=event.exception)


class InlineJobs:
    """Runs the workflow's steps in the calling thread, on any :class:`Clock`.

    The CLI drives a request with it, sleeping on the real clock; tests drive it on a
    :class:`~bot.clock.ManualClock`, where sleeping is moving time forward.
    """

    def __init__(self, clock: Clock, steps: Steps) -> None:
        self.clock = clock
        self.steps = steps
        self._due: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def wake(self, request_id: int, at: datetime | None = None) -> None:
        self._set(f"request-{request_id}", at)

    def wake_outbox(self, at: datetime | None = None) -> None:
        self._set(OUTBOX, at)

    def scheduled(self) -> dict[str, datetime]:
        with self._lock:
            return dict(self._due)

    def _set(self, key: str, at: datetime | None) -> None:
        at = at or self.clock.now()
        with self._lock:
            if key not in self._due or at < self._due[key]:
                self._due[key] = at

    def run_due(self) -> int:
        """Run every job whose time has come (including ones they schedule for now). Returns the count."""
        ran = 0
        while True:
            with self._lock:
                now = self.clock.now()
                due = [(at, key) for key, at in self._due.items() if at <= now]
                if not due:
                    return ran
                _, key = heapq.nsmallest(1, due)[0]
                del self._due[key]
            self._run(key)
            ran += 1

    def run_until(self, done: Callable[[], bool], *, timeout: float = 7 * 24 * 3600.0) -> bool:
        """Run jobs, sleeping on the clock until the next one, until ``done()`` or nothing is left.

        ``timeout`` is in clock seconds. Returns ``done()``.
        """
        deadline = self.clock.monotonic() + timeout
        while not done():
            self.run_due()
            if done():
                break
            with self._lock:
                upcoming = min(self._due.values(), default=None)
            if upcoming is None or self.clock.monotonic() >= deadline:
                break
            wait = (upcoming - self.clock.now()).total_seconds()
            self.clock.sleep(min(max(wait, 0.0), deadline - self.clock.monotonic()))
        return done()

    def _run(self, key: str) -> None:
        if key == OUTBOX:
            deliver_events(self.steps)
        else:
            advance_request(self.steps, int(key.removeprefix("request-")))
