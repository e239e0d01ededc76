"""What the Slack listeners need, built once by :func:`bot.slack.app.create_app`."""

from __future__ import annotations

import dataclasses

from bot.registration import Workflow
from bot.slack.approvers import Approvers


@dataclasses.dataclass(frozen=True)
class Deps:
    workflow: Workflow
    approvers: Approvers
    bot_token: str = dataclasses.field(repr=False)
    api_url: str
    allow_self_approval: bool = False
    credentials_dm: bool = True
    label: str = ""  # shown on every message and modal, e.g. in emulator mode
