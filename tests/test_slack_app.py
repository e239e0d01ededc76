"""The Slack front end as people use it: signed requests over HTTP to the real Bolt app, a local fake
Slack recording everything the bot sends, and the IoT Platform emulator behind it.

The workflow's steps run when a test says so (``scenario.drive``), on the emulator's manual clock;
what Bolt's listeners do after their ack is waited for as a condition.
"""

from __future__ import annotations

import csv
import io
import threading
import time

import pytest
from support import SIGNING_SECRET, SlackScenario, buttons, response_after, slack_scenario, text_of

from bot.domain import State
from bot.slack import blocks
from bot.standins.slack import Workspace, file_input_value, plain_text_value

OPS, NOTICES = "C0OPS", "C0NOTICES"
ALICE, BOB, CAROL, DAVE = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"


class Scenario(SlackScenario):
    def upload_devices(self, user: str, content: bytes, name: str = "devices.csv", product_key: str | None = None) -> None:
        """``user`` runs /devices register, and submits the modal with a file."""
        answer = self.ws.command(user, OPS, f"register {product_key or self.emulator.product_key}")
        assert answer.status_code == 200
        view = self.fake.wait_for(lambda: next(iter(self.fake.views.values()), None))
        file = self.fake.add_file(content, name=name, filetype=name.rsplit(".", 1)[-1], mimetype="text/csv")
        submitted = self.ws.submit_view(user, view, {blocks.FILE_BLOCK: {blocks.FILE_BLOCK: file_input_value(file)}})
        assert submitted.status_code == 200 and not submitted.content.strip()


@pytest.fixture
def scenario(make_emulator, store_location):
    with slack_scenario(
        Scenario, make_emulator(check_seconds=2, create_seconds=3), store_location,
        channels={OPS: {"name": "iot-ops"}, NOTICES: {"name": "iot-notices"}},
        notify_channel=NOTICES, approvers=f"{BOB},S0LEADS", usergroups={"S0LEADS": [CAROL]},
    ) as scenario:
        yield scenario


def sample_file(n: int, prefix: str = "cam", bad: bool = True) -> bytes:
    rows = ["DeviceName,DeviceNickname"] + [f"{prefix}-{i:04d},camera_{i}" for i in range(1, n + 1)]
    if bad:
        rows += ["ab,", "bad#name,"]
    return ("\n".join(rows) + "\n").encode()


# -- the conversation ----------------------------------------------------------------------------


