"""Scale: large and many requests against the platform's QPS quotas, and a growing database.

The emulator runs in its own process on the real clock and enforces the account's quotas (answering
``Throttling.User`` beyond them); the bot side is the real :class:`~bot.registration.Workflow` on
APScheduler (:class:`~bot.jobs.SchedulerJobs`, 8 workers, as ``create_app`` sizes it with the
default IOTREG_WORKERS), its own client-side rate limiter, SQLite in a temp dir, and a notifier that
does nothing but hand each request that awaits approval to an approver thread, which approves it at
once: as a click on the approval message would, as soon as the message is out (no Slack: this is
about the IoT side).

1. One big request: 100,000 names (ten chunks of 10,000) checked, approved, registered, and every
   device's IotId collected (2,000 QueryPageByApplyId calls of 50). The result (the request done, its
   threaded reply posted) comes from the final status; the IotIds after it: the run ends when the
   last is read, and "approval to result" is set against the platform's creation time (target:
   within it + 3 s).
2. Many requests in flight: 200 requests of 50 names, submitted at once, all to the end.
3. Growth as the work doubles: names per request, requests in flight, and rows already in the
   database (time of ``Workflow.submit`` of 10,000 names, ``store.outcome_counts`` and
   ``store.requests(limit=20)``).

For 1 and 2: total time, calls per action (and per second, as the emulator saw them),
``Throttling.User`` answers (target: none), every device accounted for (created on the emulator ==
recorded as created in the store, with the same IotId, nothing pending; target: all) and the
quota-bound optimum (target: total within 1.2 times it):

    optimum = max over actions (fewest calls possible / the action's QPS) + check + create

The fewest calls: per chunk one check, one register, two status calls (one after the check ends,
one after the creation ends) and ceil(size / 50) pages. The busiest action cannot go faster than
its quota, and the check and the creation stand in series with it: the pages of a chunk can only be
read after its creation ends, and a request's creation only starts after its check ends, so the last
check sent (or the first page read) is separated from the end (or the start) by both durations.
For a few calls the formula is up to a second generous (a full window's calls go at once). The
emulator builds a creation's devices inside the first call after its deadline, so for 100,000
devices its creation takes seconds longer than ``create_seconds``: that time is shown apart.

    python bench/bench_scale.py [--poll 1] [--check-seconds 1] [--create-seconds 1] [--quick]
    python bench/bench_scale.py --result-only [--names 100000] [--latency 0.05]   # just approval to result, one request

``--replicas N`` measures instead how replicas share the account's quotas: 200 requests of 50 names
in flight (to the last IotId read), driven by N processes at once, each with its own PostgreSQL store (one throwaway
database), its own scheduler and rate limiter, built as ``iotreg serve`` builds them
(:func:`bot.wiring.iot_client`, :func:`bot.wiring.workflow`, :class:`~bot.jobs.SchedulerJobs`);
each submits its share and approves each request whose approval message it delivers. Then the same with one process on
the same kind of database, for comparison. Targets: no ``Throttling.User``, every device accounted
for, total within 1.05 times the quota-bound optimum.

    python bench/bench_scale.py --replicas 3 [--requests 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median, report, table  # noqa: E402

from bot.domain import FINAL_STATES, Outcome, State  # noqa: E402
from bot.aliyun.client import MAX_PAGE_SIZE, Credentials, IotClient  # noqa: E402
from bot.aliyun.ratelimit import RateLimiter  # noqa: E402
from bot.clock import SystemClock  # noqa: E402
from bot.config import DEFAULT_QPS  # noqa: E402
from bot.jobs import InlineJobs, SchedulerJobs  # noqa: E402
from bot.domain import Timing, WorkflowError  # noqa: E402
from bot.reconciler import CHECKS_AT_ONCE  # noqa: E402
from bot.registration import Workflow  # noqa: E402
from bot.store.sqlite import SqliteStore, parse_time  # noqa: E402
from bot.domain import Event, EventKind  # noqa: E402

ACTIONS = ["BatchCheckDeviceNames", "BatchRegisterDeviceWithApplyId", "QueryBatchRegisterDeviceStatus", "QueryPageByApplyId"]
SHORT = {"BatchCheckDeviceNames": "check", "BatchRegisterDeviceWithApplyId": "register", "QueryBatchRegisterDeviceStatus": "status", "QueryPageByApplyId": "pages"}
THROTTLED = "Throttling.User"
WORKERS = 8  # create_app: max(4, IOTREG_WORKERS // 2) with the default of 16
CHUNK = 10_000


class Silent:
    """The notifier: hears every event and does nothing with it."""

    def deliver(self, event: Event) -> None:
        pass


class Approver:
    """The notifier of a run: the approvers' side of Slack. Each request whose approval message it
    is handed is approved at once, in a thread of its own (as a click on the message would come
    back as a request of its own), by someone other than the requester."""

    def __init__(self, workflow_of: Callable[[], Workflow]) -> None:
        self._workflow_of = workflow_of
        self._waiting: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._approve, daemon=True)
        self._thread.start()

    def deliver(self, event: Event) -> None:
        if event.kind == EventKind.AWAITING_APPROVAL:
            self._waiting.put(event.request_id)

    def stop(self) -> None:
        self._waiting.put(None)
        self._thread.join()

    def _approve(self) -> None:
        while (request_id := self._waiting.get()) is not None:
            try:
                self._workflow_of().requests.approve(request_id, "U0BOB")
            except WorkflowError:
                pass  # approved already (a message delivered again)


# -- the emulator, in its own process -----------------------------------------------------------


def _serve_emulator(conn: Connection, check_seconds: float, create_seconds: float, latency: float = 0.0) -> None:
    """Child process: run the emulator until told to stop; answer "report" with its counts.
    ``latency``: seconds added before every call reaches the gateway (a network's way there)."""
    from bot.standins.emulator import Emulator, FaultPlan
    from bot.standins.emulator.server import SWITCH_INTERVAL

    sys.setswitchinterval(SWITCH_INTERVAL)  # as `iotreg emulator` runs
    faults = FaultPlan(latency=latency, real_sleep=True) if latency else None
    emulator = Emulator(clock=SystemClock(), check_seconds=check_seconds, create_seconds=create_seconds, faults=faults).start()
    # Every answer's time, action, outcome and time spent in the gateway, for the timeline: the
    # gateway's own handle, wrapped. And the time the backend spends building the devices of a
    # finished creation: it does so lazily, inside the first call after the creation's deadline.
    answered: list[tuple[float, str, str, float]] = []
    building: list[float] = []
    handle, finish_create = emulator.gateway.handle, emulator.backend._finish_create  # noqa: SLF001

    def timed(method: str, query: Iterable[tuple[str, str]], form: Iterable[tuple[str, str]] = (), **v3: Any) -> tuple[int, dict]:
        params, began = list(query), time.monotonic()
        status, body = handle(method, params, form, **v3)
        ended = time.monotonic()
        answered.append((ended, dict(params).get("Action", ""), str(body.get("Code", "Success")), ended - began))
        return status, body

    def timed_create(app: object) -> None:
        began = time.monotonic()
        finish_create(app)
        building.append(time.monotonic() - began)

    emulator.gateway.handle = timed  # type: ignore[method-assign]
    emulator.backend._finish_create = timed_create  # type: ignore[method-assign]  # noqa: SLF001
    conn.send({**emulator.env(), "product_key": emulator.product_key})
    while True:
        command = conn.recv()
        if command == "report":
            devices = {d.device_name: d.iot_id for d in emulator.backend.devices(emulator.product_key)}
            conn.send((dict(emulator.gateway.outcomes), devices, answered, building))
        else:
            emulator.stop()
            conn.send("stopped")
            return


class EmulatorProcess:
    def __init__(self, check_seconds: float, create_seconds: float, latency: float = 0.0) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_emulator, args=(child, check_seconds, create_seconds, latency), daemon=True)
        self._process.start()
        child.close()  # so that recv() ends with EOFError, not a hang, if the child dies
        self.env: dict[str, str] = self._conn.recv()

    def report(self) -> tuple[dict[tuple[str, str], int], dict[str, str], list[tuple[float, str, str, float]], list[float]]:
        """The gateway's outcomes per (action, code), the devices (name: IotId), every answer's
        (monotonic time, action, code, seconds in the gateway), and the seconds each creation took to build."""
        self._conn.send("report")
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._conn.recv()
        self._process.join(10)


