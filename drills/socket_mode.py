"""Socket Mode drill: the production timing (``bot.slack.socket_mode.Timing()``) against every way a
connection ends, measured on a local Socket Mode server.

For each way, one after the other on the same client: how long until a new connection is being read,
how long until the next envelope is acked (counted from the moment the connection ended or Slack
asked for a new one), and the share of a core the process used over at least 3 s from then (a client looping on a dead
socket would use a whole core). Bounds: a ``disconnect``'s
next envelope acked within Slack's 3 s; a connection lost without a close frame replaced within 15 s.

    python drills/socket_mode.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slack_bolt import App  # noqa: E402
from slack_sdk import WebClient  # noqa: E402

from bot.slack import socket_mode  # noqa: E402
from bot.standins.slack import FakeSlack  # noqa: E402

WAYS = ["disconnect: warning", "disconnect: refresh_requested", "disconnect: link_disabled",
        "close frame", "dropped without a close frame", "reset", "half-open (silent)"]
WINDOW = 3.0  # seconds over which the CPU share is measured, from the end of the connection


def main() -> int:
    timing = socket_mode.Timing()
    failures = 0
    with FakeSlack() as fake:
        server = fake.socket_mode
        app = App(client=WebClient(token=fake.bot_token, base_url=fake.api_url), token_verification_enabled=False,
                  request_verification_enabled=False)
        app.command("/devices")(lambda ack: ack(text="pong"))
        client = socket_mode.connection(app, fake.app_token, fake.api_url, timing=timing)
        client.start()
        print(f"Timing: ping every {timing.ping_interval:g} s, dead after {timing.dead_after:g} s of silence, "
              f"worst case to replace a silent connection {timing.worst_case_replacement:g} s\n")
        print("| how the connection ended | new connection after s | next envelope acked after s | CPU share | bound s | |")
        print("|---|---|---|---|---|---|")
        try:
            for number, way in enumerate(WAYS, start=2):
                server.wait_for_connection(number - 1)
                cpu, began = time.process_time(), time.monotonic()
                if way.startswith("disconnect"):
                    server.disconnect(way.split(": ")[1])
                else:
                    {"close frame": server.close, "dropped without a close frame": server.drop, "reset": server.reset,
                     "half-open (silent)": server.silence}[way]()
                peer = server.wait_for_connection(number, timeout=30)
                opened = time.monotonic() - began
                envelope_id, _ = server.envelope("slash_commands", {"command": "/devices", "text": "ping", "user_id": "U0A",
                                                                    "channel_id": "C0A", "team_id": fake.team_id})
                ack = server.wait_ack(envelope_id, timeout=30)
                acked = (ack["at"] if ack else time.monotonic()) - began
                time.sleep(max(0.0, began + WINDOW - time.monotonic()))  # CPU measured over WINDOW at least
                share = (time.process_time() - cpu) / (time.monotonic() - began)
                bound = 3.0 if way.startswith("disconnect") else 15.0
                ok = peer is not None and ack is not None and acked <= bound and share < 0.5
                failures += not ok
                print(f"| {way} | {opened:.2f} | {acked:.2f} | {share:.1%} | {bound:g} | {'PASS' if ok else 'MISS'} |")
        finally:
            client.close()
    print("\nPASS" if not failures else f"\n{failures} MISS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
