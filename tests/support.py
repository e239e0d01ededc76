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
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bot.domain import Request

from bot.store.sqlite import SqliteStore  # noqa: E402
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
    def store(self) -> SqliteStore:
        return self.bot.workflow.store

    def request(self, request_id: int = 1) -> Request:
        assert wait_until(lambda: self.store.get(request_id) is not None), f"request #{request_id} was never created"
        return self.store.get(request_id)

    def drive(self, request_id: int, *states: str) -> str:
        """Run the workflow (polls, notifications) on the manual clock until the request is in ``states``."""
        self.request(request_id)  # created by a listener after its ack
        self.jobs.run_until(lambda: self.store.get(request_id).state in states)
        self.jobs.run_due()
        return self.store.get(request_id).state


@contextmanager
def slack_scenario(
    cls: type[SlackScenario],
    emulator: Any,
    tmp_path: Path,
    *,
    channels: Mapping[str, dict[str, Any]],
    notify_channel: str,
    approvers: str,
    bot_token: str = "xoxb-test-token",
    usergroups: Mapping[str, list[str]] = {},  # noqa: B006 - read only
) -> Iterator[SlackScenario]:
    """A started ``cls`` over a fake Slack with ``channels`` (id -> add_channel options)."""
    fake = FakeSlack(bot_token=bot_token).start()
    for channel, options in channels.items():
        fake.add_channel(channel, **options)
    fake.usergroups.update(usergroups)
    env = {
        **emulator.env(),
        "SLACK_BOT_TOKEN": fake.bot_token,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": fake.api_url,
        "IOTREG_DB": str(tmp_path / "iotreg.db"),
        "IOTREG_NOTIFY_CHANNEL": notify_channel,
        "IOTREG_APPROVERS": approvers,
        "IOTREG_POLL_INTERVAL": "1",
        "IOTREG_APPROVAL_TTL": "1h",
        "IOTREG_WORKERS": "4",
    }
    scenario = cls(emulator, fake, env)
    scenario.start_bot()
    try:
        yield scenario
    finally:
        scenario.stop_bot()
        fake.stop()
