r"""The local Slack's wire: :class:`FakeSlack`, the HTTP server speaking the Web API over
:class:`~bot.standins.slack.state.SlackState` (method dispatch, token rules, argument parsing,
``ok: false`` errors, injected faults), and the other addresses Slack hands out: upload URLs,
private file URLs and ``response_url``\s."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from bot.standins.slack.state import (
    Call,
    Download,
    MAX_BLOCKS_TOTAL_TEXT,
    MAX_MESSAGE_BLOCKS,
    MAX_MESSAGE_TEXT,
    RESPONSE_URL_USES,
    ResponseUrlPost,
    SlackState,
    TRIGGER_TTL,
    _add_share,
    _ApiError,
    _block_problems,
    _Channel,
    _Fault,
    _FileRecord,
    _FILETYPES,
    _invalid_arguments,
    _is_top_level,
    _json_value,
    _public,
    _replace_message,
    _total_text,
    _with_block_ids,
)

log = logging.getLogger(__name__)


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


def _fault_reply(fault: _Fault, json_api: bool) -> _Reply:
    """What an injected fault answers: Slack's JSON error, a 429 with Retry-After, or an HTML 5xx page."""
    if fault.error is not None:
        return _Reply.json({"ok": False, "error": fault.error})
    if fault.status == 429:
        headers = {"Retry-After": str(fault.retry_after if fault.retry_after is not None else 1)}
        if json_api:
            return _Reply.json({"ok": False, "error": "ratelimited"}, 429, **headers)
        return _Reply(429, b"", "text/plain; charset=utf-8", headers)
    body = SERVER_ERROR_PAGE if fault.body is None else fault.body
    return _Reply.html(fault.status, body)


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
            self.fake._caller.address = self.client_address[:2]
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


class FakeSlack(SlackState):
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
        app_token: str = "xapp-local-iotreg-test",
    ) -> None:
        super().__init__(
            bot_token,
            team_id,
            team_domain=team_domain,
            team_name=team_name,
            bot_user_id=bot_user_id,
            bot_id=bot_id,
            bot_name=bot_name,
            app_id=app_id,
            clock=clock,
            trigger_ttl=trigger_ttl,
            app_token=app_token,
        )
        self.host = host
        self.port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._socket_mode: Any = None
        self._caller = threading.local()  # the client address of the request this thread serves

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

    def _before(self, name: str, json_api: bool, params: dict[str, Any] | None = None) -> _Reply | None:
        """Apply an injected delay (outside the lock), hold and fault, if any."""
        with self._lock:
            delay = self._delays.get(name, 0.0)
            held = self._holds.get(name)
        if delay:
            self._stopping.wait(delay)
        if held is not None and (held.when is None or held.when(params or {})):
            held.wait(self._stopping, getattr(self._caller, "address", None), params)
        with self._lock:
            queue = self._faults.get(name)
            if not queue:
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
        return _fault_reply(fault, json_api)

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
        fault = self._before(method, json_api=True, params=params)
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


def _str_or_none(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)