# -- one run: some requests, from submit to the last IotId --------------------------------------


@dataclasses.dataclass
class Run:
    sizes: list[int]
    seconds: float
    calls: dict[str, int]
    throttled: dict[str, int]
    on_emulator: int
    created_in_store: int
    iot_ids_matching: int
    pending: int
    done: int
    phases: dict[str, float]
    result: float  # seconds from the first submit to the last request's result (every request final)
    timeline: list[tuple[float, str, str, float]]  # every answer: (seconds from the first submit, action, code, seconds in the gateway)
    building: float  # seconds the emulator spent building created devices, inside the first call after each deadline
    missed_slots: int  # booked rate-limit slots whose step came too late to use them
    moved_slots: int  # booked slots whose step came late and moved them to its time

    @property
    def fewest(self) -> dict[str, int]:
        return fewest_calls(self.sizes)

    def optimum(self, check_seconds: float, create_seconds: float) -> float:
        return optimum(self.sizes, check_seconds, create_seconds)

    @property
    def accounted(self) -> bool:
        n = sum(self.sizes)
        return self.on_emulator == self.created_in_store == self.iot_ids_matching == n and self.pending == 0 and self.done == len(self.sizes)


def fewest_calls(sizes: list[int]) -> dict[str, int]:
    """The fewest calls per action that requests of ``sizes`` names need (see the docstring)."""
    chunks = [min(CHUNK, n - start) for n in sizes for start in range(0, n, CHUNK)]
    return {
        "BatchCheckDeviceNames": len(chunks),
        "BatchRegisterDeviceWithApplyId": len(chunks),
        "QueryBatchRegisterDeviceStatus": 2 * len(chunks),
        "QueryPageByApplyId": sum(math.ceil(c / MAX_PAGE_SIZE) for c in chunks),
    }


