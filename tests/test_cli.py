"""The CLI front end, run as an operator would, against the emulator on the real clock."""

from __future__ import annotations

import csv
import os
import stat

import pytest
from click.testing import CliRunner

from bot.cli import cli
from bot.clock import SystemClock
from bot.store.sqlite import SqliteStore


@pytest.fixture
def live(make_emulator):
    """An emulator whose phases end at once, on the real clock the CLI uses."""
    return make_emulator(clock=SystemClock(), check_seconds=0, create_seconds=0)


@pytest.fixture
def run(live, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**live.env(), "IOTREG_DB": str(tmp_path / "iotreg.db"), "IOTREG_POLL_INTERVAL": "0.05", "IOTREG_POLL_MAX_INTERVAL": "0.2"}
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "IOT_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, extra_env: dict | None = None):
        return runner.invoke(cli, list(args), env={**env, **(extra_env or {})}, input=input, catch_exceptions=False)

    return invoke


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_register_a_file_with_yes_reports_every_device(run, live, tmp_path):
    devices = write(tmp_path / "devices.csv", "DeviceName,DeviceNickname\nline-a-0001,北门_1\nline-a-0002,\nab,\nline-a-0001,\n")
    result = run("register", devices, "--product-key", live.product_key, "--yes", "--output", "out.csv")
    assert result.exit_code == 0, result.output
    assert "2 line(s) were not valid" in result.output
    assert "line 4: 'ab': too short" in result.output and "line 5: 'line-a-0001': duplicate of line 2" in result.output
    assert "registered" in result.output and "2" in result.output
    assert {d.device_name for d in live.backend.devices(live.product_key)} == {"line-a-0001", "line-a-0002"}
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8-sig")))
    assert [(r["DeviceName"], r["Outcome"]) for r in rows] == [
        ("line-a-0001", "registered"), ("line-a-0002", "registered"), ("ab", "rejected locally"), ("line-a-0001", "rejected locally"),
    ]
    assert rows[0]["IotId"] and rows[0]["DeviceNickname"] == "北门_1"


def test_declining_at_the_prompt_rejects_and_registers_nothing(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "keep-out-01\nkeep-out-02\n")
    result = run("register", devices, "-p", live.product_key, input="n\n")
    assert result.exit_code == 1
    assert "Register 2 device(s) in product" in result.output and "rejected" in result.output
    assert live.backend.devices(live.product_key) == []


def test_a_failed_check_stops_unless_asked_to_skip_the_invalid_names(run, live, tmp_path):
    live.backend.add_device(live.product_key, "exists-0001")
    devices = write(tmp_path / "d.txt", "exists-0001\nfresh-0001\nfresh-0002\n")
    stopped = run("register", devices, "-p", live.product_key, "--yes")
    assert stopped.exit_code == 1
    assert "exists-0001" in stopped.output and "add --skip-invalid" in stopped.output
    assert len(live.backend.devices(live.product_key)) == 1
    skipped = run("register", devices, "-p", live.product_key, "--yes", "--skip-invalid")
    assert skipped.exit_code == 0, skipped.output
    assert {d.device_name for d in live.backend.devices(live.product_key)} == {"exists-0001", "fresh-0001", "fresh-0002"}


def test_platform_named_devices(run, live):
    result = run("register", "--count", "3", "-p", live.product_key, "--yes")
    assert result.exit_code == 0, result.output
    assert len(live.backend.devices(live.product_key)) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"<!DOCTYPE html><html><body>Sign in to Slack</body></html>", "HTML page"),
        (b"PK\x03\x04\x14\x00\x00\x00", "save it as CSV"),
        (b"", "empty"),
    ],
)
def test_files_that_are_not_device_lists_are_refused_before_any_call(run, live, tmp_path, content, message):
    path = tmp_path / "upload.csv"
    path.write_bytes(content)
    result = run("register", str(path), "-p", live.product_key, "--yes")
    assert result.exit_code == 1 and message in result.output
    assert sum(live.gateway.calls.values()) == 0


def test_missing_credentials_name_the_variable(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "abcd-0001\n")
    result = run("register", devices, "-p", live.product_key, extra_env={"ALIBABA_CLOUD_ACCESS_KEY_SECRET": ""})
    assert result.exit_code == 1 and "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in result.output


def test_file_or_count_not_both(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "abcd-0001\n")
    assert "either FILE or --count" in run("register", devices, "--count", "2", "-p", live.product_key).output


def test_credentials_go_to_a_private_file_and_never_to_the_screen(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "secret-dev-01\nsecret-dev-02\n")
    assert run("register", devices, "-p", live.product_key, "--yes").exit_code == 0
    apply_id = SqliteStore(tmp_path / "iotreg.db").chunks(1)[0].apply_id
    result = run("credentials", str(apply_id), "--output", "creds.csv")
    assert result.exit_code == 0 and "2 device(s)" in result.output
    mode = stat.S_IMODE(os.stat(tmp_path / "creds.csv").st_mode)
    assert mode == 0o600
    rows = list(csv.DictReader(open(tmp_path / "creds.csv", encoding="utf-8")))
    secrets = {d.device_name: d.device_secret for d in live.backend.devices(live.product_key)}
    assert {(r["ProductKey"], r["DeviceName"], r["DeviceSecret"]) for r in rows} == {(live.product_key, n, s) for n, s in secrets.items()}
    assert not any(secret in result.output for secret in secrets.values())
    again = run("credentials", str(apply_id), "--output", "creds.csv")
    assert again.exit_code == 1 and "add --force" in again.output


def test_requests_audit_and_status_show_what_happened(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "audit-0001\naudit-0002\n")
    run("register", devices, "-p", live.product_key, "--yes")
    listing = run("requests")
    assert "done" in listing.output and live.product_key in listing.output
    trail = run("audit", "1").output
    for step in ("requested", "check_submitted", "checked", "approved", "register_submitted", "registered"):
        assert step in trail
    apply_id = SqliteStore(tmp_path / "iotreg.db").chunks(1)[0].apply_id
    status = run("status", str(apply_id), "-p", live.product_key)
    assert f"ApplyId {apply_id}" in status.output and "CREATE_SUCCESS" in status.output and "request #1" in status.output
    assert run("audit", "99").exit_code == 1


def test_resume_finishes_an_interrupted_request(run, live, tmp_path):
    from bot.jobs import InlineJobs
    from bot.registration import Workflow
    from bot.aliyun.client import Credentials, IotClient

    clock = SystemClock()
    store = SqliteStore(tmp_path / "iotreg.db")
    workflow = Workflow(
        store, IotClient(live.endpoint, Credentials(live.access_key_id, live.access_key_secret)), clock,
        notifier=lambda _: None, jobs=lambda steps: InlineJobs(clock, steps),
    )
    request = workflow.requests.submit(live.product_key, "cli:someone", ["resume-0001", "resume-0002"], origin="cli")
    store.close()  # the process that started it is gone
    result = run("resume", "--yes")
    assert result.exit_code == 0, result.output
    assert f"Request #{request.id}" in result.output and "done" in result.output
    assert len(live.backend.devices(live.product_key)) == 2
    assert "No unfinished request" in run("resume").output
