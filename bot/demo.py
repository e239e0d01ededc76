"""``iotreg demo``: the whole conversation on one machine, no Slack workspace or cloud account needed.

The real bot (the Bolt app behind HTTP with signed requests, the workflow, the scheduler, SQLite in
a temporary folder) talks to the embedded IoT Platform emulator and to a local stand-in for Slack.
Three people play their parts: Alice uploads a device list; Bob and Carol approve it, the two
approvals the demo's policy asks for (Carol from the direct message the bot sent her). Everything
Slack receives is printed as a person would read it, with the time of each step.
"""

from __future__ import annotations

import json
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bot.clock import SystemClock
from bot.config import Settings
from bot.standins.emulator import DEMO_PRODUCT_KEY, Emulator
from bot.server import serve_locally
from bot.slack import blocks
from bot.slack.app import create_app
from bot.standins.slack import FakeSlack, Workspace, file_input_value

OPS, NOTICES = "C0IOTOPS", "C0NOTICES"
ALICE, BOB, CAROL = "U0ALICE", "U0BOB", "U0CAROL"
PEOPLE = {ALICE: "alice", BOB: "bob", CAROL: "carol", "U0BOT": "iotreg"}
#: The demo's policy file: two approvals from Bob and Carol.
POLICY = f'[default]\napprovers = ["{BOB}", "{CAROL}"]\napprovals = 2\n'

CHANNELS = {OPS: "#iot-ops", NOTICES: "#iot-notices"}
#: Names in the shipped sample that already exist on the demo's platform, so the check finds them.
ALREADY_REGISTERED = ("sensor-hz-0007", "sensor-hz-0123", "sensor-hz-0200")
EMOJI = {
    ":hourglass_flowing_sand:": "⏳", ":hourglass:": "⌛", ":x:": "✖", ":raised_hand:": "✋",
    ":white_check_mark:": "✔", ":gear:": "⚙", ":no_entry_sign:": "⛔", ":heavy_multiplication_x:": "✖",
    ":test_tube:": "🧪", ":repeat:": "🔁", ":bell:": "🔔",
}


class DemoError(RuntimeError):
    """The conversation did not reach the next step in time."""


@dataclass
class DemoResult:
    request_ids: list[int]
    state: str
    registered: int
    results_csv: Path | None
    folder: Path
    seconds: float


def sample_devices() -> bytes:
    return resources.files("bot").joinpath("data/sample_devices.csv").read_bytes()


class Transcript:
    """Prints, in order, what the bot sent to Slack since the last look."""

    def __init__(self, fake: FakeSlack, out: Callable[[str], None]) -> None:
        self.fake = fake
        self.out = out
        self.seen = 0
        self.started = time.monotonic()

    def say(self, who: str, text: str) -> None:
        self.out(f"{self._stamp()} {CHANNELS[OPS]}  {who}: {text}")

    def note(self, text: str) -> None:
        self.out(f"{self._stamp()} {text}")

    def flush(self) -> None:
        calls = self.fake.calls
        for call in calls[self.seen :]:
            if call.error is None and call.status == 200:
                self._show(call.method, call.params)
        self.seen = len(calls)

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f}s]"

    def _show(self, method: str, params: dict[str, Any]) -> None:
        content = params.get("blocks")
        content = json.loads(content) if isinstance(content, str) else content
        channel = self._where(str(params.get("channel") or params.get("channel_id")))
        indent = "        ↳ " if params.get("thread_ts") else ""
        if method == "chat.postMessage":
            self._message(f"{channel}  iotreg: ", indent, params.get("text", ""), content)
        elif method == "chat.update" and channel.startswith("@"):
            pass  # an approver's copy kept current: the same as the channel's message
        elif method == "chat.update":
            self._message(f"{channel}  iotreg edited its message: ", "", params.get("text", ""), content)
        elif method == "chat.postEphemeral":
            self._message(f"{channel}  (only @{PEOPLE.get(params.get('user'), params.get('user'))} sees) iotreg: ", "", params.get("text", ""), content)
        elif method == "views.open":
            view = params.get("view")
            view = json.loads(view) if isinstance(view, str) else view
            labels = [b["label"]["text"] for b in view.get("blocks", []) if b.get("type") == "input"]
            self.out(f"{self._stamp()} iotreg opens the form “{view['title']['text']}”: " + " · ".join(f"[{label}]" for label in labels) + f" [{view['submit']['text']}]")
        elif method == "files.completeUploadExternal":
            files = params.get("files")
            files = json.loads(files) if isinstance(files, str) else files
            for f in files or []:
                upload = self.fake.uploads.get(f["id"])
                if upload:
                    where = "        ↳ " if upload.thread_ts else ""
                    lines = upload.content.count(b"\n") - 1
                    what = "secrets not shown here" if "credentials" in upload.name else f"{lines:,} rows"
                    self.out(f"{self._stamp()} {where}{self._where(upload.channel or '')}  iotreg: 📎 {upload.name} ({what})")

    def _where(self, channel: str) -> str:
        """A channel's name, or whose direct messages it is."""
        if channel in CHANNELS:
            return CHANNELS[channel]
        for user, name in PEOPLE.items():
            if channel in (user, self.fake.dm_channel(user)):
                return f"@{name}'s DM"
        return "a direct message"

    def _message(self, prefix: str, indent: str, text: str, content: list | None) -> None:
        lines = render(content) if content else [plain(text)]
        pad = " " * (len(self._stamp()) + 1 + len(indent))
        self.out(f"{self._stamp()} {indent}{prefix}{lines[0]}")
        for line in lines[1:]:
            self.out(f"{pad}    {line}")


