"""The composition root: settings in, a running bot out.

:func:`create_app` builds the Slack Web API client (with retries for 429, 5xx and connection
errors), the IoT client, the store, the workflow, the scheduler and the Bolt app, and registers the
listeners of :mod:`commands`, :mod:`views` and :mod:`actions`. Nothing else constructs these.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from slack_bolt import App, BoltResponse
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped
from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier
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
from bot.metrics import CONTENT_TYPE, CountingWebClient, Metrics
from bot.policy import Policy
from bot.registration import Jobs, Steps, Workflow
from bot.slack import actions, blocks, commands, home, views
from bot.slack.approvers import Approvers
from bot.slack.deps import Deps
from bot.slack.notifier import SlackNotifier
from bot.store import is_url, open_store

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"


#: Slack's requests are a few kilobytes; anything over this is refused from its Content-Length.
MAX_BODY = 1 << 20
#: Seconds a stopping bot (SIGTERM, a rolling deploy) gives its running steps before it hands
#: their leases back and ends: under the 30 s most platforms wait before SIGKILL.
STOP_GRACE = 8.0
_TIMESTAMP = re.compile(r"\d{1,12}")
_SIGNATURE = re.compile(r"v0=[0-9a-f]{64}")
#: In Socket Mode, /healthz turns unhealthy once the bot has been without a connection this long.
SOCKET_DOWN_LIMIT = 60.0


@dataclasses.dataclass
class Bot:
    """The running parts of one deployment."""

    app: App
    workflow: Workflow
    jobs: Jobs
    web_client: WebClient
    settings: Settings
    deps: Deps | None = None
    metrics: Metrics | None = None
    #: The Socket Mode connection, when the bot runs in Socket Mode (see :mod:`bot.server`).
    socket: Any = None

    def start(self) -> None:
        """Start the scheduler and resume every unfinished request (one scheduler per deployment)."""
        if isinstance(self.jobs, SchedulerJobs):
            self.jobs.start()
            if self.deps is not None:  # lists a replica that died was reading: read here
                self.jobs.scheduler.add_job(
                    views.resume_uploads, "interval", seconds=views.UPLOAD_SWEEP, args=[self.deps, self.web_client],
                    id="uploads", max_instances=1, coalesce=True,
                )
        resumed = self.workflow.resume()
        uploads = views.resume_uploads(self.deps, self.web_client) if self.deps is not None else 0
        log.info("iotreg started; %d unfinished request(s) and %d unread upload(s) resumed", resumed, uploads)

    def stop(self, grace: float = STOP_GRACE) -> bool:
        """Stop: no new step starts, running ones get ``grace`` seconds, then every lease goes
        back at once (another replica carries on). Returns whether every step finished; if not,
        the process must end now rather than let them go on without their leases."""
        finished = self.workflow.stop(grace)
        if not finished:
            return False  # the caller ends the process now: nothing may wait for the pools
        if self.deps is not None:
            self.deps.background.shutdown(wait=True)
            self.deps.slow.shutdown(wait=True)
        if isinstance(self.jobs, SchedulerJobs):
            self.jobs.shutdown(wait=finished)
        self.workflow.close()
        return finished

    def health(self) -> tuple[bool, dict[str, Any]]:
        health = self.workflow.requests.health(self.workflow.origins)
        database = "ok" if health.ok else "unavailable"
        scheduler = not isinstance(self.jobs, SchedulerJobs) or self.jobs.scheduler.running
        ok = health.ok and scheduler
        body: dict[str, Any] = {
            "ok": ok, "database": database, "scheduler": "running" if scheduler else "stopped",
            "pending_notifications": health.outbox_pending,
        }
        if self.socket is not None:
            down = self.socket.down_for()
            body["slack"] = "connected" if down == 0 else f"reconnecting for {down:.0f} s"
            body["ok"] = ok and down < SOCKET_DOWN_LIMIT
        return body["ok"], body

    def wsgi(self, *, events: bool = True) -> Callable[[dict, Callable], Iterable[bytes]]:
        """The WSGI application: ``GET /healthz`` and ``GET /metrics`` for the platform, and (with
        ``events``, in HTTP mode) ``POST /slack/events`` for Slack.

        Before Bolt sees a request, the edge refuses a body over :data:`MAX_BODY` from its
        Content-Length (413, nothing read), and a missing, malformed or wrong signature (401); each
        refusal is one INFO line, without a traceback. Bolt checks the signature again."""
        handler = SlackRequestHandler(self.app, path=EVENTS_PATH)
        secret = self.settings.slack_signing_secret
        verifier = SignatureVerifier(secret) if secret else None  # Socket Mode needs none

        def answer(start_response: Callable, status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> list[bytes]:
            start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]

        def refuse(environ: dict, start_response: Callable, status: str, reason: str) -> list[bytes]:
            log.info("refused a request from %s: %s", environ.get("REMOTE_ADDR", "?"), reason, extra={"http_status": int(status[:3])})
            return answer(start_response, status, status[4:].encode())

        def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
            path, method = environ.get("PATH_INFO"), environ.get("REQUEST_METHOD")
            if method in ("GET", "HEAD") and path == "/healthz":
                ok, body = self.health()
                return answer(start_response, "200 OK" if ok else "503 Service Unavailable", json.dumps(body).encode(), "application/json")
            if method in ("GET", "HEAD") and path == "/metrics" and self.metrics is not None:
                return answer(start_response, "200 OK", self.metrics.exposition(), CONTENT_TYPE)
            if not events or path != EVENTS_PATH or method != "POST":
                return answer(start_response, "404 Not Found", b"Not Found")
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                return refuse(environ, start_response, "400 Bad Request", "a Content-Length that is not a number")
            if length > MAX_BODY:
                return refuse(environ, start_response, "413 Payload Too Large", f"a body of {length} bytes (limit {MAX_BODY})")
            timestamp = environ.get("HTTP_X_SLACK_REQUEST_TIMESTAMP", "")
            signature = environ.get("HTTP_X_SLACK_SIGNATURE", "")
            if not _TIMESTAMP.fullmatch(timestamp) or not _SIGNATURE.fullmatch(signature):
                return refuse(environ, start_response, "401 Unauthorized", "no well-formed Slack signature")
            body = environ["wsgi.input"].read(length) if length else b""
            if verifier is None or not verifier.is_valid(body, timestamp, signature):
                return refuse(environ, start_response, "401 Unauthorized", "a Slack signature that does not match (or is over 5 minutes old)")
            environ["wsgi.input"] = io.BytesIO(body)
            try:
                return handler(environ, start_response)
            except Exception:  # noqa: BLE001 - the edge: a signed body Bolt could not parse is a bug to see
                log.exception("a signed request Bolt could not handle")
                return answer(start_response, "400 Bad Request", b"iotreg could not read this request")

        return application


def slack_web_client(settings: Settings, on_call: Callable[[str, str], None] | None = None) -> WebClient:
    """slack-sdk's client on the configured API host, retrying 429 (honouring Retry-After), 5xx and
    connection errors before giving the failure to the outbox, which tries again later; each call
    counted by ``on_call`` (method, outcome) when given."""
    options: dict[str, Any] = {
        "token": settings.slack_bot_token,
        "base_url": settings.slack_api_url,
        "timeout": 30,
        "retry_handlers": [
            RateLimitErrorRetryHandler(max_retry_count=3),
            ServerErrorRetryHandler(max_retry_count=2),
            ConnectionErrorRetryHandler(max_retry_count=2),
        ],
    }
    return CountingWebClient(on_call=on_call, **options) if on_call else WebClient(**options)


class _GivenClientWarning(logging.Filter):
    """Bolt warns that ``token`` is unused whenever SLACK_BOT_TOKEN is in the environment and a
    client is given; ours is built from that very token, so the warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != warning_client_prioritized_and_token_skipped()