def optimum(sizes: list[int], check_seconds: float, create_seconds: float) -> float:
    """The quota-bound optimum: the busiest action at its QPS, plus one check and one creation."""
    return max(calls / DEFAULT_QPS[action] for action, calls in fewest_calls(sizes).items()) + check_seconds + create_seconds


def run_requests(sizes: list[int], *, poll: float, check_seconds: float, create_seconds: float, latency: float = 0.0) -> Run:
    """Submit one request per size at once, approve each when it is checked, wait for all to end."""
    emulator = EmulatorProcess(check_seconds, create_seconds, latency)
    folder = Path(tempfile.mkdtemp(prefix="iotreg-bench-scale-"))
    clock = SystemClock()
    client = IotClient(
        emulator.env["IOT_ENDPOINT"],
        Credentials(emulator.env["ALIBABA_CLOUD_ACCESS_KEY_ID"], emulator.env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]),
        limiter=RateLimiter(DEFAULT_QPS, clock),
        clock=clock,
    )
    approver = Approver(lambda: workflow)
    workflow = Workflow(
        SqliteStore(folder / "iotreg.db"), client, clock, Timing(poll_interval=poll, poll_max_interval=60.0),
        notifier=lambda _: approver, jobs=lambda steps: SchedulerJobs(steps, workers=WORKERS),
    )
    jobs = workflow.jobs
    jobs.start()
    product_key = emulator.env["product_key"]
    final = ", ".join(f"'{s}'" for s in FINAL_STATES)
    try:
        started, wall_started = time.monotonic(), clock.now()
        for r, n in enumerate(sizes):
            workflow.requests.submit(product_key, "U0ALICE", [f"r{r:03d}-{i:06d}" for i in range(n)], origin="cli")
        submitted = time.monotonic() - started
        limit = 120 + 5 * (max(len(sizes) / 10, sum(sizes) / 2500) + check_seconds + create_seconds)
        while workflow.store.db.execute(f"SELECT COUNT(*) FROM requests WHERE state IN ({final})").fetchone()[0] < len(sizes):
            if time.monotonic() - started > limit:
                raise RuntimeError(f"not finished after {limit:.0f} s: {_states(workflow.store)}")
            time.sleep(0.02)
        result = time.monotonic() - started
        # The IotIds, read after the result (a store without the method read them before it).
        unread = getattr(workflow.store, "unread_iot_ids", list)
        while unread():
            if time.monotonic() - started > limit:
                raise RuntimeError(f"IotIds not all read after {limit:.0f} s")
            time.sleep(0.02)
        seconds = time.monotonic() - started
    finally:
        jobs.shutdown(wait=True)
        approver.stop()
    outcomes, devices, answered, building = emulator.report()
    emulator.stop()
    db = workflow.store.db
    recorded = dict(db.execute("SELECT name, iot_id FROM devices WHERE outcome = ?", [Outcome.CREATED]).fetchall())
    pending = db.execute("SELECT COUNT(*) FROM devices WHERE outcome = ?", [Outcome.PENDING]).fetchone()[0]
    done = db.execute("SELECT COUNT(*) FROM requests WHERE state = ?", [State.DONE]).fetchone()[0]
    phases = _phases(workflow.store, wall_started, submitted, create_seconds, sum(building))
    phases["last IotId read"] = seconds
    workflow.close()
    shutil.rmtree(folder, ignore_errors=True)
    return Run(
        sizes=sizes,
        seconds=seconds,
        calls={a: sum(n for (action, _), n in outcomes.items() if action == a) for a in ACTIONS},
        throttled={a: outcomes.get((a, THROTTLED), 0) for a in ACTIONS},
        on_emulator=len(devices),
        created_in_store=len(recorded),
        iot_ids_matching=sum(1 for name, iot_id in recorded.items() if iot_id and devices.get(name) == iot_id),
        pending=pending,
        done=done,
        phases=phases,
        result=result,
        timeline=sorted((at - started, action, code, seconds) for at, action, code, seconds in answered),
        building=sum(building),
        missed_slots=sum(client.limiter.missed.values()),
        moved_slots=sum(client.limiter.moved.values()),
    )


# -- several replicas on one PostgreSQL database -------------------------------------------------


def _replica(conn: Connection, env: dict[str, str], share: list[tuple[str, int]], product_key: str) -> None:
    """Child process: a replica's workflow on the shared database. Built, it says "ready"; told
    "go", it submits its share (name prefix, size) and approves each request whose approval message
    it delivers; told "stop", stops."""
    from bot import wiring
    from bot.config import Settings

    from bot.server import SWITCH_INTERVAL

    sys.setswitchinterval(SWITCH_INTERVAL)  # as `iotreg serve` runs
    settings = Settings.from_env(env)
    clock = SystemClock()
    approver = Approver(lambda: workflow)
    workflow = wiring.workflow(settings, clock=clock, notifier=lambda _: approver, jobs=lambda steps: SchedulerJobs(steps, workers=WORKERS))
    workflow.jobs.start()
    workflow.resume()
    conn.send("ready")
    assert conn.recv() == "go"
    for prefix, size in share:
        workflow.requests.submit(product_key, "U0ALICE", [f"{prefix}-{i:06d}" for i in range(size)], origin="cli")
    conn.send("submitted")
    conn.recv()  # stop
    limiter = workflow.client.limiter
    missed, moved = sum(limiter.missed.values()), sum(limiter.moved.values())
    workflow.jobs.shutdown(wait=True)
    approver.stop()
    workflow.close()
    conn.send(("stopped", missed, moved))


