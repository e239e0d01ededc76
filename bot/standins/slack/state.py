r"""The local Slack's state: the workspace model :class:`SlackState` (channels, messages, users,
user groups, files, views, Home tabs, triggers, ``response_url``\s, injected faults and holds, the
requests recorded), with Slack's rules for what a message or a view may hold. Nothing here speaks
HTTP; :mod:`bot.standins.slack.wire` does."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

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
# The model


class _ApiError(Exception):
    """An ``ok: false`` answer; ``extra`` goes into the JSON next to ``error``."""

    def __init__(self, code: str, **extra: Any) -> None:
        super().__init__(code)
        self.code = code
        self.extra = extra


class Hold:
    """Requests held by :meth:`FakeSlack.hold` until :meth:`release`. ``calls`` are the requests
    held now, as (the caller's client address (host, port), the method's parameters): which process
    is waiting, and for what, when several call."""

    def __init__(self, changed: threading.Condition, when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self._changed = changed
        self._released = threading.Event()
        self.when = when  # which calls to hold, by their parameters (None: every call)
        self.waiting = 0  # requests held now (read it in FakeSlack.wait_for)
        self.calls: list[tuple[tuple[str, int] | None, dict[str, Any]]] = []

    def release(self) -> None:
        self._released.set()
        with self._changed:
            self._changed.notify_all()

    def wait(self, stopping: threading.Event, caller: tuple[str, int] | None = None, params: dict[str, Any] | None = None) -> None:
        call = (caller, params or {})
        with self._changed:
            self.waiting += 1
            self.calls.append(call)
            self._changed.notify_all()
        try:
            while not self._released.wait(0.05) and not stopping.is_set():
                pass
        finally:
            with self._changed:
                self.waiting -= 1
                self.calls.remove(call)
                self._changed.notify_all()


@dataclasses.dataclass
class _Fault:
    status: int
    retry_after: int | None
    error: str | None
    body: str | None
    times: int


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


class SlackState:
    r"""The workspace :class:`~bot.standins.slack.FakeSlack` serves: channels and their messages,
    users, user groups, files, views and Home tabs, triggers and ``response_url``\s, the faults and
    holds a test injected, and every request recorded. Everything is guarded by one lock; every
    recorded request notifies a condition that :meth:`wait_for` waits on."""

    def __init__(
        self,
        bot_token: str,
        team_id: str,
        *,
        team_domain: str,
        team_name: str,
        bot_user_id: str,
        bot_id: str,
        bot_name: str,
        app_id: str,
        clock: Callable[[], float],
        trigger_ttl: float | None,
        app_token: str,
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
        self.clock = clock
        self.trigger_ttl = trigger_ttl
        self.usergroups: dict[str, list[str]] = {}

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
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
        self._holds: dict[str, Hold] = {}
        self.add_user(bot_user_id, name=bot_name, is_bot=True)

    @property
    def base_url(self) -> str:
        r"""The address the workspace is served at, which the URLs it hands out start with (file
        URLs, ``response_url``\s): the wire's to say."""
        raise NotImplementedError

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

    def hold(self, method: str, when: Callable[[dict[str, Any]], bool] | None = None) -> Hold:
        """Hold every answer for ``method`` (or ``files.upload``/``files.download``), or those of
        the calls whose parameters satisfy ``when``, until the returned :class:`Hold` is released;
        :attr:`Hold.waiting` counts the requests held now, :attr:`Hold.calls` says whose and what."""
        with self._lock:
            held = self._holds[method] = Hold(self._changed, when)
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

    def _record(self, call: Call) -> None:
        with self._changed:
            self._calls.append(call)
            self._changed.notify_all()

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
