"""The Home tab: what waits for this person's approval (with the buttons), and their own requests.

Published with ``views.publish`` when the person opens the tab (``app_home_opened``), and again
after they click a button on it.
"""

from __future__ import annotations

import logging

from slack_bolt import App
from slack_sdk import WebClient

from bot.slack import blocks
from bot.slack.deps import Deps

log = logging.getLogger(__name__)


def register(app: App, deps: Deps) -> None:
    @app.event("app_home_opened")
    def opened(event: dict, client: WebClient) -> None:
        if event.get("tab", "home") == "home" and event.get("user"):
            deps.background.submit(publish, deps, client, event["user"])


def publish(deps: Deps, client: WebClient, user: str) -> None:
    """Show ``user`` their Home tab as it stands now."""
    try:
        waiting = [
            (request, deps.requests.approvals(request.id), deps.requests.rule_of(request).approvals)
            for request in deps.requests.waiting_for(user)
        ]
        view = blocks.home_view(waiting, deps.requests.requested_by(user), deps.label)
        client.views_publish(user_id=user, view=view)
    except Exception:  # noqa: BLE001 - this thread is an edge: a tab not refreshed is logged
        log.exception("publishing the Home tab of %s failed", user)