@dataclasses.dataclass
class ReplicaRun:
    replicas: int
    sizes: list[int]
    seconds: float
    calls: dict[str, int]
    throttled: dict[str, int]
    accounted: bool
    detail: str  # devices on emulator / created in store / same IotId / pending / done
    missed_slots: int  # booked slots whose step was woken too late to use them (booked again)
    moved_slots: int  # booked slots whose step was woken late and moved them to its time
    checks: list[float]  # when each accepted check was answered, seconds from the first submit
    submitted: float  # when every replica had submitted its share, seconds from the start

    def where(self, check_seconds: float, create_seconds: float) -> str:
        """Where the time went: the checks (the bound) and what came after the last of them."""
        if not self.checks:
            return "-"
        # The limiter's schedule from the first check: ten to every 1.05 s, spread over 0.19 s.
        ideal = (len(self.checks) - 1) // 10 * 1.05 + 9 * 0.021
        return (f"{self.submitted:.1f} / {self.checks[0]:.2f} / {self.checks[-1]:.1f} (schedule {self.checks[0] + ideal:.1f}) / "
                f"{self.seconds - self.checks[-1]:.1f} (check + create {check_seconds + create_seconds:g})")

    def optimum(self, check_seconds: float, create_seconds: float) -> float:
        return optimum(self.sizes, check_seconds, create_seconds)


def run_replicas(count: int, sizes: list[int], *, poll: float, check_seconds: float, create_seconds: float) -> ReplicaRun:
    """``count`` replica processes on one fresh PostgreSQL database drive one request per size."""
    from bot.standins.postgres import TempCluster
    from bot.store import open_store

    emulator = EmulatorProcess(check_seconds, create_seconds)
    product_key = emulator.env.pop("product_key")
    cluster = TempCluster().start()
    try:
        url = cluster.create_database("iotreg")
        env = {**emulator.env, "IOTREG_DB": url, "IOTREG_POLL_INTERVAL": str(poll), "IOTREG_POLL_MAX_INTERVAL": "60"}
        context = multiprocessing.get_context("spawn")
        pipes, processes = [], []
        for i in range(count):
            share = [(f"r{r:03d}", n) for r, n in enumerate(sizes) if r % count == i]
            mine, theirs = context.Pipe()
            process = context.Process(target=_replica, args=(theirs, env, share, product_key), daemon=True)
            process.start()
            theirs.close()
            pipes.append(mine)
            processes.append(process)
        for pipe in pipes:
            assert pipe.recv() == "ready"
        store = open_store(url)
        started = time.monotonic()
        for pipe in pipes:
            pipe.send("go")
        for pipe in pipes:
            pipe.recv()  # submitted
        submitted = time.monotonic() - started
        limit = 120 + 5 * (len(sizes) / 10 + check_seconds + create_seconds)
        while True:
            # A count, not the rows: the bench's own watching must not take the CPU the replicas need.
            ended = sum(n for state, n in store.state_counts().items() if state in FINAL_STATES)
            if ended >= len(sizes):
                break
            if time.monotonic() - started > limit:
                raise RuntimeError(f"not finished after {limit:.0f} s: {ended} of {len(sizes)} requests ended")
            time.sleep(0.02)
        while store.unread_iot_ids():  # read after the result, by whichever replica
            if time.monotonic() - started > limit:
                raise RuntimeError(f"IotIds not all read after {limit:.0f} s")
            time.sleep(0.02)
        seconds = time.monotonic() - started
        for pipe in pipes:
            pipe.send("stop")
        missed = moved = 0
        for pipe, process in zip(pipes, processes):
            _, missed_here, moved_here = pipe.recv()
            missed, moved = missed + missed_here, moved + moved_here
            process.join(30)
        outcomes, devices, answered, _ = emulator.report()
        all_requests = store.requests(limit=len(sizes) + 1)
        recorded = {d.name: d.iot_id for r in all_requests for d in store.devices(r.id, outcome=Outcome.CREATED)}
        pending = sum(len(store.devices(r.id, outcome=Outcome.PENDING)) for r in all_requests)
        done = sum(1 for r in all_requests if r.state == State.DONE)
        store.close()
    finally:
        emulator.stop()
        cluster.destroy()
    matching = sum(1 for name, iot_id in recorded.items() if iot_id and devices.get(name) == iot_id)
    n = sum(sizes)
    return ReplicaRun(
        replicas=count, sizes=sizes, seconds=seconds,
        calls={a: sum(k for (action, _), k in outcomes.items() if action == a) for a in ACTIONS},
        throttled={a: outcomes.get((a, THROTTLED), 0) for a in ACTIONS},
        accounted=len(devices) == len(recorded) == matching == n and pending == 0 and done == len(sizes),
        detail=f"{len(devices):,} / {len(recorded):,} / {matching:,} / {pending} / {done}",
        missed_slots=missed,
        moved_slots=moved,
        checks=sorted(t - started for t, action, code, _ in answered if action == ACTIONS[0] and code != THROTTLED),
        submitted=submitted,
    )


