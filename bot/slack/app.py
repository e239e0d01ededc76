"""The composition root: settings in, a running bot out.

:func:`create_app` builds the Slack Web API client (with retries for 429, 5xx and connection
errors), the IoT client, the store, the workflow, the scheduler and the Bolt app, and registers the
listeners of :mod:`commands`, :mod:`views` and :mod:`actions`. Nothing else constructs these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from slack_bolt import App, BoltResponse
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)

from bot import wiring
from bot.aliyun.client import IotClient
from bot.clock import Clock, SystemClock
from bot.config import Settings
from bot.jobs import SchedulerJobs
from bot.domain import Origin
from bot.policy import Policy
from bot.registration import Jobs, Steps, Workflow
from bot.slack import actions, blocks, commands, home, views
from bot.slack.approvers import Approvers
from bot.slack.deps import Deps
from bot.slack.notifier import SlackNotifier

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"


@dataclasses.dataclass
class Bot:
    """The running parts of one deployment."""

    app: App
    workflow: Workflow
    jobs: Jobs
    web_client: WebClient
    settings: Settings
    deps: Deps | None = None

    def start(self) -> None:
        """Start the scheduler and resume every unfinished request (one scheduler per deployment)."""
        if isinstance(self.jobs, SchedulerJobs):
            self.jobs.start()
        resumed = self.workflow.resume()
        uploads = views.resume_uploads(self.deps, self.web_client) if self.deps is not None else 0
        log.info("iotreg started; %d unfinished request(s) and %d unread upload(s) resumed", resumed, uploads)

    def stop(self) -> None:
        if self.deps is not None:
            self.deps.background.shutdown(wait=True)
        if isinstance(self.jobs, SchedulerJobs):
            self.jobs.shutdown(wait=True)
        self.workflow.close()

    def health(self) -> tuple[bool, dict[str, Any]]:
        health = self.workflow.requests.health(self.workflow.origins)
        database = "ok" if health.ok else "unavailable"
        scheduler = not isinstance(self.jobs, SchedulerJobs) or self.jobs.scheduler.running
        ok = health.ok and scheduler
        return ok, {
            "ok": ok, "database": database, "scheduler": "running" if scheduler else "stopped",
            "pending_notifications": health.outbox_pending,
        }

    def wsgi(self) -> Callable[[dict, Callable], Iterable[bytes]]:
        """The WSGI application: ``POST /slack/events`` for Slack, ``GET /healthz`` for the platform."""
        handler = SlackRequestHandler(self.app, path=EVENTS_PATH)

        def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz" and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
                ok, body = self.health()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
                return [json.dumps(body).encode()]
            try:
                return handler(environ, start_response)
            except Exception:  # noqa: BLE001 - the edge: Bolt could not parse a signed body
                log.exception("a request Bolt could not handle")
                start_response("400 Bad Request", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"iotreg could not read this request"]

        return application


def slack_web_client(settings: Settings) -> WebClient:
    """slack-sdk's client on the configured API host, retrying 429 (honouring Retry-After), 5xx and
    connection errors before giving the failure to the outbox, which tries again later."""
    return WebClient(
        token=settings.slack_bot_token,
        base_url=settings.slack_api_url,
        timeout=30,
        retry_handlers=[
            RateLimitErrorRetryHandler(max_retry_count=3),
            ServerErrorRetryHandler(max_retry_count=2),
            ConnectionErrorRetryHandler(max_retry_count=2),
        ],
    )


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    iot_client: IotClient | None = None,
    web_client: WebClient | None = None,
    jobs: Callable[[Steps], Jobs] | None = None,
    label: str = "",
) -> Bot:
    """Build the whole bot from settings. Tests and the demo pass their own clock, clients or jobs
    (a factory given the workflow's steps)."""
    settings.require("slack_bot_token", "slack_signing_secret")
    clock = clock or SystemClock()
    web_client = web_client or slack_web_client(settings)
    workers = max(4, settings.workers // 2)
    approvers = Approvers(web_client, settings.approvers, clock)
    default, products = wiring.rules(settings)  # a bad policy file stops the bot here, saying where
    workflow = wiring.workflow(
        settings,
        clock=clock,
        client=iot_client,
        notifier=lambda requests: SlackNotifier(
            web_client, approvers, requests,
            notify_channel=settings.notify_channel, credentials_dm=settings.credentials_dm, label=label,
        ),
        jobs=jobs or (lambda steps: SchedulerJobs(steps, workers=workers)),
        policy=Policy(approvers, default=default, products=products, membership=approvers.of),
        origins=frozenset({Origin.SLACK}),
    )
    app = App(
        signing_secret=settings.slack_signing_secret,
        client=web_client,
        # Listeners ack first and then download, parse and call IoT Platform in this pool: sized so
        # slow work never delays another request's ack.
        listener_executor=ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="listener"),
    )
    deps = Deps(
        requests=workflow.requests,
        approvers=approvers,
        bot_token=settings.slack_bot_token or "",
        api_url=settings.slack_api_url,
        credentials_dm=settings.credentials_dm,
        label=label,
    )
    commands.register(app, deps)
    views.register(app, deps)
    actions.register(app, deps)
    home.register(app, deps)

    @app.error
    def on_error(error: Exception, body: dict, logger: logging.Logger) -> BoltResponse:
        # The one place a listener's unexpected failure is caught: logged, and answered with a
        # message instead of an HTTP 500 (which Slack shows as a bare "failed" error).
        logger.exception("listener failed: %s", error)
        return BoltResponse(status=200, body=blocks.SORRY)

    return Bot(app=app, workflow=workflow, jobs=workflow.jobs, web_client=web_client, settings=settings, deps=deps)
