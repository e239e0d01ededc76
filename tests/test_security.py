"""Security through the real Slack front end: secrets stay where they belong, the CSV files the bot
writes cannot run formulas, and clicks or submissions that Slack would never send change nothing.

* Secrets: a whole conversation (upload, approve, register, a failed and then a successful "Send me
  the device credentials", a refused one, a status) is run with every logger at DEBUG; no DeviceSecret,
  bot token, signing secret or AccessKey secret may appear in anything Slack received or in any log
  record. The one allowed place is the credentials CSV uploaded to the requester's DM.
* Formulas: every cell of the outcome CSV (uploaded into the thread, or written by
  ``bot.report``) and of the credentials CSV that a spreadsheet would evaluate starts with ``'``,
  except valid device names, which provisioning scripts read back and so stay byte for byte.
* Tampering: a click from another workspace's user, a non-approver's click whose value names another
  request, and a ``view_submission`` whose private_metadata names another channel and product.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from support import SIGNING_SECRET, SlackScenario, response_after, slack_scenario, wait_until

from bot import report
from bot.domain import Kind, Origin, Outcome, Request, State
from bot.store.sqlite import SqliteStore
from bot.names import validate_name
from bot.slack import blocks
from bot.standins.slack import (
    block_actions_payload,
    file_input_value,
    interaction_body,
    plain_text_value,
    view_submission_payload,
)

BOT_TOKEN = "xoxb-test-token-5f1c0de"
OPS, NOTICES, PRIVATE = "C0OPS", "C0NOTICES", "C0PRIVATE"
ALICE, BOB, CAROL, DAVE, ERIN = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE", "U0ERIN"
PRODUCT, OTHER_PRODUCT = "a1TestProd1", "a1OtherProd1"

#: What a spreadsheet evaluates when a cell starts with it (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class Scenario(SlackScenario):
    def anchor(self, request_id: int = 1) -> dict:
        request = self.store.get(request_id)
        return next(m for m in self.fake.messages(request.channel) if m["ts"] == request.origin_data.get("thread_ts"))

    def open_modal(self, user: str, product_key: str = PRODUCT) -> dict:
        before = set(self.fake.views)
        assert self.ws.command(user, OPS, f"register {product_key}").status_code == 200
        return self.fake.wait_for(lambda: next((v for k, v in self.fake.views.items() if k not in before), None))

    def upload(self, user: str, content: bytes, name: str = "devices.csv") -> None:
        view = self.open_modal(user)
        file = self.fake.add_file(content, name=name, filetype="csv", mimetype="text/csv")
        answer = self.ws.submit_view(user, view, {blocks.FILE_BLOCK: {blocks.FILE_BLOCK: file_input_value(file)}})
        assert answer.status_code == 200 and not answer.content.strip()

    def told(self, user: str, after: int, channel: str = OPS) -> str:
        """The next ephemeral message for ``user`` after the first ``after``."""
        return self.fake.wait_for(lambda: self.fake.ephemeral(channel, user)[after:])[0]["text"]

    def act(self, user: str, message: dict, action_id: str, value: str, *, team: str | None = None) -> Any:
        """A signed block_actions for ``action_id`` with ``value`` on ``message``, as a (tampered)
        client would send it: the action need not be on the message, the team need not be ours."""
        if not self.fake.has_user(user):
            self.fake.add_user(user)
        team = team or self.fake.team_id
        channel = self.store.get(1).channel
        payload = block_actions_payload(
            user={"id": user, "username": user.lower(), "name": user.lower(), "team_id": team},
            team={"id": team, "domain": "partner" if team != self.fake.team_id else self.fake.team_domain},
            api_app_id=self.fake.app_id,
            trigger_id=self.fake.issue_trigger(user),
            action={"action_id": action_id, "block_id": "tampered", "type": "button", "value": value,
                    "text": {"type": "plain_text", "text": "Go"}, "action_ts": f"{time.time():.6f}"},  # fmt: skip
            container={"type": "message", "message_ts": message["ts"], "channel_id": channel, "is_ephemeral": False},
            channel={"id": channel, "name": "iot-ops"},
            message=message,
            response_url=self.fake.response_url(channel=channel, user=user, message_ts=message["ts"], kind="actions"),
        )
        return self.ws.post(interaction_body(payload))


@pytest.fixture
def scenario(make_emulator, store_location):
    with slack_scenario(
        Scenario, make_emulator(product_keys=(PRODUCT, OTHER_PRODUCT), check_seconds=2, create_seconds=3), store_location,
        channels={OPS: {"name": "iot-ops"}, NOTICES: {"name": "iot-notices"}, PRIVATE: {"name": "secret-project", "private": True}},
        notify_channel=NOTICES, approvers=f"{BOB},S0LEADS", usergroups={"S0LEADS": [CAROL]}, bot_token=BOT_TOKEN,
    ) as scenario:
        yield scenario


# --- the conversation ----------------------------------------------------------------------------

#: Valid names that start like a formula (the platform allows - and @), and lines a spreadsheet
#: would run: they are rejected locally and so end up in the outcome CSV as the operator wrote them.
VALID_LOOKALIKES = ["-dash-0001", "@at-0002", "-1-1", "@host.lan:1"]
HOSTILE_LINES = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(1)", "\t=HYPERLINK(\"http://evil.example\")"]


def device_file() -> bytes:
    rows = ["DeviceName,DeviceNickname"]
    rows += [f"{name}," for name in VALID_LOOKALIKES]
    rows += [f"sec-{i:04d},Camera_{i}" for i in range(1, 19)]  # 22 devices in all: the outcome comes as a file
    rows += [f"{line}," for line in HOSTILE_LINES]
    rows += ["sec-0099,=1+2", "sec-0098,@Pump(1)"]  # formulas in the nickname column
    return ("\r\n".join(rows) + "\r\n").encode()


def converse(scenario: Scenario) -> tuple[list[str], list[str]]:
    """Upload, approve, register, credentials (refused, failed, sent), status. Returns the secrets
    and the bodies of the acks that answered commands."""
    fake, ws = scenario.fake, scenario.ws
    scenario.upload(ALICE, device_file())
    assert scenario.drive(1, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    ws.click(BOB, scenario.anchor(1), blocks.APPROVE)
    assert wait_until(lambda: scenario.store.get(1).state != State.AWAITING_APPROVAL)
    assert scenario.drive(1, State.DONE, State.FAILED) == State.DONE
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=600)

    ws.click(DAVE, scenario.anchor(1), blocks.CREDENTIALS)
    assert "Only" in scenario.told(DAVE, 0)
    fake.fail("files.upload", status=500)  # the first export fails half-way, after the secrets were fetched
    ws.click(ALICE, scenario.anchor(1), blocks.CREDENTIALS)
    assert "could not be sent" in fake.wait_for(lambda: [m for m in fake.dm(ALICE) if "could not be sent" in m.get("text", "")])[0]["text"]
    ws.click(ALICE, scenario.anchor(1), blocks.CREDENTIALS)
    fake.wait_for(lambda: [u for u in fake.uploads.values() if u.channel == fake.dm_channel(ALICE) and u.completed])
    before = len(fake.responses)
    status = ws.command(ALICE, OPS, "status 1")
    said = status.text or response_after(scenario, before)  # in the ack; after it with a database server
    assert status.status_code == 200 and "Request #1" in said
    scenario.bot.deps.background.shutdown(wait=True)  # every answer has been sent
    secrets = [d.device_secret for d in scenario.emulator.backend.devices(PRODUCT)]
    assert len(secrets) == 22 and all(secrets)
    return secrets, [status.text]


def credentials_upload(scenario: Scenario):
    (upload,) = [u for u in scenario.fake.uploads.values() if u.channel == scenario.fake.dm_channel(ALICE) and u.completed]
    return upload


def test_secrets_and_tokens_reach_no_message_no_upload_and_no_log_but_the_requesters_dm_file(scenario, caplog):
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):  # loggers with a level of their own too
        caplog.set_level(logging.DEBUG, logger=name)
    fake = scenario.fake
    secrets, acks = converse(scenario)
    needles = {f"the DeviceSecret of {d.device_name}": d.device_secret for d in scenario.emulator.backend.devices(PRODUCT)}
    needles |= {"the bot token": BOT_TOKEN, "the signing secret": SIGNING_SECRET, "the AccessKey secret": scenario.emulator.access_key_secret}

    allowed = credentials_upload(scenario)
    assert all(secret in allowed.content.decode() for secret in secrets)  # the one place they go

    # Everything the bot sent (messages, updates, ephemerals, views, files' metadata, replies to
    # commands), and the workspace as people see it: channels, threads, edits, DMs, ephemerals.
    slack_saw = [json.dumps(c.params, default=str) for c in fake.calls]
    slack_saw += [json.dumps(r.payload) for r in fake.responses] + acks
    slack_saw += [json.dumps(v) for v in fake.views.values()]
    slack_saw += [u.content.decode("utf-8", "replace") + u.title + (u.initial_comment or "") for u in fake.uploads.values() if u.id != allowed.id]
    for channel in (OPS, NOTICES):
        for message in fake.messages(channel):
            slack_saw += [json.dumps(message)] + [json.dumps(reply) for reply in fake.thread(channel, message["ts"])]
        slack_saw += [json.dumps(m) for user in (ALICE, BOB, CAROL, DAVE) for m in fake.ephemeral(channel, user)]
    slack_saw += [json.dumps(m) for user in (ALICE, BOB, CAROL, DAVE) for m in fake.dm(user)]
    logged = [r.getMessage() for r in caplog.records] + [caplog.text]

    assert any(r.name.startswith("slack_sdk") and r.levelno == logging.DEBUG for r in caplog.records)  # DEBUG was captured
    assert any(r.name.startswith("bot.") and r.levelno == logging.DEBUG for r in caplog.records)
    assert any("sending the credentials of request #1 failed" in line for line in logged)  # the failure's traceback too
    assert len([u for u in fake.uploads.values() if u.channel == OPS]) == 1  # the outcome file was searched
    for what, needle in needles.items():
        assert not [s for s in slack_saw if needle in s], f"{what} was sent to Slack outside the credentials file"
        assert not [s for s in logged if needle in s], f"{what} was logged"


# --- CSV files cannot run formulas ----------------------------------------------------------------


def cells_a_spreadsheet_would_run(text: str) -> list[tuple[int, str, str]]:
    """(row, column, cell) of every cell that starts like a formula and is not a valid DeviceName."""
    rows = list(csv.reader(io.StringIO(text.removeprefix("\ufeff"))))
    header = rows[0]
    return [
        (n, column, cell)
        for n, row in enumerate(rows[1:], 2)
        for column, cell in zip(header, row)
        if cell.startswith(FORMULA_START) and not (column == "DeviceName" and validate_name(cell) is None)
    ]


def column(text: str, name: str) -> list[str]:
    return [row[name] for row in csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))]


def test_the_files_the_bot_uploads_cannot_run_formulas_and_keep_device_names_exact(scenario):
    converse(scenario)
    (outcome,) = [u for u in scenario.fake.uploads.values() if u.channel == OPS]
    outcome_text = outcome.content.decode()
    assert cells_a_spreadsheet_would_run(outcome_text) == []
    names = column(outcome_text, "DeviceName")
    for line in HOSTILE_LINES:
        assert "'" + line.strip() in names  # shown as the operator wrote it, as text
    nicknames_refused = [r for r in csv.DictReader(io.StringIO(outcome_text)) if r["Outcome"] == report.REJECTED_LABEL]
    assert {"sec-0099", "sec-0098"} <= {r["DeviceName"] for r in nicknames_refused}  # under the device's name
    for name in VALID_LOOKALIKES:
        assert name in names  # byte for byte: a script reading this file back finds the device

    credentials_text = credentials_upload(scenario).content.decode()
    assert cells_a_spreadsheet_would_run(credentials_text) == []
    registered = {d.device_name: d.device_secret for d in scenario.emulator.backend.devices(PRODUCT)}
    rows = list(csv.DictReader(io.StringIO(credentials_text)))
    assert {(r["DeviceName"], r["DeviceSecret"]) for r in rows} == set(registered.items())
    assert set(VALID_LOOKALIKES) <= {r["DeviceName"] for r in rows}


#: Every way a cell can start a formula, for every free-text column.
HOSTILE_TEXT = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(1)", "\t=1+1", "\r=1+1", "=HYPERLINK(\"http://x\",\"y\")"]
#: Valid DeviceNames that start with - or @: kept byte for byte ("-1-1" too, though a spreadsheet
#: shows it as -2: a provisioning script reading the file back must find the device).
NAMES = ["-dash-0001", "@at-0002", "-1-1", "plain-0003", "@a.b:c-0004", "-dash-0005", "plain-0006"]


def report_of(tmp_path, nicknames, reasons, iot_ids, rejected) -> tuple[SqliteStore, int]:
    """A finished request whose devices came back from IoT Platform with these values."""
    store = SqliteStore(tmp_path / "report.db")
    request_id = store.create_request(
        product_key=PRODUCT, requester=ALICE, origin="slack", kind="names", count=len(NAMES), state=State.DONE,
        now=datetime(2026, 1, 5, tzinfo=timezone.utc), chunks=[len(NAMES)],
        devices=[(n, k, i) for i, (n, k) in enumerate(zip(NAMES, nicknames), 2)],
        rejected=[(20 + i, value, reason) for i, (value, reason) in enumerate(rejected)],
    )  # fmt: skip
    store.set_outcomes(
        request_id, [(n, Outcome.NOT_CREATED if i % 2 else Outcome.CREATED, r, d) for i, (n, r, d) in enumerate(zip(NAMES, reasons, iot_ids))]
    )
    return store, request_id


def test_outcome_and_credentials_csv_neutralise_every_formula_from_the_platform(tmp_path):
    # Nicknames, reasons and IotIds come back from IoT Platform: as far as iotreg knows, anything.
    nicknames = [None, "=1+1", "+Pump", "-Pump 3", "@Pump(4)", "\tPump", "\rPump"]
    store, request_id = report_of(tmp_path, nicknames, HOSTILE_TEXT, HOSTILE_TEXT[::-1], zip(HOSTILE_TEXT, HOSTILE_TEXT))
    written = tmp_path / "outcomes.csv"
    report.write_outcomes(written, store, request_id)
    for text in (report.outcomes_csv(store, request_id), written.read_bytes().decode("utf-8-sig")):
        assert cells_a_spreadsheet_would_run(text) == []
        rows = list(csv.DictReader(io.StringIO(text)))
        devices, rejected = rows[: len(NAMES)], rows[len(NAMES) :]
        assert [r["DeviceName"] for r in devices] == NAMES  # byte for byte
        assert [r["DeviceNickname"] for r in devices] == [""] + ["'" + k for k in nicknames[1:]]
        assert [r["Reason"] for r in devices] == ["'" + v for v in HOSTILE_TEXT]
        assert [r["IotId"] for r in devices] == ["'" + v for v in reversed(HOSTILE_TEXT)]
        assert [r["DeviceName"] for r in rejected] == [r["Reason"] for r in rejected] == ["'" + v for v in HOSTILE_TEXT]
    store.close()

    credentials = "".join(report.credentials_csv([(PRODUCT, n, "s3cretAbc0123", v) for n, v in zip(NAMES, HOSTILE_TEXT)]))
    assert cells_a_spreadsheet_would_run(credentials) == []
    rows = list(csv.DictReader(io.StringIO(credentials)))
    assert [r["DeviceName"] for r in rows] == NAMES and {r["DeviceSecret"] for r in rows} == {"s3cretAbc0123"}
    assert [r["IotId"] for r in rows] == ["'" + v for v in HOSTILE_TEXT]


def test_only_the_devicename_column_keeps_name_shaped_values_that_start_like_a_formula(tmp_path):
    name_shaped = ["-Pump", "@Pump", "-1-1", "@A1:A9", "-Pump", "@Pump", "-1-1"]
    store, request_id = report_of(tmp_path, [None, *name_shaped[1:]], name_shaped, name_shaped, [])
    text = report.outcomes_csv(store, request_id)
    store.close()
    assert cells_a_spreadsheet_would_run(text) == []


def test_a_line_refused_for_its_nickname_is_listed_under_its_device_name(tmp_path):
    from bot.names import read_device_file

    devices = read_device_file(b"DeviceName,DeviceNickname\nok-0001,Pump_1\nsec-0099,=1+2\n")
    store = SqliteStore(tmp_path / "report.db")
    request_id = store.create_request(
        product_key=PRODUCT, requester=ALICE, origin="slack", kind="names", count=1, state=State.DONE,
        now=datetime(2026, 1, 5, tzinfo=timezone.utc), chunks=[1], devices=[("ok-0001", "Pump_1", 2)],
        rejected=[(r.line, r.value, r.reason) for r in devices.rejected],
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(report.outcomes_csv(store, request_id))))
    store.close()
    (refused,) = [r for r in rows if r["Line"] == "3"]
    assert refused["DeviceName"] == "sec-0099"  # today: "'=1+2", the nickname


# --- clicks and submissions Slack would not send ------------------------------------------------------


def awaiting(scenario: Scenario, requester: str, names: str) -> int:
    """A request by ``requester`` for ``names``, waiting for approval; returns its number."""
    answer = scenario.ws.command(requester, OPS, f"register {PRODUCT} {names}")
    assert answer.status_code == 200
    request_id = scenario.store.requests(limit=1)[0].id  # stored before the ack
    assert scenario.drive(request_id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    return request_id


def test_a_click_from_another_workspaces_user_approves_nothing_and_is_told_why(scenario):
    first = awaiting(scenario, ALICE, "ext-0001 ext-0002")
    anchor = scenario.anchor(first)
    for action_id in (blocks.APPROVE, blocks.REJECT, blocks.CANCEL):
        seen = len(scenario.fake.ephemeral(OPS, "U0PARTNER"))
        assert scenario.act("U0PARTNER", anchor, action_id, str(first), team="T0PARTNER").status_code == 200
        told = scenario.told("U0PARTNER", seen)
        assert "not one of the approvers" in told or "Only" in told
    assert scenario.store.get(first).state == State.AWAITING_APPROVAL
    assert "approval_denied" in [e.event for e in scenario.store.audit(first)]
    scenario.jobs.run_due()
    assert scenario.emulator.backend.devices(PRODUCT) == []


def test_a_non_approver_cannot_reach_another_request_by_changing_a_buttons_value(scenario):
    mine = awaiting(scenario, ALICE, "mine-0001")
    theirs = awaiting(scenario, ERIN, "theirs-0001 theirs-0002")
    anchor = scenario.anchor(mine)
    refusals = {blocks.APPROVE: "not one of the approvers", blocks.REJECT: "not one of the approvers",
                blocks.CANCEL: f"Only <@{ERIN}> or an approver", blocks.RETRY_VALID: f"Only <@{ERIN}> or an approver",
                blocks.CREDENTIALS: f"Only <@{ERIN}> and the approvers"}  # fmt: skip
    for clicker in (DAVE, ALICE):  # a bystander, and the requester of the other request
        for action_id, refusal in refusals.items():
            seen = len(scenario.fake.ephemeral(OPS, clicker))
            assert scenario.act(clicker, anchor, action_id, str(theirs)).status_code == 200
            assert refusal in scenario.told(clicker, seen), (clicker, action_id)
    assert scenario.store.get(theirs).state == State.AWAITING_APPROVAL
    assert scenario.store.get(mine).state == State.AWAITING_APPROVAL
    assert [e.event for e in scenario.store.audit(theirs)].count("approval_denied") == 2
    assert not scenario.fake.dm(DAVE) and not scenario.fake.dm(ALICE)  # no credentials went anywhere
    scenario.jobs.run_due()
    assert scenario.emulator.backend.devices(PRODUCT) == []


def forge(scenario: Scenario, user: str, metadata: dict, names: str = "forged-0001") -> Any:
    """``user`` submits a modal whose private_metadata was rewritten to ``metadata`` (signed)."""
    view = scenario.open_modal(user)
    view["private_metadata"] = json.dumps(metadata)
    payload = view_submission_payload(
        user={"id": user, "username": user.lower(), "name": user.lower(), "team_id": scenario.fake.team_id},
        team={"id": scenario.fake.team_id, "domain": scenario.fake.team_domain},
        api_app_id=scenario.fake.app_id,
        trigger_id=scenario.fake.issue_trigger(user),
        view=view,
        values={blocks.NAMES_BLOCK: {blocks.NAMES_BLOCK: plain_text_value(names)}},
    )
    return scenario.ws.post(interaction_body(payload))


ELSEWHERE = {"channel": PRIVATE, "user": ALICE, "product_key": OTHER_PRODUCT, "draft": "0123456789ab"}


def test_a_forged_submission_for_another_channel_and_product_registers_and_approves_nothing(scenario):
    answer = forge(scenario, DAVE, ELSEWHERE)
    assert answer.status_code == 200
    if wait_until(lambda: scenario.store.get(1) is not None, timeout=2):  # today it is opened (see below)
        scenario.jobs.run_until(lambda: scenario.store.get(1).state != State.CHECKING)
        assert scenario.store.get(1).state == State.AWAITING_APPROVAL  # an approver still has to say yes
        scenario.emulator.clock.advance(3 * 3600)  # past the approval TTL: nobody did
        scenario.jobs.run_until(lambda: scenario.store.get(1).final)
        assert scenario.store.get(1).state == State.EXPIRED
        assert "approved" not in [e.event for e in scenario.store.audit(1)]
    assert scenario.emulator.backend.devices(OTHER_PRODUCT) == []
    assert scenario.emulator.backend.devices(PRODUCT) == []


def test_a_forged_submission_for_another_channel_is_refused_in_the_modal(scenario):
    answer = forge(scenario, DAVE, ELSEWHERE)
    scenario.jobs.run_due()
    assert answer.status_code == 200 and answer.content.strip(), "the modal closed: the forged context was taken"
    assert answer.json()["response_action"] == "errors"
    assert scenario.store.get(1) is None and not scenario.fake.messages(PRIVATE)


def test_a_product_key_can_never_ping_a_channel():
    """Whatever reaches a message as a ProductKey (the modal now refuses such a key) is shown, not run."""
    from bot.domain import Summary

    now = datetime(2026, 1, 5, tzinfo=timezone.utc)
    request = Request(
        id=1, product_key="<!channel>", requester=ALICE, origin=Origin.SLACK, channel=OPS, kind=Kind.NAMES, count=2,
        rejected_count=0, state=State.DONE, reason=None, decided_by=BOB, decided_at=now, expires_at=None, retry_of=None,
        polls=0, phase_started_at=now, errors_in_row=0, created_at=now, updated_at=now,
    )
    summary = Summary(request, 2, 0, 0, 0, 0)
    text, content = blocks.anchor(request, summary)
    assert "<!channel>" not in text + json.dumps(content) + blocks.notice(summary)