def replicas_main(args: argparse.Namespace) -> None:
    c, k = args.check_seconds, args.create_seconds
    sizes = [50] * args.requests
    timing = dict(poll=args.poll, check_seconds=c, create_seconds=k)
    runs = []
    for count in (args.replicas, 1):
        print(f"{args.requests} requests of 50 names, {count} replica(s) on PostgreSQL…", flush=True)
        runs.append(run_replicas(count, sizes, **timing))
    rows, verdicts = [], []
    for run in runs:
        optimum = run.optimum(c, k)
        ratio = run.seconds / optimum
        throttled = sum(run.throttled.values())
        which = ", ".join(f"{SHORT[a]} {n}" for a, n in run.throttled.items() if n)
        verdict = "PASS" if throttled == 0 and run.accounted and ratio <= 1.05 else "MISS"
        verdicts.append(verdict)
        rows.append([run.replicas, f"{run.seconds:.1f}", f"{optimum:.1f}", f"{ratio:.2f}×", f"{throttled}{f' ({which})' if which else ''}",
                     " / ".join(f"{run.calls[a]:,}" for a in ACTIONS), f"{run.detail} ({'yes' if run.accounted else 'NO'})",
                     f"{run.moved_slots} / {run.missed_slots}", run.where(c, k), verdict])
    report(
        f"Scale with replicas: {args.requests} requests in flight, {args.replicas} processes against 1",
        f"Emulator in its own process on the real clock, enforcing the quotas (check {c:g} s, create {k:g} s); each replica a "
        f"process with its own PostgresStore on one throwaway database, its own SchedulerJobs ({WORKERS} workers) and rate "
        f"limiter as `iotreg serve` builds them, submitting its share of the requests and approving each request as soon as it delivers its approval message. "
        f"IOTREG_POLL_INTERVAL={args.poll:g} s. Optimum = max over actions (fewest calls / QPS) + check + create.\n\n"
        + table(["replicas", "total (s)", "optimum (s)", "total / optimum (target ≤ 1.05×)", "Throttling.User (target 0)",
                 "calls: check / register / status / pages", "devices on emulator / in store / same IotId / pending / requests done",
                 "slots moved / missed (woken > 25 ms / > half a window late)", "all submitted / checks: first / last answered (s) / after the last (s)", "verdict"], rows)
        + f"\n\nOverall: {'PASS' if all(v == 'PASS' for v in verdicts) else 'MISS'}",
    )


def _states(store: SqliteStore) -> str:
    rows = store.db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall()
    return ", ".join(f"{state}: {count}" for state, count in rows)


def _phases(store: SqliteStore, origin: datetime, submitted: float, create_seconds: float, building: float) -> dict[str, float]:
    """When (seconds from the first submit) the last request reached each step, from the audit trail;
    and when the platform's last creation ended: its register call, ``create_seconds``, and the
    emulator building the devices inside the first status call after the deadline."""
    rows = store.db.execute(
        "SELECT event, MIN(at), MAX(at) FROM audit WHERE event IN ('requested', 'check_submitted', 'checked', 'approved', 'register_submitted', 'registered') GROUP BY event"
    ).fetchall()
    span = {event: (parse_time(first), parse_time(last)) for event, first, last in rows}
    phases = {"submit calls returned": submitted}
    for event, label in [("check_submitted", "last check answered"), ("checked", "last checked"), ("approved", "last approved"),
                         ("register_submitted", "last register answered"), ("registered", "last result (done)")]:
        if event in span:
            phases[label] = (span[event][1] - origin).total_seconds()
    if "last register answered" in phases:
        phases["platform's last creation ended"] = phases["last register answered"] + create_seconds + building
    return phases


def approval_to_result(run: Run) -> list[list[object]]:
    """Approval to result against the platform's creation time (target: within it + 3 s), one request."""
    approved, phases = run.phases["last approved"], run.phases
    creation = phases["platform's last creation ended"] - approved
    result = phases.get("last result (done)", run.result) - approved
    return [
        ["approval → platform's creation ended (register call, create, emulator building)", f"{creation:.1f}"],
        ["approval → result (done; the threaded result goes out)", f"{result:.1f}"],
        ["result − creation ended (target ≤ 3 s)", f"{result - creation:.1f} ({'PASS' if result - creation <= 3 else 'MISS'})"],
        ["approval → last IotId read", f"{phases['last IotId read'] - approved:.1f}"],
        ["QueryPageByApplyId calls / devices accounted (same IotId)", f"{run.calls['QueryPageByApplyId']:,} / {'all' if run.accounted else 'NOT ALL'}"],
    ]


