"""Helpers the test modules share (pytest puts this folder on the import path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Wait for a condition that another thread makes true; ``True`` as soon as it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


# -- the Slack front end, running for real: Bolt over HTTP, the fake Slack, the emulator --------------

import dataclasses  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

from bot.domain import Request

from bot.store import Store  # noqa: E402
from bot.config import Settings  # noqa: E402
from bot.jobs import InlineJobs  # noqa: E402
from bot.server import serve_locally  # noqa: E402
from bot.slack.app import create_app  # noqa: E402
from bot.standins.slack import FakeSlack, Workspace  # noqa: E402

SIGNING_SECRET = "test-signing-secret-0123456789"


@dataclasses.dataclass
class SlackScenario:
    """The bot serving Slack over HTTP, its workflow run when a test says so (``drive``), on the
    emulator's manual clock; what listeners do after their ack is waited for (``request``)."""

    emulator: Any
    fake: FakeSlack
    env: dict
    bot: Any = None
    server: Any = None
    ws: Workspace | None = None

    def start_bot(self) -> None:
        self.bot = create_app(Settings.from_env(self.env), clock=self.emulator.clock, jobs=lambda steps: InlineJobs(self.emulator.clock, steps))
        self.jobs = self.bot.jobs
        self.bot.start()
        self.server = serve_locally(self.bot.wsgi())
        self.ws = Workspace(self.fake, SIGNING_SECRET, app_url=f"http://127.0.0.1:{self.server.server_port}/slack/events")

    def stop_bot(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.bot.app.listener_runner.listener_executor.shutdown(wait=True)
        self.bot.stop()

    @property
    def store(self) -> Store:
        return self.bot.workflow.store

    def request(self, request_id: int = 1) -> Request:
        assert wait_until(lambda: self.store.get(request_id) is not None), f"request #{request_id} was never created"
        return self.store.get(request_id)

    #: The channel where people use /devices.
    channel = "C0OPS"

    def wait_state(self, request_id: int, *states: str) -> str:
        """For what a listener does after its ack (in Bolt's thread pool)."""
        wait_until(lambda: self.store.get(request_id) is not None and self.store.get(request_id).state in states)
        return self.store.get(request_id).state

    def anchor(self, request_id: int = 1) -> dict:
        """The request's message in the channel, as it stands now."""
        ts = self.store.get(request_id).origin_data.get("thread_ts")
        assert ts, "no anchor message was posted"
        return next(m for m in self.fake.messages(self.channel) if m["ts"] == ts)

    def replies(self, request_id: int = 1) -> list[dict]:
        return self.fake.thread(self.channel, self.store.get(request_id).origin_data.get("thread_ts"))

    def drive(self, request_id: int, *states: str) -> str:
        """Run the workflow (polls, notifications) on the manual clock until the request is in ``states``."""
        self.request(request_id)  # created by a listener after its ack, which then asks for its first step
        wait_until(lambda: f"request-{request_id}" in self.jobs.scheduled() or self.store.get(request_id).state in states or self.store.get(request_id).final)
        self.jobs.run_until(lambda: self.store.get(request_id).state in states)
        self.jobs.run_due()
        return self.store.get(request_id).state


def buttons(message: dict) -> dict[str, dict]:
    """The buttons of a message or view, by action id."""
    return {e["action_id"]: e for b in message.get("blocks", []) if b["type"] == "actions" for e in b["elements"]}


def text_of(message: dict) -> str:
    """All the text a person reads in a message or view."""
    parts = [message.get("text", "")]
    for block in message.get("blocks", []):
        if isinstance(block.get("text"), dict):
            parts.append(block["text"]["text"])
        for element in block.get("elements", []):
            if isinstance(element, dict) and isinstance(element.get("text"), str):
                parts.append(element["text"])
    return "\n".join(parts)


@contextmanager
def slack_scenario(
    cls: type[SlackScenario],
    emulator: Any,
    db: str,
    *,
    channels: Mapping[str, dict[str, Any]],
    notify_channel: str,
    approvers: str,
    bot_token: str = "xoxb-test-token",
    usergroups: Mapping[str, list[str]] = {},  # noqa: B006 - read only
    settings: Mapping[str, str] = {},  # noqa: B006 - read only
) -> Iterator[SlackScenario]:
    """A started ``cls`` on the database ``db`` (what ``IOTREG_DB`` is set to: a SQLite file or a
    PostgreSQL URL, the ``store_location`` fixture's) over a fake Slack with ``channels`` (id ->
    add_channel options); the
    approvers and the members of ``usergroups`` are people of the workspace; ``settings`` are
    more environment variables."""
    fake = FakeSlack(bot_token=bot_token).start()
    for channel, options in channels.items():
        fake.add_channel(channel, **options)
    fake.usergroups.update(usergroups)
    people = {a for a in approvers.split(",") if a.startswith("U")} | {u for members in usergroups.values() for u in members}
    for person in sorted(people):
        if not fake.has_user(person):
            fake.add_user(person)
    env = {
        **emulator.env(),
        "SLACK_BOT_TOKEN": fake.bot_token,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": fake.api_url,
        "IOTREG_DB": db,
        "IOTREG_NOTIFY_CHANNEL": notify_channel,
        "IOTREG_APPROVERS": approvers,
        "IOTREG_POLL_INTERVAL": "1",
        "IOTREG_APPROVAL_TTL": "1h",
        "IOTREG_WORKERS": "4",
        **settings,
    }
    scenario = cls(emulator, fake, env)
    scenario.start_bot()
    try:
        yield scenario
    finally:
        scenario.stop_bot()
        fake.stop()


def response_after(scenario, before: int, timeout: float = 5.0) -> str:
    """The text of the first answer through a response_url after the first ``before`` ones."""
    return scenario.fake.wait_for(lambda: scenario.fake.responses[before:] and scenario.fake.responses[before].payload["text"], timeout=timeout)
