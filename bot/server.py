"""``iotreg serve``: the bot behind gunicorn in HTTP mode, or connected over Socket Mode.

HTTP mode runs one gunicorn worker with threads (``gthread``): one process, so one scheduler and
one writer of the database, as the deployment needs; threads for concurrent acks. The bot is built
inside the worker (``load``), after the fork, so no thread or SQLite connection crosses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from gunicorn.app.base import BaseApplication

from bot import wiring
from bot.config import Settings

log = logging.getLogger(__name__)


class Server(BaseApplication):
    def __init__(self, settings: Settings, *, host: str = "0.0.0.0", port: int | None = None, build: Any = None) -> None:
        self.settings = settings
        self.options = {
            "bind": f"{host}:{port or settings.port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": settings.workers,
            "timeout": 60,
            "graceful_timeout": 30,
            "keepalive": 5,
            "worker_exit": _worker_exit,
        }
        self.build = build  # a callable returning a started Bot (tests, emulator mode)
        self.bot = None
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from bot.slack.app import create_app

        bot = self.build() if self.build else create_app(self.settings)
        bot.start()
        _running.append(bot)
        return bot.wsgi()


_running: list[Any] = []


def _worker_exit(server: Any, worker: Any) -> None:
    while _running:
        _running.pop().stop()


EMULATOR_LABEL = ":test_tube: *EMULATOR MODE*: devices are created on iotreg's built-in emulator, not on Alibaba Cloud."


def emulator_bot(settings: Settings) -> Any:
    """A builder of the bot backed by an embedded IoT Platform emulator, every message labelled so."""

    def build() -> Any:
        import dataclasses

        from bot.standins.emulator import Emulator
        from bot.slack.app import create_app

        emulator = Emulator(port=0).start()  # built in the serving process, after any fork
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


def socket_mode(settings: Settings, build: Any = None) -> None:
    """Connect to Slack over Socket Mode (no public URL) and run until interrupted."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    from bot.slack.app import create_app

    bot = build() if build else create_app(settings)
    bot.start()
    try:
        SocketModeHandler(bot.app, settings.slack_app_token).start()
    finally:
        bot.stop()


class _LocalServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve_locally(application: Callable, host: str = "127.0.0.1", port: int = 0) -> WSGIServer:
    """The WSGI app on a threaded local server, started in the background (``server_port`` tells
    where). For the demo, the benchmarks and the tests: production runs gunicorn (:class:`Server`)."""
    server = make_server(host, port, application, server_class=_LocalServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server
