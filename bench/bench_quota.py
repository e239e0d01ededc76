"""Quotas shared by replicas through PostgreSQL: what a booking costs, and what N replicas achieve.

1. The cost of one booking (``PostgresStore.book_slot``: one statement, one round trip), median
   and p99, for quotas of 10, 50 and 500 slots to a window, beside a bare ``SELECT 1``; then with
   three processes of four threads booking one action at once (the bookings queue on its row).
2. N = 1 and N = 3 replicas (processes, each with its own client, limiter and connection pool, as
   ``iotreg serve`` builds them) calling one action as fast as their threads can against the
   emulator in its own process on the real clock, which answers ``Throttling.User`` over the quota
   as the platform does. The clients make one attempt per call, so every call over the quota shows.
   Figures: calls the emulator answered in the run's first S seconds (from the first one) against
   the quota's S x QPS (the limiter's 5% margin keeps it a little under), and ``Throttling.User``
   answers (target: 0). For comparison, N = 3
   replicas that each keep the quota in their own memory (the limiter of a SQLite deployment).

    python bench/bench_quota.py [--seconds 8] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median, percentile, report, table  # noqa: E402

from bot.aliyun.ratelimit import DEFAULT_QPS  # noqa: E402
from bot.standins.postgres import TempCluster  # noqa: E402
from bot.store.postgres import PostgresStore  # noqa: E402

THREADS = 4


def _serve_emulator(conn: Connection) -> None:
    """Child process: the emulator on the real clock until told to stop; "report" answers every
    answer's (monotonic time, action, code)."""
    from bot.clock import SystemClock
    from bot.standins.emulator import Emulator

    emulator = Emulator(clock=SystemClock()).start()
    answered: list[tuple[float, str, str]] = []
    handle = emulator.gateway.handle

    def noted(method: str, query: Iterable[tuple[str, str]], form: Iterable[tuple[str, str]] = (), **more: Any) -> Any:
        params = list(query)
        status, body = handle(method, params, form, **more)
        answered.append((time.monotonic(), dict(params).get("Action", ""), str(body.get("Code", "Success"))))
        return status, body

    emulator.gateway.handle = noted  # type: ignore[method-assign]
    conn.send({**emulator.env(), "product_key": emulator.product_key})
    while conn.recv() == "report":
        conn.send(list(answered))
    emulator.stop()


class EmulatorProcess:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_emulator, args=(child,), daemon=True)
        self._process.start()
        child.close()  # so that recv() ends with EOFError, not a hang, if the child dies
        self.env: dict[str, str] = self._conn.recv()

    def answered(self) -> list[tuple[float, str, str]]:
        self._conn.send("report")
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._process.join(10)


def _book(url: str, action: str, bookings: int, threads: int, ready: object, go: object, out: object) -> None:
    """Child process: ``threads`` threads booking ``bookings`` slots each; send back every booking's seconds."""
    store = PostgresStore(url, max_size=threads)
    store.book_slot(action, 0.05)  # the pool's connections open before the clock starts
    seconds: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        mine = []
        for _ in range(bookings):
            began = time.perf_counter()
            store.book_slot(action, 0.05)
            mine.append(time.perf_counter() - began)
        with lock:
            seconds.extend(mine)

    ready.release()  # type: ignore[attr-defined]
    go.wait()  # type: ignore[attr-defined]
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put(seconds)  # type: ignore[attr-defined]
    store.close()


