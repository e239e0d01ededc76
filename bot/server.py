"""``iotreg serve``: the bot on ``PORT`` in HTTP mode, or connected over Socket Mode with ``PORT``
still answering ``/healthz`` and ``/metrics``.

Any number of processes on one PostgreSQL database (replicas): the database's leases decide which
one runs each step (:mod:`bot.leases`); one process on a SQLite file. The HTTP
server is waitress: its main thread reads every request whole, headers and body, without blocking
(a body over :data:`~bot.slack.app.MAX_BODY` is refused from its Content-Length before it is
read), and only a complete request goes to one of ``IOTREG_WORKERS`` threads. A client that never
finishes its body holds a socket, not a thread, so it cannot stop the bot answering others; an idle
one is closed after :data:`IDLE_TIMEOUT`.

A start that cannot succeed (Slack unreachable or a token refused in Socket Mode, the database or
the port unusable) raises :class:`StartupError`, one line naming the setting to fix.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from bot import wiring
from bot.config import Settings
from bot.store import StoreBusy, StoreUnavailable

log = logging.getLogger(__name__)
#: For slack-sdk clients whose failures iotreg reports itself, in one line.
QUIET = logging.getLogger("bot.quiet")
QUIET.setLevel(logging.CRITICAL)

#: Seconds a connection may stay silent (mid-request or between requests) before it is closed
#: (waitress looks every 5 s, so within 35 s).
IDLE_TIMEOUT = 30
#: Open connections at most; past it, new ones wait in the listen backlog.
CONNECTION_LIMIT = 1000
#: Seconds a thread may hold the GIL while others wait (Python's default: 0.005). waitress reads and
#: writes every connection from one thread; while the request threads run Python, that thread waits
#: for the GIL at each step, so a shorter slice shortens every request's wait (bench/bench_ack.py).
SWITCH_INTERVAL = 0.001


class StartupError(Exception):
    """The bot cannot start; the message names the setting to fix."""


class Server:
    """Build and start the bot, serve ``PORT`` (and connect over Socket Mode when
    ``SLACK_APP_TOKEN`` is set) until SIGTERM or SIGINT, then stop it all."""

    def __init__(self, settings: Settings, *, host: str = "0.0.0.0", port: int | None = None, build: Any = None) -> None:
        self.settings = settings
        self.host = host
        self.port = settings.port if port is None else port
        self.build = build  # a callable returning a Bot-like object (the emulator, the benchmark)
        self.socket_mode = bool(settings.slack_app_token)

    def run(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        bot = self._build()
        socket = None
        try:
            check_slack(bot)
            if self.socket_mode:
                socket = self._connect(bot)  # before resuming any work: a refused token stops here
            bot.start()
            server = self._listen(bot.wsgi(events=not self.socket_mode))

            def on_signal(signum: int, frame: Any) -> None:
                log.info("stopping on %s", signal.Signals(signum).name)
                raise SystemExit(0)  # ends waitress's loop, which then stops its threads

            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, on_signal)
            server.run()
        finally:
            if socket is not None:
                socket.close()
            if bot.stop() is False:
                # A step outlived the grace and its lease is back in the pool: it must not go on
                # beside the replica that takes it over.
                logging.shutdown()
                os._exit(0)

    def _build(self) -> Any:
        from bot.slack.app import create_app

        try:
            bot = self.build() if self.build else create_app(self.settings)
            # One serving process per SQLite file; PostgreSQL takes any number. (A bot built by a
            # benchmark may have no store of its own.)
            store = getattr(getattr(bot, "workflow", None), "store", None)
            if store is not None:
                store.hold("serve")
        except (StoreUnavailable, StoreBusy) as exc:
            raise StartupError(f"IOTREG_DB: {exc}") from None
        return bot

    def _connect(self, bot: Any) -> Any:
        from bot.slack import socket_mode

        client = socket_mode.connection(
            bot.app, self.settings.slack_app_token or "", self.settings.slack_api_url,
            concurrency=self.settings.workers, on_call=bot.metrics.slack_call if bot.metrics else None,
        )
        try:
            client.start()
        except Exception as exc:  # noqa: BLE001 - every way of failing to connect is one line
            client.close()
            raise StartupError(f"{socket_mode_setting(exc)}: cannot connect to Slack over Socket Mode: {socket_mode.describe(exc)}") from None
        bot.socket = client
        return client

    def _listen(self, application: Callable) -> Any:
        import waitress

        from bot.slack.app import MAX_BODY

        try:
            server = waitress.create_server(
                application, host=self.host, port=self.port, threads=self.settings.workers,
                max_request_body_size=MAX_BODY + 1,  # waitress refuses a Content-Length >= this
                channel_timeout=IDLE_TIMEOUT, cleanup_interval=5, connection_limit=CONNECTION_LIMIT, asyncore_use_poll=True,
                ident="iotreg", expose_tracebacks=False,
            )
        except OSError as exc:
            raise StartupError(f"PORT: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        log.info("listening on http://%s:%s (%s)", self.host, server.effective_port,
                 "/healthz, /metrics" if self.socket_mode else "/slack/events, /healthz, /metrics")
        return server


def check_slack(bot: Any) -> None:
    """Ask Slack who the bot is (``auth.test``), so a refused token or an unreachable Slack stops
    the start with one line instead of failing at the first request."""
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    from bot.slack import socket_mode
    from bot.slack.app import Bot

    if not isinstance(bot, Bot):
        return
    # Without retries, and without slack-sdk's own error lines: the failure is told once, below.
    client = WebClient(token=bot.settings.slack_bot_token, base_url=bot.settings.slack_api_url, timeout=10, logger=QUIET)
    try:
        client.auth_test()
    except SlackApiError as exc:
        raise StartupError(f"SLACK_BOT_TOKEN: Slack refused the bot token ({exc.response.get('error')})") from None
    except Exception as exc:  # noqa: BLE001 - unreachable, in every way requests can say it
        raise StartupError(f"SLACK_API_URL: cannot reach Slack at {bot.settings.slack_api_url}: {socket_mode.describe(exc)}") from None


def socket_mode_setting(exc: BaseException) -> str:
    """The setting behind a failure to connect: the token when Slack refused it, else the API URL."""
    from slack_sdk.errors import SlackApiError

    if isinstance(exc, SlackApiError) and exc.response.get("error") in ("invalid_auth", "not_authed", "not_allowed_token_type", "account_inactive", "token_revoked"):
        return "SLACK_APP_TOKEN"
    return "SLACK_API_URL"


EMULATOR_LABEL = ":test_tube: *EMULATOR MODE*: devices are created on iotreg's built-in emulator, not on Alibaba Cloud."


def emulator_bot(settings: Settings) -> Any:
    """A builder of the bot backed by an embedded IoT Platform emulator, every message labelled so."""

    def build() -> Any:
        import dataclasses

        from bot.slack.app import create_app
        from bot.standins.emulator import Emulator

        emulator = Emulator(port=0).start()  # built in the serving process
        trial = dataclasses.replace(
            settings,
            endpoint=emulator.endpoint,
            access_key_id=emulator.access_key_id,
            access_key_secret=emulator.access_key_secret,
            security_token=None,
            instance_id=None,
        )
        log.warning("emulator mode: IoT Platform calls go to %s (products: %s)", emulator.endpoint, ", ".join(emulator.product_keys))
        return create_app(trial, iot_client=wiring.iot_client(trial), label=EMULATOR_LABEL)

    return build


class _LocalServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve_locally(application: Callable, host: str = "127.0.0.1", port: int = 0) -> WSGIServer:
    """The WSGI app on a threaded local server, started in the background (``server_port`` tells
    where). For the demo, the benchmarks and the tests: production runs :class:`Server`."""
    server = make_server(host, port, application, server_class=_LocalServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server
