r"""A local stand-in for Slack, for the tests and the offline demo.

Two halves, both speaking Slack's wire formats so that the real ``slack_sdk`` and ``slack_bolt`` run
against them unchanged:

* :class:`FakeSlack` is the Slack side the bot calls. It serves the Web API methods the bot uses on
  ``http://127.0.0.1:PORT/api/`` (give ``fake.api_url`` to ``WebClient(base_url=…)``) with Slack's
  response shapes and error codes, and the other addresses Slack hands out: upload URLs
  (``files.getUploadURLExternal``), private file URLs (``url_private_download``, which answer a
  request without the bot token with HTTP 200 and a sign-in page, as Slack does) and
  ``response_url``\s. It keeps a model of the workspace for tests to read (:meth:`~FakeSlack.messages`,
  :meth:`~FakeSlack.thread`, :meth:`~FakeSlack.ephemeral`, :attr:`~FakeSlack.views`,
  :attr:`~FakeSlack.uploads`, :meth:`~FakeSlack.dm`, the Home tabs of ``views.publish``:
  :meth:`~FakeSlack.home`), records every request
  (:attr:`~FakeSlack.calls`), injects faults (:meth:`~FakeSlack.fail`, :meth:`~FakeSlack.delay`),
  holds answers until a test releases them (:meth:`~FakeSlack.hold`) and lets a test wait for the
  bot without sleeping (:meth:`~FakeSlack.wait_for`).
* Socket Mode: ``apps.connections.open`` (with the app-level token, :attr:`FakeSlack.app_token`)
  hands out ``ws://`` URLs of :attr:`FakeSlack.socket_mode`, a local Socket Mode server
  (:mod:`bot.standins.slack.socketmode`) that sends envelopes, collects acks and drops connections
  in every way Slack's can end.
* :class:`Workspace` plays the people: it builds the slash command, ``block_actions``,
  ``view_submission`` and Events API (``event_callback``, e.g. ``app_home_opened``) requests Slack sends, signs them with the signing secret
  (:func:`signature_headers`) and POSTs them to the app. The pure builders (:func:`command_body`,
  :func:`interaction_body`, :func:`block_actions_payload`, :func:`view_submission_payload`) are
  public for unit tests.

Slack's behaviour reproduced here, with the API reference (https://docs.slack.dev/reference/methods/)
as the source: ``not_authed``/``invalid_auth``/``unknown_method`` with HTTP 200; ``ts`` values that
only grow; ``chat.update`` keeping the old blocks when ``blocks`` is omitted; block limits
(``invalid_blocks`` with ``response_metadata.messages``); block and action ids generated where the
bot gave none; a ``trigger_id`` that works once (``exchanged_trigger_id``) and for 3 seconds
(``expired_trigger_id``); ``views.update`` with a stale ``hash`` (``hash_conflict``);
``files_upload_v2``'s three steps (the bytes go to the upload URL raw, or multipart); a
``response_url`` that works 5 times (``used_url``); message ``metadata`` (``event_type`` and
``event_payload``, ``invalid_metadata_format``/``invalid_metadata_schema``), returned by
``conversations.history`` (top-level messages and broadcasts, newest first) and
``conversations.replies`` (the parent, then the replies oldest first) only with
``include_all_metadata``, both cursor-paginated with ``oldest``/``latest``/``inclusive``. Where the fake is stricter than Slack, it says
so: a ``thread_ts`` that names no message in the channel is refused (``thread_not_found``), and
``conversations.open`` supports one user only. It is more lenient in one place: Slack's reference
says bot tokens may lack permission for ``conversations.replies`` in channels; here a bot in the
channel may read its threads. Scopes are not modelled (``fail(..., error="missing_scope")`` plays one).

Everything the handlers touch is guarded by one lock; every recorded request notifies a condition
that :meth:`FakeSlack.wait_for` waits on.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import requests

__all__ = [
    "Call",
    "Download",
    "FakeSlack",
    "Hold",
    "ResponseUrlPost",
    "Upload",
    "Workspace",
    "block_actions_payload",
    "command_body",
    "file_input_value",
    "interaction_body",
    "plain_text_value",
    "signature_headers",
    "view_submission_payload",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Limits from Slack's Block Kit and method references.
MAX_MESSAGE_BLOCKS = 50
MAX_VIEW_BLOCKS = 100
MAX_SECTION_TEXT = 3000
MAX_FIELD_TEXT = 2000
MAX_SECTION_FIELDS = 10
MAX_HEADER_TEXT = 150
MAX_ACTIONS_ELEMENTS = 25
MAX_CONTEXT_ELEMENTS = 10
MAX_BUTTON_VALUE = 2000
MAX_BUTTON_TEXT = 75
MAX_ID_LENGTH = 255
MAX_MARKDOWN_BLOCK_TEXT = 12000
MAX_MESSAGE_TEXT = 40000
MAX_PRIVATE_METADATA = 3000
# Slack refuses messages whose blocks hold about 13 k characters in all (msg_blocks_too_long), below
# every documented limit: https://github.com/slackapi/bolt-js/issues/2509 (13,172 to 13,297 there).
MAX_BLOCKS_TOTAL_TEXT = 13000
RESPONSE_URL_USES = 5  # "up to 5 times within 30 minutes"
TRIGGER_TTL = 3.0  # seconds a trigger_id can be exchanged

LOGIN_PAGE = (
    "<!DOCTYPE html>\n<html lang=\"en-US\">\n<head>\n<meta charset=\"utf-8\">\n"
    "<title>Slack</title>\n</head>\n<body class=\"signin\">\n"
    "<h1>Sign in to your workspace</h1>\n"
    "<form id=\"signin_form\" action=\"/signin\" method=\"post\">"
    "<input type=\"email\" name=\"email\"><input type=\"password\" name=\"password\">"
    "<button type=\"submit\">Sign in</button></form>\n</body>\n</html>\n"
)
SERVER_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Server Error | Slack</title></head>\n"
    "<body><h1>Slack is having trouble</h1><p>Please try again later.</p></body></html>\n"
)
NOT_FOUND_PAGE = "<!DOCTYPE html>\n<html><head><title>Page Not Found | Slack</title></head><body></body></html>\n"

_FILETYPES = {  # extension -> (filetype, mimetype, pretty_type)
    "csv": ("csv", "text/csv", "CSV"),
    "txt": ("text", "text/plain", "Plain Text"),
    "json": ("json", "application/json", "JSON"),
    "xlsx": ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "Excel Spreadsheet"),
    "png": ("png", "image/png", "PNG"),
    "html": ("html", "text/html", "HTML"),
}


# ---------------------------------------------------------------------------------------------
# What tests read


@dataclasses.dataclass(frozen=True)
class Call:
    """One request the fake answered: a Web API method, or ``files.upload``/``files.download``/
    ``response_url`` for the other addresses. ``status`` is the HTTP status sent and ``error`` the
    ``error`` of an ``ok: false`` answer (or of an injected fault)."""

    method: str
    params: dict[str, Any]
    at: float
    status: int = 200
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Upload:
    """A file the bot uploaded: its bytes and where ``files.completeUploadExternal`` shared it."""

    id: str
    name: str
    title: str
    content: bytes
    channel: str | None
    thread_ts: str | None
    initial_comment: str | None
    completed: bool


@dataclasses.dataclass(frozen=True)
class Download:
    """A request for a private file URL, with the ``Authorization`` header it carried."""

    path: str
    authorization: str | None
    status: int
    content_type: str
    file_id: str | None
    at: float


@dataclasses.dataclass(frozen=True)
class ResponseUrlPost:
    """A POST to a ``response_url``: the JSON it carried and what the fake answered."""

    url: str
    payload: dict[str, Any]
    status: int
    at: float


# ---------------------------------------------------------------------------------------------
# Internal state


class _ApiError(Exception):
    """An ``ok: false`` answer; ``extra`` goes into the JSON next to ``error``."""

    def __init__(self, code: str, **extra: Any) -> None:
        super().__init__(code)
        self.code = code
        self.extra = extra


@dataclasses.dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def json(cls, payload: Mapping[str, Any], status: int = 200, **headers: str) -> _Reply:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return cls(status, body, "application/json; charset=utf-8", dict(headers))

    @classmethod
    def html(cls, status: int, page: str) -> _Reply:
        return cls(status, page.encode("utf-8"), "text/html; charset=utf-8")

    @classmethod
    def text(cls, status: int, text: str) -> _Reply:
        return cls(status, text.encode("utf-8"), "text/plain; charset=utf-8")


class Hold:
    """Requests held by :meth:`FakeSlack.hold` until :meth:`release`."""

    def __init__(self, changed: threading.Condition) -> None:
        self._changed = changed
        self._released = threading.Event()
        self.waiting = 0  # requests held now (read it in FakeSlack.wait_for)

    def release(self) -> None:
        self._released.set()
        with self._changed:
            self._changed.notify_all()

    def wait(self, stopping: threading.Event) -> None:
        with self._changed:
            self.waiting += 1
            self._changed.notify_all()
        try:
            while not self._released.wait(0.05) and not stopping.is_set():
                pass
        finally:
            with self._changed:
                self.waiting -= 1
                self._changed.notify_all()


@dataclasses.dataclass
class _Fault:
    status: int
    retry_after: int | None
    error: str | None
    body: str | None
    times: int

    def reply(self, json_api: bool) -> _Reply:
        if self.error is not None:
            return _Reply.json({"ok": False, "error": self.error})
        if self.status == 429:
            headers = {"Retry-After": str(self.retry_after if self.retry_after is not None else 1)}
            if json_api:
                return _Reply.json({"ok": False, "error": "ratelimited"}, 429, **headers)
            return _Reply(429, b"", "text/plain; charset=utf-8", headers)
        body = SERVER_ERROR_PAGE if self.body is None else self.body
        return _Reply.html(self.status, body)


@dataclasses.dataclass
class _Channel:
    id: str
    name: str
    is_private: bool = False
    is_im: bool = False
    im_user: str | None = None
    bot_member: bool = True
    members: frozenset[str] | None = None  # None: anyone may be addressed in it
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # replies included
    ephemeral: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Trigger:
    user: str
    issued_at: float
    used: bool = False


@dataclasses.dataclass
class _FileRecord:
    file: dict[str, Any]  # the Slack file object
    content: bytes | None
    declared_length: int | None = None
    upload_token: str | None = None
    completed: bool = False
    channel: str | None = None
    thread_ts: str | None = None
    initial_comment: str | None = None


@dataclasses.dataclass
class _ResponseUrl:
    channel: str | None
    user: str | None
    message_ts: str | None
    uses: int = 0


# ---------------------------------------------------------------------------------------------
# The server


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout test) leaves a broken pipe behind: not worth a traceback.
        log.debug("fake Slack: connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-slack"
    disable_nagle_algorithm = True
    fake: FakeSlack  # set on the subclass made per server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        try:
            reply = self.fake._handle(self.command, self.path, dict(self.headers.items()), body)
        except Exception:  # the edge: a bug in the fake must still answer
            log.exception("fake Slack failed on %s %s", self.command, self.path)
            reply = _Reply.json({"ok": False, "error": "fatal_error"}, 500)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        log.debug("%s - %s", self.address_string(), format % args)


class FakeSlack:
    """A Slack workspace and its Web API on ``host:port`` (port 0: any free port).

    ``clock`` gives the epoch seconds behind ``ts`` values and trigger expiry; a test that steps it
    can expire a ``trigger_id`` (after ``trigger_ttl`` seconds; ``None``: never). Channels and users
    exist once added (:meth:`add_channel`, :meth:`add_user`); :class:`Workspace` adds the users it
    plays. ``usergroups`` maps ``S…`` ids to member ids and may be changed at any time.
    """

    def __init__(
        self,
        bot_token: str = "xoxb-test-token",
        team_id: str = "T0TEST",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        team_domain: str = "iotreg-test",
        team_name: str = "iotreg test",
        bot_user_id: str = "U0BOT",
        bot_id: str = "B0BOT",
        bot_name: str = "iotreg",
        app_id: str = "A0IOTREG",
        clock: Callable[[], float] = time.time,
        trigger_ttl: float | None = TRIGGER_TTL,
        app_token: str = "xapp-1-A0IOTREG-1-test",
    ) -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.team_id = team_id
        self.team_domain = team_domain
        self.team_name = team_name
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.bot_name = bot_name
        self.app_id = app_id
        self.host = host
        self.port = port
        self.clock = clock
        self.trigger_ttl = trigger_ttl
        self.usergroups: dict[str, list[str]] = {}

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._last_ts = 0
        self._calls: list[Call] = []
        self._channels: dict[str, _Channel] = {}
        self._users: dict[str, dict[str, Any]] = {}
        self._views: dict[str, dict[str, Any]] = {}
        self._homes: dict[str, dict[str, Any]] = {}
        self._closed_views: set[str] = set()
        self._triggers: dict[str, _Trigger] = {}
        self._files: dict[str, _FileRecord] = {}
        self._downloads: list[Download] = []
        self._responses: list[ResponseUrlPost] = []
        self._response_urls: dict[str, _ResponseUrl] = {}
        self._redirects: dict[str, tuple[int, str]] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._delays: dict[str, float] = {}
        self._socket_mode: Any = None
        self._holds: dict[str, Hold] = {}
        self.add_user(bot_user_id, name=bot_name, is_bot=True)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("the fake Slack is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        """The ``base_url`` for ``WebClient``: ``http://HOST:PORT/api/``."""
        return f"{self.base_url}/api/"

    def start(self) -> FakeSlack:
        """Bind and serve from a daemon thread; returns at once, ready to answer."""
        if self._httpd is not None:
            return self
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server((self.host, self.port), handler)
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-slack", daemon=True
        )
        self._thread.start()
        return self

    @property
    def socket_mode(self) -> Any:
        """The Socket Mode endpoint (:class:`~bot.standins.slack.socketmode.SocketModeServer`),
        started on first use; ``apps.connections.open`` hands out its URLs."""
        with self._lock:
            if self._socket_mode is None:
                from bot.standins.slack.socketmode import SocketModeServer

                self._socket_mode = SocketModeServer(self.host, app_id=self.app_id).start()
            return self._socket_mode

    def stop(self) -> None:
        """Stop serving (delayed answers are cut short) and close the socket."""
        if self._socket_mode is not None:
            self._socket_mode.stop()
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- setting up the workspace ---------------------------------------------------------------

    def add_channel(
        self,
        channel_id: str,
        name: str | None = None,
        *,
        private: bool = False,
        bot_member: bool = True,
        members: Iterable[str] | None = None,
    ) -> None:
        """Create a channel. ``bot_member=False``: posting answers ``not_in_channel``. ``members``:
        ephemeral messages to anyone else answer ``user_not_in_channel`` (``None``: no check)."""
        with self._lock:
            self._channels[channel_id] = _Channel(
                id=channel_id,
                name=name or channel_id.lower(),
                is_private=private,
                bot_member=bot_member,
                members=frozenset(members) if members is not None else None,
            )

    def add_user(
        self,
        user_id: str,
        name: str | None = None,
        *,
        real_name: str | None = None,
        tz: str = "Europe/London",
        is_bot: bool = False,
    ) -> dict[str, Any]:
        """Create (or replace) a user; returns the ``users.info`` object."""
        name = name or user_id.removeprefix("U0").removeprefix("U").lower()
        real = real_name or name.title()
        user = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "deleted": False,
            "real_name": real,
            "tz": tz,
            "tz_label": tz,
            "tz_offset": 0,
            "profile": {"real_name": real, "display_name": name, "team": self.team_id},
            "is_admin": False,
            "is_owner": False,
            "is_bot": is_bot,
            "is_app_user": False,
            "updated": int(self.clock()),
        }
        with self._lock:
            self._users[user_id] = user
        return copy.deepcopy(user)

    def has_user(self, user_id: str) -> bool:
        with self._lock:
            return user_id in self._users

    def add_file(
        self,
        content: bytes,
        name: str = "devices.csv",
        filetype: str = "csv",
        mimetype: str = "text/csv",
        *,
        user: str = "U0USER",
        title: str | None = None,
    ) -> dict[str, Any]:
        """A file a person uploaded (for a ``file_input``); returns its Slack file object, whose
        ``url_private``/``url_private_download`` point at this server."""
        with self._lock:
            file_id = self._new_id("F")
            file = self._file_object(file_id, name, title or name, len(content), user, filetype, mimetype)
            self._files[file_id] = _FileRecord(file=file, content=bytes(content), completed=True)
            return copy.deepcopy(file)

    def add_redirect(self, path_or_url: str, location: str, status: int = 302) -> None:
        """Answer GETs of ``path_or_url`` (a path on this server or a full URL of it) with a
        redirect to ``location``, as a CDN might: for testing that the bot refuses foreign hosts."""
        path = urlsplit(path_or_url).path or path_or_url
        with self._lock:
            self._redirects[path] = (status, location)

    def issue_trigger(self, user: str) -> str:
        """A fresh ``trigger_id``, as Slack puts in a command or interaction payload."""
        with self._lock:
            n = next(self._ids)
            trigger_id = f"{n}{int(self.clock())}.{sum(map(ord, self.team_id))}.{secrets.token_hex(16)}"
            self._triggers[trigger_id] = _Trigger(user=user, issued_at=self.clock())
            return trigger_id

    def response_url(
        self,
        *,
        channel: str | None = None,
        user: str | None = None,
        message_ts: str | None = None,
        kind: str = "commands",
    ) -> str:
        """A ``response_url`` on this server. POSTs to it are recorded in :attr:`responses`; with a
        ``channel`` they also act as Slack's do (ephemeral to ``user`` by default,
        ``response_type: in_channel``, ``replace_original``/``delete_original`` of ``message_ts``)."""
        with self._lock:
            path = f"/{kind}/{self.team_id}/{next(self._ids)}{int(self.clock())}/{secrets.token_urlsafe(18)}"
            self._response_urls[path] = _ResponseUrl(channel=channel, user=user, message_ts=message_ts)
        return f"{self.base_url}{path}"

    # -- fault injection ------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        *,
        status: int = 429,
        retry_after: int | None = 1,
        times: int = 1,
        error: str | None = None,
        body: str | None = None,
    ) -> None:
        """Make the next ``times`` requests for ``method`` fail.

        ``method`` is a Web API method or ``files.upload`` (the upload URL) or ``files.download``
        (private file URLs). With ``error``: HTTP 200 and ``{"ok": false, "error": error}``.
        Otherwise ``status``: 429 carries ``Retry-After`` and ``{"ok": false, "error":
        "ratelimited"}``; 5xx carries Slack's HTML error page, or ``body`` (``""``: empty).
        """
        with self._lock:
            self._faults.setdefault(method, []).append(
                _Fault(status=status, retry_after=retry_after, error=error, body=body, times=times)
            )

    def delay(self, method: str, seconds: float) -> None:
        """Hold every answer for ``method`` (or ``files.upload``/``files.download``) ``seconds``
        before answering; 0 removes the delay."""
        with self._lock:
            if seconds > 0:
                self._delays[method] = seconds
            else:
                self._delays.pop(method, None)

    def hold(self, method: str) -> Hold:
        """Hold every answer for ``method`` (or ``files.upload``/``files.download``) until the
        returned :class:`Hold` is released; :attr:`Hold.waiting` counts the requests held now."""
        with self._lock:
            held = self._holds[method] = Hold(self._changed)
            return held

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()
            holds, self._holds = list(self._holds.values()), {}
        for held in holds:
            held.release()

    # -- reading the workspace ------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Every request answered, in order."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if c.method == method]

    def messages(self, channel: str) -> list[dict[str, Any]]:
        """The channel's messages as people see them, in posting order: thread replies are left out
        unless broadcast (see :meth:`thread`). Each is a copy with ``history``: its earlier versions."""
        with self._lock:
            ch = self._channel_or_key_error(channel)
            return [copy.deepcopy(m) for m in ch.messages if _is_top_level(m)]

    def thread(self, channel: str, ts: str) -> list[dict[str, Any]]:
        """The replies in the thread under ``ts`` (the parent not included), in order."""
        with self._lock:
            ch = self._channel_or_key_error(channel)
            return [copy.deepcopy(m) for m in ch.messages if m.get("thread_ts") == ts and m["ts"] != ts]

    def ephemeral(self, channel: str, user: str) -> list[dict[str, Any]]:
        """Ephemeral messages shown to ``user`` in ``channel``, in order."""
        with self._lock:
            ch = self._channel_or_key_error(channel)
            return [copy.deepcopy(m) for m in ch.ephemeral if m["user_to"] == user]

    def dm(self, user: str) -> list[dict[str, Any]]:
        """Messages (file shares included) in the bot's DM with ``user``; empty if never opened."""
        with self._lock:
            for ch in self._channels.values():
                if ch.is_im and ch.im_user == user:
                    return self.messages(ch.id)
            return []

    def dm_channel(self, user: str) -> str:
        """The stable id of the DM channel ``conversations.open`` gives for ``user``."""
        return "D" + user[1:] if user[:1] in ("U", "W") else "D" + user

    def find_message(self, ts: str) -> tuple[str, dict[str, Any]] | None:
        """``(channel, message)`` of the message or ephemeral message ``ts``, wherever it is."""
        with self._lock:
            for ch in self._channels.values():
                for m in ch.messages:
                    if m["ts"] == ts:
                        return ch.id, copy.deepcopy(m)
                for m in ch.ephemeral:
                    if m["ts"] == ts:
                        return ch.id, copy.deepcopy(m)
            return None

    def channel_info(self, channel: str) -> dict[str, Any]:
        """``id``, ``name`` (Slack's ``privategroup``/``directmessage`` for those), ``is_im``."""
        with self._lock:
            ch = self._channel_or_key_error(channel)
            name = "directmessage" if ch.is_im else ("privategroup" if ch.is_private else ch.name)
            return {"id": ch.id, "name": name, "is_im": ch.is_im, "is_private": ch.is_private}

    @property
    def views(self) -> dict[str, dict[str, Any]]:
        """Views opened or updated, by id, as last set (with the state last submitted)."""
        with self._lock:
            return copy.deepcopy(self._views)

    def home(self, user: str) -> dict[str, Any] | None:
        """The Home tab ``user`` sees (published with ``views.publish``), or ``None``."""
        with self._lock:
            view = self._homes.get(user)
            return copy.deepcopy(view) if view else None

    def view_is_open(self, view_id: str) -> bool:
        """False once a submission closed the modal (an empty ack, or ``response_action: clear``)."""
        with self._lock:
            return view_id in self._views and view_id not in self._closed_views

    @property
    def uploads(self) -> dict[str, Upload]:
        """Files the bot uploaded whose bytes arrived, by file id."""
        with self._lock:
            return {
                fid: Upload(
                    id=fid,
                    name=r.file["name"],
                    title=r.file["title"],
                    content=r.content or b"",
                    channel=r.channel,
                    thread_ts=r.thread_ts,
                    initial_comment=r.initial_comment,
                    completed=r.completed,
                )
                for fid, r in self._files.items()
                if r.upload_token is not None and r.content is not None
            }

    @property
    def downloads(self) -> list[Download]:
        with self._lock:
            return list(self._downloads)

    @property
    def responses(self) -> list[ResponseUrlPost]:
        with self._lock:
            return list(self._responses)

    def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Wait until ``predicate()`` is truthy and return its value; it is re-evaluated at every
        request the fake records, with the fake's lock held (so it sees a consistent state).
        Raises :class:`TimeoutError` naming the last calls."""
        with self._changed:
            result = self._changed.wait_for(predicate, timeout)
            if not result:
                recent = ", ".join(f"{c.method}({c.error or c.status})" for c in self._calls[-8:])
                raise TimeoutError(f"condition not met within {timeout} s; last calls: {recent or 'none'}")
            return result

    # -- internal: interactions that Workspace reports ------------------------------------------

    def _record_submission(self, view_id: str, values: dict[str, Any], ack: dict[str, Any] | None) -> None:
        """Apply what Slack does after a view_submission is acknowledged."""
        with self._changed:
            view = self._views.get(view_id)
            if view is None:
                return
            view["state"] = {"values": copy.deepcopy(values)}
            action = (ack or {}).get("response_action")
            if action == "update" and isinstance(ack, dict) and isinstance(ack.get("view"), dict):
                self._views[view_id] = self._build_view(ack["view"], view_id=view_id, previous=view)
            elif action in (None, "clear"):
                self._closed_views.add(view_id)
            self._changed.notify_all()

    # -- internal: request handling -------------------------------------------------------------

    def _handle(self, verb: str, target: str, headers: dict[str, str], body: bytes) -> _Reply:
        url = urlsplit(target)
        path = url.path
        with self._lock:
            redirect = self._redirects.get(path)
        if redirect is not None:
            status, location = redirect
            self._record(Call("redirect", {"path": path}, self.clock(), status))
            return _Reply(status, b"", "text/html; charset=utf-8", {"Location": location})
        if path.startswith("/api/"):
            return self._serve_api(path[len("/api/") :], url.query, headers, body)
        if path.startswith("/upload/v1/"):
            return self._serve_upload(path.rsplit("/", 1)[-1], headers, body)
        if path.startswith("/files-pri/"):
            return self._serve_download(path, headers)
        if path.startswith(("/commands/", "/actions/")):
            return self._serve_response_url(f"{self.base_url}{path}", path, headers, body)
        return _Reply.html(404, NOT_FOUND_PAGE)

    def _before(self, name: str, json_api: bool) -> _Reply | None:
        """Apply an injected delay (outside the lock) and fault, if any."""
        with self._lock:
            delay = self._delays.get(name, 0.0)
            held = self._holds.get(name)
        if delay:
            self._stopping.wait(delay)
        if held is not None:
            held.wait(self._stopping)
        with self._lock:
            queue = self._faults.get(name)
            if not queue:
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
        return fault.reply(json_api)

    def _record(self, call: Call) -> None:
        with self._changed:
            self._calls.append(call)
            self._changed.notify_all()

    def _serve_api(self, method: str, query: str, headers: dict[str, str], body: bytes) -> _Reply:
        try:
            params = _parse_params(query, headers, body)
        except ValueError:
            self._record(Call(method, {}, self.clock(), 200, "invalid_json"))
            return _Reply.json({"ok": False, "error": "invalid_json"})
        token = params.pop("token", None)
        auth = _header(headers, "Authorization")
        if auth and auth.lower().startswith("bearer "):
            token = auth[len("bearer ") :].strip()
        impl = _API.get(method)
        if impl is None:
            return self._api_answer(method, params, {"ok": False, "error": "unknown_method", "req_method": method})
        if not token:
            return self._api_answer(method, params, {"ok": False, "error": "not_authed"})
        if token != (self.app_token if method in _APP_TOKEN_METHODS else self.bot_token):
            error = "not_allowed_token_type" if token in (self.bot_token, self.app_token) else "invalid_auth"
            return self._api_answer(method, params, {"ok": False, "error": error})
        fault = self._before(method, json_api=True)
        if fault is not None:
            error = json.loads(fault.body).get("error") if fault.content_type.startswith("application/json") else None
            self._record(Call(method, params, self.clock(), fault.status, error or f"HTTP {fault.status}"))
            return fault
        with self._changed:
            try:
                answer = {"ok": True, **impl(self, params)}
            except _ApiError as exc:
                answer = {"ok": False, "error": exc.code, **exc.extra}
            return self._api_answer(method, params, answer)

    def _api_answer(self, method: str, params: dict[str, Any], answer: dict[str, Any]) -> _Reply:
        self._record(Call(method, params, self.clock(), 200, None if answer["ok"] else answer["error"]))
        return _Reply.json(answer)

    def _serve_upload(self, token: str, headers: dict[str, str], body: bytes) -> _Reply:
        fault = self._before("files.upload", json_api=False)
        if fault is not None:
            self._record(Call("files.upload", {"token": token}, self.clock(), fault.status, f"HTTP {fault.status}"))
            return fault
        content = _upload_content(_header(headers, "Content-Type") or "", body)
        with self._lock:
            record = next((r for r in self._files.values() if r.upload_token == token), None)
            if record is None or record.completed:
                self._record(Call("files.upload", {"token": token}, self.clock(), 404, "not found"))
                return _Reply.text(404, "Not Found")
            record.content = content
            record.file["size"] = len(content)
            self._record(Call("files.upload", {"file_id": record.file["id"], "bytes": len(content)}, self.clock()))
        return _Reply.text(200, f"OK - {len(content)}")

    def _serve_download(self, path: str, headers: dict[str, str]) -> _Reply:
        authorization = _header(headers, "Authorization")
        fault = self._before("files.download", json_api=False)
        file_id = _file_id_from_path(path)
        if fault is not None:
            reply = fault
        else:
            with self._lock:
                record = self._files.get(file_id or "")
            if authorization is None or authorization.strip() != f"Bearer {self.bot_token}":
                reply = _Reply.html(200, LOGIN_PAGE)  # Slack's trap: 200 and a sign-in page
            elif record is None or record.content is None or not record.completed:
                reply = _Reply.html(404, NOT_FOUND_PAGE)
            else:
                disposition = "attachment" if "/download/" in path else "inline"
                reply = _Reply(
                    200,
                    record.content,
                    record.file["mimetype"],
                    # RFC 6266: a name that is not ASCII (设备.csv) goes percent-encoded, as HTTP headers are Latin-1.
                    {"Content-Disposition": f"{disposition}; filename*=UTF-8''{quote(record.file['name'])}"},
                )
        download = Download(path, authorization, reply.status, reply.content_type, file_id, self.clock())
        with self._changed:
            self._downloads.append(download)
            self._calls.append(Call("files.download", {"path": path}, download.at, reply.status))
            self._changed.notify_all()
        return reply

    def _serve_response_url(self, url: str, path: str, headers: dict[str, str], body: bytes) -> _Reply:
        try:
            payload = _parse_response_url_body(_header(headers, "Content-Type") or "", body)
        except ValueError:
            payload = {}
            status, reply = 400, _Reply.text(400, "invalid_payload")
        else:
            with self._lock:
                status, reply = self._apply_response_url(path, payload)
        with self._changed:
            self._responses.append(ResponseUrlPost(url, payload, status, self.clock()))
            error = None if status == 200 else reply.body.decode()
            self._calls.append(Call("response_url", payload, self.clock(), status, error))
            self._changed.notify_all()
        return reply

    def _apply_response_url(self, path: str, payload: dict[str, Any]) -> tuple[int, _Reply]:
        target = self._response_urls.get(path)
        if target is None:
            return 404, _Reply.text(404, "invalid_token")
        if target.uses >= RESPONSE_URL_USES:
            return 404, _Reply.text(404, "used_url")
        ch = self._channels.get(target.channel or "")
        deleting = _flag(payload.get("delete_original"))
        if not deleting and not payload.get("text") and not payload.get("blocks"):
            return 400, _Reply.text(400, "no_text")
        target.uses += 1
        if ch is not None:
            if deleting and target.message_ts:
                ch.messages = [m for m in ch.messages if m["ts"] != target.message_ts]
                ch.ephemeral = [m for m in ch.ephemeral if m["ts"] != target.message_ts]
            elif _flag(payload.get("replace_original")) and target.message_ts:
                found = self._find_in(ch, target.message_ts)
                if found is not None:
                    _replace_message(found, payload.get("text"), payload.get("blocks"), self._next_ts())
            elif payload.get("response_type") == "in_channel":
                self._append_message(ch, payload.get("text") or "", payload.get("blocks"), payload.get("thread_ts"))
            elif target.user:
                self._append_ephemeral(ch, target.user, payload.get("text") or "", payload.get("blocks"), None)
        return 200, _Reply.html(200, "ok")

    # -- internal: the model --------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}0{next(self._ids):08X}"

    def _next_ts(self) -> str:
        micros = max(int(self.clock() * 1_000_000), self._last_ts + 1)
        self._last_ts = micros
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _channel_or_key_error(self, channel: str) -> _Channel:
        ch = self._channels.get(channel)
        if ch is None:
            raise KeyError(f"no channel {channel!r} in the fake Slack; add it with add_channel()")
        return ch

    def _resolve_channel(self, channel: Any) -> _Channel:
        """A channel by id, by name (``#ops``/``ops``), or a user id (the bot's DM with them)."""
        if not channel or not isinstance(channel, str):
            raise _ApiError("channel_not_found")
        if channel in self._channels:
            return self._channels[channel]
        if channel[:1] in ("U", "W") and channel in self._users:
            return self._open_dm(channel)[0]
        name = channel.removeprefix("#")
        for ch in self._channels.values():
            if not ch.is_im and ch.name == name:
                return ch
        raise _ApiError("channel_not_found")

    def _open_dm(self, user: str) -> tuple[_Channel, bool]:
        dm_id = self.dm_channel(user)
        existing = self._channels.get(dm_id)
        if existing is not None:
            return existing, False
        ch = _Channel(id=dm_id, name=dm_id.lower(), is_im=True, im_user=user, members=frozenset({user}))
        self._channels[dm_id] = ch
        return ch, True

    @staticmethod
    def _find_in(ch: _Channel, ts: str) -> dict[str, Any] | None:
        for m in ch.messages:
            if m["ts"] == ts:
                return m
        for m in ch.ephemeral:
            if m["ts"] == ts:
                return m
        return None

    def _message(self, text: str, blocks: list[dict[str, Any]] | None, ts: str) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "message",
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "text": text,
            "ts": ts,
            "team": self.team_id,
            "bot_profile": {"id": self.bot_id, "app_id": self.app_id, "name": self.bot_name, "team_id": self.team_id},
        }
        if blocks is not None:
            message["blocks"] = blocks
        message["history"] = []
        return message

    def _append_message(
        self,
        ch: _Channel,
        text: str,
        blocks: list[dict[str, Any]] | None,
        thread_ts: str | None,
        *,
        broadcast: bool = False,
        files: list[dict[str, Any]] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        parent = None
        if thread_ts:
            parent = next((m for m in ch.messages if m["ts"] == thread_ts), None)
            if parent is None:
                raise _ApiError("thread_not_found")  # stricter than Slack: catches a wrong ts
            if parent.get("thread_ts") and parent["thread_ts"] != parent["ts"]:
                parent = next(m for m in ch.messages if m["ts"] == parent["thread_ts"])  # a reply's ts
        message = self._message(text, _with_block_ids(blocks), self._next_ts())
        if files is not None:
            message.update({"files": files, "upload": True, "display_as_bot": False})
        if metadata is not None:
            message["metadata"] = metadata
        if parent is not None:
            message["thread_ts"] = parent["ts"]
            message["parent_user_id"] = parent.get("user")
            if broadcast:
                message["subtype"] = "thread_broadcast"
            parent["thread_ts"] = parent["ts"]
            parent["reply_count"] = parent.get("reply_count", 0) + 1
            parent["reply_users"] = [self.bot_user_id]
            parent["reply_users_count"] = 1
            parent["latest_reply"] = message["ts"]
        ch.messages.append(message)
        return message

    def _append_ephemeral(
        self, ch: _Channel, user: str, text: str, blocks: list[dict[str, Any]] | None, thread_ts: str | None
    ) -> dict[str, Any]:
        message = self._message(text, _with_block_ids(blocks), self._next_ts())
        del message["history"]
        message["user_to"] = user
        if thread_ts:
            message["thread_ts"] = thread_ts
        ch.ephemeral.append(message)
        return message

    def _file_object(
        self, file_id: str, name: str, title: str, size: int | None, user: str, filetype: str, mimetype: str
    ) -> dict[str, Any]:
        now = int(self.clock())
        pretty = next((p for ft, _m, p in _FILETYPES.values() if ft == filetype), filetype.upper())
        quoted = quote(name)
        base = f"{self.base_url}/files-pri/{self.team_id}-{file_id}"
        file: dict[str, Any] = {
            "id": file_id,
            "created": now,
            "timestamp": now,
            "name": name,
            "title": title,
            "mimetype": mimetype,
            "filetype": filetype,
            "pretty_type": pretty,
            "user": user,
            "user_team": self.team_id,
            "editable": False,
            "size": size,
            "mode": "hosted",
            "is_external": False,
            "external_type": "",
            "is_public": False,
            "public_url_shared": False,
            "display_as_bot": False,
            "username": "",
            "url_private": f"{base}/{quoted}",
            "url_private_download": f"{base}/download/{quoted}",
            "permalink": f"https://{self.team_domain}.slack.com/files/{user}/{file_id}/{quoted}",
            "permalink_public": f"https://slack-files.com/{self.team_id}-{file_id}-{secrets.token_hex(5)}",
            "channels": [],
            "groups": [],
            "ims": [],
            "shares": {},
            "comments_count": 0,
            "has_rich_preview": False,
            "file_access": "visible",
        }
        if size is None:
            del file["size"]
        return file

    def _build_view(
        self, view: Any, *, view_id: str | None = None, previous: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        view = _json_value(view, "view")
        if not isinstance(view, dict):
            raise _invalid_arguments("missing required field: view")
        problems: list[str] = []
        if view.get("type") not in ("modal", "home"):
            problems.append("must provide a valid view type [json-pointer:/view/type]")
        if view.get("type") == "modal" and not view.get("title"):
            problems.append("missing required field: title [json-pointer:/view/title]")
        if len(str(view.get("private_metadata", ""))) > MAX_PRIVATE_METADATA:
            limit = MAX_PRIVATE_METADATA + 1
            problems.append(f"must be less than {limit} characters [json-pointer:/view/private_metadata]")
        if len(str(view.get("callback_id", ""))) > MAX_ID_LENGTH:
            problems.append(f"must be less than {MAX_ID_LENGTH + 1} characters [json-pointer:/view/callback_id]")
        blocks = view.get("blocks", [])
        for problem in _block_problems(blocks, MAX_VIEW_BLOCKS):
            problems.append(problem.replace("[json-pointer:/blocks", "[json-pointer:/view/blocks"))
        if problems:
            raise _invalid_arguments(*problems)
        view_id = view_id or self._new_id("V")
        return {
            "id": view_id,
            "team_id": self.team_id,
            "type": view["type"],
            "blocks": _with_block_ids(copy.deepcopy(blocks)),
            "private_metadata": view.get("private_metadata", ""),
            "callback_id": view.get("callback_id", ""),
            "state": copy.deepcopy(previous["state"]) if previous else {"values": {}},
            "hash": f"{int(self.clock())}.{secrets.token_hex(4)}",
            "title": view.get("title"),
            "clear_on_close": bool(view.get("clear_on_close", False)),
            "notify_on_close": bool(view.get("notify_on_close", False)),
            "close": view.get("close"),
            "submit": view.get("submit"),
            "previous_view_id": None,
            "root_view_id": previous["root_view_id"] if previous else view_id,
            "app_id": self.app_id,
            "external_id": view.get("external_id", ""),
            "app_installed_team_id": self.team_id,
            "bot_id": self.bot_id,
        }

    # -- the Web API methods (run with the lock held) -------------------------------------------

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": f"https://{self.team_domain}.slack.com/",
            "team": self.team_name,
            "user": self.bot_name,
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _message_content(self, params: dict[str, Any], *, required: bool = True) -> tuple[str | None, list | None]:
        text = params.get("text")
        blocks = params.get("blocks")
        if blocks is not None:
            blocks = _json_value(blocks, "blocks", error="invalid_blocks_format")
            if not isinstance(blocks, list):
                raise _ApiError("invalid_blocks_format")
            problems = _block_problems(blocks, MAX_MESSAGE_BLOCKS)
            if problems:
                raise _ApiError(
                    "invalid_blocks",
                    errors=problems,
                    response_metadata={"messages": [f"[ERROR] {p}" for p in problems]},
                )
            if _total_text(blocks) > MAX_BLOCKS_TOTAL_TEXT:
                raise _ApiError("msg_blocks_too_long")
        if text is not None and len(str(text)) > MAX_MESSAGE_TEXT:
            raise _ApiError("msg_too_long")
        if required and not text and not blocks and not params.get("attachments"):
            raise _ApiError("no_text")
        return (None if text is None else str(text)), blocks

    def _chat_post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        ch = self._resolve_channel(params.get("channel"))
        if not ch.bot_member:
            raise _ApiError("not_in_channel")
        text, blocks = self._message_content(params)
        message = self._append_message(
            ch,
            text or "",
            blocks,
            _str_or_none(params.get("thread_ts")),
            broadcast=_flag(params.get("reply_broadcast")),
            metadata=_message_metadata(params.get("metadata")),
        )
        return {"channel": ch.id, "ts": message["ts"], "message": _public(message)}

    def _chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        ch = self._resolve_channel(params.get("channel"))
        ts = _str_or_none(params.get("ts"))
        message = next((m for m in ch.messages if m["ts"] == ts), None) if ts else None
        if message is None:
            raise _ApiError("message_not_found")
        if message.get("user") != self.bot_user_id:
            raise _ApiError("cant_update_message")
        text, blocks = self._message_content(params)
        _replace_message(message, text, _with_block_ids(blocks), self._next_ts())
        return {"channel": ch.id, "ts": message["ts"], "text": message["text"], "message": _public(message)}

    def _chat_delete(self, params: dict[str, Any]) -> dict[str, Any]:
        ch = self._resolve_channel(params.get("channel"))
        ts = _str_or_none(params.get("ts"))
        if not any(m["ts"] == ts for m in ch.messages):
            raise _ApiError("message_not_found")
        ch.messages = [m for m in ch.messages if m["ts"] != ts]
        return {"channel": ch.id, "ts": ts}

    def _chat_post_ephemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        ch = self._resolve_channel(params.get("channel"))
        user = _str_or_none(params.get("user"))
        if not user or user not in self._users:
            raise _ApiError("user_not_found")
        if ch.members is not None and user not in ch.members:
            raise _ApiError("user_not_in_channel")
        if not ch.bot_member:
            raise _ApiError("not_in_channel")
        text, blocks = self._message_content(params)
        message = self._append_ephemeral(ch, user, text or "", blocks, _str_or_none(params.get("thread_ts")))
        return {"message_ts": message["ts"]}

    def _chat_get_permalink(self, params: dict[str, Any]) -> dict[str, Any]:
        ch = self._resolve_channel(params.get("channel"))
        ts = _str_or_none(params.get("message_ts")) or ""
        message = next((m for m in ch.messages if m["ts"] == ts), None)
        if message is None:
            raise _ApiError("message_not_found")
        link = f"https://{self.team_domain}.slack.com/archives/{ch.id}/p{ts.replace('.', '')}"
        if message.get("thread_ts") and message["thread_ts"] != ts:
            link += f"?thread_ts={message['thread_ts']}&cid={ch.id}"
        return {"channel": ch.id, "permalink": link}

    def _views_open(self, params: dict[str, Any]) -> dict[str, Any]:
        trigger_id = _str_or_none(params.get("trigger_id") or params.get("interactivity_pointer"))
        trigger = self._triggers.get(trigger_id or "")
        if trigger is None:
            raise _ApiError("invalid_trigger_id")
        if trigger.used:
            raise _ApiError("exchanged_trigger_id")
        if self.trigger_ttl is not None and self.clock() - trigger.issued_at > self.trigger_ttl:
            raise _ApiError("expired_trigger_id")
        view = self._build_view(params.get("view"))
        trigger.used = True
        self._views[view["id"]] = view
        return {"view": copy.deepcopy(view)}

    def _views_update(self, params: dict[str, Any]) -> dict[str, Any]:
        view_id = _str_or_none(params.get("view_id"))
        external_id = _str_or_none(params.get("external_id"))
        current = None
        if view_id:
            current = self._views.get(view_id)
        elif external_id:
            current = next((v for v in self._views.values() if v.get("external_id") == external_id), None)
        else:
            raise _invalid_arguments("view_id or external_id required")
        if current is None or current["id"] in self._closed_views:
            raise _ApiError("not_found")
        given_hash = _str_or_none(params.get("hash"))
        if given_hash and given_hash != current["hash"]:
            raise _ApiError("hash_conflict")
        view = self._build_view(params.get("view"), view_id=current["id"], previous=current)
        self._views[view["id"]] = view
        return {"view": copy.deepcopy(view)}

    def _views_publish(self, params: dict[str, Any]) -> dict[str, Any]:
        user = _str_or_none(params.get("user_id"))
        if not user:
            raise _invalid_arguments("missing required field: user_id")
        if user not in self._users:
            raise _ApiError("user_not_found")
        view = _json_value(params.get("view"), "view")
        if not isinstance(view, dict) or view.get("type") != "home":
            raise _ApiError("invalid_arguments", detail="views.publish takes a view of type home")
        current = self._homes.get(user)
        given_hash = _str_or_none(params.get("hash"))
        if given_hash and current and given_hash != current["hash"]:
            raise _ApiError("hash_conflict")
        built = self._build_view(view, view_id=current["id"] if current else None, previous=current)
        self._homes[user] = built
        return {"view": copy.deepcopy(built)}

    def _files_get_upload_url_external(self, params: dict[str, Any]) -> dict[str, Any]:
        filename = _str_or_none(params.get("filename"))
        length = params.get("length")
        if not filename or length is None:
            raise _ApiError("invalid_arguments")
        try:
            declared = int(length)
        except (TypeError, ValueError):
            raise _ApiError("invalid_arguments") from None
        file_id = self._new_id("F")
        extension = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
        filetype, mimetype, _pretty = _FILETYPES.get(extension, ("binary", "application/octet-stream", "Binary"))
        token = secrets.token_urlsafe(24)
        file = self._file_object(file_id, filename, filename, declared, self.bot_user_id, filetype, mimetype)
        self._files[file_id] = _FileRecord(file=file, content=None, declared_length=declared, upload_token=token)
        return {"upload_url": f"{self.base_url}/upload/v1/{token}", "file_id": file_id}

    def _files_complete_upload_external(self, params: dict[str, Any]) -> dict[str, Any]:
        entries = _json_value(params.get("files"), "files", error="invalid_arguments")
        if not isinstance(entries, list) or not entries:
            raise _ApiError("invalid_arguments")
        records = []
        for entry in entries:
            record = self._files.get(str(entry.get("id")) if isinstance(entry, dict) else "")
            if record is None or record.upload_token is None or record.content is None:
                raise _ApiError("file_not_found")
            records.append((record, entry))
        channel_ids = [c for c in [_str_or_none(params.get("channel_id"))] if c]
        if params.get("channels"):
            channel_ids += [c for c in str(params["channels"]).split(",") if c]
        thread_ts = _str_or_none(params.get("thread_ts"))
        channels = [self._resolve_channel(c) for c in channel_ids]
        for ch in channels:
            if not ch.bot_member:
                raise _ApiError("not_in_channel")
        for record, entry in records:
            record.completed = True
            if entry.get("title"):
                record.file["title"] = str(entry["title"])
        comment = _str_or_none(params.get("initial_comment"))
        for ch in channels:
            message = self._append_message(ch, comment or "", None, thread_ts, files=[r.file for r, _e in records])
            for record, _entry in records:
                record.channel, record.thread_ts, record.initial_comment = ch.id, thread_ts, comment
                _add_share(record.file, ch, message, self.team_id)
            message["files"] = [copy.deepcopy(r.file) for r, _e in records]
        return {"files": [copy.deepcopy(r.file) for r, _e in records]}

    def _files_info(self, params: dict[str, Any]) -> dict[str, Any]:
        record = self._files.get(_str_or_none(params.get("file")) or "")
        if record is None or not record.completed:
            raise _ApiError("file_not_found")
        return {"file": copy.deepcopy(record.file), "comments": [], "response_metadata": {"next_cursor": ""}}

    def _conversations_open(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _str_or_none(params.get("channel"))
        if channel:
            ch = self._channels.get(channel)
            if ch is None or not ch.is_im:
                raise _ApiError("channel_not_found")
            created = False
        else:
            users = [u for u in str(params.get("users") or "").split(",") if u]
            if not users:
                raise _ApiError("users_list_not_supplied")
            if len(users) > 1:
                raise _ApiError("not_supported_by_fake", detail="the fake opens DMs with one user")
            if users[0] not in self._users:
                raise _ApiError("user_not_found")
            ch, created = self._open_dm(users[0])
        if _flag(params.get("return_im")):
            channel_obj: dict[str, Any] = {
                "id": ch.id,
                "created": int(self.clock()),
                "is_im": True,
                "is_org_shared": False,
                "user": ch.im_user,
                "is_user_deleted": False,
                "priority": 0,
            }
        else:
            channel_obj = {"id": ch.id}
        answer: dict[str, Any] = {"channel": channel_obj}
        if not created:
            answer = {"no_op": True, "already_open": True, **answer}
        return answer

    def _readable(self, params: dict[str, Any]) -> _Channel:
        ch = self._resolve_channel(params.get("channel"))
        if not ch.bot_member:
            raise _ApiError("not_in_channel")
        return ch

    def _conversations_history(self, params: dict[str, Any]) -> dict[str, Any]:
        """The channel's messages, newest first; replies only when broadcast (as Slack does)."""
        ch = self._readable(params)
        metadata = _flag(params.get("include_all_metadata"))
        found = [m for m in reversed(ch.messages) if _is_top_level(m) and _in_range(m["ts"], params)]
        page, cursor = _page(found, params, 100, 999)
        return {
            "messages": [_public(m, metadata=metadata) for m in page],
            "has_more": bool(cursor),
            "pin_count": 0,
            "channel_actions_ts": None,
            "channel_actions_count": 0,
            "response_metadata": {"next_cursor": cursor},
        }

    def _conversations_replies(self, params: dict[str, Any]) -> dict[str, Any]:
        """The thread's parent first, then its replies oldest first (``ts`` may name a reply)."""
        ch = self._readable(params)
        ts = _str_or_none(params.get("ts"))
        if not ts:
            raise _invalid_arguments("missing required field: ts")
        named = next((m for m in ch.messages if m["ts"] == ts), None)
        if named is None:
            raise _ApiError("thread_not_found")
        parent_ts = named.get("thread_ts") or named["ts"]
        parent = next(m for m in ch.messages if m["ts"] == parent_ts)
        replies = [m for m in ch.messages if m.get("thread_ts") == parent_ts and m["ts"] != parent_ts and _in_range(m["ts"], params)]
        metadata = _flag(params.get("include_all_metadata"))
        page, cursor = _page([parent, *replies], params, 1000, 1000)
        return {
            "messages": [_public(m, metadata=metadata) for m in page],
            "has_more": bool(cursor),
            "response_metadata": {"next_cursor": cursor},
        }

    def _usergroups_users_list(self, params: dict[str, Any]) -> dict[str, Any]:
        group = _str_or_none(params.get("usergroup"))
        if not group or group not in self.usergroups:
            raise _ApiError("no_such_subteam")
        return {"users": list(self.usergroups[group])}

    def _apps_connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"url": self.socket_mode.url()}

    def _users_info(self, params: dict[str, Any]) -> dict[str, Any]:
        user = self._users.get(_str_or_none(params.get("user")) or "")
        if user is None:
            raise _ApiError("user_not_found")
        return {"user": copy.deepcopy(user)}


_API: dict[str, Callable[[FakeSlack, dict[str, Any]], dict[str, Any]]] = {
    "apps.connections.open": FakeSlack._apps_connections_open,
    "auth.test": FakeSlack._auth_test,
    "chat.postMessage": FakeSlack._chat_post_message,
    "chat.update": FakeSlack._chat_update,
    "chat.delete": FakeSlack._chat_delete,
    "chat.postEphemeral": FakeSlack._chat_post_ephemeral,
    "chat.getPermalink": FakeSlack._chat_get_permalink,
    "views.open": FakeSlack._views_open,
    "views.update": FakeSlack._views_update,
    "views.publish": FakeSlack._views_publish,
    "files.getUploadURLExternal": FakeSlack._files_get_upload_url_external,
    "files.completeUploadExternal": FakeSlack._files_complete_upload_external,
    "files.info": FakeSlack._files_info,
    "conversations.open": FakeSlack._conversations_open,
    "conversations.history": FakeSlack._conversations_history,
    "conversations.replies": FakeSlack._conversations_replies,
    "usergroups.users.list": FakeSlack._usergroups_users_list,
    "users.info": FakeSlack._users_info,
}

#: Methods called with the app-level token (xapp-); every other one takes the bot token.
_APP_TOKEN_METHODS = frozenset({"apps.connections.open"})


# ---------------------------------------------------------------------------------------------
# Helpers of the model


def _is_top_level(message: dict[str, Any]) -> bool:
    thread_ts = message.get("thread_ts")
    return thread_ts is None or thread_ts == message["ts"] or message.get("subtype") == "thread_broadcast"


def _public(message: dict[str, Any], *, metadata: bool = False) -> dict[str, Any]:
    """A message as the API returns it: without the fake's own keys, and without its metadata unless
    asked for (``include_all_metadata``)."""
    hidden = ("history", "user_to") if metadata else ("history", "user_to", "metadata")
    return {k: copy.deepcopy(v) for k, v in message.items() if k not in hidden}


def _message_metadata(value: Any) -> dict[str, Any] | None:
    """``metadata`` of chat.postMessage: an object with a string ``event_type`` and an object
    ``event_payload`` (a JSON string when form-encoded)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _ApiError("invalid_metadata_format") from None
    if not isinstance(value, dict):
        raise _ApiError("invalid_metadata_format")
    event_type, payload = value.get("event_type"), value.get("event_payload")
    if not isinstance(event_type, str) or not event_type or not isinstance(payload, dict) or set(value) - {"event_type", "event_payload"}:
        raise _ApiError("invalid_metadata_schema")
    return {"event_type": event_type, "event_payload": copy.deepcopy(payload)}


def _page(items: list[dict[str, Any]], params: dict[str, Any], default_limit: int, max_limit: int) -> tuple[list[dict[str, Any]], str]:
    """One page of ``items`` after ``cursor``, at most ``limit`` long, and the next page's cursor ("" at the end)."""
    try:
        limit = int(params.get("limit") or default_limit)
    except (TypeError, ValueError):
        raise _invalid_arguments("limit must be a number") from None
    limit = max(1, min(limit, max_limit))
    cursor = _str_or_none(params.get("cursor"))
    start = 0
    if cursor:
        try:
            start = int(base64.urlsafe_b64decode(cursor.encode()).decode().removeprefix("next:"))
        except (ValueError, UnicodeDecodeError):
            raise _ApiError("invalid_cursor") from None
    page = items[start : start + limit]
    more = start + limit < len(items)
    return page, base64.urlsafe_b64encode(f"next:{start + limit}".encode()).decode() if more else ""


def _in_range(ts: str, params: dict[str, Any]) -> bool:
    """Whether ``ts`` lies between ``oldest`` and ``latest`` (both ends only if ``inclusive``)."""
    inclusive = _flag(params.get("inclusive"))
    key = _ts_key(ts)
    oldest, latest = params.get("oldest"), params.get("latest")
    if oldest not in (None, "") and (key < _ts_key(oldest, "invalid_ts_oldest") or (key == _ts_key(oldest) and not inclusive)):
        return False
    if latest not in (None, "") and (key > _ts_key(latest, "invalid_ts_latest") or (key == _ts_key(latest) and not inclusive)):
        return False
    return True


def _ts_key(ts: Any, error: str = "invalid_arguments") -> tuple[int, int]:
    seconds, _, micros = str(ts).partition(".")
    try:
        return int(seconds), int((micros or "0").ljust(6, "0")[:6])
    except ValueError:
        raise _ApiError(error) from None


def _replace_message(message: dict[str, Any], text: str | None, blocks: list | None, edited_ts: str) -> None:
    """Slack's chat.update: omitted text or blocks stay as they were; ``blocks=[]`` removes them."""
    if "history" in message:
        message["history"].append({k: copy.deepcopy(message[k]) for k in ("text", "blocks", "edited") if k in message})
    if text is not None:
        message["text"] = text
    if blocks is not None:
        if blocks:
            message["blocks"] = blocks
        else:
            message.pop("blocks", None)
    message["edited"] = {"user": message.get("user"), "ts": edited_ts}


def _add_share(file: dict[str, Any], ch: _Channel, message: dict[str, Any], team_id: str) -> None:
    kind = "public" if ch.id.startswith("C") and not ch.is_private else "private"
    share: dict[str, Any] = {
        "reply_users": [],
        "reply_users_count": 0,
        "reply_count": 0,
        "ts": message["ts"],
        "channel_name": ch.name,
        "team_id": team_id,
    }
    if message.get("thread_ts"):
        share["thread_ts"] = message["thread_ts"]
    file["shares"].setdefault(kind, {}).setdefault(ch.id, []).append(share)
    listing = "ims" if ch.is_im else ("groups" if ch.is_private else "channels")
    if ch.id not in file[listing]:
        file[listing].append(ch.id)
    file["is_public"] = file["is_public"] or kind == "public"


def _with_block_ids(blocks: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Copies of ``blocks`` with the ``block_id``/``action_id`` Slack generates where none was given."""
    if blocks is None:
        return None
    blocks = copy.deepcopy(blocks)
    for block in blocks:
        if not isinstance(block, dict):
            continue
        block.setdefault("block_id", _random_id(5))
        for element in _interactive_elements(block):
            element.setdefault("action_id", _random_id(5))
    return blocks


def _interactive_elements(block: dict[str, Any]) -> list[dict[str, Any]]:
    if block.get("type") == "actions":
        return [e for e in block.get("elements", []) if isinstance(e, dict)]
    if block.get("type") == "input" and isinstance(block.get("element"), dict):
        return [block["element"]]
    if block.get("type") == "section" and isinstance(block.get("accessory"), dict):
        accessory = block["accessory"]
        return [accessory] if accessory.get("type") not in ("image",) else []
    return []


def _random_id(length: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _text_of(obj: Any) -> str:
    return str(obj.get("text", "")) if isinstance(obj, dict) else ""


def _block_problems(blocks: Any, max_blocks: int) -> list[str]:
    """What Slack would refuse in ``blocks``, in its words, with JSON pointers."""
    if not isinstance(blocks, list):
        return ["must be an array [json-pointer:/blocks]"]
    problems: list[str] = []
    if len(blocks) > max_blocks:
        problems.append(f"no more than {max_blocks} items allowed [json-pointer:/blocks]")
    seen_ids: set[str] = set()
    for i, block in enumerate(blocks):
        at = f"/blocks/{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            problems.append(f"missing required field: type [json-pointer:{at}]")
            continue
        block_id = block.get("block_id")
        if block_id is not None:
            if len(str(block_id)) > MAX_ID_LENGTH:
                problems.append(f"must be less than {MAX_ID_LENGTH + 1} characters [json-pointer:{at}/block_id]")
            if block_id in seen_ids:
                problems.append(f"block_id must be unique within a message [json-pointer:{at}/block_id]")
            seen_ids.add(block_id)
        kind = block["type"]
        if kind == "section":
            if not block.get("text") and not block.get("fields"):
                problems.append(f"must provide either text or fields [json-pointer:{at}]")
            if len(_text_of(block.get("text"))) > MAX_SECTION_TEXT:
                problems.append(f"must be less than {MAX_SECTION_TEXT + 1} characters [json-pointer:{at}/text/text]")
            fields = block.get("fields") or []
            if len(fields) > MAX_SECTION_FIELDS:
                problems.append(f"no more than {MAX_SECTION_FIELDS} items allowed [json-pointer:{at}/fields]")
            for j, field in enumerate(fields):
                if len(_text_of(field)) > MAX_FIELD_TEXT:
                    pointer = f"{at}/fields/{j}/text"
                    problems.append(f"must be less than {MAX_FIELD_TEXT + 1} characters [json-pointer:{pointer}]")
        elif kind == "header":
            if len(_text_of(block.get("text"))) > MAX_HEADER_TEXT:
                problems.append(f"must be less than {MAX_HEADER_TEXT + 1} characters [json-pointer:{at}/text/text]")
        elif kind == "markdown":
            if len(str(block.get("text", ""))) > MAX_MARKDOWN_BLOCK_TEXT:
                problems.append(f"must be less than {MAX_MARKDOWN_BLOCK_TEXT + 1} characters [json-pointer:{at}/text]")
        elif kind == "context":
            if len(block.get("elements") or []) > MAX_CONTEXT_ELEMENTS:
                problems.append(f"no more than {MAX_CONTEXT_ELEMENTS} items allowed [json-pointer:{at}/elements]")
        elif kind == "actions":
            elements = block.get("elements") or []
            if len(elements) > MAX_ACTIONS_ELEMENTS:
                problems.append(f"no more than {MAX_ACTIONS_ELEMENTS} items allowed [json-pointer:{at}/elements]")
            for j, element in enumerate(elements):
                problems += _element_problems(element, f"{at}/elements/{j}")
        if kind == "section" and isinstance(block.get("accessory"), dict):
            problems += _element_problems(block["accessory"], f"{at}/accessory")
    return problems


def _element_problems(element: Any, at: str) -> list[str]:
    if not isinstance(element, dict):
        return [f"must be an object [json-pointer:{at}]"]
    problems = []
    if len(str(element.get("action_id", ""))) > MAX_ID_LENGTH:
        problems.append(f"must be less than {MAX_ID_LENGTH + 1} characters [json-pointer:{at}/action_id]")
    if element.get("type") == "button":
        if len(_text_of(element.get("text"))) > MAX_BUTTON_TEXT:
            problems.append(f"must be less than {MAX_BUTTON_TEXT + 1} characters [json-pointer:{at}/text/text]")
        if len(str(element.get("value", ""))) > MAX_BUTTON_VALUE:
            problems.append(f"must be less than {MAX_BUTTON_VALUE + 1} characters [json-pointer:{at}/value]")
    confirm = element.get("confirm")
    if isinstance(confirm, dict):
        for key, limit in (("title", 100), ("text", 300), ("confirm", 30), ("deny", 30)):
            if len(_text_of(confirm.get(key))) > limit:
                problems.append(f"must be less than {limit + 1} characters [json-pointer:{at}/confirm/{key}/text]")
    return problems


def _total_text(value: Any) -> int:
    if isinstance(value, dict):
        return sum(len(v) if k == "text" and isinstance(v, str) else _total_text(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_total_text(v) for v in value)
    return 0


# ---------------------------------------------------------------------------------------------
# Helpers of the wire


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def _multipart_parts(content_type: str, body: bytes) -> list[Any]:
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    return list(message.iter_parts()) if message.is_multipart() else []


def _parse_params(query: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """Query string and body (form, JSON or multipart) as one dict; ValueError for bad JSON."""
    params: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True))
    content_type = (_header(headers, "Content-Type") or "").lower()
    if content_type.startswith("application/json"):
        data = json.loads(body.decode("utf-8") or "{}")
        if not isinstance(data, dict):
            raise ValueError("the JSON body is not an object")
        params.update(data)
    elif content_type.startswith("multipart/form-data"):
        for part in _multipart_parts(_header(headers, "Content-Type") or "", body):
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            params[name] = payload if part.get_filename() else payload.decode("utf-8")
    elif body:
        params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    return params


def _upload_content(content_type: str, body: bytes) -> bytes:
    """The file bytes of an upload-URL POST: the raw body (slack_sdk's way) or a multipart file part."""
    if content_type.lower().startswith("multipart/form-data"):
        parts = _multipart_parts(content_type, body)
        for part in parts:
            if part.get_filename() or part.get_param("name", header="content-disposition") in ("file", "filename"):
                return part.get_payload(decode=True) or b""
    return body


def _parse_response_url_body(content_type: str, body: bytes) -> dict[str, Any]:
    if content_type.lower().startswith("application/json") or body.lstrip().startswith(b"{"):
        data = json.loads(body.decode("utf-8") or "{}")
    else:
        form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        data = json.loads(form["payload"]) if "payload" in form else form
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return data


def _file_id_from_path(path: str) -> str | None:
    # /files-pri/T0TEST-F000000001/download/devices.csv
    parts = path.split("/")
    if len(parts) < 3 or "-" not in parts[2]:
        return None
    return parts[2].split("-", 1)[1]


def _json_value(value: Any, name: str, *, error: str = "invalid_arguments") -> Any:
    """A JSON argument: a string in a form body, already a value in a JSON body."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise _ApiError(error, response_metadata={"messages": [f"[ERROR] {name} is not valid JSON"]}) from None
    return value


def _invalid_arguments(*problems: str) -> _ApiError:
    return _ApiError("invalid_arguments", response_metadata={"messages": [f"[ERROR] {p}" for p in problems]})


def _str_or_none(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)


# ---------------------------------------------------------------------------------------------
# What Slack sends the bot: payload builders and signing


def signature_headers(body: str | bytes, secret: str, timestamp: int | str) -> dict[str, str]:
    """Slack's request signature: ``v0=`` + hex HMAC-SHA256 of ``v0:{timestamp}:{body}``.

    https://docs.slack.dev/authentication/verifying-requests-from-slack/
    """
    raw = body.encode("utf-8") if isinstance(body, str) else body
    basestring = b"v0:" + str(timestamp).encode("ascii") + b":" + raw
    digest = hmac.new(secret.encode("utf-8"), basestring, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(timestamp), "X-Slack-Signature": f"v0={digest}"}


def command_body(
    *,
    command: str,
    text: str,
    user_id: str,
    user_name: str,
    channel_id: str,
    channel_name: str,
    team_id: str,
    team_domain: str,
    api_app_id: str,
    response_url: str,
    trigger_id: str,
    token: str = "verification-token",
) -> str:
    """The form body of a slash command, fields in the order Slack sends them."""
    return urlencode(
        [
            ("token", token),
            ("team_id", team_id),
            ("team_domain", team_domain),
            ("channel_id", channel_id),
            ("channel_name", channel_name),
            ("user_id", user_id),
            ("user_name", user_name),
            ("command", command),
            ("text", text),
            ("api_app_id", api_app_id),
            ("is_enterprise_install", "false"),
            ("response_url", response_url),
            ("trigger_id", trigger_id),
        ]
    )


def interaction_body(payload: Mapping[str, Any]) -> str:
    """The form body of an interaction: one field, ``payload``, holding the JSON."""
    return urlencode({"payload": json.dumps(payload, separators=(",", ":"))})


def _user_object(user_id: str, name: str, team_id: str) -> dict[str, str]:
    return {"id": user_id, "username": name, "name": name, "team_id": team_id}


def block_actions_payload(
    *,
    user: Mapping[str, str],
    team: Mapping[str, str],
    api_app_id: str,
    trigger_id: str,
    action: Mapping[str, Any],
    container: Mapping[str, Any],
    channel: Mapping[str, str] | None = None,
    message: Mapping[str, Any] | None = None,
    view: Mapping[str, Any] | None = None,
    response_url: str | None = None,
    token: str = "verification-token",
) -> dict[str, Any]:
    """A ``block_actions`` payload for one action, from a message (``channel``, ``message``,
    ``response_url``) or a view (``view``). An ephemeral message's payload has no ``message``."""
    payload: dict[str, Any] = {
        "type": "block_actions",
        "user": dict(user),
        "api_app_id": api_app_id,
        "token": token,
        "container": dict(container),
        "trigger_id": trigger_id,
        "team": dict(team),
        "enterprise": None,
        "is_enterprise_install": False,
    }
    if channel is not None:
        payload["channel"] = dict(channel)
    if message is not None:
        payload["message"] = copy.deepcopy(dict(message))
    if view is not None:
        payload["view"] = copy.deepcopy(dict(view))
    payload["state"] = {"values": copy.deepcopy(view["state"]["values"]) if view is not None else {}}
    if response_url is not None:
        payload["response_url"] = response_url
    payload["actions"] = [dict(action)]
    return payload


def view_submission_payload(
    *,
    user: Mapping[str, str],
    team: Mapping[str, str],
    api_app_id: str,
    trigger_id: str,
    view: Mapping[str, Any],
    values: Mapping[str, Any],
    token: str = "verification-token",
) -> dict[str, Any]:
    """A ``view_submission`` payload: the view with ``state.values`` set to ``values``."""
    submitted = copy.deepcopy(dict(view))
    submitted["state"] = {"values": copy.deepcopy(dict(values))}
    return {
        "type": "view_submission",
        "team": dict(team),
        "user": dict(user),
        "api_app_id": api_app_id,
        "token": token,
        "trigger_id": trigger_id,
        "view": submitted,
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }


def plain_text_value(text: str | None) -> dict[str, Any]:
    """The state value of a ``plain_text_input``."""
    return {"type": "plain_text_input", "value": text}


def file_input_value(*files: Mapping[str, Any], omit_size: bool = False) -> dict[str, Any]:
    """The state value of a ``file_input`` holding ``files`` (from :meth:`FakeSlack.add_file`).
    ``omit_size``: leave ``size`` out, as Slack sometimes does."""
    objects = [copy.deepcopy(dict(f)) for f in files]
    if omit_size:
        for f in objects:
            f.pop("size", None)
    return {"type": "file_input", "files": objects}


def _action_for(element: Mapping[str, Any], block_id: str, value: str | None, action_ts: str) -> dict[str, Any]:
    """The ``actions[0]`` entry Slack sends when ``element`` is used."""
    kind = element.get("type")
    action: dict[str, Any] = {"action_id": element["action_id"], "block_id": block_id}
    if kind == "button":
        action["text"] = copy.deepcopy(element.get("text"))
        chosen = value if value is not None else element.get("value")
        if chosen is not None:
            action["value"] = chosen
        if element.get("style"):
            action["style"] = element["style"]
    elif kind in ("static_select", "overflow", "radio_buttons"):
        options = [o for group in element.get("option_groups", []) for o in group.get("options", [])]
        options += element.get("options", [])
        option = next((o for o in options if o.get("value") == value), None)
        if option is None:
            raise ValueError(f"{element['action_id']} has no option with value {value!r}")
        action["selected_option"] = copy.deepcopy(option)
        if kind == "static_select" and element.get("placeholder"):
            action["placeholder"] = copy.deepcopy(element["placeholder"])
    elif value is not None:
        action["value"] = value
    action["type"] = kind
    action["action_ts"] = action_ts
    return action


class Workspace:
    """People using the app: builds, signs and POSTs what Slack sends to ``app_url``.

    Each method returns the app's HTTP answer (a :class:`requests.Response`). ``clock`` gives the
    request timestamp (epoch seconds): return an old time to forge an expired request; per call,
    ``sign=False`` leaves the signature out and ``bad_signature=True`` signs with a wrong secret.
    Users and trigger ids are registered in ``fake`` so the bot's API calls about them succeed.
    """

    def __init__(
        self,
        fake: FakeSlack,
        signing_secret: str,
        app_url: str = "http://127.0.0.1:3000/slack/events",
        *,
        clock: Callable[[], float] = time.time,
        verification_token: str = "verification-token",
        timeout: float = 10.0,
    ) -> None:
        self.fake = fake
        self.signing_secret = signing_secret
        self.app_url = app_url
        self.clock = clock
        self.verification_token = verification_token
        self.timeout = timeout
        self.last_trigger_id: str | None = None
        self.last_response_url: str | None = None
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the people's actions -------------------------------------------------------------------

    def command(
        self,
        user: str,
        channel: str,
        text: str = "",
        command: str = "/devices",
        *,
        sign: bool = True,
        bad_signature: bool = False,
    ) -> requests.Response:
        """``user`` types ``command text`` in ``channel``."""
        name = self._ensure_user(user)
        info = self.fake.channel_info(channel)
        self.last_trigger_id = self.fake.issue_trigger(user)
        self.last_response_url = self.fake.response_url(channel=channel, user=user, kind="commands")
        body = command_body(
            command=command,
            text=text,
            user_id=user,
            user_name=name,
            channel_id=channel,
            channel_name=info["name"],
            team_id=self.fake.team_id,
            team_domain=self.fake.team_domain,
            api_app_id=self.fake.app_id,
            response_url=self.last_response_url,
            trigger_id=self.last_trigger_id,
            token=self.verification_token,
        )
        return self.post(body, sign=sign, bad_signature=bad_signature)

    def click(
        self,
        user: str,
        surface: Mapping[str, Any],
        action_id: str,
        value: str | None = None,
        *,
        channel: str | None = None,
        sign: bool = True,
        bad_signature: bool = False,
    ) -> requests.Response:
        """``user`` uses the element ``action_id`` on ``surface``: a message (from
        :meth:`FakeSlack.messages`, :meth:`~FakeSlack.thread` or :meth:`~FakeSlack.ephemeral`) as the
        user sees it, which may be out of date (a double click), or a view (from
        :attr:`FakeSlack.views`). ``value`` overrides a button's value or picks a select option."""
        name = self._ensure_user(user)
        block_id, element = _find_element(surface, action_id)
        self.last_trigger_id = self.fake.issue_trigger(user)
        action = _action_for(element, block_id, value, f"{self.clock():.6f}")
        common = {
            "user": _user_object(user, name, self.fake.team_id),
            "team": {"id": self.fake.team_id, "domain": self.fake.team_domain},
            "api_app_id": self.fake.app_id,
            "trigger_id": self.last_trigger_id,
            "action": action,
            "token": self.verification_token,
        }
        if surface.get("type") in ("modal", "home") and "id" in surface:
            payload = block_actions_payload(
                container={"type": "view", "view_id": surface["id"]}, view=_view_snapshot(surface), **common
            )
        else:
            ts = surface["ts"]
            if channel is None:
                found = self.fake.find_message(ts)
                if found is None:
                    raise ValueError(f"no message {ts} in the fake Slack; pass channel=")
                channel = found[0]
            info = self.fake.channel_info(channel)
            ephemeral = "user_to" in surface
            container: dict[str, Any] = {
                "type": "message",
                "message_ts": ts,
                "channel_id": channel,
                "is_ephemeral": ephemeral,
            }
            if surface.get("thread_ts"):
                container["thread_ts"] = surface["thread_ts"]
            self.last_response_url = self.fake.response_url(
                channel=channel, user=user, message_ts=ts, kind="actions"
            )
            payload = block_actions_payload(
                container=container,
                channel={"id": channel, "name": info["name"]},
                message=None if ephemeral else _public(dict(surface)),
                response_url=self.last_response_url,
                **common,
            )
        return self.post(interaction_body(payload), sign=sign, bad_signature=bad_signature)

    def event(self, user: str, event: Mapping[str, Any], *, sign: bool = True) -> requests.Response:
        """Slack's Events API delivers ``event`` (``type`` and the rest) about ``user`` to the app,
        as an ``event_callback`` (e.g. ``{"type": "app_home_opened", "tab": "home"}``)."""
        self._ensure_user(user)
        now = self.clock()
        body = {
            "token": self.verification_token,
            "team_id": self.fake.team_id,
            "api_app_id": self.fake.app_id,
            "event": {"user": user, "event_ts": f"{now:.6f}", **event},
            "type": "event_callback",
            "event_id": f"Ev{_random_id(10)}",
            "event_time": int(now),
            "authorizations": [{"team_id": self.fake.team_id, "user_id": self.fake.bot_user_id, "is_bot": True}],
        }
        return self.post(json.dumps(body), content_type="application/json", sign=sign)

    def submit_view(
        self,
        user: str,
        view: Mapping[str, Any],
        values: Mapping[str, Mapping[str, Mapping[str, Any]]],
        *,
        sign: bool = True,
        bad_signature: bool = False,
    ) -> requests.Response:
        """``user`` submits the modal ``view`` (from :attr:`FakeSlack.views`) with ``values``
        (``{block_id: {action_id: value}}``, see :func:`plain_text_value`, :func:`file_input_value`).
        Afterwards the fake applies the app's answer: an empty ack closes the modal,
        ``response_action: update`` replaces it, ``errors`` keeps it open."""
        name = self._ensure_user(user)
        _check_values(view, values)
        self.last_trigger_id = self.fake.issue_trigger(user)
        payload = view_submission_payload(
            user=_user_object(user, name, self.fake.team_id),
            team={"id": self.fake.team_id, "domain": self.fake.team_domain},
            api_app_id=self.fake.app_id,
            trigger_id=self.last_trigger_id,
            view=_view_snapshot(view),
            values=values,
            token=self.verification_token,
        )
        response = self.post(interaction_body(payload), sign=sign, bad_signature=bad_signature)
        if response.status_code == 200:
            ack: dict[str, Any] | None = None
            if response.content.strip():
                try:
                    ack = response.json()
                except ValueError:
                    ack = None
            self.fake._record_submission(str(view["id"]), dict(values), ack)
        return response

    def post(
        self,
        body: str | bytes,
        *,
        content_type: str = "application/x-www-form-urlencoded",
        sign: bool = True,
        bad_signature: bool = False,
        timestamp: int | None = None,
    ) -> requests.Response:
        """POST ``body`` to the app as Slack does, signed unless told otherwise."""
        headers = {"Content-Type": content_type, "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)"}
        if sign:
            when = int(self.clock()) if timestamp is None else timestamp
            secret = self.signing_secret + "-forged" if bad_signature else self.signing_secret
            headers.update(signature_headers(body, secret, when))
        data = body.encode("utf-8") if isinstance(body, str) else body
        return self._session.post(self.app_url, data=data, headers=headers, timeout=self.timeout)

    def _ensure_user(self, user: str) -> str:
        if not self.fake.has_user(user):
            self.fake.add_user(user)
        with self.fake._lock:
            return str(self.fake._users[user]["name"])


def _view_snapshot(view: Mapping[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in view.items()}


def _find_element(surface: Mapping[str, Any], action_id: str) -> tuple[str, dict[str, Any]]:
    seen = []
    for block in surface.get("blocks") or []:
        for element in _interactive_elements(block):
            seen.append(element.get("action_id"))
            if element.get("action_id") == action_id:
                return str(block.get("block_id")), element
    raise ValueError(f"no element with action_id {action_id!r} here; there are {seen}")


def _check_values(view: Mapping[str, Any], values: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse values Slack could not send: for blocks or actions the view does not have."""
    known = {
        str(b.get("block_id")): {e.get("action_id") for e in _interactive_elements(b)}
        for b in view.get("blocks") or []
        if isinstance(b, dict)
    }
    for block_id, actions in values.items():
        if block_id not in known:
            raise ValueError(f"the view has no block {block_id!r}; it has {sorted(known)}")
        for action_id in actions:
            if action_id not in known[block_id]:
                has = sorted(map(str, known[block_id]))
                raise ValueError(f"block {block_id!r} has no element {action_id!r}; it has {has}")
