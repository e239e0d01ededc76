"""Ack latency: how fast `iotreg serve` answers Slack, beside a Bolt app that only acks.

`iotreg serve` on SQLite, `iotreg serve` on PostgreSQL (a throwaway server started here) and the
minimal app run under the same production server settings (waitress, one process, IOTREG_WORKERS
threads), each in its own process, against the same local fake Slack. 50 concurrent streams send
signed `/devices` commands (help, list, status) and button clicks (Approve on a finished request,
which the bot must check and answer). Rounds alternate between the apps so that the machine's
noise falls on all alike. Targets: p99 under 150 ms, and within 1.3 times the minimal app's p99.

``--replicas N`` adds N `iotreg serve` processes on one more PostgreSQL database, the streams going
round-robin over them as through a load balancer, beside the single process on PostgreSQL.

    python bench/bench_ack.py [--db both|sqlite|postgres] [--streams 50] [--requests 20] [--rounds 6] [--quick]
    python bench/bench_ack.py --db postgres --replicas 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
from common import percentile, report, table  # noqa: E402

from bot.clock import SystemClock  # noqa: E402
from bot.standins.emulator import Emulator  # noqa: E402
from bot.standins.postgres import TempCluster, free_port  # noqa: E402
from bot.standins.replicas import Replicas, Spread  # noqa: E402
from bot.slack import blocks  # noqa: E402
from bot.standins.slack import FakeSlack, Workspace  # noqa: E402

SECRET = "bench-signing-secret"
OPS = "C0OPS"


def serve_minimal(port: int) -> None:
    """The baseline: a Bolt app that acks every command and click and does nothing else."""
    from slack_bolt import App
    from slack_bolt.adapter.wsgi import SlackRequestHandler
    from slack_sdk import WebClient

    from bot.config import Settings
    from bot.server import Server

    settings = Settings.from_env(os.environ)

    class Minimal:
        def __init__(self) -> None:
            self.app = App(signing_secret=settings.slack_signing_secret, client=WebClient(token=settings.slack_bot_token, base_url=settings.slack_api_url))
            self.app.command(blocks.COMMAND)(lambda ack: ack(text="ok"))
            for action_id in blocks.ACTION_IDS:
                self.app.action(action_id)(lambda ack: ack())

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

        def wsgi(self, events: bool = True):
            return SlackRequestHandler(self.app)

    Server(settings, host="127.0.0.1", port=port, build=Minimal).run()


def start(command: list[str], env: dict, port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.post(f"http://127.0.0.1:{port}/slack/events", timeout=1)
            return process
        except requests.RequestException:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{command} did not start")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children so far."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
            pids += [int(p) for p in children.read().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def settled_cpu(pids: list[int]) -> float:
    """The CPU time once the servers have finished what the last round left them (answers after acks)."""
    last = sum(cpu_seconds(pid) for pid in pids)
    steady = 0
    while steady < 3:
        time.sleep(0.2)
        now = sum(cpu_seconds(pid) for pid in pids)
        steady = steady + 1 if now - last < 0.005 else 0
        last = now
    return last


def load(ws: Workspace | Spread, anchor: dict, streams: int, per_stream: int, resets: list[str] | None = None) -> list[float]:
    """``streams`` concurrent people, each sending ``per_stream`` requests; latencies in ms.
    Requests sent again after a closed kept-alive connection are added to ``resets``."""
    latencies: list[float] = []
    resets = [] if resets is None else resets
    lock = threading.Lock()
    go = threading.Barrier(streams)
    texts = ["help", "list", "status 1"]

    def person(n: int) -> None:
        user = f"U0LOAD{n:03d}"
        go.wait()
        for i in range(per_stream):
            for attempt in (1, 2):
                try:
                    if i % 4 == 3:
                        answer = ws.click(user, anchor, blocks.APPROVE, channel=OPS)
                    else:
                        answer = ws.command(user, OPS, texts[i % 3])
                    break
                except requests.ConnectionError:
                    # A kept-alive connection the server closed while idle (between rounds): the
                    # load generator's own race, sent again on a new connection, and counted.
                    if attempt == 2:
                        raise
                    with lock:
                        resets.append(user)
            assert answer.status_code == 200, answer.status_code
            with lock:
                latencies.append(answer.elapsed.total_seconds() * 1000)

    threads = [threading.Thread(target=person, args=(n,)) for n in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


MINIMAL = "minimal Bolt app (ack only)"


def finished_request(ws: Workspace | Spread, fake: FakeSlack, product_key: str, tag: str) -> dict:
    """Register two devices through ``ws``'s bot and approve them: the request's message, once it
    says so, for /devices status and the Approve clicks to have something to check."""
    ws.command("U0ALICE", OPS, f"register {product_key} {tag}-0001 {tag}-0002")
    anchor = fake.wait_for(lambda: next((m for m in fake.messages(OPS) if blocks.APPROVE in str(m.get("blocks"))), None), timeout=30)
    ws.click("U0BOB", anchor, blocks.APPROVE)
    fake.wait_for(lambda: any(m["ts"] == anchor["ts"] and "registered" in str(m.get("blocks")) for m in fake.messages(OPS)) or None, timeout=30)
    return anchor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="per stream and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both",
                        help="the store(s) iotreg serve runs on; PostgreSQL is a throwaway server started here")
    parser.add_argument("--replicas", type=int, default=1, help="also N serve processes on PostgreSQL, round-robin (N > 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve-minimal", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_minimal:
        serve_minimal(args.serve_minimal)
        return
    if args.quick:
        args.streams, args.requests, args.rounds = 10, 4, 1
    if args.replicas > 1 and args.db == "sqlite":
        sys.exit("bench_ack.py: --replicas above 1 needs PostgreSQL (--db postgres or both)")
    replicated = f"iotreg serve ×{args.replicas}, PostgreSQL, round-robin"

    emulator = Emulator(clock=SystemClock(), check_seconds=0.1, create_seconds=0.1).start()
    fake = FakeSlack().start()
    fake.add_channel(OPS, "iot-ops")
    workdir = Path(tempfile.mkdtemp(prefix="iotreg-bench-"))
    cluster = TempCluster().start() if args.db in ("postgres", "both") else None
    databases = {}
    if args.db in ("sqlite", "both"):
        databases["iotreg serve, SQLite"] = str(workdir / "iotreg.db")
    if cluster is not None:
        databases["iotreg serve, PostgreSQL"] = cluster.create_database("iotreg")
    env = {
        **os.environ, **emulator.env(),
        "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": fake.api_url,
        "IOTREG_POLL_INTERVAL": "0.2", "IOTREG_WORKERS": "16", "IOTREG_APPROVERS": "U0BOB",
    }
    processes: dict[str, subprocess.Popen] = {}
    replicas: Replicas | None = None
    apps: dict[str, Workspace | Spread] = {}
    anchors: dict[str, dict] = {}
    try:
        for n, (name, database) in enumerate(databases.items()):
            port = free_port()
            processes[name] = start([sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(port)], {**env, "IOTREG_DB": database}, port)
            apps[name] = Workspace(fake, SECRET, app_url=f"http://127.0.0.1:{port}/slack/events")
            anchors[name] = finished_request(apps[name], fake, emulator.product_key, f"bench{n}")
        if args.replicas > 1 and cluster is not None:
            replicas = Replicas(args.replicas, {**env, "IOTREG_DB": cluster.create_database("replicas")}, workdir).start()
            apps[replicated] = Spread(replicas, fake, SECRET)
            anchors[replicated] = finished_request(apps[replicated], fake, emulator.product_key, "benchr")
        port = free_port()
        processes[MINIMAL] = start([sys.executable, __file__, "--serve-minimal", str(port)], env, port)
        apps[MINIMAL] = Workspace(fake, SECRET, app_url=f"http://127.0.0.1:{port}/slack/events")
        anchors[MINIMAL] = next(iter(anchors.values()))
        pids = {name: [process.pid] for name, process in processes.items()}
        if replicas is not None:
            pids[replicated] = [r.pid for r in replicas if r.pid is not None]

        samples: dict[str, list[float]] = {name: [] for name in apps}
        round_p99: dict[str, list[float]] = {name: [] for name in apps}
        cpu: dict[str, float] = {name: 0.0 for name in apps}
        resets: dict[str, list[str]] = {name: [] for name in apps}
        # Warm each up at full concurrency (every server thread, its database connection and its
        # Slack connections made), so that the rounds measure a running service, not its start.
        for name, workspace in apps.items():
            load(workspace, anchors[name], args.streams, 4)
        for _ in range(args.rounds):
            for name, workspace in apps.items():
                before = settled_cpu(pids[name])
                latencies = load(workspace, anchors[name], args.streams, args.requests, resets[name])
                cpu[name] += settled_cpu(pids[name]) - before
                samples[name] += latencies
                round_p99[name].append(percentile(latencies, 99))
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(20)
        if replicas is not None:
            replicas.stop()
        fake.stop()
        emulator.stop()
        if cluster is not None:
            cluster.destroy()

    rows = [
        [name, len(s), f"{percentile(s, 50):.1f}", f"{percentile(s, 99):.1f}", f"{max(s):.1f}",
         " / ".join(f"{p:.0f}" for p in round_p99[name]), f"{cpu[name] / len(s) * 1000:.2f}", len(resets[name])]
        for name, s in samples.items()
    ]
    base = samples[MINIMAL]
    verdict = []
    for name in [*databases, *([replicated] if replicas is not None else [])]:
        ours = samples[name]
        ratio = percentile(ours, 99) / percentile(base, 99)
        round_ratios = [a / b for a, b in zip(round_p99[name], round_p99[MINIMAL])]
        verdict += [
            [f"{name}: p99 under 150 ms", f"{percentile(ours, 99):.1f} ms", "PASS" if percentile(ours, 99) < 150 else "MISS"],
            [f"{name}: p99 within 1.3x the minimal app's", f"{ratio:.2f}x (each round: {', '.join(f'{r:.2f}x' for r in round_ratios)})", "PASS" if ratio <= 1.3 else "MISS"],
        ]
    report(
        "Ack latency",
        f"{args.streams} concurrent streams × {args.requests} requests × {args.rounds} rounds per app (commands and clicks, "
        "signed), waitress 1 process × 16 threads"
        + (f" (×{args.replicas} processes for the round-robin row: its CPU column sums them)" if replicas is not None else "")
        + ", load generated on the same machine"
        + (", PostgreSQL a local throwaway server on the same machine" if cluster is not None else "") + ".\n\n"
        + table(["app", "requests", "p50 ms", "p99 ms", "max ms", "p99 ms of each round", "server CPU ms a request (acks and all the work after)", "sent again (idle connection closed)"], rows)
        + "\n\n"
        + table(["target", "measured", ""], verdict),
    )


if __name__ == "__main__":
    main()