# -- rows already in the database ---------------------------------------------------------------


def fill(store: SqliteStore, rows: int, start: int) -> None:
    """Add ``rows`` devices as finished requests of 10,000 created devices each."""
    now = SystemClock().now()
    for offset in range(0, rows, CHUNK):
        n = min(CHUNK, rows - offset)
        request_id = store.create_request(
            product_key="a1EmuDemo01", requester="U0ALICE", origin="cli", kind="names", count=n, state=State.DONE, now=now,
            devices=((f"old{start + offset + i:07d}", None, i + 1) for i in range(n)), chunks=[n],
        )
        with store._write() as db:  # noqa: SLF001 - set-up only: mark them created, as a finished request's are
            db.conn.execute("UPDATE devices SET outcome = ?, iot_id = name || 'IotId000100' WHERE request_id = ?", [Outcome.CREATED, request_id])


def database_growth(levels: list[int], submit_names: int, repeat: int) -> list[list[object]]:
    folder = Path(tempfile.mkdtemp(prefix="iotreg-bench-db-"))
    clock = SystemClock()
    store = SqliteStore(folder / "iotreg.db")
    client = IotClient("http://127.0.0.1:9", Credentials("unused", "unused"))
    # The jobs are never run: only submit's own work is timed.
    workflow = Workflow(store, client, clock, Timing(), notifier=lambda _: Silent(), jobs=lambda steps: InlineJobs(clock, steps))
    rows, filled, serial = [], 0, 0
    for level in levels:
        fill(store, level - filled, filled)
        filled = level
        submits, counts, lists = [], [], []
        last = 0
        for _ in range(repeat):
            names = [f"new{serial:03d}-{i:06d}" for i in range(submit_names)]
            serial += 1
            began = time.perf_counter()
            last = workflow.requests.submit("a1EmuDemo01", "U0ALICE", names, origin="cli").id
            submits.append(time.perf_counter() - began)
            for _ in range(10):
                began = time.perf_counter()
                store.outcome_counts(last)
                counts.append(time.perf_counter() - began)
                began = time.perf_counter()
                store.requests(limit=20)
                lists.append(time.perf_counter() - began)
        total = store.db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
        rows.append([f"{level:,}", f"{total:,}", f"{median(submits) * 1000:.0f}", f"{median(counts) * 1000:.1f}", f"{median(lists) * 1000:.2f}"])
    workflow.close()
    shutil.rmtree(folder, ignore_errors=True)
    return rows


# -- the report ---------------------------------------------------------------------------------


