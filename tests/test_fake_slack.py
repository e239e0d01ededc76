"""The fake Slack, driven by the real slack_sdk WebClient and a real Bolt App.

What the bot's tests rely on: Slack's response shapes and errors, the workspace model they read
(messages, threads, ephemeral messages, views, uploads, DMs), files_upload_v2 end to end, the
download trap (200 + sign-in page without the token), retries of injected 429/5xx by slack_sdk's
own handlers, and signed payloads that Bolt parses and accepts.
"""

from __future__ import annotations

import json
import re
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from slack_bolt import App, BoltRequest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry import builtin_handlers
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler, ServerErrorRetryHandler
from slack_sdk.http_retry.builtin_interval_calculators import FixedValueRetryIntervalCalculator
from slack_sdk.signature import SignatureVerifier
from slack_sdk.webhook import WebhookClient

from bot.standins.slack import (
    FakeSlack,
    Workspace,
    command_body,
    file_input_value,
    interaction_body,
    plain_text_value,
    signature_headers,
)

TOKEN = "xoxb-test-token"
SECRET = "test-signing-secret"
OPS = "C0OPS"
TS = re.compile(r"^\d{10}\.\d{6}$")


class StepClock:
    """Epoch seconds that move only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def fake(clock: StepClock) -> Iterator[FakeSlack]:
    with FakeSlack(bot_token=TOKEN, clock=clock) as fake:
        fake.add_channel(OPS, "ops")
        fake.add_user("U0ALICE", "alice")
        fake.add_user("U0BOB", "bob")
        yield fake


@pytest.fixture
def client(fake: FakeSlack) -> WebClient:
    return WebClient(token=TOKEN, base_url=fake.api_url)


# -- messages -------------------------------------------------------------------------------------


def test_post_returns_increasing_ts_and_threads_replies(fake: FakeSlack, client: WebClient) -> None:
    parent = client.chat_postMessage(channel=OPS, text="Request #1")
    reply = client.chat_postMessage(channel=OPS, thread_ts=parent["ts"], text="checking")
    loud = client.chat_postMessage(channel=OPS, thread_ts=parent["ts"], text="done", reply_broadcast=True)

    assert parent["ok"] and parent["channel"] == OPS and TS.match(parent["ts"])
    assert parent["message"]["text"] == "Request #1" and parent["message"]["user"] == fake.bot_user_id
    assert parent["ts"] < reply["ts"] < loud["ts"]  # same clock second, still strictly increasing
    assert [m["text"] for m in fake.messages(OPS)] == ["Request #1", "done"]  # broadcast shows in channel
    assert [m["text"] for m in fake.thread(OPS, parent["ts"])] == ["checking", "done"]
    top = fake.messages(OPS)[0]
    assert top["reply_count"] == 2 and top["latest_reply"] == loud["ts"] and top["thread_ts"] == parent["ts"]


def test_posting_by_channel_name_and_unknown_channel_or_thread(fake: FakeSlack, client: WebClient) -> None:
    assert client.chat_postMessage(channel="#ops", text="hi")["channel"] == OPS
    with pytest.raises(SlackApiError) as unknown:
        client.chat_postMessage(channel="C0NOPE", text="hi")
    assert unknown.value.response["error"] == "channel_not_found"
    with pytest.raises(SlackApiError) as thread:
        client.chat_postMessage(channel=OPS, thread_ts="1.000001", text="hi")
    assert thread.value.response["error"] == "thread_not_found"
    fake.add_channel("C0SECRET", "secret", bot_member=False)
    with pytest.raises(SlackApiError) as outside:
        client.chat_postMessage(channel="C0SECRET", text="hi")
    assert outside.value.response["error"] == "not_in_channel"


def test_update_keeps_blocks_when_omitted_and_records_history(fake: FakeSlack, client: WebClient) -> None:
    button = {"type": "button", "action_id": "approve", "text": {"type": "plain_text", "text": "Approve"}}
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": "3 devices"}},
        {"type": "actions", "elements": [button]},
    ]
    posted = client.chat_postMessage(channel=OPS, text="3 devices", blocks=blocks)
    assert all(b.get("block_id") for b in posted["message"]["blocks"])  # Slack fills in block ids

    updated = client.chat_update(channel=OPS, ts=posted["ts"], text="3 devices (reviewing)")
    assert updated["ts"] == posted["ts"] and updated["text"] == "3 devices (reviewing)"
    assert updated["message"]["blocks"] == posted["message"]["blocks"]

    client.chat_update(channel=OPS, ts=posted["ts"], text="Approved", blocks=blocks[:1])
    [message] = fake.messages(OPS)
    assert message["text"] == "Approved" and len(message["blocks"]) == 1 and "edited" in message
    assert [h["text"] for h in message["history"]] == ["3 devices", "3 devices (reviewing)"]
    assert len(message["history"][0]["blocks"]) == 2


def test_update_errors(fake: FakeSlack, client: WebClient) -> None:
    posted = client.chat_postMessage(channel=OPS, text="x")
    for kwargs, error in [
        ({"channel": OPS, "ts": "1700000000.999999", "text": "y"}, "message_not_found"),
        ({"channel": "C0NOPE", "ts": posted["ts"], "text": "y"}, "channel_not_found"),
        ({"channel": OPS, "ts": posted["ts"]}, "no_text"),
    ]:
        with pytest.raises(SlackApiError) as failed, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # slack_sdk's own nudge about missing text
            client.chat_update(**kwargs)
        assert failed.value.response["error"] == error


def test_block_and_text_limits(fake: FakeSlack, client: WebClient) -> None:
    section = {"type": "section", "text": {"type": "mrkdwn", "text": "ok"}}
    with pytest.raises(SlackApiError) as too_many:
        client.chat_postMessage(channel=OPS, text="x", blocks=[section] * 51)
    assert too_many.value.response["error"] == "invalid_blocks"
    assert "no more than 50 items" in too_many.value.response["response_metadata"]["messages"][0]

    long_section = {"type": "section", "text": {"type": "mrkdwn", "text": "a" * 3001}}
    with pytest.raises(SlackApiError) as too_long:
        client.chat_postMessage(channel=OPS, text="x", blocks=[long_section])
    assert too_long.value.response["error"] == "invalid_blocks"
    assert "/blocks/0/text/text" in too_long.value.response["errors"][0]

    with pytest.raises(SlackApiError) as text:
        client.chat_postMessage(channel=OPS, text="a" * 40001)
    assert text.value.response["error"] == "msg_too_long"
    with pytest.raises(SlackApiError) as empty, pytest.warns(UserWarning, match="text"):
        client.chat_postMessage(channel=OPS)
    assert empty.value.response["error"] == "no_text"
    assert fake.messages(OPS) == []
    errors = [c.error for c in fake.calls_to("chat.postMessage")]
    assert errors == ["invalid_blocks", "invalid_blocks", "msg_too_long", "no_text"]


def test_form_encoded_calls_with_the_token_in_the_body(fake: FakeSlack) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*hi*"}}]
    answer = requests.post(f"{fake.api_url}chat.postMessage", timeout=5,
                           data={"token": TOKEN, "channel": OPS, "text": "hi", "blocks": json.dumps(blocks)}).json()
    assert answer["ok"] and fake.messages(OPS)[0]["blocks"][0]["text"]["text"] == "*hi*"
    assert "token" not in fake.calls_to("chat.postMessage")[0].params  # not kept in the record
    broken = requests.post(f"{fake.api_url}chat.postMessage", timeout=5,
                           data={"token": TOKEN, "channel": OPS, "text": "hi", "blocks": "[{"}).json()
    assert broken["error"] == "invalid_blocks_format"


def test_ephemeral_is_shown_to_one_user_only(fake: FakeSlack, client: WebClient) -> None:
    answer = client.chat_postEphemeral(channel=OPS, user="U0ALICE", text="only you can see this")
    assert TS.match(answer["message_ts"])
    assert [m["text"] for m in fake.ephemeral(OPS, "U0ALICE")] == ["only you can see this"]
    assert fake.ephemeral(OPS, "U0BOB") == [] and fake.messages(OPS) == []
    fake.add_channel("C0SMALL", "small", members=["U0BOB"])
    with pytest.raises(SlackApiError) as outside:
        client.chat_postEphemeral(channel="C0SMALL", user="U0ALICE", text="x")
    assert outside.value.response["error"] == "user_not_in_channel"


# -- views ----------------------------------------------------------------------------------------

MODAL = {
    "type": "modal",
    "callback_id": "upload",
    "title": {"type": "plain_text", "text": "Register devices"},
    "submit": {"type": "plain_text", "text": "Check"},
    "private_metadata": json.dumps({"channel": OPS}),
    "blocks": [{"type": "input", "block_id": "names", "label": {"type": "plain_text", "text": "Names"},
                "element": {"type": "plain_text_input", "action_id": "names", "multiline": True}}],
}


def test_views_open_uses_a_trigger_once_and_within_three_seconds(
    fake: FakeSlack, client: WebClient, clock: StepClock
) -> None:
    trigger = fake.issue_trigger("U0ALICE")
    opened = client.views_open(trigger_id=trigger, view=MODAL)["view"]
    assert re.match(r"^V0", opened["id"]) and opened["hash"] and opened["state"] == {"values": {}}
    assert opened["callback_id"] == "upload" and opened["private_metadata"] == MODAL["private_metadata"]
    assert fake.views[opened["id"]]["blocks"][0]["block_id"] == "names"

    with pytest.raises(SlackApiError) as again:
        client.views_open(trigger_id=trigger, view=MODAL)
    assert again.value.response["error"] == "exchanged_trigger_id"
    with pytest.raises(SlackApiError) as made_up:
        client.views_open(trigger_id="123.456.abc", view=MODAL)
    assert made_up.value.response["error"] == "invalid_trigger_id"
    late = fake.issue_trigger("U0ALICE")
    clock.now += 3.5
    with pytest.raises(SlackApiError) as expired:
        client.views_open(trigger_id=late, view=MODAL)
    assert expired.value.response["error"] == "expired_trigger_id"
    with pytest.raises(SlackApiError) as too_big:
        client.views_open(trigger_id=fake.issue_trigger("U0ALICE"), view={**MODAL, "private_metadata": "x" * 3001})
    assert too_big.value.response["error"] == "invalid_arguments"
    assert "private_metadata" in too_big.value.response["response_metadata"]["messages"][0]


def test_views_update_by_id_checks_hash(fake: FakeSlack, client: WebClient) -> None:
    opened = client.views_open(trigger_id=fake.issue_trigger("U0ALICE"), view=MODAL)["view"]
    checking = {**MODAL, "title": {"type": "plain_text", "text": "Checking…"}}
    updated = client.views_update(view_id=opened["id"], hash=opened["hash"], view=checking)["view"]
    assert updated["id"] == opened["id"] and fake.views[opened["id"]]["title"]["text"] == "Checking…"
    with pytest.raises(SlackApiError) as stale:
        client.views_update(view_id=opened["id"], hash=opened["hash"], view=MODAL)
    assert stale.value.response["error"] == "hash_conflict"
    with pytest.raises(SlackApiError) as missing:
        client.views_update(view_id="V0NOPE", view=MODAL)
    assert missing.value.response["error"] == "not_found"


# -- files ----------------------------------------------------------------------------------------


def test_files_upload_v2_into_a_thread(fake: FakeSlack, client: WebClient) -> None:
    parent = client.chat_postMessage(channel=OPS, text="Request #7")
    csv = "device,status\nsensor-01,ok\n"
    result = client.files_upload_v2(
        channel=OPS, thread_ts=parent["ts"], content=csv, filename="result-7.csv", initial_comment="Results"
    )

    file_id = result["file"]["id"]
    upload = fake.uploads[file_id]
    assert upload.content == csv.encode() and upload.name == "result-7.csv" and upload.title == "result-7.csv"
    assert (upload.channel, upload.thread_ts, upload.completed) == (OPS, parent["ts"], True)
    [share] = fake.thread(OPS, parent["ts"])
    assert share["text"] == "Results" and share["files"][0]["id"] == file_id
    assert share["files"][0]["shares"]["public"][OPS][0]["thread_ts"] == parent["ts"]
    assert [c.method for c in fake.calls] == [
        "chat.postMessage", "files.getUploadURLExternal", "files.upload", "files.completeUploadExternal"
    ]
    info = client.files_info(file=file_id)["file"]
    assert info["size"] == len(csv.encode()) and info["filetype"] == "csv" and info["mimetype"] == "text/csv"


def test_upload_url_takes_multipart_too(fake: FakeSlack, client: WebClient) -> None:
    ticket = client.files_getUploadURLExternal(filename="a.txt", length=5)
    assert ticket["upload_url"].startswith(fake.base_url) and ticket["file_id"].startswith("F0")
    answer = requests.post(ticket["upload_url"], files={"filename": ("a.txt", b"hello")}, timeout=5)
    assert answer.status_code == 200
    client.files_completeUploadExternal(files=[{"id": ticket["file_id"], "title": "A"}])
    assert fake.uploads[ticket["file_id"]].content == b"hello"
    assert fake.uploads[ticket["file_id"]].channel is None  # completed without a channel: private
    with pytest.raises(SlackApiError) as unknown:
        client.files_completeUploadExternal(files=[{"id": "F0NOPE"}], channel_id=OPS)
    assert unknown.value.response["error"] == "file_not_found"


def test_dm_is_stable_and_takes_uploads(fake: FakeSlack, client: WebClient) -> None:
    first = client.conversations_open(users="U0ALICE")
    second = client.conversations_open(users="U0ALICE")
    assert first["channel"]["id"] == second["channel"]["id"] == fake.dm_channel("U0ALICE")
    assert "already_open" not in first.data and second["already_open"] is True
    client.files_upload_v2(channel=first["channel"]["id"], content=b"a,b\n", filename="failed.csv")
    client.chat_postMessage(channel="U0ALICE", text="done")  # a user id posts into the DM
    dm = fake.dm("U0ALICE")
    assert dm[0]["files"][0]["name"] == "failed.csv" and dm[1]["text"] == "done"
    assert fake.dm("U0BOB") == []
    with pytest.raises(SlackApiError) as nobody:
        client.conversations_open(users="U0NOBODY")
    assert nobody.value.response["error"] == "user_not_found"


def test_download_needs_the_bot_token(fake: FakeSlack) -> None:
    file = fake.add_file(b"name\nsensor-01\n", name="devices.csv")
    assert file["url_private_download"].startswith(f"{fake.base_url}/files-pri/{fake.team_id}-{file['id']}/download/")
    assert file["size"] == 15 and file["filetype"] == "csv" and file["user"] == "U0USER"

    good = requests.get(file["url_private_download"], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert good.status_code == 200 and good.content == b"name\nsensor-01\n"
    assert good.headers["Content-Type"] == "text/csv" and "devices.csv" in good.headers["Content-Disposition"]

    for headers in ({}, {"Authorization": "Bearer xoxb-wrong"}):
        trap = requests.get(file["url_private_download"], headers=headers, timeout=5)
        assert trap.status_code == 200 and trap.headers["Content-Type"].startswith("text/html")
        assert "<html" in trap.text and b"sensor-01" not in trap.content
    assert [d.authorization for d in fake.downloads] == [f"Bearer {TOKEN}", None, "Bearer xoxb-wrong"]


def test_redirect_to_another_host_is_served_as_registered(fake: FakeSlack) -> None:
    file = fake.add_file(b"x\n")
    fake.add_redirect(file["url_private_download"], "https://evil.example/steal")
    answer = requests.get(file["url_private_download"], headers={"Authorization": f"Bearer {TOKEN}"},
                          allow_redirects=False, timeout=5)
    assert answer.status_code == 302 and answer.headers["Location"] == "https://evil.example/steal"
    assert fake.downloads == []  # nothing was served


# -- other methods, auth --------------------------------------------------------------------------


def test_usergroups_users_info_and_auth_test(fake: FakeSlack, client: WebClient) -> None:
    fake.usergroups["S0APPROVERS"] = ["U0ALICE", "U0BOB"]
    assert client.usergroups_users_list(usergroup="S0APPROVERS")["users"] == ["U0ALICE", "U0BOB"]
    with pytest.raises(SlackApiError) as unknown:
        client.usergroups_users_list(usergroup="S0NOPE")
    assert unknown.value.response["error"] == "no_such_subteam"
    assert client.users_info(user="U0ALICE")["user"]["name"] == "alice"
    me = client.auth_test()
    assert (me["user_id"], me["bot_id"], me["team_id"]) == (fake.bot_user_id, fake.bot_id, fake.team_id)


def test_auth_errors_and_unknown_method(fake: FakeSlack) -> None:
    for token, error in [("xoxb-wrong", "invalid_auth"), (None, "not_authed")]:
        with pytest.raises(SlackApiError) as failed:
            WebClient(token=token, base_url=fake.api_url).chat_postMessage(channel=OPS, text="x")
        assert failed.value.response.status_code == 200 and failed.value.response["error"] == error
    with pytest.raises(SlackApiError) as unknown:
        WebClient(token=TOKEN, base_url=fake.api_url).api_call("chat.teleport")
    assert unknown.value.response["error"] == "unknown_method"
    assert fake.messages(OPS) == []


# -- faults ---------------------------------------------------------------------------------------


def test_429_is_retried_by_slack_sdk_after_retry_after(fake: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(builtin_handlers, "time", SimpleNamespace(sleep=slept.append))  # no real waiting
    fake.fail("chat.postMessage", status=429, retry_after=7)
    client = WebClient(token=TOKEN, base_url=fake.api_url, retry_handlers=[RateLimitErrorRetryHandler()])

    assert client.chat_postMessage(channel=OPS, text="hello")["ok"]
    assert [(c.status, c.error) for c in fake.calls_to("chat.postMessage")] == [(429, "ratelimited"), (200, None)]
    assert len(slept) == 1 and 7 <= slept[0] < 8  # Retry-After read from the header
    assert [m["text"] for m in fake.messages(OPS)] == ["hello"]


def test_500_is_retried_by_server_error_handler_and_fails_without(fake: FakeSlack) -> None:
    fake.fail("chat.update", status=500)
    plain = WebClient(token=TOKEN, base_url=fake.api_url)
    posted = plain.chat_postMessage(channel=OPS, text="x")
    with pytest.raises(SlackApiError) as failed:
        plain.chat_update(channel=OPS, ts=posted["ts"], text="y")
    assert failed.value.response.status_code == 500

    fake.fail("chat.update", status=503, body="")
    retrying = WebClient(token=TOKEN, base_url=fake.api_url, retry_handlers=[
        ServerErrorRetryHandler(interval_calculator=FixedValueRetryIntervalCalculator(0))])
    assert retrying.chat_update(channel=OPS, ts=posted["ts"], text="y")["ok"]
    assert [c.status for c in fake.calls_to("chat.update")] == [500, 503, 200]
    assert fake.messages(OPS)[0]["text"] == "y"


def test_injected_error_and_download_fault(fake: FakeSlack, client: WebClient) -> None:
    fake.fail("views.open", error="expired_trigger_id")
    with pytest.raises(SlackApiError) as failed:
        client.views_open(trigger_id=fake.issue_trigger("U0ALICE"), view=MODAL)
    assert failed.value.response["error"] == "expired_trigger_id"
    file = fake.add_file(b"x\n")
    fake.fail("files.download", status=503, times=2)
    statuses = [requests.get(file["url_private_download"], headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=5).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]


def test_delay_holds_the_answer(fake: FakeSlack) -> None:
    fake.delay("auth.test", 5)
    impatient = WebClient(token=TOKEN, base_url=fake.api_url, timeout=0.2)
    with pytest.raises(Exception) as timed_out:
        impatient.auth_test()
    assert "timed out" in str(timed_out.value).lower()
    fake.delay("auth.test", 0)
    assert impatient.auth_test()["ok"]


def test_wait_for_wakes_on_calls_and_times_out(fake: FakeSlack, client: WebClient) -> None:
    threading.Thread(target=client.chat_postMessage, kwargs={"channel": OPS, "text": "later"}).start()
    messages = fake.wait_for(lambda: fake.messages(OPS))
    assert messages[0]["text"] == "later"
    with pytest.raises(TimeoutError, match="chat.postMessage"):
        fake.wait_for(lambda: len(fake.messages(OPS)) > 1, timeout=0.05)


def test_response_url_acts_like_slack(fake: FakeSlack, client: WebClient) -> None:
    posted = client.chat_postMessage(channel=OPS, text="Approve?")
    replace = WebhookClient(fake.response_url(channel=OPS, user="U0ALICE", message_ts=posted["ts"], kind="actions"))
    assert replace.send(text="Approved", replace_original=True).status_code == 200
    url = fake.response_url(channel=OPS, user="U0ALICE")
    hook = WebhookClient(url)
    hook.send(text="just for you")
    hook.send(text="for everyone", response_type="in_channel")
    assert [m["text"] for m in fake.messages(OPS)] == ["Approved", "for everyone"]
    assert [m["text"] for m in fake.ephemeral(OPS, "U0ALICE")] == ["just for you"]
    assert [r.payload.get("text") for r in fake.responses if r.url == url] == ["just for you", "for everyone"]
    for _ in range(3):
        hook.send(text="again")
    assert hook.send(text="sixth").status_code == 404  # five uses at most


# -- what Slack sends the bot ---------------------------------------------------------------------

SLACK_DOC_BODY = (
    "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    "&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    "&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    "&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)


def test_signature_reproduces_slacks_test_vector() -> None:
    headers = signature_headers(SLACK_DOC_BODY, "8f742231b10e8888abcd99yyyzzz85a5", 1531420618)
    assert headers == {
        "X-Slack-Request-Timestamp": "1531420618",
        "X-Slack-Signature": "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
    }


def test_signed_bodies_pass_the_sdks_verifier_and_forgeries_do_not() -> None:
    body = interaction_body({"type": "block_actions", "actions": []})
    now = 1_700_000_000
    verifier = SignatureVerifier(SECRET, clock=SimpleNamespace(now=lambda: now))
    assert verifier.is_valid_request(body, signature_headers(body, SECRET, now))
    assert not verifier.is_valid_request(body, signature_headers(body, SECRET, now - 301))  # expired
    assert not verifier.is_valid_request(body, signature_headers(body, "other", now))
    parsed = dict(p.split("=", 1) for p in command_body(
        command="/devices", text="register a1", user_id="U1", user_name="u", channel_id="C1", channel_name="c",
        team_id="T1", team_domain="t", api_app_id="A1", response_url="https://r", trigger_id="1.2.3").split("&"))
    assert list(parsed)[:3] == ["token", "team_id", "team_domain"] and parsed["command"] == "%2Fdevices"
    assert list(parsed)[-2:] == ["response_url", "trigger_id"] and parsed["is_enterprise_install"] == "false"


class _BoltAdapter(BaseHTTPRequestHandler):
    """The few lines that put a Bolt App behind HTTP (what the WSGI adapter does in production)."""

    app: App

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        answer = self.app.dispatch(BoltRequest(body=body, headers={k: [v] for k, v in self.headers.items()}))
        data = answer.body.encode()
        self.send_response(answer.status)
        for name, values in answer.headers.items():
            for value in values:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def bolt(fake: FakeSlack) -> Iterator[tuple[App, Workspace]]:
    app = App(client=WebClient(token=TOKEN, base_url=fake.api_url), signing_secret=SECRET)  # calls auth.test
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Adapter", (_BoltAdapter,), {"app": app}))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    with Workspace(fake, SECRET, f"http://127.0.0.1:{server.server_address[1]}/slack/events") as ws:
        yield app, ws
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_conversation_through_a_real_bolt_app(fake: FakeSlack, bolt: tuple[App, Workspace]) -> None:
    app, ws = bolt
    seen: dict[str, Any] = {}
    modal = {**MODAL, "blocks": [*MODAL["blocks"], {
        "type": "input", "block_id": "file", "optional": True, "label": {"type": "plain_text", "text": "CSV"},
        "element": {"type": "file_input", "action_id": "file", "filetypes": ["csv"], "max_files": 1}}]}

    @app.command("/devices")
    def devices(ack: Any, body: dict, client: WebClient) -> None:
        ack()
        seen["command"] = body
        client.views_open(trigger_id=body["trigger_id"], view=modal)

    @app.view("upload")
    def upload(ack: Any, body: dict, view: dict, client: WebClient) -> None:
        values = view["state"]["values"]
        if not values["names"]["names"]["value"] and not values["file"]["file"]["files"]:
            ack(response_action="errors", errors={"names": "Paste names or attach a CSV."})
            return
        ack()
        file = values["file"]["file"]["files"][0]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        content = requests.get(file["url_private_download"], headers=auth, timeout=5).text
        channel = json.loads(view["private_metadata"])["channel"]
        client.chat_postMessage(channel=channel, text=f"{len(content.splitlines())} lines", blocks=[
            {"type": "section", "text": {"type": "mrkdwn", "text": f"<@{body['user']['id']}> asks"}},
            {"type": "actions", "elements": [{"type": "button", "action_id": "approve", "value": "req-1",
                                              "text": {"type": "plain_text", "text": "Approve"}}]}])

    @app.action("approve")
    def approve(ack: Any, body: dict, action: dict, client: WebClient) -> None:
        ack()
        seen["action"] = action
        client.chat_update(channel=body["channel"]["id"], ts=body["message"]["ts"],
                           text=f"Approved by <@{body['user']['id']}>", blocks=[])

    answer = ws.command("U0ALICE", OPS, "register a1Prod")
    assert answer.status_code == 200
    view = fake.wait_for(lambda: next(iter(fake.views.values()), None))
    assert seen["command"]["text"] == "register a1Prod" and seen["command"]["channel_name"] == "ops"

    refused = ws.submit_view("U0ALICE", view, {"names": {"names": plain_text_value("")},
                                               "file": {"file": file_input_value()}})
    assert refused.json() == {"response_action": "errors", "errors": {"names": "Paste names or attach a CSV."}}
    assert fake.view_is_open(view["id"])

    csv = fake.add_file(b"name\nsensor-01\nsensor-02\n", user="U0ALICE")
    accepted = ws.submit_view("U0ALICE", view, {"names": {"names": plain_text_value(None)},
                                                "file": {"file": file_input_value(csv, omit_size=True)}})
    assert accepted.status_code == 200 and not fake.view_is_open(view["id"])
    [message] = fake.wait_for(lambda: fake.messages(OPS))
    assert message["text"] == "3 lines" and fake.downloads[-1].authorization == f"Bearer {TOKEN}"

    assert ws.click("U0BOB", message, "approve").status_code == 200
    fake.wait_for(lambda: fake.messages(OPS)[0]["text"].startswith("Approved"))
    assert seen["action"]["value"] == "req-1" and seen["action"]["type"] == "button"
    assert "blocks" not in fake.messages(OPS)[0] and fake.messages(OPS)[0]["history"][0]["text"] == "3 lines"

    # A stale copy of the message still carries the button: the double click reaches the app.
    assert ws.click("U0BOB", message, "approve").status_code == 200
    fake.wait_for(lambda: len(fake.calls_to("chat.update")) == 2)


def test_bolt_refuses_forged_and_expired_requests(fake: FakeSlack, bolt: tuple[App, Workspace]) -> None:
    app, ws = bolt
    app.command("/devices")(lambda ack: ack("hi"))
    assert ws.command("U0ALICE", OPS, sign=False).status_code == 401
    assert ws.command("U0ALICE", OPS, bad_signature=True).status_code == 401
    ws.clock = lambda: time.time() - 301  # Bolt checks the timestamp against the real time
    assert ws.command("U0ALICE", OPS).status_code == 401
    ws.clock = time.time
    ok = ws.command("U0ALICE", OPS)
    assert ok.status_code == 200 and ok.text == "hi"


def test_clicks_in_a_modal_and_on_an_ephemeral_message(fake: FakeSlack, bolt: tuple[App, Workspace]) -> None:
    app, ws = bolt
    bodies: list[dict] = []

    @app.action("more")
    def more(ack: Any, body: dict) -> None:
        ack()
        bodies.append(body)

    button = {"type": "button", "action_id": "more", "value": "1", "text": {"type": "plain_text", "text": "More"}}
    view = WebClient(token=TOKEN, base_url=fake.api_url).views_open(
        trigger_id=fake.issue_trigger("U0ALICE"),
        view={**MODAL, "blocks": [*MODAL["blocks"], {"type": "actions", "elements": [button]}]})["view"]
    assert ws.click("U0ALICE", view, "more").status_code == 200
    WebClient(token=TOKEN, base_url=fake.api_url).chat_postEphemeral(
        channel=OPS, user="U0ALICE", text="pick", blocks=[{"type": "actions", "elements": [button]}])
    [note] = fake.ephemeral(OPS, "U0ALICE")
    assert ws.click("U0ALICE", note, "more", value="2").status_code == 200
    fake.wait_for(lambda: len(bodies) == 2)

    in_view, in_note = bodies
    assert in_view["container"] == {"type": "view", "view_id": view["id"]} and in_view["view"]["id"] == view["id"]
    assert "response_url" not in in_view and "message" not in in_view
    assert in_note["container"]["is_ephemeral"] is True and "message" not in in_note
    assert in_note["actions"][0]["value"] == "2" and in_note["response_url"].startswith(fake.base_url)
    assert in_note["trigger_id"] == ws.last_trigger_id


def test_message_metadata_comes_back_only_when_asked_for(fake: FakeSlack, client: WebClient) -> None:
    mark = {"event_type": "iotreg_step", "event_payload": {"event_id": 7, "step": "result"}}
    parent = client.chat_postMessage(channel=OPS, text="anchor", metadata=mark)
    assert "metadata" not in parent["message"]
    for n in range(3):
        client.chat_postMessage(channel=OPS, thread_ts=parent["ts"], text=f"reply {n}", metadata={**mark, "event_payload": {"n": n}})
    newest = client.conversations_history(channel=OPS, limit=1, include_all_metadata=True)
    assert [m["text"] for m in newest["messages"]] == ["anchor"] and newest["messages"][0]["metadata"] == mark  # replies are not history
    assert "metadata" not in client.conversations_history(channel=OPS)["messages"][0]
    thread = client.conversations_replies(channel=OPS, ts=parent["ts"], include_all_metadata=True, limit=2)
    assert [m["text"] for m in thread["messages"]] == ["anchor", "reply 0"] and thread["has_more"]
    rest = client.conversations_replies(channel=OPS, ts=parent["ts"], include_all_metadata=True, cursor=thread["response_metadata"]["next_cursor"])
    assert [m["metadata"]["event_payload"] for m in rest["messages"]] == [{"n": 1}, {"n": 2}] and not rest["has_more"]
    assert all(m["parent_user_id"] == fake.bot_user_id for m in rest["messages"])


def test_bad_metadata_and_unreadable_conversations_are_refused_as_slack_does(fake: FakeSlack, client: WebClient) -> None:
    for metadata, error in (({"event_type": "x"}, "invalid_metadata_schema"), ("{not json", "invalid_metadata_format")):
        with pytest.raises(SlackApiError) as refused:
            client.chat_postMessage(channel=OPS, text="x", metadata=metadata)
        assert refused.value.response["error"] == error
    with pytest.raises(SlackApiError) as missing:
        client.conversations_replies(channel=OPS, ts="1.000001")
    assert missing.value.response["error"] == "thread_not_found"
    fake.add_channel("C0ELSEWHERE", "elsewhere", bot_member=False)
    with pytest.raises(SlackApiError) as outside:
        client.conversations_history(channel="C0ELSEWHERE")
    assert outside.value.response["error"] == "not_in_channel"
