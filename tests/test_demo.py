"""`iotreg demo` plays the whole conversation and ends in registered devices."""

import csv

from click.testing import CliRunner

from bot.domain import State
from bot.cli import cli
from bot.demo import run_demo


def test_the_demo_plays_the_conversation_to_registered_devices():
    lines: list[str] = []
    result = run_demo(out=lines.append, check_seconds=0.2, create_seconds=0.3, poll_interval=0.1)
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


def test_the_demo_takes_your_own_file(tmp_path):
    devices = tmp_path / "mine.txt"
    devices.write_text("mine-0001\nmine-0002\nmine-0003\n")
    result = CliRunner().invoke(cli, ["demo", "--file", str(devices)])
    assert result.exit_code == 0, result.output
    assert "mine.txt" in result.output and "3 devices registered" in result.output
