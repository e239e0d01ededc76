"""The CLI front end, run as an operator would, against the emulator on the real clock."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
import time

import click

import pytest
from click.testing import CliRunner

from bot.cli import Exit, Terminal, cli, progress_units
from bot.domain import Chunk
from bot.clock import SystemClock
from bot.store import open_store
from bot.standins.emulator import FaultPlan


@pytest.fixture
def live(make_emulator):
    """An emulator whose phases end at once, on the real clock the CLI uses."""
    return make_emulator(clock=SystemClock(), check_seconds=0, create_seconds=0)


@pytest.fixture
def run(live, tmp_path, store_location, monkeypatch):
    """``iotreg`` as an operator runs it, on a fresh database of each kind (SQLite, PostgreSQL)."""
    monkeypatch.chdir(tmp_path)
    env = {**live.env(), "IOTREG_DB": store_location, "IOTREG_POLL_INTERVAL": "0.05", "IOTREG_POLL_MAX_INTERVAL": "0.2"}
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "IOT_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, extra_env: dict | None = None):
        return runner.invoke(cli, list(args), env={**env, **(extra_env or {})}, input=input, catch_exceptions=False)

    return invoke


def first_apply_id(location: str) -> int:
    store = open_store(location)
    try:
        return store.chunks(1)[0].apply_id
    finally:
        store.close()


#: For the tests of SQLite's own file (where it is made, when it is not): they run on SQLite alone.
sqlite_only = pytest.mark.parametrize("store_location", ["sqlite"], indirect=True)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_register_a_file_with_yes_reports_every_device(run, live, tmp_path):
    devices = write(tmp_path / "devices.csv", "DeviceName,DeviceNickname\nline-a-0001,北门_1\nline-a-0002,\nab,\nline-a-0001,\n")
    result = run("register", devices, "--product-key", live.product_key, "--yes", "--output", "out.csv")
    assert result.exit_code == Exit.REJECTED_LOCALLY, result.output
    assert "2 line(s) were not valid" in result.output
    assert "line 4: 'ab': too short" in result.output and "line 5: 'line-a-0001': duplicate of line 2" in result.output
    assert "registered" in result.output and "2" in result.output
    assert {d.device_name for d in live.backend.devices(live.product_key)} == {"line-a-0001", "line-a-0002"}
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8-sig")))
    assert [(r["DeviceName"], r["Outcome"]) for r in rows] == [
        ("line-a-0001", "registered"), ("line-a-0002", "registered"), ("ab", "rejected locally"), ("line-a-0001", "rejected locally"),
    ]
    assert rows[0]["IotId"] and rows[0]["DeviceNickname"] == "北门_1"
    platform = {d.device_name: d.iot_id for d in live.backend.devices(live.product_key)}
    assert {r["DeviceName"]: r["IotId"] for r in rows[:2]} == platform  # read after the result, before the file


def test_iot_ids_the_platform_will_not_list_are_waited_for_then_given_up_and_the_file_says_registered(run, live, tmp_path):
    live.gateway.faults = FaultPlan(error_rate=1.0, actions=frozenset({"QueryPageByApplyId"}))
    devices = write(tmp_path / "d.txt", "list-0001\nlist-0002\n")
    result = run("register", devices, "-p", live.product_key, "--yes", "--output", "out.csv",
                 extra_env={"IOTREG_POLL_TIMEOUT": "3", "IOT_RETRY_DEADLINE": "0.2"})
    assert result.exit_code == Exit.OK, result.output
    assert "Request #1: registration finished." in result.output
    assert "reading the IotIds of the created devices from IoT Platform failed; trying again" in result.output
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8-sig")))
    assert [(r["DeviceName"], r["Outcome"], r["IotId"]) for r in rows] == [("list-0001", "registered", ""), ("list-0002", "registered", "")]
    assert "iot_ids_not_read" in run("audit", "1").output


def test_declining_at_the_prompt_rejects_and_registers_nothing(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "keep-out-01\nkeep-out-02\n")
    result = run("register", devices, "-p", live.product_key, input="n\n")
    assert result.exit_code == Exit.NOT_APPROVED
    assert "Register 2 device(s) in product" in result.output and "rejected" in result.output
    assert live.backend.devices(live.product_key) == []


def test_a_failed_check_stops_unless_asked_to_skip_the_invalid_names(run, live, tmp_path):
    live.backend.add_device(live.product_key, "exists-0001")
    devices = write(tmp_path / "d.txt", "exists-0001\nfresh-0001\nfresh-0002\n")
    stopped = run("register", devices, "-p", live.product_key, "--yes")
    assert stopped.exit_code == Exit.REFUSED
    assert "exists-0001" in stopped.output and "add --skip-invalid" in stopped.output
    assert len(live.backend.devices(live.product_key)) == 1
    skipped = run("register", devices, "-p", live.product_key, "--yes", "--skip-invalid")
    assert skipped.exit_code == Exit.REFUSED, skipped.output  # registered the others, but not every name
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


def test_credentials_go_to_a_private_file_and_never_to_the_screen(run, live, tmp_path, store_location):
    devices = write(tmp_path / "d.txt", "secret-dev-01\nsecret-dev-02\n")
    assert run("register", devices, "-p", live.product_key, "--yes").exit_code == 0
    apply_id = first_apply_id(store_location)
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


def test_requests_audit_and_status_show_what_happened(run, live, tmp_path, store_location):
    devices = write(tmp_path / "d.txt", "audit-0001\naudit-0002\n")
    run("register", devices, "-p", live.product_key, "--yes")
    listing = run("requests")
    assert "done" in listing.output and live.product_key in listing.output
    trail = run("audit", "1").output
    for step in ("requested", "check_submitted", "checked", "approved", "register_submitted", "registered"):
        assert step in trail
    apply_id = first_apply_id(store_location)
    status = run("status", str(apply_id))  # the product is found in the database
    assert f"ApplyId {apply_id} on IoT Platform: CREATE_SUCCESS" in status.output and "Request #1 (" in status.output
    assert run("audit", "99").exit_code == 1


def test_resume_finishes_an_interrupted_request(run, live, store_location):
    from bot.jobs import InlineJobs
    from bot.registration import Workflow
    from bot.aliyun.client import Credentials, IotClient

    clock = SystemClock()
    store = open_store(store_location)
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


# -- exit statuses a script can rely on ----------------------------------------------------------


def test_every_line_registered_is_the_only_exit_0_and_a_summary_says_so_in_json(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "json-0001\njson-0002\n")
    result = run("register", devices, "-p", live.product_key, "--yes", "--json")
    assert result.exit_code == Exit.OK, result.output
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == 0
    [request] = summary["requests"]
    assert (request["id"], request["state"], request["registered"], request["product_key"]) == (1, "done", 2, live.product_key)
    assert len(request["apply_ids"]) == 1


def test_platform_refusals_give_their_own_exit_status_even_when_the_rest_is_registered(run, live, tmp_path):
    live.backend.add_device(live.product_key, "taken-0001")
    devices = write(tmp_path / "d.txt", "taken-0001\nfree-0001\nbad#\n")
    result = run("register", devices, "-p", live.product_key, "--yes", "--skip-invalid", "--json")
    assert result.exit_code == Exit.REFUSED
    states = [(r["id"], r["state"]) for r in json.loads(result.stdout)["requests"]]
    assert states == [(1, "check_failed"), (2, "done")]


def test_devices_that_fail_creation_exit_5_and_retry_failed_registers_just_them(run, live, tmp_path):
    live.backend.create_failure_rate = 1.0
    devices = write(tmp_path / "d.txt", "flaky-0001\nflaky-0002\nflaky-0003\n")
    failed = run("register", devices, "-p", live.product_key, "--yes")
    assert failed.exit_code == Exit.FAILED
    assert "iotreg retry-failed 1" in failed.output
    live.backend.create_failure_rate = 0.0
    retried = run("retry-failed", "1", "--yes", "--output", "again.csv")
    assert retried.exit_code == Exit.OK, retried.output
    assert "Request #2 registers the 3 device(s) of #1" in retried.output
    assert {d.device_name for d in live.backend.devices(live.product_key)} == {"flaky-0001", "flaky-0002", "flaky-0003"}
    assert run("retry-failed", "2").exit_code == Exit.ERROR  # nothing left to retry


def test_no_answer_at_the_prompt_leaves_the_request_waiting_with_what_to_do_and_cancel_withdraws_it(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "wait-0001\n")
    result = run("register", devices, "-p", live.product_key, input="")  # standard input closed
    assert result.exit_code == Exit.WAITING
    assert "Aborted!" not in result.output
    assert "iotreg resume 1 --yes" in result.output and "iotreg cancel 1" in result.output
    cancelled = run("cancel", "1")
    assert cancelled.exit_code == Exit.OK and "cancelled" in cancelled.output
    assert run("cancel", "1").exit_code == Exit.ERROR  # already cancelled: said, not a traceback
    assert "No unfinished request" in run("resume").output
    assert live.backend.devices(live.product_key) == []


def test_ctrl_c_at_the_prompt_exits_130_and_says_how_to_go_on(run, live, tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise click.Abort() from None  # as click.confirm does

    monkeypatch.setattr(click, "confirm", ctrl_c)
    devices = write(tmp_path / "d.txt", "ctrlc-0001\n")
    result = run("register", devices, "-p", live.product_key)
    assert result.exit_code == Exit.INTERRUPTED == 130
    assert "Aborted!" not in result.output and "iotreg resume 1" in result.output
    monkeypatch.undo()
    assert run("resume", "--yes").exit_code == Exit.OK  # nobody drives it any more


def test_another_terminals_resume_leaves_a_request_at_its_prompt_alone(run, live, tmp_path, monkeypatch):
    answers = []

    def the_other_terminal(question, **kwargs):
        answers.append(run("resume", "--yes"))  # while this one is at its prompt
        return True

    monkeypatch.setattr(click, "confirm", the_other_terminal)
    devices = write(tmp_path / "d.txt", "mine-0001\nmine-0002\n")
    result = run("register", devices, "-p", live.product_key)
    [other] = answers
    assert "Request #1 is being driven by another iotreg" in other.output and "No unfinished request" in other.output
    assert result.exit_code == Exit.OK, result.output
    trail = [e["event"] for e in json.loads(run("audit", "1", "--json").stdout)]
    assert trail.count("approved") == 1 and "registered" in trail


# -- read-only commands: no credentials needed, no database created ------------------------------


@sqlite_only
def test_queries_need_no_credentials_and_create_no_database(run, tmp_path):
    no_keys = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": ""}
    assert run("requests", extra_env=no_keys).output == "No requests yet.\n"
    assert run("requests", "--json", extra_env=no_keys).stdout.strip() == "[]"
    assert run("audit", "3", extra_env=no_keys).exit_code == Exit.ERROR
    assert run("status", "3", extra_env=no_keys).exit_code == Exit.ERROR
    assert not (tmp_path / "iotreg.db").exists()


@sqlite_only
def test_a_database_in_a_missing_folder_is_one_line_not_a_traceback(run, live, tmp_path):
    missing = {"IOTREG_DB": str(tmp_path / "nonexistent" / "x.db")}
    assert run("requests", extra_env=missing).exit_code == Exit.OK
    devices = write(tmp_path / "d.txt", "nodb-0001\n")
    result = run("register", devices, "-p", live.product_key, "--yes", extra_env=missing)
    assert result.exit_code == Exit.ERROR
    assert result.output.startswith("Error: cannot open the SQLite database") and len(result.output.splitlines()) == 1


@sqlite_only
def test_a_configuration_error_leaves_no_empty_database_behind(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "conf-0001\n")
    result = run("register", devices, "-p", live.product_key, extra_env={"ALIBABA_CLOUD_ACCESS_KEY_SECRET": ""})
    assert result.exit_code == Exit.ERROR and "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in result.output
    assert not (tmp_path / "iotreg.db").exists()


def test_status_requests_and_audit_speak_json(run, live, tmp_path):
    devices = write(tmp_path / "d.txt", "js-0001\njs-0002\n")
    run("register", devices, "-p", live.product_key, "--yes")
    [listed] = json.loads(run("requests", "--json").stdout)
    assert (listed["id"], listed["state"], listed["registered"]) == (1, "done", 2)
    status = json.loads(run("status", "1", "--json").stdout)
    assert status["request"]["registered"] == 2 and status["platform"] is None  # a request number: no API call
    apply_id = status["request"]["apply_ids"][0]
    by_apply_id = json.loads(run("status", str(apply_id), "--json").stdout)
    assert by_apply_id["platform"]["status"] == "CREATE_SUCCESS" and by_apply_id["request"]["id"] == 1
    events = [e["event"] for e in json.loads(run("audit", "1", "--json").stdout)]
    assert events[0] == "requested" and events[-1] == "registered"


def test_credentials_of_a_whole_request_in_one_file_across_its_apply_ids(run, live, tmp_path):
    names = [f"many-{i:04d}" for i in range(5)]
    devices = write(tmp_path / "d.txt", "\n".join(names) + "\n")
    assert run("register", devices, "-p", live.product_key, "--yes", extra_env={"IOTREG_CHUNK_SIZE": "2"}).exit_code == Exit.OK
    assert len(json.loads(run("status", "1", "--json").stdout)["request"]["apply_ids"]) == 3
    result = run("credentials", "1", "-o", "all.csv")
    assert result.exit_code == Exit.OK and "5 device(s)" in result.output
    rows = list(csv.DictReader(open(tmp_path / "all.csv", encoding="utf-8")))
    assert sorted(r["DeviceName"] for r in rows) == names


def test_the_outcome_report_gives_every_devices_line(run, live, tmp_path):
    devices = write(tmp_path / "d.csv", "DeviceName,DeviceNickname\nrow-0001,北门_1\n\nrow-0002,\nab,南门_2\n")
    run("register", devices, "-p", live.product_key, "--yes", "-o", "out.csv")
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8-sig")))
    assert [(r["DeviceName"], r["DeviceNickname"], r["Line"]) for r in rows] == [
        ("row-0001", "北门_1", "2"), ("row-0002", "", "4"), ("ab", "南门_2", "5"),
    ]


@sqlite_only
def test_resume_from_another_folder_finds_the_request_in_iotregs_home(run, live, tmp_path, monkeypatch):
    home = {"IOTREG_HOME": str(tmp_path / "home"), "IOTREG_DB": ""}
    devices = write(tmp_path / "d.txt", "home-0001\n")
    assert run("register", devices, "-p", live.product_key, input="", extra_env=home).exit_code == Exit.WAITING
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run("resume", "--yes", extra_env=home).exit_code == Exit.OK
    assert (tmp_path / "home" / "iotreg.db").exists() and not (elsewhere / "iotreg.db").exists()


# -- a platform that cannot be reached, or does not accept the key ----------------------------------


def test_an_unreachable_endpoint_is_one_clear_error_within_the_retry_deadline(run, live, tmp_path):
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    devices = write(tmp_path / "d.txt", "far-0001\n")
    started = time.monotonic()
    result = run("register", devices, "-p", live.product_key, "--yes", extra_env={"IOT_ENDPOINT": endpoint, "IOT_RETRY_DEADLINE": "2"})
    assert time.monotonic() - started < 15
    assert result.exit_code == Exit.ERROR
    assert f"IoT Platform could not be reached: connection to {endpoint} failed: Connection refused" in result.output
    assert "did not finish" not in result.output


def test_a_wrong_secret_fails_at_once_without_the_string_to_sign(run, live, tmp_path, caplog):
    devices = write(tmp_path / "d.txt", "sig-0001\n")
    started = time.monotonic()
    result = run("-v", "register", devices, "-p", live.product_key, "--yes", extra_env={"ALIBABA_CLOUD_ACCESS_KEY_SECRET": "wrong"})
    assert time.monotonic() - started < 5
    assert result.exit_code == Exit.ERROR and "did not accept iotreg's credentials" in result.output
    assert live.gateway.calls["BatchCheckDeviceNames"] == 1
    assert "string to sign" not in result.output
    assert not any("string to sign" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


# -- the terminal ----------------------------------------------------------------------------------


def test_an_event_line_clears_the_progress_bar_instead_of_sticking_to_it():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    terminal = Terminal(err=stream)
    with terminal.progress("Checking names", 100) as bar:
        bar.update(10)
        terminal.line("Request #1: checking 50 name(s).")
    text = stream.getvalue()
    before, _, after = text.partition("Request #1")
    assert before.endswith("\r\x1b[K") and "Checking names" in after  # cleared, then drawn again


def test_the_progress_bar_moves_with_each_part_of_a_request():
    def chunk(no, apply_id=None, status=None, confirmed=None):
        return Chunk(1, no, 10_000, apply_id, status, None, confirmed, None)

    assert progress_units([chunk(0), chunk(1), chunk(2)], registering=False) == 0
    submitted = [chunk(0, 11, "CHECK"), chunk(1, 12, "CHECK"), chunk(2)]
    assert progress_units(submitted, registering=False) == 20_000
    one_done = [chunk(0, 11, "CHECK_SUCCESS"), chunk(1, 12, "CHECK"), chunk(2, 13, "CHECK")]
    assert progress_units(one_done, registering=False) == 40_000


def test_rows_that_name_another_product_are_not_registered_in_this_one(run, live, tmp_path):
    devices = write(tmp_path / "d.csv", f"ProductKey,DeviceName\n{live.product_key},ours-0001\na1OtherProd,theirs-0001\n,ours-0002\n")
    result = run("register", devices, "-p", live.product_key, "--yes")
    assert result.exit_code == Exit.REJECTED_LOCALLY, result.output
    assert "line 3: 'theirs-0001': the ProductKey column says a1OtherProd, not" in result.output
    assert {d.device_name for d in live.backend.devices(live.product_key)} == {"ours-0001", "ours-0002"}


def test_a_list_saved_by_chinese_excel_is_read_as_gb18030_and_says_so(run, live, tmp_path):
    path = tmp_path / "设备.csv"
    path.write_bytes("DeviceName,DeviceNickname\r\ngb-0001,温度传感器_1\r\ngb-0002,水泵_2\r\n".encode("gb18030"))
    result = run("register", str(path), "-p", live.product_key, "--yes")
    assert result.exit_code == 0, result.output
    assert "Read 设备.csv as GB18030: it is not UTF-8." in result.output
    assert {(d.device_name, d.nickname) for d in live.backend.devices(live.product_key)} == {("gb-0001", "温度传感器_1"), ("gb-0002", "水泵_2")}
