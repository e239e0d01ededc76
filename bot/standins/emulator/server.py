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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from bot.standins.emulator.gateway import Gateway

__all__ = ["EmulatorServer"]

logger = logging.getLogger(__name__)

#: The longest request line read; a longer one is answered 414.
MAX_REQUEST_LINE = 8 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "iotreg-emulator"
    timeout = 30  # seconds an idle keep-alive connection is kept
    # Headers and body leave in two writes; without TCP_NODELAY, Nagle's algorithm meets the
    # client's delayed ACK and every answer on a kept-alive connection waits about 40 ms.
    disable_nagle_algorithm = True
    gateway: Gateway  # set on the subclass made per server

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
        handler = type("Handler", (_Handler,), {"gateway": self.gateway})
        httpd = ThreadingHTTPServer((self.host, self.port), handler)
        httpd.daemon_threads = True
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