def plain(text: str) -> str:
    """mrkdwn as a terminal shows it: names instead of ids, dates as text, no markup."""
    text = re.sub(r"<@(\w+)>", lambda m: "@" + PEOPLE.get(m[1], m[1]), text)
    text = re.sub(r"<!date\^[^|>]*\|([^>]*)>", r"\1", text)
    text = re.sub(r"<!subteam\^(\w+)>", r"@\1", text)
    for code, symbol in EMOJI.items():
        text = text.replace(code, symbol)
    return text.replace("*", "").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def render(content: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for block in content:
        if block.get("type") == "section":
            lines += plain(block["text"]["text"]).splitlines()
        elif block.get("type") == "context":
            lines.append("(" + " · ".join(plain(e.get("text", "")) for e in block.get("elements", [])) + ")")
        elif block.get("type") == "actions":
            lines.append("  ".join(f"[ {e['text']['text']} ]" for e in block.get("elements", []) if e.get("type") == "button"))
    return lines or [""]


def run_demo(
    file: Path | None = None,
    *,
    out: Callable[[str], None] = print,
    check_seconds: float = 1.0,
    create_seconds: float = 2.0,
    poll_interval: float = 0.5,
    timeout: float = 60.0,
    folder: Path | None = None,
) -> DemoResult:
    """Play the whole conversation; return what came of it. ``file``: your own device list;
    ``folder``: where the database and the results go (a new temporary folder, kept, by default)."""
    started = time.monotonic()
    folder = folder or Path(tempfile.mkdtemp(prefix="iotreg-demo-"))
    content = file.read_bytes() if file else sample_devices()
    name = file.name if file else "sample_devices.csv"
    emulator = Emulator(clock=SystemClock(), check_seconds=check_seconds, create_seconds=create_seconds, seed=7).start()
    if file is None:
        for existing in ALREADY_REGISTERED:
            emulator.backend.add_device(DEMO_PRODUCT_KEY, existing)
    fake = FakeSlack().start()
    fake.add_channel(OPS, "iot-ops")
    fake.add_channel(NOTICES, "iot-notices")
    for user_id, user_name in PEOPLE.items():
        if user_id != "U0BOT":
            fake.add_user(user_id, user_name)
    secret = secrets.token_hex(16)
    policy = folder / "policy.toml"
    policy.write_text(POLICY, encoding="utf-8")
    settings = Settings.from_env(
        {
            **emulator.env(),
            "SLACK_BOT_TOKEN": fake.bot_token,
            "SLACK_SIGNING_SECRET": secret,
            "SLACK_API_URL": fake.api_url,
            "IOTREG_DB": str(folder / "iotreg.db"),
            "IOTREG_POLICY": str(policy),
            "IOTREG_NOTIFY_CHANNEL": NOTICES,
            "IOTREG_POLL_INTERVAL": str(poll_interval),
            "IOTREG_POLL_MAX_INTERVAL": str(max(poll_interval, 1.0)),
            "IOTREG_WORKERS": "4",
        }
    )
    bot = create_app(settings)
    bot.start()
    server = serve_locally(bot.wsgi())
    ws = Workspace(fake, secret, app_url=f"http://127.0.0.1:{server.server_port}/slack/events")
    transcript = Transcript(fake, out)

    def wait(what: str, condition: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            transcript.flush()
            found = condition()
            if found:
                transcript.flush()
                return found
            time.sleep(0.05)
        raise DemoError(f"the demo waited {timeout:g}s for {what}")

    def message_with(action_id: str, *, in_threads: bool = False) -> dict | None:
        candidates = list(fake.messages(OPS))
        if in_threads:
            candidates = [r for m in fake.messages(OPS) for r in fake.thread(OPS, m["ts"])]
        for message in reversed(candidates):
            for block in message.get("blocks", []):
                if block.get("type") == "actions" and any(e.get("action_id") == action_id for e in block["elements"]):
                    return message
        return None

    requests = bot.workflow.requests
    out(f"iotreg demo: the real bot, the IoT Platform emulator ({emulator.endpoint}) and a stand-in for Slack, on this machine.")
    out(f"Alice (operator), Bob and Carol (approvers: two approvals needed) are in {CHANNELS[OPS]}; the database is {folder / 'iotreg.db'}.\n")
    try:
        transcript.say("@alice", f"/devices register {DEMO_PRODUCT_KEY}")
        ws.command(ALICE, OPS, f"register {DEMO_PRODUCT_KEY}")
        view = wait("the upload form", lambda: next(iter(fake.views.values()), None))
        uploaded = fake.add_file(content, name=name, filetype=name.rsplit(".", 1)[-1], mimetype="text/csv", user=ALICE)
        transcript.note(f"@alice attaches {name} ({len(content):,} bytes) and presses [Check names]")
        before = len(fake.calls)
        ws.submit_view(ALICE, view, {blocks.FILE_BLOCK: {blocks.FILE_BLOCK: file_input_value(uploaded)}})
        request_ids = [1]

        def refused() -> bool:
            """The bot told Alice alone that her file is not a device list, and made no request."""
            told = any(c.method == "chat.postEphemeral" and c.status == 200 for c in fake.calls[before:])
            return told and requests.get(1) is None and not requests.unread_uploads()

        outcome = wait("the check", lambda: message_with(blocks.APPROVE) or message_with(blocks.RETRY_VALID, in_threads=True) or refused())
        if outcome is True:
            raise DemoError(f"the bot refused {name} (its answer is above): nothing to register")
        if blocks.RETRY_VALID in json.dumps(outcome.get("blocks")):
            transcript.note("@alice clicks [Retry with the valid names]")
            ws.click(ALICE, outcome, blocks.RETRY_VALID)
            wait("the new request", lambda: requests.get(2))
            request_ids.append(2)
            wait("the second check", lambda: (m := message_with(blocks.APPROVE)) and "#2" in m.get("text", "") and m)
        anchor = message_with(blocks.APPROVE)
        transcript.note("@bob clicks [Approve]")
        ws.click(BOB, anchor, blocks.APPROVE)
        wait("the first approval", lambda: len(requests.approvals(request_ids[-1])) == 1 and not requests.health().outbox_pending)
        copy = wait("Carol's copy", lambda: next(
            (m for m in reversed(fake.dm(CAROL)) if blocks.APPROVE in json.dumps(m.get("blocks")) and f"#{request_ids[-1]}" in m.get("text", "")), None
        ))
        transcript.note("@carol clicks [Approve] in the direct message iotreg sent her")
        ws.click(CAROL, copy, blocks.APPROVE)
        final = wait("the result", lambda: (r := requests.get(request_ids[-1])) and r.final and not requests.health().outbox_pending and r)
        results_csv = None
        done = message_with(blocks.CREDENTIALS)
        if done is not None:
            transcript.note("@alice clicks [Send me the device credentials]")
            ws.click(ALICE, done, blocks.CREDENTIALS)
            wait("the credentials", lambda: any(u.channel == fake.dm_channel(ALICE) and u.completed for u in fake.uploads.values()))
        thread_files = [u for u in fake.uploads.values() if u.channel == OPS and u.completed]
        if thread_files:
            results_csv = folder / thread_files[-1].name
            results_csv.write_bytes(thread_files[-1].content)
        registered = bot.workflow.requests.summary(final.id).created
        seconds = time.monotonic() - started
        out("")
        out(f"Request #{final.id}: {final.state}, {registered:,} devices registered in product {DEMO_PRODUCT_KEY}, in {seconds:.1f}s.")
        if results_csv:
            out(f"Every device's outcome: {results_csv}")
        out("Next: `iotreg emulator` and `iotreg register FILE -p PK` to try the CLI, or README.md, 'Connect to Slack'.")
        return DemoResult(request_ids, final.state, registered, results_csv, folder, seconds)
    finally:
        server.shutdown()
        server.server_close()
        bot.stop()
        fake.stop()
        emulator.stop()
