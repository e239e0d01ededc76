"""`iotreg serve` as deployed: waitress, the real scheduler, signed requests, a healthy /healthz."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import requests

from bot.clock import SystemClock
from bot.slack import blocks
from bot.standins.slack import FakeSlack, Workspace

SECRET = "serve-signing-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition()
        except requests.RequestException:
            result = None
        if result:
            return result
        time.sleep(0.05)
    return condition()


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, as a platform stops a web process; SIGKILL if it does not go within 20 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def test_serve_runs_the_bot_over_http_from_command_to_registered_devices(make_emulator, tmp_path):
    emulator = make_emulator(clock=SystemClock(), check_seconds=0.2, create_seconds=0.2)
    port = free_port()
    with FakeSlack() as fake:
        fake.add_channel("C0OPS", "iot-ops")
        env = {
            **os.environ,
            **emulator.env(),
            "SLACK_BOT_TOKEN": fake.bot_token,
            "SLACK_SIGNING_SECRET": SECRET,
            "SLACK_API_URL": fake.api_url,
            "IOTREG_DB": str(tmp_path / "iotreg.db"),
            "IOTREG_POLL_INTERVAL": "0.2",
            "IOTREG_POLL_MAX_INTERVAL": "0.5",
            "PORT": str(port),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1"], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            health = wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1))
            assert health is not None and health.status_code == 200, process.stdout.read() if process.poll() is not None else ""
            assert health.json() == {"ok": True, "database": "ok", "scheduler": "running", "pending_notifications": 0}

            ws = Workspace(fake, SECRET, app_url=f"http://127.0.0.1:{port}/slack/events")
            answer = ws.command("U0ALICE", "C0OPS", f"register {emulator.product_key} served-0001 served-0002")
            assert answer.status_code == 200 and "checking 2 names" in answer.text

            def anchor_with(action_id: str):
                messages = fake.messages("C0OPS")
                return next((m for m in messages if any(
                    e.get("action_id") == action_id for b in m.get("blocks", []) if b["type"] == "actions" for e in b["elements"])), None)

            waiting = wait_until(lambda: anchor_with(blocks.APPROVE))
            assert waiting is not None
            assert ws.click("U0BOB", waiting, blocks.APPROVE).status_code == 200
            done = wait_until(lambda: anchor_with(blocks.CREDENTIALS))
            assert done is not None and "*2* registered" in str(done["blocks"])
            assert {d.device_name for d in emulator.backend.devices(emulator.product_key)} == {"served-0001", "served-0002"}
            assert ws.command("U0ALICE", "C0OPS", "help", bad_signature=True).status_code == 401
        finally:
            stop(process)
        assert process.returncode == 0


def test_serve_with_the_emulator_labels_every_message(tmp_path):
    port = free_port()
    with FakeSlack() as fake:
        fake.add_channel("C0OPS", "iot-ops")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIBABA_CLOUD_", "IOT_"))}
        env.update({
            "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": fake.api_url,
            "IOTREG_DB": str(tmp_path / "iotreg.db"), "IOTREG_POLL_INTERVAL": "0.2", "PORT": str(port),
        })
        process = subprocess.Popen([sys.executable, "-m", "bot", "serve", "--emulator", "--host", "127.0.0.1"], env=env, cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200)
            ws = Workspace(fake, SECRET, app_url=f"http://127.0.0.1:{port}/slack/events")
            ws.command("U0ALICE", "C0OPS", "register a1EmuDemo01 trial-0001 trial-0002")
            waiting = wait_until(lambda: next((m for m in fake.messages("C0OPS") if "Waiting for approval" in str(m.get("blocks"))), None))
            assert waiting is not None
            assert all("EMULATOR MODE" in str(m.get("blocks")) for m in fake.messages("C0OPS"))
        finally:
            stop(process)
        assert "EMULATOR MODE" in process.stdout.read()
