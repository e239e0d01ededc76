"""HTTP for the emulator: reads the query string and form body, asks the gateway, writes JSON.

Nothing here knows the API; :class:`~bot.standins.emulator.gateway.Gateway` does. Standard library only:
a :class:`~http.server.ThreadingHTTPServer` on daemon threads, speaking HTTP/1.1 with keep-alive.

A request line may be up to :data:`MAX_REQUEST_LINE` bytes, not the standard library's 64 KiB: a
check of 10,000 names sent in the query string (as a GET, or by a client that flattens every
parameter into the query) is about 0.4 MB, and 4 MB with long nicknames.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit

from bot.standins.emulator.gateway import Gateway

__all__ = ["AnswerHold", "EmulatorServer"]

logger = logging.getLogger(__name__)

#: The longest request line read; a longer one is answered 414.
MAX_REQUEST_LINE = 8 * 1024 * 1024

#: The GIL slice of an emulator running as a process of its own (``iotreg emulator``). The gateway
#: counts a call against its quota when the call's thread gets to run; with Python's default slice
#: (5 ms) and a dozen request threads, a busy emulator counted calls tens of milliseconds after they
#: arrived, where the platform's gateway counts them as they come in.
SWITCH_INTERVAL = 0.001


class AnswerHold:
    """Answers to one action held after the platform has acted, until :meth:`release`: the caller
    waits as on a slow network, or dies waiting and never hears that the call took effect.
    ``callers`` are the client addresses (host, port) of the calls held now."""

    def __init__(self, when: Callable[[dict[str, str]], bool] | None = None) -> None:
        self._released = threading.Event()
        self._changed = threading.Condition()
        self.when = when  # which calls to hold, by their parameters (None: every call of the action)
        self.callers: list[tuple[str, int]] = []

    def release(self) -> None:
        self._released.set()

    def wait(self, caller: tuple[str, int]) -> None:
        with self._changed:
            self.callers.append(caller)
            self._changed.notify_all()
        try:
            self._released.wait(60)
        finally:
            with self._changed:
                self.callers.remove(caller)

    def wait_for_caller(self, timeout: float) -> tuple[str, int] | None:
        """The first caller held, once there is one (``None`` after ``timeout`` seconds)."""
        with self._changed:
            self._changed.wait_for(lambda: self.callers, timeout)
            return self.callers[0] if self.callers else None


def _call(query: str, body: bytes, headers: object) -> tuple[str, dict[str, str]]:
    """The API action of a call (its ``Action`` parameter, version 1.0, or ``x-acs-action``
    header, V3) and its parameters."""
    params = dict(parse_qsl(query))
    params.update(parse_qsl(body.decode("utf-8", "replace")))
    action = params.get("Action") or dict((k.lower(), v) for k, v in headers.items()).get("x-acs-action", "")  # type: ignore[attr-defined]
    return action, params


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that died or gave up while its answer was on the way (a killed process, a
        # timeout test) leaves a broken pipe behind: not worth a traceback.
        logger.debug("emulator: connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "iotreg-emulator"
    timeout = 30  # seconds an idle keep-alive connection is kept
    # Headers and body leave in two writes; without TCP_NODELAY, Nagle's algorithm meets the
    # client's delayed ACK and every answer on a kept-alive connection waits about 40 ms.
    disable_nagle_algorithm = True
    gateway: Gateway  # set on the subclass made per server
    holds: dict[str, AnswerHold]  # the server's, by action

    def handle_one_request(self) -> None:
        # The standard library's, with a longer request line (it stops at 64 KiB with 414).
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except TimeoutError:
            self.close_connection = True
            return
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        method = getattr(self, f"do_{self.command}", None)
        if method is None:
            self.send_error(501, f"unsupported method {self.command!r}")
            return
        method()
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        url = urlsplit(self.path)
        if url.path != "/":
            status, payload = 404, {
                "Code": "InvalidApi.NotFound",
                "Message": "Specified api is not found, please check your url and method.",
            }
        else:
            try:
                status, payload = self.gateway.handle_raw(
                    self.command, url.query, body, self.headers.get("Content-Type"), headers=self.headers.items()
                )
            except Exception:  # the edge: a bug in the emulator must still answer, as a 500
                logger.exception("emulator failed on %s %s", self.command, self.path)
                status, payload = 500, {
                    "Code": "InternalError",
                    "Message": "The emulator failed; see its log.",
                }
        if self.holds:
            action, params = _call(url.query, body, self.headers)
            held = self.holds.get(action)
            if held is not None and (held.when is None or held.when(params)):
                held.wait(self.client_address[:2])
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        logger.debug("%s - %s", self.address_string(), format % args)


class EmulatorServer:
    """Serve ``gateway`` on ``host:port`` (port 0: any free port) from a background thread."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.holds: dict[str, AnswerHold] = {}

    def hold(self, action: str, when: Callable[[dict[str, str]], bool] | None = None) -> AnswerHold:
        """Hold every answer to ``action`` (after the platform has acted on the call), or to those
        calls whose parameters satisfy ``when``, until the returned :class:`AnswerHold` is
        released; :meth:`unhold` ends it for later calls."""
        held = self.holds[action] = AnswerHold(when)
        return held

    def unhold(self, action: str) -> None:
        held = self.holds.pop(action, None)
        if held is not None:
            held.release()

    @property
    def endpoint(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("the emulator server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> EmulatorServer:
        """Bind and serve; returns at once, ready to answer."""
        if self._httpd is not None:
            return self
        handler = type("Handler", (_Handler,), {"gateway": self.gateway, "holds": self.holds})
        httpd = _Server((self.host, self.port), handler)
        self._httpd = httpd
        # A short poll interval so that stop() returns quickly.
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="iot-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