def booking_cost(url: str, samples: int) -> str:
    store = PostgresStore(url, max_size=2)
    store.set_quotas({**DEFAULT_QPS, "Cost10": 10, "Cost50": 50, "Cost500": 500})
    rows = []
    for label, call in [
        ("`SELECT 1` (a bare round trip)", lambda: store.ping()),
        ("booking, 10 slots to a window", lambda: store.book_slot("Cost10", 0.05)),
        ("booking, 50 slots to a window", lambda: store.book_slot("Cost50", 0.05)),
        ("booking, 500 slots to a window", lambda: store.book_slot("Cost500", 0.05)),
    ]:
        for _ in range(200):
            call()
        seconds = []
        for _ in range(samples):
            began = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - began)
        rows.append([label, f"{median(seconds) * 1000:.3f}", f"{percentile(seconds, 99) * 1000:.3f}", ""])
    store.close()
    context = multiprocessing.get_context("spawn")
    ready, go, out = context.Semaphore(0), context.Event(), context.Queue()
    per = max(50, samples // 12)
    processes = [context.Process(target=_book, args=(url, "Cost50", per, THREADS, ready, go, out)) for _ in range(3)]
    for p in processes:
        p.start()
    for _ in processes:
        ready.acquire(timeout=120)  # the children import and connect; the clock starts at `go`
    began = time.perf_counter()
    go.set()
    seconds = [s for _ in processes for s in out.get(timeout=300)]
    took = time.perf_counter() - began
    for p in processes:
        p.join(30)
    rows.append([f"booking, 50 slots, 3 processes x {THREADS} threads at once", f"{median(seconds) * 1000:.3f}",
                 f"{percentile(seconds, 99) * 1000:.3f}", f"{len(seconds) / took:,.0f}"])
    return table(["what", "median ms", "p99 ms", "bookings/s"], rows)


def _replica(env: dict[str, str], action: str, seconds: float, ready: object, go: object, out: object) -> None:
    """Child process: one replica's client, ``THREADS`` threads calling ``action`` for ``seconds``."""
    os.environ.update(env)
    from bot import wiring
    from bot.aliyun import errors
    from bot.config import Settings

    client = wiring.iot_client(Settings.from_env(os.environ))
    counts = {"ok": 0, "throttled": 0}
    lock = threading.Lock()
    product = env["BENCH_PRODUCT"]

    def work(worker: int) -> None:
        k, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            k += 1
            try:
                if action == "BatchCheckDeviceNames":
                    client.batch_check_device_names(product, [f"dev-{os.getpid()}-{worker}-{k}"])
                else:
                    client.query_product_list()
                outcome = "ok"
            except errors.ThrottledError:
                outcome = "throttled"
            with lock:
                counts[outcome] += 1

    ready.release()  # type: ignore[attr-defined]
    go.wait()  # type: ignore[attr-defined]
    workers = [threading.Thread(target=work, args=(w,)) for w in range(THREADS)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put((type(client.limiter).__name__, counts))  # type: ignore[attr-defined]
    client.close()


def replicas(emulator: EmulatorProcess, database: str, n: int, action: str, seconds: float) -> list[object]:
    """N replicas calling ``action`` for ``seconds``: a row of the table."""
    context = multiprocessing.get_context("spawn")
    ready, go, out = context.Semaphore(0), context.Event(), context.Queue()
    env = {**emulator.env, "IOTREG_DB": database, "IOT_MAX_ATTEMPTS": "1", "BENCH_PRODUCT": emulator.env["product_key"]}
    if not database.startswith("postgresql"):  # each its own SQLite file: each its own quota
        env_of = [{**env, "IOTREG_DB": f"{database}-{k}.db"} for k in range(n)]
    else:
        env_of = [env] * n
    processes = [context.Process(target=_replica, args=(env_of[k], action, seconds, ready, go, out)) for k in range(n)]
    for p in processes:
        p.start()
    for _ in processes:
        ready.acquire(timeout=120)
    before = emulator.answered()
    go.set()
    results = [out.get(timeout=seconds + 120) for _ in processes]
    for p in processes:
        p.join(30)
    answered = [a for a in emulator.answered()[len(before):] if a[1] == action]
    ok = sorted(t for t, _, code in answered if code == "Success")
    throttled = sum(1 for _, _, code in answered if code == "Throttling.User")
    first = [t for t in ok if t < ok[0] + seconds] if ok else []
    quota = DEFAULT_QPS[action]
    limiter = {name for name, _ in results}
    return [action, n, ", ".join(sorted(limiter)), len(first), f"{quota * seconds:g}", f"{len(first) / (quota * seconds):.0%}", throttled]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="how long each run of replicas calls")
    parser.add_argument("--samples", type=int, default=3000, help="bookings timed for the cost")
    parser.add_argument("--quick", action="store_true", help="a tiny version: checks the script works")
    args = parser.parse_args()
    seconds, samples = (2.0, 300) if args.quick else (args.seconds, args.samples)
    with TempCluster() as cluster, tempfile.TemporaryDirectory() as folder:
        cost = booking_cost(cluster.create_database("cost"), samples)
        print(cost, flush=True)
        emulator = EmulatorProcess()
        try:
            rows = []
            for action in ("BatchCheckDeviceNames", "QueryProductList"):
                for n in (1, 3):
                    rows.append(replicas(emulator, cluster.create_database(f"r{n}{action.lower()}"), n, action, seconds))
                    print(rows[-1], flush=True)
                rows.append(replicas(emulator, str(Path(folder) / action), 3, action, seconds))
                print(rows[-1], flush=True)
        finally:
            emulator.stop()
    runs = table(["action", "replicas", "limiter", f"calls answered in {seconds:g} s", "the quota's", "share", "Throttling.User"], rows)
    report(
        "Quotas shared through PostgreSQL (bench_quota.py)",
        f"""
Each booking is one statement (`iotreg_book_ticket`): one round trip per IoT Platform call. Every booking here is of a slot ahead that nobody takes, so the schedule it rewrites grows with each: 200 to start, then one more per booking timed.

{cost}

Replicas calling as fast as {THREADS} threads each can, for {seconds:g} s, against the emulator in its own process
on the real clock (one attempt per call). `SharedRateLimiter`: bookings in one PostgreSQL database;
`RateLimiter`: each replica keeps the quota in its own memory (its own SQLite file), for comparison.

{runs}
""",
    )


if __name__ == "__main__":
    main()
