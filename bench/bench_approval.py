"""Approval to result: from the Approve click to the threaded result, against the platform's own time.

The emulator's creation takes T seconds; the bot (the real app, workflow and APScheduler, on the
real clock) polls from IOTREG_POLL_INTERVAL, backing off by half again each time. For each T: the
time from the click to the result in the thread, minus T (the part iotreg adds), and the number of
QueryBatchRegisterDeviceStatus calls the registration made, against the fewest possible (one, if
the bot knew when creation ends). Target: at most T + one poll interval (the one in force when
creation ended) + 0.5 s.

    python bench/bench_approval.py [--t 1 2 4] [--repeat 3] [--poll 1] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median, report, table  # noqa: E402

from bot.clock import SystemClock  # noqa: E402
from bot.config import Settings  # noqa: E402
from bot.standins.emulator import Emulator  # noqa: E402
from bot import wiring  # noqa: E402
from bot.server import serve_locally  # noqa: E402
from bot.slack import blocks  # noqa: E402
from bot.slack.app import create_app  # noqa: E402
from bot.standins.slack import FakeSlack, Workspace  # noqa: E402

SECRET = "bench-signing-secret"
OPS = "C0OPS"


def one_run(create_seconds: float, poll: float, n: int) -> tuple[float, int, float]:
    """(seconds from click to result, status calls while registering, interval in force at the end)."""
    emulator = Emulator(clock=SystemClock(), check_seconds=0.2, create_seconds=create_seconds).start()
    fake = FakeSlack().start()
    fake.add_channel(OPS, "iot-ops")
    folder = Path(tempfile.mkdtemp(prefix="iotreg-bench-"))
    settings = Settings.from_env(
        {
            **emulator.env(), "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": fake.api_url,
            "IOTREG_DB": str(folder / "iotreg.db"), "IOTREG_POLL_INTERVAL": str(poll), "IOTREG_POLL_MAX_INTERVAL": "60",
        }
    )
    bot = create_app(settings)
    bot.start()
    server = serve_locally(bot.wsgi())
    ws = Workspace(fake, SECRET, app_url=f"http://127.0.0.1:{server.server_port}/slack/events")
    try:
        names = " ".join(f"bench-{i:05d}" for i in range(n))
        ws.command("U0ALICE", OPS, f"register {emulator.product_key} {names}")
        anchor = fake.wait_for(lambda: next((m for m in fake.messages(OPS) if blocks.APPROVE in str(m.get("blocks"))), None), timeout=60)
        emulator.gateway.reset_counts()
        started = time.monotonic()
        ws.click("U0BOB", anchor, blocks.APPROVE)
        fake.wait_for(lambda: any("Request #1:" in r.get("text", "") for r in fake.thread(OPS, anchor["ts"])), timeout=120)
        elapsed = time.monotonic() - started
        polls = emulator.gateway.calls["QueryBatchRegisterDeviceStatus"]
        timing = wiring.timing(settings)
        return elapsed, polls, timing.next_poll(max(0, polls - 1))
    finally:
        server.shutdown()
        bot.stop()
        fake.stop()
        emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="creation times T, seconds")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--poll", type=float, default=1.0, help="IOTREG_POLL_INTERVAL")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.t, args.repeat = [0.5], 1
    rows, verdicts = [], []
    for create_seconds in args.t:
        runs = [one_run(create_seconds, args.poll, args.devices) for _ in range(args.repeat)]
        added = [elapsed - create_seconds for elapsed, _, _ in runs]
        polls = [p for _, p, _ in runs]
        bound = max(interval for _, _, interval in runs) + 0.5
        rows.append([f"{create_seconds:g}", f"{median([r[0] for r in runs]):.2f}", f"{median(added):.2f}", f"{max(added):.2f}", f"{median(polls):g}", "1", f"{bound:.2f}"])
        verdicts.append("PASS" if max(added) <= bound else "MISS")
    report(
        "Approval to result",
        f"{args.devices} devices, IOTREG_POLL_INTERVAL={args.poll:g} s (backing off ×1.5), {args.repeat} runs per T; "
        "the real app, workflow and scheduler against the emulator and the fake Slack.\n\n"
        + table(["T (s)", "click → result, median (s)", "added by iotreg, median (s)", "added, worst (s)", "status calls", "fewest possible", "target: added ≤ (s)"], rows)
        + f"\n\nTarget met for every T: {'PASS' if all(v == 'PASS' for v in verdicts) else 'MISS'} ({', '.join(verdicts)})",
    )


if __name__ == "__main__":
    main()
