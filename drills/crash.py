"""Crash drill: kill `iotreg serve` with SIGKILL at random moments, start it again, and check that
nothing was lost or done twice.

The IoT Platform emulator and the fake Slack run in this process (they outlive every kill); the bot
runs as `iotreg serve` (waitress, the real scheduler, SQLite on disk). People send signed
`/devices register` commands and an approver clicks Approve whenever an Approve button appears,
retrying while the bot is down. A killer sends SIGKILL every 0.3 to 2.5 seconds (during checks,
approvals, register calls, polls and posts alike) and starts the bot again. When the kills stop
and every request has ended, it verifies:

- every request reached a final state;
- every ApplyId got at most one BatchRegisterDeviceWithApplyId (exactly one if it was registered);
- every request that was registered got exactly one final result in its thread;
- no notification's message was posted twice (each carries its event and step as metadata), and no
  result file was shared twice in one place;
- every device the platform created is recorded as created on its request, and no recorded device
  is missing from the platform.

    python drills/crash.py [--requests 40] [--kills 25] [--seed N]
    python drills/crash.py --kills 0 --platform-faults 0.3 --slack-faults 0.3   # faults, no kills
    python drills/crash.py --db postgres   # the same on PostgreSQL (a throwaway server started here)
    python drills/crash.py --replicas 3 --requests 20 --kills 10   # three replicas on PostgreSQL

``--replicas N`` runs N `iotreg serve` processes on one PostgreSQL database (PostgreSQL only): the
killer picks a live replica at random each time, and people's commands and clicks go round-robin
to the live ones, as through a load balancer.

``--platform-faults R`` has the emulator answer a share R of calls with 500/503 (half of them after
acting, the answer lost), R/2 with Throttling.User, and add up to 0.3 s to calls;
``--slack-faults R`` has the fake Slack answer a share R of posts, updates and uploads with 429
(Retry-After 1), 500 or 503. Requests must still end, done or failed with the reason in the thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bot.domain import Outcome, State  # noqa: E402
from bot.clock import SystemClock  # noqa: E402
from bot.standins.emulator import Emulator  # noqa: E402
from bot.slack import blocks  # noqa: E402
from bot.standins.slack import FakeSlack  # noqa: E402
from bot.standins.postgres import TempCluster  # noqa: E402
from bot.standins.replicas import Replicas, Spread  # noqa: E402
from bot.store import open_store  # noqa: E402
from bot.store.sqlite import SqliteStore  # noqa: E402

SECRET = "drill-signing-secret"
OPS = "C0OPS"
APPROVER = "U0BOB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--platform-faults", type=float, default=0.0)
    parser.add_argument("--slack-faults", type=float, default=0.0)
    parser.add_argument("--db", choices=["sqlite", "postgres"], help="the store iotreg runs on (sqlite; postgres with --replicas)")
    parser.add_argument("--replicas", type=int, default=1, help="iotreg serve processes on one database (more than 1: PostgreSQL)")
    args = parser.parse_args()
    if args.replicas < 1:
        sys.exit("crash.py: --replicas must be at least 1")
    if args.replicas > 1 and args.db == "sqlite":
        sys.exit("crash.py: --replicas above 1 needs --db postgres (SQLite serves one process)")
    args.db = args.db or ("postgres" if args.replicas > 1 else "sqlite")
    rng = random.Random(args.seed)

    folder = Path(tempfile.mkdtemp(prefix="iotreg-drill-"))
    cluster = TempCluster().start() if args.db == "postgres" else None  # it outlives every kill, as a server does
    location = cluster.create_database("iotreg") if cluster else str(folder / "iotreg.db")
    emulator = Emulator(clock=SystemClock(), check_seconds=0.5, create_seconds=1.0, create_failure_rate=0.02, seed=args.seed).start()
    if args.platform_faults:
        from bot.standins.emulator import FaultPlan

        emulator.gateway.faults = FaultPlan(
            error_rate=args.platform_faults, throttle_rate=args.platform_faults / 2, errors_take_effect=0.5,
            latency=0.3 * args.platform_faults, real_sleep=True, seed=args.seed,
        )
    fake = FakeSlack().start()
    fake.add_channel(OPS, "iot-ops")
    env = {
        **os.environ, **emulator.env(),
        "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": fake.api_url,
        "IOTREG_DB": location, "IOTREG_POLL_INTERVAL": "0.2", "IOTREG_POLL_MAX_INTERVAL": "1",
        "IOTREG_APPROVERS": APPROVER, "IOTREG_CHUNK_SIZE": "25",
    }
    bots = Replicas(args.replicas, env, folder).start()
    ws = Spread(bots, fake, SECRET, patience=2, timeout=5)
    started = time.monotonic()
    done = threading.Event()
    kills = 0
    sent_commands = 0
    command_retries = 0

    def send(fn, *a, **kw):
        nonlocal command_retries
        while not done.is_set():
            try:
                answer = fn(*a, **kw)
                if answer.status_code == 200:
                    return answer
            except (requests.RequestException, TimeoutError):  # every replica down for a while
                pass
            command_retries += 1
            time.sleep(0.2)
        return None

    def people() -> None:
        nonlocal sent_commands
        for n in range(args.requests):
            size = rng.choice([5, 20, 60])  # 60 names: three chunks of 25
            names = " ".join(f"drill{n:03d}-{i:03d}" for i in range(size))
            send(ws.command, f"U0USER{n % 7}", OPS, f"register {emulator.product_key} {names}")
            sent_commands += 1
            time.sleep(rng.uniform(0, 0.4))

    def approver() -> None:
        # A click is acked before it is carried out, so a kill in between loses it: as a person
        # would, the approver clicks again when the button is still there 5 seconds later.
        clicked: dict[str, float] = {}
        while not done.is_set():
            for message in fake.messages(OPS):
                if time.monotonic() - clicked.get(message["ts"], -10.0) > 5.0 and blocks.APPROVE in str(message.get("blocks")):
                    if send(ws.click, APPROVER, message, blocks.APPROVE):
                        clicked[message["ts"]] = time.monotonic()
            time.sleep(0.1)

    def killer() -> None:
        nonlocal kills
        while not done.is_set() and kills < args.kills:
            time.sleep(rng.uniform(0.3, 2.5))
            victim = rng.choice(bots.live() or [0])
            bots.kill(victim)
            kills += 1
            if len(bots) > 1:
                time.sleep(rng.uniform(0, 1.0))  # the others carry on meanwhile
            bots.start(victim)

    slack_faults = 0
    calm = threading.Event()  # set once every request has ended: Slack recovers, the outbox drains

    def slack_chaos() -> None:
        """About once a second, with chance R, make one of the bot's Slack methods fail 1-3 times."""
        nonlocal slack_faults
        methods = ["chat.postMessage", "chat.update", "chat.postEphemeral", "files.getUploadURLExternal", "files.completeUploadExternal", "files.upload"]
        while not calm.is_set() and args.slack_faults:
            if rng.random() < args.slack_faults:
                status = rng.choice([429, 500, 503])
                fake.fail(rng.choice(methods), status=status, retry_after=1, times=rng.randint(1, 3))
                slack_faults += 1
            time.sleep(1.0)

    threading.Thread(target=slack_chaos, daemon=True).start()
    threads = [threading.Thread(target=t, daemon=True) for t in (people, approver, killer)]
    for t in threads:
        t.start()
    threads[0].join()
    threads[2].join()
    store = open_store(location)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        requests_now = store.requests(limit=100_000)
        if requests_now and all(r.final for r in requests_now) and sent_commands == args.requests:
            calm.set()
            fake.clear_faults()
        pending = sum(1 for _ in store.pending_events())
        if requests_now and all(r.final for r in requests_now) and pending == 0 and sent_commands == args.requests:
            break
        time.sleep(0.5)
    done.set()
    threads[1].join(5)
    statuses = bots.stop()

    # -- verification -------------------------------------------------------------------------
    all_requests = store.requests(limit=100_000)
    states = collections.Counter(r.state for r in all_requests)
    register_calls = collections.Counter()
    unaccounted = 0
    missing = 0
    duplicate_results = 0
    repeated: list[tuple[int, list[str]]] = []
    missing_results = 0
    for request in all_requests:
        apply_ids = [c.apply_id for c in store.chunks(request.id) if c.apply_id]
        for apply_id in apply_ids:
            register_calls[emulator.backend.application(apply_id).register_calls] += 1
        platform = {d.device_name for d in emulator.backend.devices(emulator.product_key) if d.apply_id in apply_ids}
        recorded = {d.name for d in store.devices(request.id, outcome=Outcome.CREATED)}
        unaccounted += len(platform - recorded)
        missing += len(recorded - platform)
        if request.state == State.FAILED and not request.reason:
            missing_results += 1  # a failure must say why
        if request.state in (State.DONE, State.FAILED) and request.decided_by:
            results = [r for r in fake.thread(OPS, request.origin_data.get("thread_ts")) if f"Request #{request.id}:" in r.get("text", "")] if request.origin_data.get("thread_ts") else []
            duplicate_results += max(0, len(results) - 1)
            if len(results) > 1:
                repeated.append((request.id, [r.get("text", "")[:70] for r in results]))
            missing_results += 1 if not results else 0
    created = sum(len(store.devices(r.id, outcome=Outcome.CREATED)) for r in all_requests)
    # Every message the bot posted carries the (event, step) it was posted for: none may appear twice.
    posted = list(fake.messages(OPS)) + [r for m in fake.messages(OPS) for r in fake.thread(OPS, m["ts"])] + fake.dm(APPROVER)
    marks = collections.Counter(json.dumps(m["metadata"]["event_payload"], sort_keys=True) for m in posted if m.get("metadata"))
    twice = {mark: n for mark, n in marks.items() if n > 1}
    shares = collections.Counter((u.channel, u.thread_ts, u.name) for u in fake.uploads.values() if u.completed)
    files_twice = sum(n - 1 for n in shares.values() if n > 1)
    # SQLite's own check of the file; PostgreSQL's server was never killed (only iotreg was).
    integrity = store.db.execute("PRAGMA integrity_check").fetchone()[0] if isinstance(store, SqliteStore) else "ok"
    print(f"Crash drill on {args.db} with {args.replicas} replica(s) (seed {args.seed}) in {time.monotonic() - started:.0f}s: "
          f"{args.requests} commands sent ({ws.refused + command_retries} tries refused while a replica was down), {kills} SIGKILLs, "
          f"{sum(b.starts for b in bots)} starts; commands and clicks answered by replica: {ws.counts}; exit statuses at the end: {statuses}")
    faults = sum(n for (_, code), n in emulator.gateway.outcomes.items() if code != "Success")
    throttled = sum(n for (_, code), n in emulator.gateway.outcomes.items() if code == "Throttling.User")
    print(f"  faults injected: IoT Platform {faults:,} error answers ({throttled:,} of them Throttling.User); Slack {slack_faults:,} failing methods")
    print(f"  requests: {len(all_requests)}; final states: {dict(states)}; not final: {sum(1 for r in all_requests if not r.final)}")
    for request in all_requests:
        if request.state == State.FAILED:
            print(f"    #{request.id} failed: {request.reason}")
    print(f"  ApplyIds by register calls received: {dict(sorted(register_calls.items()))}  (more than 1: {sum(n for k, n in register_calls.items() if k > 1)})")
    print(f"  devices created and recorded: {created:,}; created but not recorded: {unaccounted}; recorded but not created: {missing}")
    print(f"  final results in threads: missing {missing_results}, duplicated {duplicate_results}")
    for request_id, texts in repeated:
        print(f"    #{request_id}: {texts}")
    print(f"  messages posted: {len(posted):,} ({sum(marks.values()):,} notification posts); posted twice: {sum(n - 1 for n in twice.values())}; result files shared twice: {files_twice}")
    for mark, n in twice.items():
        print(f"    {mark}: {n} times")
    print(f"  database after every kill: integrity_check {integrity}" if args.db == "sqlite" else "  database: PostgreSQL (its server was not killed)")
    ok = (
        all(r.final for r in all_requests)
        and not any(k > 1 for k in register_calls)
        and unaccounted == 0 and missing == 0 and missing_results == 0 and duplicate_results == 0
        and not twice and files_twice == 0
        and integrity == "ok"
    )
    print("PASS" if ok else "FAIL")
    store.close()
    emulator.stop()
    fake.stop()
    if cluster:
        cluster.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