logging.getLogger("slack_bolt.App").addFilter(_GivenClientWarning())


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
    settings.require("slack_bot_token", *required_for_slack(settings))
    clock = clock or SystemClock()
    # Read at scrape time, through the request service (so every replica on one database agrees).
    metrics = Metrics(lambda: workflow.requests.figures())
    web_client = web_client or slack_web_client(settings, on_call=metrics.slack_call)
    store = None
    if iot_client is None:
        # A server database is opened first: the client books its calls there (shared quotas).
        store = open_store(settings.db_path) if is_url(settings.db_path) else None
        iot_client = wiring.iot_client(settings, clock=clock, observer=metrics.iot_call, store=store)
    elif iot_client.observer is None:
        iot_client.observer = metrics.iot_call
    workers = max(4, settings.workers // 2)
    approvers = Approvers(web_client, settings.approvers, clock)
    default, products = wiring.rules(settings)  # a bad policy file stops the bot here, saying where
    workflow = wiring.workflow(
        settings,
        clock=clock,
        client=iot_client,
        store=store,
        notifier=lambda requests: SlackNotifier(
            web_client, approvers, requests,
            notify_channel=settings.notify_channel, credentials_dm=settings.credentials_dm, label=label,
        ),
        jobs=jobs or (lambda steps: SchedulerJobs(steps, workers=workers)),
        policy=Policy(approvers, default=default, products=products, membership=approvers.of),
        origins=frozenset({Origin.SLACK}),
    )
    app = App(
        signing_secret=settings.slack_signing_secret or "",
        # Socket Mode envelopes carry no signature: Bolt checks HTTP requests only.
        request_verification_enabled=bool(settings.slack_signing_secret),
        client=web_client,
        # ``iotreg serve`` asks auth.test itself, to fail with one line naming the setting.
        token_verification_enabled=False,
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

    return Bot(app=app, workflow=workflow, jobs=workflow.jobs, web_client=web_client, settings=settings, deps=deps, metrics=metrics)


def required_for_slack(settings: Settings) -> tuple[str, ...]:
    """What Slack's side needs beyond the bot token: the signing secret in HTTP mode; nothing in
    Socket Mode (SLACK_APP_TOKEN set), whose envelopes come over a connection the bot opened."""
    return () if settings.slack_app_token else ("slack_signing_secret",)
