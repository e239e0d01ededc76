"""The store's hot paths on SQLite and on PostgreSQL, in one run: what moving to PostgreSQL costs.

    python bench/bench_store.py            # a few repetitions of each
    python bench/bench_store.py --quick    # one small round: checks the script works

SQLite is a file in a temporary folder (WAL, synchronous=FULL, as deployed); PostgreSQL a throwaway
server started here (bot/standins/postgres.py: local, over TCP on 127.0.0.1, with fsync off, so
its figures are the cost of the client, the protocol and the server's work, not of the disk).
Each figure is the median of its repetitions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median, report, table  # noqa: E402
from bot.domain import EventKind, Kind, Origin, Outcome, State  # noqa: E402
from bot.standins.postgres import TempCluster  # noqa: E402
from bot.store import Store, open_store  # noqa: E402

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=timezone.utc)


def timed(function: Callable[[], object], repeat: int) -> float:
    """The median seconds of ``repeat`` calls."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return median(samples)


def create(store: Store, n: int, state: State = State.AWAITING_APPROVAL) -> int:
    return store.create_request(
        product_key="a1BenchProd", requester="U1", origin=Origin.SLACK, kind=Kind.NAMES, count=n, state=state, now=NOW,
        devices=((f"sensor-{i:07d}", None, i + 1) for i in range(n)), chunks=[min(10_000, n - i) for i in range(0, n, 10_000)],
        event=(EventKind.CREATED, {}),
    )


def measure(store: Store, quick: bool) -> dict[str, float]:
    """Seconds per operation."""
    reps = 1 if quick else 5
    figures: dict[str, float] = {}
    figures["create_request, 10,000 names"] = timed(lambda: create(store, 10_000), reps)
    figures["create_request, 100,000 names"] = timed(lambda: create(store, 100_000), 1 if quick else 3)
    big = create(store, 100_000)
    figures["get"] = timed(lambda: store.get(big), 50 if quick else 1000)
    figures["chunks (10 of them)"] = timed(lambda: store.chunks(big), 20 if quick else 500)
    figures["device_names of a chunk (10,000)"] = timed(lambda: store.device_names(big, 5), reps * 4)
    waiting = [create(store, 3) for _ in range(50 if quick else 500)]
    moves = iter(waiting)
    figures["transition (compare-and-set, audit, event)"] = timed(
        lambda: store.transition(next(moves), from_states=[State.AWAITING_APPROVAL], to_state=State.APPROVED, actor="U2",
                                 event="approved", now=NOW + timedelta(minutes=1), notify=(EventKind.APPROVED, {"by": "U2"}),
                                 decided_by="U2", decided_at=NOW),
        len(waiting),
    )
    pending = store.pending_count()
    figures[f"pending_events ({pending:,} waiting)"] = timed(lambda: list(store.pending_events()), 5 if quick else 50)
    names = [f"sensor-{i:07d}" for i in range(10_000)]
    rows = [(name, Outcome.CREATED, None, f"iot-{name}") for name in names]
    figures["set_outcomes, 10,000 devices"] = timed(lambda: store.set_outcomes(big, rows), reps)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small round")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(str(Path(folder) / "bench.db"))
        try:
            results["SQLite"] = measure(store, args.quick)
        finally:
            store.close()
    with TempCluster() as cluster:
        store = open_store(cluster.create_database("bench"))
        try:
            results["PostgreSQL"] = measure(store, args.quick)
        finally:
            store.close()
    sqlite, postgres = results["SQLite"], results["PostgreSQL"]

    def shown(seconds: float) -> str:
        return f"{seconds * 1000:,.1f} ms" if seconds >= 0.001 else f"{seconds * 1e6:,.0f} µs"

    # The pending count differs between the runs only if a store lost an event: same labels expected.
    rows = [[label, shown(sqlite[label]), shown(postgres[label]), f"{postgres[label] / sqlite[label]:.2f}x"] for label in sqlite if label in postgres]
    missing = sorted(set(sqlite) ^ set(postgres))
    body = table(["operation", "SQLite", "PostgreSQL", "PostgreSQL / SQLite"], rows)
    if missing:
        body += f"\n\nNot comparable (different counts): {', '.join(missing)}"
    report("Store: SQLite and PostgreSQL", body)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