def test_the_whole_conversation_from_upload_to_registered_devices(scenario):
    fake, ws = scenario.fake, scenario.ws
    answer = ws.command(ALICE, OPS, f"register {scenario.emulator.product_key}")
    assert answer.status_code == 200 and answer.elapsed.total_seconds() < 1.0
    view = fake.wait_for(lambda: next(iter(fake.views.values()), None))
    assert view["callback_id"] == blocks.VIEW_REGISTER and scenario.emulator.product_key in str(view["blocks"])

    file = fake.add_file(sample_file(30), name="line-4.csv", filetype="csv", mimetype="text/csv")
    submitted = ws.submit_view(ALICE, view, {blocks.FILE_BLOCK: {blocks.FILE_BLOCK: file_input_value(file)}})
    assert submitted.status_code == 200 and submitted.elapsed.total_seconds() < 1.0
    request = scenario.request(1)
    assert fake.downloads[-1].authorization == f"Bearer {fake.bot_token}"
    assert (request.requester, request.channel, request.count, request.rejected_count) == (ALICE, OPS, 30, 2)

    assert scenario.drive(1, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    anchor = scenario.anchor(1)
    assert set(buttons(anchor)) == {blocks.APPROVE, blocks.REJECT}
    assert buttons(anchor)[blocks.APPROVE]["style"] == "primary"
    assert buttons(anchor)[blocks.REJECT]["style"] == "danger"  # it opens a form: the confirmation
    assert "Waiting for approval" in text_of(anchor) and f"<@{ALICE}>" in text_of(anchor)
    skipped = text_of(scenario.replies(1)[0])
    assert "2 lines" in skipped and "line 32" in skipped and "bad#name" in skipped

    ws.click(BOB, anchor, blocks.APPROVE)
    assert scenario.wait_state(1, State.APPROVED) == State.APPROVED
    assert scenario.drive(1, State.DONE, State.FAILED) == State.DONE
    anchor = scenario.anchor(1)
    assert blocks.APPROVE not in buttons(anchor) and blocks.CREDENTIALS in buttons(anchor)
    assert f"Approved by <@{BOB}>" in text_of(anchor) and "*30* registered" in text_of(anchor)
    result = [r for r in scenario.replies(1) if "Request #1:" in text_of(r)]
    assert len(result) == 1 and "30 registered" in text_of(result[0])
    assert blocks.IOT_IDS_AFTER_FILE in text_of(result[0])  # the result did not wait for the pages of IotIds
    uploads = [u for u in fake.uploads.values() if u.channel == OPS]
    assert len(uploads) == 1 and uploads[0].thread_ts == scenario.store.get(1).origin_data.get("thread_ts")
    rows = list(csv.DictReader(io.StringIO(uploads[0].content.decode())))
    assert len(rows) == 32 and {r["Outcome"] for r in rows} == {"registered", "rejected locally"}
    assert len(fake.messages(NOTICES)) == 1 and "#1" in fake.messages(NOTICES)[0]["text"]
    assert len(scenario.emulator.backend.devices(scenario.emulator.product_key)) == 30


def test_credentials_go_by_dm_to_requester_and_approvers_only_and_never_to_a_channel(scenario):
    fake, ws = scenario.fake, scenario.ws
    scenario.upload_devices(ALICE, sample_file(3, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    ws.click(BOB, scenario.anchor(1), blocks.APPROVE)
    scenario.wait_state(1, State.APPROVED)
    scenario.drive(1, State.DONE)

    ws.click(DAVE, scenario.anchor(1), blocks.CREDENTIALS)
    refusal = fake.wait_for(lambda: fake.ephemeral(OPS, DAVE))
    assert "Only" in refusal[-1]["text"] and not fake.dm(DAVE)

    ws.click(ALICE, scenario.anchor(1), blocks.CREDENTIALS)
    fake.wait_for(lambda: [u for u in fake.uploads.values() if u.channel == fake.dm_channel(ALICE) and u.completed])
    dm_upload = next(u for u in fake.uploads.values() if u.channel == fake.dm_channel(ALICE))
    rows = list(csv.DictReader(io.StringIO(dm_upload.content.decode())))
    secrets = {d.device_name: d.device_secret for d in scenario.emulator.backend.devices(scenario.emulator.product_key)}
    assert {(r["DeviceName"], r["DeviceSecret"]) for r in rows} == set(secrets.items())
    assert "arrive in a direct message" in fake.wait_for(lambda: fake.ephemeral(OPS, ALICE))[-1]["text"]
    everything_in_channels = str([fake.messages(c) for c in (OPS, NOTICES)]) + str(
        [(u.content, u.initial_comment) for u in fake.uploads.values() if u.channel in (OPS, NOTICES)]
    ) + str([fake.thread(OPS, m["ts"]) for m in fake.messages(OPS)])
    assert not any(secret in everything_in_channels for secret in secrets.values())


def test_a_failed_check_lists_the_reasons_and_offers_a_retry_with_the_valid_names(scenario):
    backend, pk = scenario.emulator.backend, scenario.emulator.product_key
    backend.add_device(pk, "cam-0002")
    scenario.upload_devices(ALICE, sample_file(4, bad=False))
    assert scenario.drive(1, State.CHECK_FAILED, State.AWAITING_APPROVAL) == State.CHECK_FAILED
    reply = scenario.replies(1)[-1]
    assert "cam-0002" in text_of(reply) and "refused 1 name" in text_of(reply)
    assert set(buttons(reply)) == {blocks.RETRY_VALID, blocks.CANCEL}
    assert buttons(reply)[blocks.RETRY_VALID]["text"]["text"] == "Retry with the 3 valid names"

    scenario.ws.click(ALICE, reply, blocks.RETRY_VALID)
    retry = scenario.request(2)
    assert retry.retry_of == 1 and retry.count == 3 and retry.channel == OPS
    assert scenario.drive(2, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    scenario.ws.click(CAROL, scenario.anchor(2), blocks.APPROVE)  # CAROL approves through the S0LEADS group
    scenario.wait_state(2, State.APPROVED)
    assert scenario.drive(2, State.DONE) == State.DONE


def test_rejection_replaces_the_buttons_and_registers_nothing(scenario):
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.ws.click(BOB, scenario.anchor(1), blocks.REJECT)
    form = scenario.fake.wait_for(lambda: next((v for v in scenario.fake.views.values() if v["callback_id"] == blocks.VIEW_REJECT), None))
    assert scenario.store.get(1).state == State.AWAITING_APPROVAL  # nothing happens until the form is sent
    scenario.ws.submit_view(BOB, form, {blocks.REASON_BLOCK: {blocks.REASON_BLOCK: plain_text_value("wrong product: use the sandbox")}})
    scenario.wait_state(1, State.REJECTED)
    scenario.jobs.run_due()
    anchor = scenario.anchor(1)
    assert not buttons(anchor) and f"Rejected by <@{BOB}>" in text_of(anchor)
    assert "wrong product: use the sandbox" in text_of(anchor)
    notice = scenario.fake.messages(NOTICES)[-1]["text"]
    assert "rejected by" in notice and "wrong product: use the sandbox" in notice
    rejected = [e for e in scenario.store.audit(1) if e.event == "rejected"]
    assert rejected[0].actor == BOB and rejected[0].detail["reason"] == "wrong product: use the sandbox"
    assert scenario.emulator.backend.devices(scenario.emulator.product_key) == []


def test_someone_who_may_not_approve_is_told_why_and_nothing_changes(scenario):
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.ws.click(DAVE, scenario.anchor(1), blocks.APPROVE)
    told = scenario.fake.wait_for(lambda: scenario.fake.ephemeral(OPS, DAVE))
    assert "not one of the approvers" in told[-1]["text"]
    assert scenario.store.get(1).state == State.AWAITING_APPROVAL
    assert [e.event for e in scenario.store.audit(1)][-1] == "approval_denied"


def test_the_requester_cannot_approve_their_own_request(scenario):
    scenario.env["IOTREG_APPROVERS"] = ALICE  # even when listed as an approver
    scenario.stop_bot()
    scenario.start_bot()
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.ws.click(ALICE, scenario.anchor(1), blocks.APPROVE)
    told = scenario.fake.wait_for(lambda: scenario.fake.ephemeral(OPS, ALICE))
    assert "someone else has to approve it" in told[-1]["text"]
    assert scenario.store.get(1).state == State.AWAITING_APPROVAL


def test_two_approvers_clicking_at_once_register_once(scenario):
    scenario.upload_devices(ALICE, sample_file(3, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    anchor = scenario.anchor(1)  # both see the same message
    clicks = [threading.Thread(target=scenario.ws.click, args=(who, anchor, blocks.APPROVE)) for who in (BOB, CAROL, BOB)]
    for click in clicks:
        click.start()
    for click in clicks:
        click.join()
    told = scenario.fake.wait_for(lambda: len(scenario.fake.ephemeral(OPS, BOB) + scenario.fake.ephemeral(OPS, CAROL)) >= 2 or None)
    assert told and all("already approved" in m["text"] for m in scenario.fake.ephemeral(OPS, BOB) + scenario.fake.ephemeral(OPS, CAROL))
    assert scenario.drive(1, State.DONE) == State.DONE
    apply_id = scenario.store.chunks(1)[0].apply_id
    assert scenario.emulator.backend.application(apply_id).register_calls == 1
    assert [e.event for e in scenario.store.audit(1)].count("approved") == 1


def test_an_unanswered_request_expires_and_the_message_says_so(scenario):
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.emulator.clock.advance(3600)
    assert scenario.drive(1, State.EXPIRED) == State.EXPIRED
    assert not buttons(scenario.anchor(1)) and "Expired" in text_of(scenario.anchor(1))
    anchor = scenario.anchor(1)
    with_buttons = {**next(v for v in anchor["history"] if blocks.APPROVE in buttons(v)), "ts": anchor["ts"]}
    scenario.ws.click(BOB, with_buttons, blocks.APPROVE)  # from a client that had not refreshed
    assert "expired" in scenario.fake.wait_for(lambda: scenario.fake.ephemeral(OPS, BOB))[-1]["text"]


def test_buttons_on_old_messages_work_after_a_restart(scenario):
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    anchor = scenario.anchor(1)
    scenario.stop_bot()
    scenario.start_bot()  # a new process over the same database
    scenario.ws.click(BOB, anchor, blocks.APPROVE)
    scenario.wait_state(1, State.APPROVED)
    assert scenario.drive(1, State.DONE) == State.DONE
    assert "*2* registered" in text_of(scenario.anchor(1))


def test_a_click_for_a_request_that_does_not_exist_is_answered(scenario):
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.ws.click(BOB, scenario.anchor(1), blocks.APPROVE, value="999")
    assert "no longer exists" in scenario.fake.wait_for(lambda: scenario.fake.ephemeral(OPS, BOB))[-1]["text"]


# -- commands --------------------------------------------------------------------------------------


def test_names_typed_after_the_command_need_no_modal(scenario):
    answer = scenario.ws.command(ALICE, OPS, f"register {scenario.emulator.product_key} inline-0001 inline-0002 no")
    assert answer.status_code == 200 and "checking 2 names" in answer.text
    request = scenario.request(1)
    assert request.count == 2 and request.rejected_count == 1
    assert scenario.drive(1, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    assert not scenario.fake.views


def test_platform_named_devices_from_a_count(scenario):
    answer = scenario.ws.command(ALICE, OPS, f"register {scenario.emulator.product_key} --count 5")
    assert "5 devices" in answer.text
    scenario.request(1)
    scenario.jobs.run_due()
    scenario.ws.click(BOB, scenario.anchor(1), blocks.APPROVE)
    scenario.wait_state(1, State.APPROVED)
    assert scenario.drive(1, State.DONE) == State.DONE
    created = scenario.emulator.backend.devices(scenario.emulator.product_key)
    assert len(created) == 5
    result = text_of(results_in_thread(scenario)[0])
    # Named by the platform: only the pages name them, so the result waits for them and lists their IotIds.
    assert all(f"{d.device_name}` · {d.iot_id}" in result for d in created) and "IotIds are read" not in result


@pytest.mark.parametrize("text", ["", "help", "frobnicate", "register 12", "status"])
def test_help_and_mistakes_get_a_short_usage(scenario, text):
    answer = scenario.ws.command(ALICE, OPS, text)
    assert answer.status_code == 200
    assert "/devices register" in answer.text


def test_a_malformed_product_key_is_refused_at_once(scenario):
    answer = scenario.ws.command(ALICE, OPS, "register not-a-key!")
    assert "is not a ProductKey" in answer.text and not scenario.fake.views


def answered(scenario, user: str, text: str) -> str:
    """What /devices answered: in its ack, or after it through the command's response_url."""
    before = len(scenario.fake.responses)
    ack = scenario.ws.command(user, OPS, text)
    assert ack.status_code == 200
    if ack.content:  # Bolt acks a text-only answer as text/plain, one with blocks as JSON
        return ack.json()["text"] if "json" in ack.headers.get("Content-Type", "") else ack.text
    return response_after(scenario, before)


@pytest.mark.parametrize(
    ("fault", "said"),
    [({"status": 429, "retry_after": 0}, "`ratelimited`"), ({"status": 503}, "HTTP 503"), ({"error": "expired_trigger_id"}, "`expired_trigger_id`")],
)
def test_a_form_slack_will_not_open_is_explained_through_the_response_url(scenario, fault, said):
    scenario.fake.fail("views.open", times=10, **fault)  # through every one of slack-sdk's retries
    product_key = scenario.emulator.product_key
    before = len(scenario.fake.responses)
    assert scenario.ws.command(ALICE, OPS, f"register {product_key}").status_code == 200
    text = response_after(scenario, before, timeout=15)
    assert text.startswith(f"The registration form could not be opened: Slack answered {said}. Nothing was registered.")
    assert f"`/devices register {product_key} name1 name2 …`" in text
    assert not scenario.fake.views


def test_status_list_and_cancel(scenario):
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    apply_id = scenario.store.chunks(1)[0].apply_id
    for ref in ("1", "#1", str(apply_id)):
        assert "Request #1" in answered(scenario, DAVE, f"status {ref}")
    assert "no request or ApplyId" in answered(scenario, DAVE, "status 4242")
    assert "#1" in answered(scenario, DAVE, "list")
    assert "Only" in answered(scenario, DAVE, "cancel 1")
    assert "cancelled" in answered(scenario, ALICE, "cancel 1")
    assert scenario.store.get(1).state == State.CANCELLED


def test_a_request_from_another_channel_is_not_shown_to_just_anyone(scenario):
    scenario.fake.add_channel("C0PRIVATE", "secret-project", private=True)
    scenario.ws.command(ALICE, "C0PRIVATE", f"register {scenario.emulator.product_key} hidden-0001")
    scenario.request(1)
    assert "no request or ApplyId" in answered(scenario, DAVE, "status 1")
    assert "Request #1" in answered(scenario, BOB, "status 1")  # an approver


def test_commands_answer_within_the_ack_even_when_slack_is_slow_to_resolve_groups(scenario):
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.fake.delay("usergroups.users.list", 4.0)
    before = len(scenario.fake.responses)
    answer = scenario.ws.command(DAVE, OPS, "cancel 1")
    assert answer.status_code == 200 and answer.elapsed.total_seconds() < 1.0
    assert "Only" in response_after(scenario, before, timeout=15)


def test_a_status_that_needs_the_approver_group_is_answered_after_the_ack_not_in_it(scenario):
    scenario.fake.add_channel("C0PRIVATE", "secret-project", private=True)
    scenario.ws.command(ALICE, "C0PRIVATE", f"register {scenario.emulator.product_key} hidden-0001")
    scenario.request(1)
    scenario.fake.delay("usergroups.users.list", 4.0)
    before = len(scenario.fake.responses)
    answer = scenario.ws.command(DAVE, OPS, "status 1")  # another channel's request: is Dave an approver?
    assert answer.status_code == 200 and answer.elapsed.total_seconds() < 1.0 and not answer.content
    later = response_after(scenario, before, timeout=15)
    assert "no request or ApplyId" in later
    # The group is cached now: the next answer needs no Slack call, and comes in the ack (on an
    # embedded database; with a database server every query is answered after the ack).
    if scenario.bot.workflow.requests.reads_in_process:
        assert "no request or ApplyId" in scenario.ws.command(DAVE, OPS, "status 1").text
    else:
        assert "no request or ApplyId" in answered(scenario, DAVE, "status 1")


def test_status_and_list_of_big_requests_are_counted_after_the_ack_not_in_it(scenario):
    scenario.ws.command(ALICE, OPS, f"register {scenario.emulator.product_key} --count 60000")
    scenario.request(1)
    for text in ("status 1", "list"):
        before = len(scenario.fake.responses)
        answer = scenario.ws.command(ALICE, OPS, text)
        assert answer.status_code == 200 and not answer.content  # acked at once, empty
        later = response_after(scenario, before)
        assert "#1" in later and "60,000" in later


# -- the modal and the file ------------------------------------------------------------------------


def test_an_empty_modal_is_answered_with_a_field_error(scenario):
    scenario.ws.command(ALICE, OPS, f"register {scenario.emulator.product_key}")
    view = scenario.fake.wait_for(lambda: next(iter(scenario.fake.views.values()), None))
    answer = scenario.ws.submit_view(ALICE, view, {})
    assert answer.json()["response_action"] == "errors" and blocks.NAMES_BLOCK in answer.json()["errors"]
    assert scenario.store.get(1) is None


def test_pasted_names_in_the_modal(scenario):
    scenario.ws.command(ALICE, OPS, f"register {scenario.emulator.product_key}")
    view = scenario.fake.wait_for(lambda: next(iter(scenario.fake.views.values()), None))
    scenario.ws.submit_view(ALICE, view, {blocks.NAMES_BLOCK: {blocks.NAMES_BLOCK: plain_text_value("paste-0001\npaste-0002")}})
    assert scenario.request(1).count == 2


def test_a_broken_file_is_explained_to_the_uploader_only(scenario):
    scenario.upload_devices(ALICE, b"<!DOCTYPE html><html>nope</html>", name="devices.csv")
    told = scenario.fake.wait_for(lambda: scenario.fake.ephemeral(OPS, ALICE))
    assert "HTML page" in told[-1]["text"] or "web page" in told[-1]["text"]
    assert scenario.store.get(1) is None and not scenario.fake.messages(OPS)


def test_a_file_on_another_host_is_never_fetched_with_the_token(scenario):
    scenario.ws.command(ALICE, OPS, f"register {scenario.emulator.product_key}")
    view = scenario.fake.wait_for(lambda: next(iter(scenario.fake.views.values()), None))
    file = scenario.fake.add_file(b"evil-0001\n", name="devices.csv")
    file = {**file, "url_private_download": "http://203.0.113.9/steal/devices.csv", "url_private": "http://203.0.113.9/steal"}
    scenario.ws.submit_view(ALICE, view, {blocks.FILE_BLOCK: {blocks.FILE_BLOCK: file_input_value(file)}})
    told = scenario.fake.wait_for(lambda: scenario.fake.ephemeral(OPS, ALICE))
    assert "not on Slack's file servers" in told[-1]["text"]
    assert scenario.store.get(1) is None


def test_a_redirect_away_from_slack_is_not_followed(scenario):
    scenario.ws.command(ALICE, OPS, f"register {scenario.emulator.product_key}")
    view = scenario.fake.wait_for(lambda: next(iter(scenario.fake.views.values()), None))
    file = scenario.fake.add_file(b"redir-0001\n", name="devices.csv")
    scenario.fake.add_redirect(file["url_private_download"], "http://203.0.113.9/collect")
    scenario.ws.submit_view(ALICE, view, {blocks.FILE_BLOCK: {blocks.FILE_BLOCK: file_input_value(file)}})
    assert "not on Slack's file servers" in scenario.fake.wait_for(lambda: scenario.fake.ephemeral(OPS, ALICE))[-1]["text"]


# -- trust and failure --------------------------------------------------------------------------------


@pytest.mark.parametrize("forgery", ["unsigned", "bad_signature", "expired"])
def test_forged_or_stale_requests_are_refused_with_401(scenario, forgery):
    ws = scenario.ws
    if forgery == "expired":
        ws = Workspace(scenario.fake, SIGNING_SECRET, app_url=scenario.ws.app_url, clock=lambda: time.time() - 600)
    answer = ws.command(ALICE, OPS, f"register {scenario.emulator.product_key} a-forged-1", sign=forgery != "unsigned", bad_signature=forgery == "bad_signature")
    assert answer.status_code == 401
    assert scenario.store.get(1) is None


def test_slack_outages_delay_messages_but_lose_none_and_post_none_twice(scenario):
    scenario.fake.fail("chat.postMessage", status=503, times=4)
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.jobs.run_until(lambda: bool(scenario.store.get(1).origin_data.get("thread_ts")), timeout=600)
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=600)
    anchors = [m for m in scenario.fake.messages(OPS) if "Device registration #1" in m.get("text", "")]
    assert len(anchors) == 1 and set(buttons(anchors[0])) == {blocks.APPROVE, blocks.REJECT}


def test_health_endpoint(scenario):
    import requests

    answer = requests.get(f"http://127.0.0.1:{scenario.server.server_port}/healthz", timeout=5)
    assert answer.status_code == 200 and answer.json()["database"] == "ok"


def test_health_is_503_while_the_database_does_not_answer_and_200_once_it_does(scenario, monkeypatch):
    import requests

    from bot.store import StoreUnavailable

    url = f"http://127.0.0.1:{scenario.server.server_port}/healthz"
    store = scenario.bot.workflow.store

    def gone() -> None:
        raise StoreUnavailable("lost the database at db.test:5432/iotreg: server closed the connection")

    with monkeypatch.context() as patch:
        patch.setattr(store, "ping", gone)
        answer = requests.get(url, timeout=5)
        assert answer.status_code == 503 and answer.json()["database"] == "unavailable"
        assert "5432" not in answer.text  # the body says what is down, not where
    answer = requests.get(url, timeout=5)
    assert answer.status_code == 200 and answer.json()["database"] == "ok"


# -- what review found: permanent errors, partial deliveries, double clicks -------------------------


def finish_one(scenario, n: int = 2, bad: bool = False) -> None:
    scenario.upload_devices(ALICE, sample_file(n, bad=bad))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.ws.click(BOB, scenario.anchor(1), blocks.APPROVE)
    scenario.wait_state(1, State.APPROVED)
    scenario.drive(1, State.DONE)


def results_in_thread(scenario) -> list[dict]:
    return [r for r in scenario.replies(1) if "Request #1:" in text_of(r)]


def test_a_notice_channel_the_bot_is_not_in_does_not_repeat_the_result(scenario):
    scenario.fake.add_channel(NOTICES, "iot-notices", bot_member=False)
    finish_one(scenario, n=25)
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=3600)
    assert len(results_in_thread(scenario)) == 1
    assert len([u for u in scenario.fake.uploads.values() if u.channel == OPS]) == 1
    assert "notice_failed" in [e.event for e in scenario.store.audit(1)]


def test_a_result_file_that_fails_to_upload_is_sent_later_without_repeating_the_reply(scenario):
    scenario.fake.fail("files.getUploadURLExternal", error="internal_error", times=2)
    finish_one(scenario, n=25)
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=3600)
    assert len(results_in_thread(scenario)) == 1
    assert len([u for u in scenario.fake.uploads.values() if u.channel == OPS and u.completed]) == 1


def test_a_channel_the_bot_is_not_in_is_explained_to_the_requester_by_dm(scenario):
    scenario.fake.add_channel("C0NOBOT", "no-bot-here", bot_member=False)
    answer = scenario.ws.command(ALICE, "C0NOBOT", f"register {scenario.emulator.product_key} lonely-0001")
    assert answer.status_code == 200
    scenario.request(1)
    scenario.jobs.run_until(lambda: bool(scenario.fake.dm(ALICE)), timeout=60)
    assert "/invite @iotreg" in scenario.fake.dm(ALICE)[-1]["text"]
    scenario.jobs.run_until(lambda: False, timeout=30)
    assert scenario.store.get(1).state == State.CANCELLED
    assert not list(scenario.store.pending_events())


def test_a_deleted_request_message_is_posted_again(scenario):
    from slack_sdk import WebClient

    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    old = scenario.anchor(1)
    WebClient(token=scenario.fake.bot_token, base_url=scenario.fake.api_url).chat_delete(channel=OPS, ts=old["ts"])
    scenario.ws.click(BOB, old, blocks.APPROVE, channel=OPS)  # from a client that still shows it
    scenario.wait_state(1, State.APPROVED)
    scenario.drive(1, State.DONE)
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=600)
    assert scenario.store.get(1).origin_data.get("thread_ts") != old["ts"]
    assert "*2* registered" in text_of(scenario.anchor(1))


def test_a_double_click_on_the_credentials_button_sends_one_file(scenario):
    finish_one(scenario)
    scenario.fake.delay("conversations.open", 1.0)  # the export takes a moment
    anchor = scenario.anchor(1)
    first = scenario.ws.click(ALICE, anchor, blocks.CREDENTIALS)
    second = scenario.ws.click(ALICE, anchor, blocks.CREDENTIALS)
    assert first.elapsed.total_seconds() < 1.0 and second.elapsed.total_seconds() < 1.0
    told = scenario.fake.wait_for(lambda: len(scenario.fake.ephemeral(OPS, ALICE)) >= 2 and scenario.fake.ephemeral(OPS, ALICE))
    assert "on its way" in told[-1]["text"]
    scenario.fake.wait_for(lambda: [u for u in scenario.fake.uploads.values() if u.channel == scenario.fake.dm_channel(ALICE) and u.completed])
    scenario.bot.deps.background.shutdown(wait=True)
    assert len([u for u in scenario.fake.uploads.values() if u.channel == scenario.fake.dm_channel(ALICE)]) == 1


def test_an_upload_interrupted_by_a_restart_is_read_when_the_bot_starts_again(scenario):
    file = scenario.fake.add_file(b"resumed-0001\nresumed-0002\n", name="devices.txt", filetype="txt")
    # A submission recorded (before its ack), and the process gone before it read the list.
    scenario.store.add_upload(user=ALICE, channel=OPS, product_key=scenario.emulator.product_key, origin_data={"files": [file]}, pasted="", now=scenario.emulator.clock.now())
    scenario.stop_bot()
    scenario.start_bot()
    request = scenario.request(1)
    assert (request.requester, request.count) == (ALICE, 2)
    assert scenario.store.unread_uploads() == []
    scenario.stop_bot()
    scenario.start_bot()  # and read once only
    assert scenario.store.get(2) is None


def test_a_list_from_chinese_excel_is_read_and_the_thread_says_it_was_read_as_gb18030(scenario):
    content = "DeviceName,DeviceNickname\r\ngb-0001,温度传感器_1\r\ngb-0002,水泵_2\r\n".encode("gb18030")
    scenario.upload_devices(ALICE, content, name="设备.csv")
    assert scenario.drive(1, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    assert [(d.name, d.nickname) for d in scenario.store.devices(1)] == [("gb-0001", "温度传感器_1"), ("gb-0002", "水泵_2")]
    (said,) = [text_of(r) for r in scenario.replies(1) if "read as" in text_of(r)]
    assert "The list was read as GB18030: it is not UTF-8." in said and "CSV UTF-8" in said


def test_a_rejected_line_cannot_turn_into_a_link_or_a_mention_in_the_thread(scenario):
    content = b"bt-0001\nx` https://evil.example/reset-password `y\n<!channel> @here\n"
    scenario.upload_devices(ALICE, content, name="list.txt")
    assert scenario.drive(1, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    (skipped,) = [text_of(r) for r in scenario.replies(1) if "could not be used" in text_of(r)]
    assert "• line 2: `x\u02cb https://evil.example/reset-password \u02cby`: " in skipped
    assert "• line 3: `&lt;!channel&gt; @here`: " in skipped and "<!" not in skipped


# -- a crash between Slack's answer and the record that a step was done ------------------------


def cut_short(monkeypatch, scenario, method: str, when) -> list:
    """Make the service's ``method`` fail once when ``when(args, kwargs)`` holds, as a crash would
    cut the step short right after Slack took its post; returns the calls it cut."""
    service = scenario.bot.workflow.requests
    real, cut = getattr(service, method), []

    def once(*args, **kwargs):
        if not cut and when(args, kwargs):
            cut.append(args or kwargs)
            raise RuntimeError("the process died here")
        return real(*args, **kwargs)

    monkeypatch.setattr(service, method, once)
    return cut


def test_a_result_cut_short_after_slack_took_it_is_not_posted_again(scenario, monkeypatch):
    cut = cut_short(monkeypatch, scenario, "mark_step", lambda args, _kw: args[1] == "result")
    finish_one(scenario, n=3)
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=3600)
    assert cut, "the result step was never cut short"
    results = results_in_thread(scenario)
    assert len(results) == 1 and "3 registered" in text_of(results[0])
    assert results[0]["metadata"]["event_type"] == "iotreg_step"
    assert scenario.fake.calls_to("conversations.replies"), "the redelivery did not look for its message"
    assert len(scenario.fake.messages(NOTICES)) == 1  # the steps after it went out once each


def test_a_result_file_cut_short_after_slack_shared_it_is_not_uploaded_again(scenario, monkeypatch):
    cut = cut_short(monkeypatch, scenario, "mark_step", lambda args, _kw: args[1] == "result_file")
    finish_one(scenario, n=25)
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=3600)
    assert cut
    assert len([u for u in scenario.fake.uploads.values() if u.channel == OPS]) == 1
    assert scenario.fake.calls_to("files.info"), "the redelivery did not ask whether the file was shared"
    assert len(results_in_thread(scenario)) == 1


def test_a_request_message_whose_ts_was_lost_is_found_not_posted_twice(scenario, monkeypatch):
    cut = cut_short(monkeypatch, scenario, "set_origin_data", lambda _args, kw: "thread_ts" in kw)
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    assert cut
    anchors = [m for m in scenario.fake.messages(OPS) if "#1" in text_of(m)]
    assert len(anchors) == 1 and scenario.anchor(1)["ts"] == anchors[0]["ts"]
    assert scenario.fake.calls_to("conversations.history")


def test_an_approver_dm_whose_ts_was_lost_is_found_not_sent_twice(scenario, monkeypatch):
    cut = cut_short(monkeypatch, scenario, "set_origin_data", lambda _args, kw: BOB in (kw.get("dms") or {}))
    scenario.upload_devices(ALICE, sample_file(2, bad=False))
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=600)
    assert cut
    assert len(scenario.fake.dm(BOB)) == 1 and len(scenario.fake.dm(CAROL)) == 1
    assert scenario.store.get(1).origin_data["dms"][BOB][1] == scenario.fake.dm(BOB)[0]["ts"]


def test_without_the_history_scopes_a_result_cut_short_still_arrives(scenario, monkeypatch):
    """An installation not yet given the history scopes: at least once, as before, never lost."""
    scenario.fake.fail("conversations.replies", error="missing_scope", times=5)
    cut = cut_short(monkeypatch, scenario, "mark_step", lambda args, _kw: args[1] == "result")
    finish_one(scenario, n=3)
    scenario.jobs.run_until(lambda: not list(scenario.store.pending_events()), timeout=3600)
    assert cut and len(results_in_thread(scenario)) == 2
