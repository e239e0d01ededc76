"""`iotreg demo` plays the whole conversation and ends in registered devices."""

import csv
import tempfile
import time

import pytest

from click.testing import CliRunner

from bot.domain import State
from bot.cli import cli
from bot.demo import run_demo


def test_the_demo_plays_the_conversation_to_registered_devices(tmp_path):
    lines: list[str] = []
    result = run_demo(out=lines.append, check_seconds=0.2, create_seconds=0.3, poll_interval=0.1, folder=tmp_path)
    transcript = "\n".join(lines)
    assert result.state == State.DONE and result.registered == 289 and result.request_ids == [1, 2]
    for step in (
        "@alice: /devices register a1EmuDemo01",
        "opens the form",
        "8 lines of the list could not be used",
        "`sensor-hz-0007`: The device name already exists.",
        "[ Retry with the 289 valid names ]",
        "[ Approve ]  [ Reject ]",
        "@bob clicks [Approve]",
        "1 of 2 approvals: @bob",
        "@carol's DM  iotreg: @alice asks for your approval of device registration #2 (2 approvals needed).",
        "@carol clicks [Approve] in the direct message iotreg sent her",
        "Approved by @bob and @carol",
        "289 registered.",
        "📎 registration-2-a1EmuDemo01.csv (289 rows)",
        "#iot-notices  iotreg: Device registration #2",
        "@alice's DM  iotreg: 📎 credentials-a1EmuDemo01-2.csv (secrets not shown here)",
    ):
        assert step in transcript, step
    rows = list(csv.DictReader(result.results_csv.open(encoding="utf-8")))
    assert len(rows) == 289 and {r["Outcome"] for r in rows} == {"registered"}
    assert result.seconds < 60


@pytest.fixture(autouse=True)
def demo_folders_in_tmp_path(tmp_path, monkeypatch):
    """The demo keeps its folder for the person who ran it; a test's goes with the test's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_the_demo_takes_your_own_file(tmp_path):
    devices = tmp_path / "mine.txt"
    devices.write_text("mine-0001\nmine-0002\nmine-0003\n")
    result = CliRunner().invoke(cli, ["demo", "--file", str(devices)])
    assert result.exit_code == 0, result.output
    assert "mine.txt" in result.output and "3 devices registered" in result.output


def test_a_file_the_bot_refuses_ends_the_demo_at_once_with_the_bots_answer(tmp_path):
    devices = tmp_path / "excel.csv"
    devices.write_bytes(b"PK\x03\x04\x14\x00\x00\x00 not a device list")
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["demo", "--file", str(devices)])
    assert result.exit_code == 1 and "refused excel.csv" in result.output, result.output
    assert "only @alice sees" in result.output
    assert time.monotonic() - started < 15  # not the 60 s wait for a check that never comes
    assert not list(tmp_path.glob("iotreg-demo-*/registration-*"))