def _calls(run: Run) -> str:
    return " / ".join(f"{run.calls[a]:,}" for a in ACTIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poll", type=float, default=1.0, help="IOTREG_POLL_INTERVAL (backing off ×1.5)")
    parser.add_argument("--check-seconds", type=float, default=1.0, help="the emulator's check duration")
    parser.add_argument("--create-seconds", type=float, default=1.0, help="the emulator's creation duration")
    parser.add_argument("--quick", action="store_true", help="a tiny version: checks the script works")
    parser.add_argument("--replicas", type=int, help="measure N replica processes on one PostgreSQL database (and 1 beside them)")
    parser.add_argument("--requests", type=int, default=200, help="requests of 50 names in flight, with --replicas")
    parser.add_argument("--result-only", action="store_true", help="only approval to result, for one request of --names")
    parser.add_argument("--names", type=int, default=100_000, help="with --result-only: the request's names")
    parser.add_argument("--latency", type=float, default=0.0, help="with --result-only: seconds a call takes to reach the emulator (a network)")
    args = parser.parse_args()
    if args.replicas is not None:
        if args.replicas < 1 or args.requests < 1:
            sys.exit("bench_scale.py: --replicas and --requests must be at least 1")
        replicas_main(args)
        return
    c, k = args.check_seconds, args.create_seconds
    if args.result_only:
        print(f"one request of {args.names:,} names…", flush=True)
        run = run_requests([args.names], poll=args.poll, check_seconds=c, create_seconds=k, latency=args.latency)
        network = f", every call {args.latency * 1000:g} ms on its way to the emulator" if args.latency else ""
        report(
            f"Scale: approval to result, {args.names:,} names",
            f"As section 1 of the scale benchmark (check {c:g} s, create {k:g} s, IOTREG_POLL_INTERVAL={args.poll:g} s{network}); "
            "seconds from the approval.\n\n" + table(["", "s"], approval_to_result(run)),
        )
        return
    if args.quick:
        names_steps, flight_steps, flight_size = [500, 1_000], [5, 10], 20
        db_levels, db_submit, db_repeat = [0, 10_000, 20_000], 1_000, 2
    else:
        names_steps, flight_steps, flight_size = [12_500, 25_000, 50_000, 100_000], [25, 50, 100, 200], 50
        db_levels, db_submit, db_repeat = [0, 100_000, 200_000, 400_000], 10_000, 3
    timing = dict(poll=args.poll, check_seconds=c, create_seconds=k)

    by_names = []
    for n in names_steps:
        print(f"one request of {n:,} names…", flush=True)
        by_names.append(run_requests([n], **timing))
    in_flight = []
    for r in flight_steps:
        print(f"{r} requests of {flight_size} names…", flush=True)
        in_flight.append(run_requests([flight_size] * r, **timing))
    print("rows already in the database…", flush=True)
    db_rows = database_growth(db_levels, db_submit, db_repeat)

    big, many = by_names[-1], in_flight[-1]
    verdicts: dict[str, list[str]] = {}
    columns = []
    for label, run in [("big", big), ("many", many)]:
        optimum = run.optimum(c, k)
        ratio = run.seconds / optimum
        throttled = sum(run.throttled.values())
        verdicts[label] = ["PASS" if throttled == 0 else "MISS", "PASS" if run.accounted else "MISS", "PASS" if ratio <= 1.2 else "MISS"]
        fewest = run.fewest
        bound = max(fewest, key=lambda a: fewest[a] / DEFAULT_QPS[a])
        which = ", ".join(f"{SHORT[a]} {n}" for a, n in run.throttled.items() if n)
        columns.append(
            [f"{run.seconds:.1f}", f"{optimum:.1f} ({SHORT[bound]}: {fewest[bound]:,} / {DEFAULT_QPS[bound]:g} + {c:g} + {k:g})", f"{ratio:.2f}× ({verdicts[label][2]})",
             f"{run.building:.1f} s; {(run.seconds - run.building) / optimum:.2f}×"]
            + [f"{run.calls[a]:,} ({fewest[a]:,})" for a in ACTIONS]
            + [f"{throttled}{f' ({which})' if which else ''} ({verdicts[label][0]})",
               f"{run.on_emulator:,} / {run.created_in_store:,} / {run.iot_ids_matching:,} / {run.pending} ({verdicts[label][1]})"]
        )
    labels = ["total (s)", "quota-bound optimum (s)", "total / optimum (target ≤ 1.2×)", "emulator building the devices (lazily, after the deadline); total less that / optimum"] + [
        f"{a} calls, QPS {DEFAULT_QPS[a]:g} (fewest possible)" for a in ACTIONS
    ] + ["Throttling.User answers (target 0)", "devices on emulator / created in store / same IotId / pending"]
    main_table = table(
        ["", f"1. one request of {sum(big.sizes):,} names", f"2. {len(many.sizes)} requests of {many.sizes[0]} names"],
        [[label, a, b] for label, a, b in zip(labels, *columns)],
    )
    phase_labels = list(dict.fromkeys([*big.phases, *many.phases]))
    phases = table(["seconds from the first submit", "1.", "2."], [[p, f"{big.phases.get(p, float('nan')):.1f}", f"{many.phases.get(p, float('nan')):.1f}"] for p in phase_labels])

    def growth(runs: list[Run], first: str, value: Callable[[Run], str]) -> str:
        return table(
            [first, "total (s)", "optimum (s)", "ratio", "calls: check / register / status / pages", "Throttling.User", "all accounted"],
            [[value(r), f"{r.seconds:.1f}", f"{r.optimum(c, k):.1f}", f"{r.seconds / r.optimum(c, k):.2f}", _calls(r), sum(r.throttled.values()), "yes" if r.accounted else "NO"] for r in runs],
        )

    verdict = "PASS" if all(v == "PASS" for vs in verdicts.values() for v in vs) else "MISS"
    report(
        "Scale: big requests, many requests, a growing database",
        f"Emulator in its own process on the real clock, enforcing the quotas (check {c:g} s, create {k:g} s); "
        f"the Workflow on SchedulerJobs ({WORKERS} workers), its client-side limiter, SQLite in a temp dir, a silent "
        f"notifier that hands each approval message to an approver, who approves at once. IOTREG_POLL_INTERVAL={args.poll:g} s (×1.5 back-off). "
        "Optimum = max over actions (fewest calls / QPS) + check + create (see the script's docstring).\n\n"
        + main_table
        + "\n\nApproval to result, 1. (seconds from the approval):\n\n" + table(["", "s"], approval_to_result(big))
        + "\n\nWhere the time went (seconds from the first submit; calls answered per second, check / register / status / pages):\n\n"
        + phases + "\n\n" + timeline(big, many)
        + "\n\nNames per request (one request):\n\n" + growth(by_names, "names", lambda r: f"{r.sizes[0]:,}")
        + f"\n\nRequests in flight ({flight_size} names each):\n\n" + growth(in_flight, "requests", lambda r: f"{len(r.sizes)}")
        + f"\n\nRows already in the database (median of {db_repeat} submits of {db_submit:,} names; of {db_repeat * 10} reads):\n\n"
        + table(["rows before", "rows at the end", f"Workflow.submit of {db_submit:,} (ms)", "store.outcome_counts (ms)", "store.requests(limit=20) (ms)"], db_rows)
        + "\n\nTargets (no throttling / all accounted / within 1.2× the optimum): "
        + f"1. {', '.join(verdicts['big'])}; 2. {', '.join(verdicts['many'])}. Overall: {verdict}\n\n"
        + "Where the time above the optimum goes (the mechanisms as profiled on the full run; the figures are this run's):\n\n"
        + explain(big, many, c, k),
    )


def timeline(big: Run, many: Run, step: int = 5) -> str:
    """Calls answered per second, per action, in ``step``-second buckets."""
    def rates(run: Run, start: float) -> str:
        counts = Counter(action for at, action, _, _ in run.timeline if start <= at < start + step)
        return " / ".join(f"{counts[a] / step:.0f}" for a in ACTIONS) if counts else "–"

    end = max(big.seconds, many.seconds)
    return table(["seconds", "1. calls/s", "2. calls/s"], [[f"{s}–{s + step}", rates(big, s), rates(many, s)] for s in range(0, math.ceil(end), step)])


def explain(big: Run, many: Run, c: float, k: float) -> str:
    """The measured reasons, in figures from these runs."""
    def times(run: Run, action: str) -> list[float]:
        return [at for at, a, _, _ in run.timeline if a == action]

    checks, pages = times(big, "BatchCheckDeviceNames"), times(big, "QueryPageByApplyId")
    in_gateway = median([seconds for _, a, _, seconds in big.timeline if a == "BatchCheckDeviceNames"])
    submitted, registered = big.phases["submit calls returned"], big.phases.get("last register answered", 0.0)
    limiter = DEFAULT_QPS["QueryPageByApplyId"] / 1.05
    lines = [
        f"- **1.** Writing {sum(big.sizes):,} names took {submitted:.1f} s. The {len(checks)} check call(s) went "
        f"{CHECKS_AT_ONCE} at a time in one step, answered {checks[-1] - submitted:.1f} s after the names were written "
        f"(each {in_gateway:.2f} s in the emulator's gateway: parsing and verifying the signature of up to 10,000 names, "
        f"on the same two cores as the bot's side building and signing them). The first page came {pages[0] - registered:.1f} s after the register "
        f"calls: the creation's {k:g} s, the poll cadence, and {big.building:.1f} s of the emulator building the "
        f"{sum(big.sizes):,} devices inside the first status call after the deadline (an emulator cost: it creates lazily). "
        f"The {len(pages):,} pages took {pages[-1] - pages[0]:.1f} s, {len(pages) / (pages[-1] - pages[0]):.1f}/s against "
        f"the optimum's 50/s: the client's limiter allows {limiter:.1f}/s after the first second's burst (its 5% margin, "
        f"about {len(pages) / limiter - len(pages) / 50:.1f} s here), and a single caller reads the pages one round trip "
        "at a time, so a slow round trip leaves part of a second's quota unused."
    ]
    checks, statuses = times(many, "BatchCheckDeviceNames"), times(many, "QueryBatchRegisterDeviceStatus")
    first_check, last_check = checks[0], checks[-1]
    check_limiter = DEFAULT_QPS["BatchCheckDeviceNames"] / 1.05
    before = sum(1 for at in statuses if at <= last_check)
    lines.append(
        f"- **2.** The {len(checks)} checks took {last_check:.1f} s where the optimum counts "
        f"{len(checks) / DEFAULT_QPS['BatchCheckDeviceNames']:.0f} s: the first was answered at {first_check:.1f} s "
        f"(the {len(many.sizes)} submit calls, which write each request, returned at {many.phases['submit calls returned']:.1f} s), "
        f"and they went at {(len(checks) - 1) / (last_check - first_check):.1f}/s, the client's limiter allowing a "
        f"first second's burst of 10 (spread over 0.19 s) and then {check_limiter:.1f}/s (its 5% margin). A step whose check would wait for a slot books the slot and gives "
        f"its worker back, so the other requests' status polls, register calls and pages went on meanwhile: {before} of the "
        f"{len(statuses)} status calls before the last check. A step comes back 0.25 s before its slot and waits out the rest; {many.moved_slots} "
        f"booked slot(s) were moved (the step came over 25 ms late, a busy core: its slot and its lane's later ones went "
        f"that much later) and {many.missed_slots} missed (over half a window late: booked again). After the last "
        f"check: {many.seconds - last_check:.1f} s, for the last request's {c:g} s check and {k:g} s creation, its polls, "
        "register call and page."
    )
    for run, label in [(big, "1"), (many, "2")]:
        throttled = [f"{SHORT[action]} at {at:.1f} s" for at, action, code, _ in run.timeline if code == THROTTLED]
        if throttled:
            lines.append(
                f"- **Throttling.User in {label}** ({', '.join(throttled[:5])}{', …' if len(throttled) > 5 else ''}): the limiter "
                "lets a call go at least 1.05 s after the call a window earlier, but the gateway counts each call when it reads "
                "it; a call held up on its way more than 50 ms longer than the one a window after it (a busy core, a pause) "
                "lands in the same server second. The client retried it after a back-off."
            )
    return "\n".join(lines)

if __name__ == "__main__":
    main()
