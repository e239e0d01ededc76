"""Socket Mode: the bot's connection to Slack when it has no public URL, kept up by a watchdog.

Slack hands out a WebSocket URL (``apps.connections.open``), says ``hello`` on it, sends each
request as an envelope and waits 3 seconds for its ack. It may ask for a new connection at any time
(a ``disconnect`` envelope: ``warning``, ``refresh_requested``, ``link_disabled``), opening the new
one first and sending the next envelope on it; and a connection can die without a close frame.

slack-sdk's built-in client reads one connection at a time in one thread, and keeps reading a
replaced connection until its 3-second receive timeout (the next envelope then misses Slack's 3 s);
when a connection ends without a close frame it loops on the dead socket until five pings have
failed. This client is a :class:`~slack_sdk.socket_mode.client.BaseSocketModeClient` (so slack-sdk's
envelope handling and Bolt's adapter functions work unchanged) with instead:

* one reader thread per connection, started as soon as the connection is up, so an envelope on the
  new connection is read at once while the old one is closed in the background;
* a watchdog that pings every :attr:`Timing.ping_interval` and replaces a connection from which
  nothing (no pong, no ping, no envelope) has come for :attr:`Timing.dead_after` seconds; it waits on
  an event between looks, so a dead or half-open socket costs no CPU;
* reconnection with a capped back-off while Slack cannot be reached, each failure on one line.

:attr:`Timing.worst_case_replacement` is the bound on noticing and replacing a silent connection.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from queue import Queue
from typing import Any

import websocket
from slack_bolt import App
from slack_bolt.adapter.socket_mode.internals import run_bolt_app, send_response
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientNotConnectedError
from slack_sdk.socket_mode.client import BaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Timing:
    """How the connection is watched, in seconds."""

    ping_interval: float = 3.0
    #: Silence after which a connection counts as dead: two pings unanswered, with a margin.
    dead_after: float = 8.0
    #: How often the watchdog looks (it sleeps on an event in between).
    tick: float = 0.5
    #: Each of ``apps.connections.open`` and the WebSocket handshake gives up after this.
    connect_timeout: float = 2.5
    #: Longest wait between two attempts to reconnect while Slack cannot be reached.
    max_backoff: float = 30.0

    @property
    def worst_case_replacement(self) -> float:
        """From the last byte heard to a new connection being read: silence, the watchdog's look,
        then the URL and the handshake, each at its timeout."""
        return self.dead_after + self.tick + 2 * self.connect_timeout


class _Link:
    """One WebSocket connection and what the watchdog knows of it."""

    def __init__(self, ws: websocket.WebSocket, number: int) -> None:
        self.ws = ws
        self.number = number
        self.heard = self.pinged = time.monotonic()
        self.closed = False

    def close(self, *, polite: bool) -> None:
        """Close it; ``polite`` sends a close frame first (a connection Slack asked us to replace)."""
        if self.closed:
            return
        self.closed = True
        if polite:
            try:
                self.ws.send_close(websocket.STATUS_NORMAL)
            except Exception:  # noqa: BLE001 - closing what may already be gone
                pass
        try:
            if self.ws.sock is not None:
                self.ws.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader at once
        except OSError:
            pass
        self.ws.shutdown()


class SocketModeClient(BaseSocketModeClient):
    """Socket Mode with one reader per connection and a watchdog (see the module docstring)."""

    def __init__(self, app_token: str, web_client: WebClient, *, timing: Timing = Timing(), concurrency: int = 10) -> None:
        self.app_token = app_token
        self.web_client = web_client
        self.timing = timing
        self.logger = log
        self.wss_uri = None  # type: ignore[assignment]
        self.message_queue = Queue()
        self.message_listeners = []
        self.socket_mode_request_listeners = []
        self.closed = False
        self.connect_operation_lock = threading.Lock()
        self.message_workers = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="socket-mode")
        self._link: _Link | None = None
        self._swap = threading.Lock()
        self._numbers = itertools.count(1)
        self._down_since: float | None = time.monotonic()
        self._stop = threading.Event()
        self._processor = threading.Thread(target=self.process_messages, name="socket-mode-envelopes", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="socket-mode-watchdog", daemon=True)

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (raising if Slack refuses or cannot be reached), then keep the connection up."""
        self.connect_to_new_endpoint()
        self._processor.start()
        self._watchdog.start()

    def close(self) -> None:
        self.closed = True
        self._stop.set()
        with self._swap:
            link, self._link = self._link, None
        if link is not None:
            link.close(polite=True)
        self.message_queue.put(None)  # wakes the envelope thread, which then sees ``closed``
        for thread in (self._watchdog, self._processor):
            if thread.is_alive():
                thread.join(timeout=5)
        self.message_workers.shutdown(wait=True)

    def is_connected(self) -> bool:
        link = self._link
        return link is not None and not link.closed

    def down_for(self) -> float:
        """Seconds without a usable connection (0 while connected)."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def connection_number(self) -> int:
        """Which connection of this process is current (1 for the first); 0 before any."""
        link = self._link
        return link.number if link is not None else 0

    # -- connections ------------------------------------------------------------------------------

    def connect_to_new_endpoint(self, force: bool = False) -> None:
        """A new connection: always with ``force`` (Slack asked for one), else only if there is none."""
        with self.connect_operation_lock:  # every step below has a timeout
            if force or not self.is_connected():
                self.wss_uri = self.issue_new_wss_url()
                self.connect()

    def issue_new_wss_url(self) -> str:
        """A URL for a new connection (``apps.connections.open``); a failure is the caller's to tell."""
        while True:
            try:
                return str(self.web_client.apps_connections_open(app_token=self.app_token)["url"])
            except SlackApiError as exc:
                if exc.response.get("error") != "ratelimited" or self.closed:
                    raise
                delay = min(float(exc.response.headers.get("Retry-After", "5")), self.timing.max_backoff)
                log.info("Socket Mode: apps.connections.open is rate limited; trying again in %.0f s", delay)
                self._stop.wait(delay)

    def connect(self) -> None:
        """Open a connection to ``wss_uri`` and read it at once; then close the one it replaces.

        Called by :meth:`connect_to_new_endpoint`, which asks Slack for the URL first (on ``start``,
        on a ``disconnect`` envelope, and when the watchdog replaces a dead connection)."""
        ws = websocket.create_connection(self.wss_uri, timeout=self.timing.connect_timeout, enable_multithread=True)
        ws.settimeout(self.timing.dead_after)  # reads wake up now and then even if the watchdog were gone
        link = _Link(ws, next(self._numbers))
        with self._swap:
            if self.closed:  # closed while this connection was being opened
                link.close(polite=True)
                return
            old, self._link = self._link, link
            self._down_since = None
        threading.Thread(target=self._read, args=(link,), name=f"socket-mode-read-{link.number}", daemon=True).start()
        if old is not None:
            old.close(polite=True)
        log.info("Socket Mode: connected to Slack (connection %d)", link.number, extra={"connection": link.number})

    def disconnect(self) -> None:
        link = self._link
        if link is not None:
            link.close(polite=True)

    def send_message(self, message: str) -> None:
        for _ in range(2):  # once more on the new connection if the current one was just replaced
            link = self._link
            if link is None:
                break
            try:
                link.ws.send(message)
                return
            except (websocket.WebSocketException, OSError):
                if link is self._link:
                    break
        raise SlackClientNotConnectedError("no connection to Slack to send the ack on")

    def _read(self, link: _Link) -> None:
        while not link.closed:
            try:
                opcode, frame = link.ws.recv_data_frame(True)  # answers pings itself
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError, ValueError) as exc:
                self._lost(link, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                return
            link.heard = time.monotonic()
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self.enqueue_message(frame.data.decode("utf-8") if isinstance(frame.data, bytes) else frame.data)
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                self._lost(link, "Slack closed it")
                return

    def _lost(self, link: _Link, reason: str) -> None:
        """A connection ended or went silent: if it is the current one, replace it now."""
        link.close(polite=False)
        with self._swap:
            if link is not self._link or self.closed:
                return  # a replaced connection ending, as it should
            self._link = None
            self._down_since = time.monotonic()
        log.warning("Socket Mode: connection %d lost (%s); reconnecting", link.number, reason)
        self._reconnect()

    def _reconnect(self) -> bool:
        try:
            self.connect_to_new_endpoint()
            return True
        except Exception as exc:  # noqa: BLE001 - the watchdog tries again
            log.warning("Socket Mode: cannot reconnect to Slack: %s", describe(exc))
            return False

    def _watch(self) -> None:
        backoff, next_try = 1.0, 0.0
        while not self._stop.wait(self.timing.tick):
            link, now = self._link, time.monotonic()
            if link is None or link.closed:
                if now >= next_try:
                    if self._reconnect():
                        backoff = 1.0
                    else:
                        next_try, backoff = now + backoff, min(backoff * 2, self.timing.max_backoff)
                continue
            if now - link.heard > self.timing.dead_after:
                self._lost(link, f"nothing heard for {now - link.heard:.1f} s")
            elif now - link.pinged >= self.timing.ping_interval:
                link.pinged = now
                try:
                    link.ws.ping(f"{link.number}:{now:.3f}")
                except (websocket.WebSocketException, OSError) as exc:
                    self._lost(link, f"ping failed: {type(exc).__name__}")

    def process_messages(self) -> None:
        while not self.closed:
            try:
                self.process_message()  # a ``disconnect`` envelope reconnects here
            except Exception as exc:  # noqa: BLE001 - the watchdog keeps the connection up
                log.warning("Socket Mode: cannot reconnect to Slack: %s", describe(exc))


def describe(exc: BaseException) -> str:
    """One line for a failure to reach Slack, without a token."""
    if isinstance(exc, SlackApiError):
        return f"Slack answered {exc.response.get('error') or exc.response.status_code}"
    reason = getattr(exc, "reason", None)  # urllib's URLError: the socket's own words
    if reason:
        return str(reason)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class BoltSocketMode:
    """Bolt's app behind :class:`SocketModeClient`: each envelope dispatched, its ack sent back."""

    def __init__(self, app: App, client: SocketModeClient) -> None:
        self.app = app
        self.client = client
        client.socket_mode_request_listeners.append(self.handle)

    def handle(self, client: BaseSocketModeClient, request: SocketModeRequest) -> None:
        started = time.time()
        send_response(client, request, run_bolt_app(self.app, request), started)


def connection(app: App, app_token: str, api_url: str, *, timing: Timing = Timing(), concurrency: int = 10,
               on_call: Callable[[str, str], None] | None = None) -> SocketModeClient:
    """A client for ``app`` over Socket Mode, not yet started; ``apps.connections.open`` goes to
    ``api_url`` with the app-level token (counted by ``on_call`` when given)."""
    from bot.metrics import CountingWebClient

    # slack-sdk's own error lines are left out: the client says once what failed (``describe``).
    options: dict[str, Any] = {"token": app_token, "base_url": api_url, "timeout": timing.connect_timeout,
                               "logger": logging.getLogger("bot.quiet")}
    web = CountingWebClient(on_call=on_call, **options) if on_call else WebClient(**options)
    client = SocketModeClient(app_token, web, timing=timing, concurrency=concurrency)
    BoltSocketMode(app, client)
    return client
