"""`iotreg serve` in Socket Mode as deployed: no signing secret, no public URL; /healthz and
/metrics on PORT, the metrics parsed by prometheus-client's own parser at every step of a whole
conversation; JSON logs with a line per transition and nothing secret; one line when it cannot start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from test_serve import free_port, stop, wait_until

from bot.clock import SystemClock
from bot.slack import blocks
from bot.standins.slack import FakeSlack
from bot.standins.slack.socketmode import socket_workspace


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels, as prometheus-client parses it."""
    answer = requests.get(f"{url}/metrics", timeout=5)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIBABA_CLOUD_", "IOT_", "SLACK_", "IOTREG_"))}
    env.update(values)
    return env


@contextmanager
def serving(env: dict[str, str], cwd: Path, *args: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    log = cwd / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", *args], env=env, cwd=cwd,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process, log
    finally:
        if process.poll() is None:
            stop(process)


def test_socket_mode_serves_a_whole_conversation_with_health_metrics_and_json_logs(make_emulator, tmp_path):
    emulator = make_emulator(clock=SystemClock(), check_seconds=0.2, create_seconds=0.2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with FakeSlack() as fake:
        fake.add_channel("C0OPS", "iot-ops")
        env = clean_env(**emulator.env(), SLACK_BOT_TOKEN=fake.bot_token, SLACK_APP_TOKEN=fake.app_token,
                        SLACK_API_URL=fake.api_url, IOTREG_DB=str(tmp_path / "iotreg.db"), IOTREG_POLL_INTERVAL="0.2",
                        IOTREG_POLL_MAX_INTERVAL="0.5", IOTREG_LOG_FORMAT="json", PORT=str(port))  # no SLACK_SIGNING_SECRET
        with serving(env, tmp_path) as (process, log):
            health = wait_until(lambda: requests.get(f"{url}/healthz", timeout=1))
            assert health is not None and health.status_code == 200, log.read_text()
            assert health.json() == {"ok": True, "database": "ok", "scheduler": "running", "pending_notifications": 0, "slack": "connected"}
            assert requests.post(f"{url}/slack/events", data="x", timeout=5).status_code == 404  # Slack comes over the socket

            first = scrape(url)
            assert total(first, "iotreg_requests") == 0 and total(first, "iotreg_pending_approvals") == 0
            assert total(first, "iotreg_slack_calls_total", method="apps.connections.open", outcome="ok") == 1

            ws = socket_workspace(fake)
            answer = ws.command("U0ALICE", "C0OPS", f"register {emulator.product_key} sock-0001 sock-0002")
            assert answer.status_code == 200 and "checking 2 names" in answer.text

            def anchor_with(action_id: str):
                return next((m for m in fake.messages("C0OPS") if any(
                    e.get("action_id") == action_id for b in m.get("blocks", []) if b["type"] == "actions" for e in b["elements"])), None)

            waiting = wait_until(lambda: anchor_with(blocks.APPROVE))
            assert waiting is not None
            asking = scrape(url)
            assert total(asking, "iotreg_pending_approvals") == 1
            assert total(asking, "iotreg_requests", state="awaiting_approval") == 1
            assert total(asking, "iotreg_iot_calls_total", action="BatchCheckDeviceNames", outcome="ok") >= 1

            assert ws.click("U0BOB", waiting, blocks.APPROVE).status_code == 200
            assert wait_until(lambda: anchor_with(blocks.CREDENTIALS)) is not None
            assert wait_until(lambda: total(scrape(url), "iotreg_outbox_pending") == 0)
            done = scrape(url)
            assert total(done, "iotreg_requests", state="done") == 1 and total(done, "iotreg_pending_approvals") == 0
            assert total(done, "iotreg_devices_registered_total") == 2
            assert total(done, "iotreg_iot_calls_total", action="BatchRegisterDeviceWithApplyId", outcome="ok") == 1
            assert total(done, "iotreg_iot_call_seconds_count") == total(done, "iotreg_iot_calls_total") > 0
            assert total(done, "iotreg_slack_calls_total", method="chat.postMessage", outcome="ok") >= 1
            assert total(done, "iotreg_slack_calls_total", method="apps.connections.open", outcome="ok") == 1
        assert process.returncode == 0

    output = log.read_text()
    records = [json.loads(line) for line in output.splitlines()]  # one JSON object a line, every line
    transitions = [r for r in records if r.get("request_id") == 1 and "state" in r]
    assert [r["state"] for r in transitions] == ["checking", "awaiting_approval", "approved", "registering", "done"]
    assert {r["product"] for r in transitions} == {emulator.product_key} and [r["actor"] for r in transitions[:3]] == ["U0ALICE", "iotreg", "U0BOB"]
    assert any(r["message"].startswith("Socket Mode: connected") for r in records)
    assert "will be unused" not in output and "Traceback" not in output
    for secret in (fake.bot_token, fake.app_token, emulator.access_key_secret):
        assert secret not in output


def test_without_a_usable_slack_or_database_serve_says_which_setting_in_one_line(tmp_path, emulator):
    with FakeSlack() as fake:
        closed = free_port()
        base = clean_env(**emulator.env(), SLACK_BOT_TOKEN=fake.bot_token, SLACK_API_URL=fake.api_url,
                         IOTREG_DB=str(tmp_path / "iotreg.db"), PORT=str(free_port()))
        cases = {
            "SLACK_APP_TOKEN": {"SLACK_APP_TOKEN": "xapp-1-refused"},
            "SLACK_BOT_TOKEN": {"SLACK_APP_TOKEN": fake.app_token, "SLACK_BOT_TOKEN": "xoxb-refused"},
            "SLACK_API_URL": {"SLACK_APP_TOKEN": fake.app_token, "SLACK_API_URL": f"http://127.0.0.1:{closed}/api/"},
            "IOTREG_DB": {"SLACK_APP_TOKEN": fake.app_token, "IOTREG_DB": str(tmp_path / "no-such-dir" / "iotreg.db")},
            "SLACK_SIGNING_SECRET": {},  # HTTP mode still needs it
        }
        for setting, change in cases.items():
            result = subprocess.run([sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1"], env={**base, **change},
                                    cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert result.returncode == 1, (setting, result.stderr)
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and setting in errors[0], (setting, result.stderr)
            assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 3, (setting, result.stderr)
            assert "refused" not in change.get("SLACK_BOT_TOKEN", "") or "xoxb-refused" not in result.stderr
