"""What the Slack listeners need, built once by :func:`bot.slack.app.create_app`."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor, ThreadPoolExecutor

from bot.service import RequestService
from bot.slack.approvers import Approvers


@dataclasses.dataclass(frozen=True)
class Deps:
    requests: RequestService
    approvers: Approvers
    bot_token: str = dataclasses.field(repr=False)
    api_url: str
    credentials_dm: bool = True
    label: str = ""  # shown on every message and modal, e.g. in emulator mode
    #: What people wait for after an ack (clicks, /devices answers, cancels) runs here, not in
    #: Bolt's listener pool, so no amount of it can delay another request's ack; and nothing slow
    #: runs here, so nobody's decision waits behind a download.
    background: Executor = dataclasses.field(default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="after-ack"))
    #: Slow work: reading uploaded lists (a download of up to 10 MB, then the reader) and credential
    #: exports. Two at a time, each read capped in size: memory stays bounded however many arrive.
    slow: Executor = dataclasses.field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="slow-work"))
