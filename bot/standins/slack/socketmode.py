"""Slack's side of Socket Mode, for the tests: a small WebSocket server (RFC 6455) on 127.0.0.1.

:class:`~bot.standins.slack.FakeSlack` answers ``apps.connections.open`` (with the app-level token)
with a ``ws://`` URL from :meth:`SocketModeServer.url`, good for one connection, as Slack's are.
On each connection the server says ``hello``; it sends envelopes (:meth:`SocketModeServer.envelope`,
or :meth:`~SocketModeServer.deliver` for the form body of a slash command or an interaction, as
:class:`SocketWorkspace` does) each on ONE of the app's open connections chosen at random, as Slack
does (an app may hold up to 10, e.g. one per replica): a connection Slack has
asked to go (``disconnect``) gets no new ones, nor here one made silent (a simplification: Slack
itself would go on sending to a half-open connection until it noticed). It records each ack with
the time it came and the connection it came on (:meth:`~SocketModeServer.wait_ack`).

What can go wrong with a connection, each on demand, on the newest one unless told otherwise:
``disconnect`` envelopes of every reason (:meth:`~SocketModeServer.disconnect`), a close frame
(:meth:`~SocketModeServer.close`), a connection that ends without one (:meth:`~SocketModeServer.drop`),
a reset (:meth:`~SocketModeServer.reset`), and a half-open one that neither reads, answers pings nor
sends anything while the socket stays up (:meth:`~SocketModeServer.silence`).

Slack's documentation of the protocol: https://docs.slack.dev/apis/events-api/using-socket-mode/
"""

from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import json
import random
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
DISCONNECT_REASONS = ("warning", "refresh_requested", "link_disabled")


class Peer:
    """One WebSocket connection as the server sees it."""

    def __init__(self, server: SocketModeServer, sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.number = number
        self.opened_at = time.monotonic()
        self.closed = False
        self.silent = False
        self.leaving = False  # told to disconnect: Slack sends it no new envelope
        self.pings = 0
        self._send_lock = threading.Lock()

    def send_text(self, value: dict[str, Any]) -> None:
        self._send(TEXT, json.dumps(value).encode())

    def _send(self, opcode: int, payload: bytes) -> None:
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        with self._send_lock:
            self.sock.sendall(header + payload)

    def close_frame(self, code: int = 1000, reason: str = "") -> None:
        self._send(CLOSE, struct.pack("!H", code) + reason.encode())

    def end(self, how: str = "fin") -> None:
        """End the TCP connection: ``fin`` (no close frame) or ``reset`` (RST)."""
        self.closed = True
        if how == "reset":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sock.close()

    def serve(self) -> None:
        try:
            while not self.closed:
                if self.silent:
                    self.server._stopping.wait()  # half-open: nothing read, nothing sent
                    return
                frame = self._frame()
                if frame is None:
                    return
                opcode, payload = frame
                if self.silent:
                    continue
                if opcode == PING:
                    self.pings += 1
                    self._send(PONG, payload)
                elif opcode == CLOSE:
                    self._send(CLOSE, payload[:2])
                    return
                elif opcode == TEXT:
                    self.server._acked(self, payload)
        except OSError:
            return
        finally:
            if not self.silent:
                self.closed = True
                self.sock.close()

    def _frame(self) -> tuple[int, bytes] | None:
        head = self._exactly(2)
        if head is None:
            return None
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._exactly(2) or b"\0\0")[0]
        elif length == 127:
            length = struct.unpack("!Q", self._exactly(8) or b"\0" * 8)[0]
        mask = self._exactly(4) if head[1] & 0x80 else b"\0\0\0\0"
        data = self._exactly(length) if length else b""
        if mask is None or data is None:
            return None
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def _exactly(self, n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(n - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)


class SocketModeServer:
    """Slack's Socket Mode endpoint (see the module docstring). Start it, or let FakeSlack do it."""

    def __init__(self, host: str = "127.0.0.1", app_id: str = "A0IOTREG", *, seed: int | None = None) -> None:
        self.host = host
        self.app_id = app_id
        self._random = random.Random(seed)
        self.peers: list[Peer] = []
        self.acks: dict[str, dict[str, Any]] = {}
        self.ack_counts: collections.Counter[str] = collections.Counter()  # acks per envelope id (Slack wants one)
        self._tickets: set[str] = set()
        self._numbers = itertools.count(1)
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None

    def start(self) -> SocketModeServer:
        if self._listener is None:
            self._listener = socket.create_server((self.host, 0))
            threading.Thread(target=self._accept, name="socket-mode-standin", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        for peer in self.open_peers():
            peer.end()

    def url(self) -> str:
        """A URL good for one connection (what ``apps.connections.open`` returns)."""
        ticket = secrets.token_hex(8)
        with self._changed:
            self._tickets.add(ticket)
        port = self._listener.getsockname()[1] if self._listener else 0
        return f"ws://{self.host}:{port}/link/?ticket={ticket}&app_id={self.app_id}"

    # -- what tests read ---------------------------------------------------------------------------

    def open_peers(self) -> list[Peer]:
        with self._changed:
            return [p for p in self.peers if not p.closed]

    @property
    def newest(self) -> Peer:
        with self._changed:
            return self.peers[-1]

    def pick(self) -> Peer:
        """The connection Slack sends the next envelope on: one of the open connections it has not
        asked to go, at random (the newest when there is none such)."""
        with self._changed:
            usable = [p for p in self.peers if not (p.closed or p.leaving or p.silent)]
            return self._random.choice(usable) if usable else self.peers[-1]

    def wait_for(self, condition: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until ``condition()`` is true (re-checked at each connection or ack); its value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (result := condition()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return result
                self._changed.wait(min(left, 0.05))
            return result

    def wait_for_connection(self, number: int, timeout: float = 10.0) -> Peer | None:
        """The ``number``-th connection (1 for the first), once it is open and greeted."""
        return self.wait_for(lambda: next((p for p in self.peers if p.number == number), None), timeout)

    def wait_ack(self, envelope_id: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """The ack of an envelope: ``{"payload": …, "at": monotonic time, "connection": n}``."""
        return self.wait_for(lambda: self.acks.get(envelope_id), timeout)

    # -- what Slack does -----------------------------------------------------------------------------

    def envelope(self, kind: str, payload: dict[str, Any], *, peer: Peer | None = None) -> tuple[str, float]:
        """Send an envelope of ``kind`` (``slash_commands``, ``interactive``, ``events_api``);
        returns its id and when it was sent."""
        envelope_id = secrets.token_hex(12)
        body = {"envelope_id": envelope_id, "type": kind, "payload": payload, "accepts_response_payload": kind != "events_api",
                "retry_attempt": 0, "retry_reason": ""}
        sent = time.monotonic()
        (peer or self.pick()).send_text(body)
        return envelope_id, sent

    def deliver(self, body: str) -> tuple[str, float]:
        """The form body Slack would POST over HTTP, sent as the envelope it sends instead."""
        fields = dict(parse_qsl(body, keep_blank_values=True))
        if "payload" in fields:
            return self.envelope("interactive", json.loads(fields["payload"]))
        return self.envelope("slash_commands", fields)

    def disconnect(self, reason: str = "warning", peer: Peer | None = None) -> Peer:
        """Ask the bot to reconnect, as Slack does before it closes a connection."""
        if reason not in DISCONNECT_REASONS:
            raise ValueError(f"Slack sends disconnect reasons {DISCONNECT_REASONS}, not {reason!r}")
        peer = peer or self.newest
        peer.leaving = True
        peer.send_text({"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-standin"}})
        return peer

    def close(self, code: int = 1001, peer: Peer | None = None) -> Peer:
        peer = peer or self.newest
        peer.close_frame(code, "going away")
        return peer

    def drop(self, peer: Peer | None = None) -> Peer:
        peer = peer or self.newest
        peer.end("fin")
        return peer

    def reset(self, peer: Peer | None = None) -> Peer:
        peer = peer or self.newest
        peer.end("reset")
        return peer

    def silence(self, peer: Peer | None = None) -> Peer:
        peer = peer or self.newest
        peer.silent = True
        return peer

    # -- the wire ------------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._greet, args=(sock,), daemon=True).start()

    def _greet(self, sock: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = sock.recv(4096)
            if not chunk or len(request) > 16384:
                sock.close()
                return
            request += chunk
        lines = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1] if len(lines[0].split(" ")) == 3 else ""
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        ticket = dict(parse_qsl(urlsplit(target).query)).get("ticket", "")
        with self._changed:
            valid = ticket in self._tickets
            self._tickets.discard(ticket)
        key = headers.get("sec-websocket-key")
        if not valid or not key or headers.get("upgrade", "").lower() != "websocket":
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            sock.close()
            return
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        sock.sendall(
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode()
        )
        peer = Peer(self, sock, next(self._numbers))
        peer.send_text({
            "type": "hello", "num_connections": len(self.open_peers()) + 1,
            "debug_info": {"host": "applink-standin", "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": self.app_id},
        })
        with self._changed:
            self.peers.append(peer)
            self._changed.notify_all()
        peer.serve()
        with self._changed:
            self._changed.notify_all()

    def _acked(self, peer: Peer, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if not isinstance(message, dict) or "envelope_id" not in message:
            return
        with self._changed:
            self.ack_counts[str(message["envelope_id"])] += 1
            self.acks.setdefault(str(message["envelope_id"]), {
                "payload": message.get("payload"), "at": time.monotonic(), "connection": peer.number,
            })
            self._changed.notify_all()


def ack_response(ack: dict[str, Any] | None) -> requests.Response:
    """An ack as the HTTP answer it stands for (200 with the payload as JSON; 504 if none came),
    so tests written against HTTP mode read Socket Mode answers alike."""
    response = requests.Response()
    response.status_code = 200 if ack is not None else 504
    payload = (ack or {}).get("payload")
    response._content = json.dumps(payload).encode() if payload else b""
    response.headers["Content-Type"] = "application/json"
    return response


def socket_workspace(fake: Any, timeout: float = 10.0) -> Any:
    """A :class:`~bot.standins.slack.Workspace` whose people reach the app over Socket Mode: each
    request goes as an envelope on ``fake``'s Socket Mode server, and its ack is the answer."""
    from bot.standins.slack import Workspace

    class SocketWorkspace(Workspace):
        def post(self, body: str | bytes, **_: Any) -> requests.Response:  # signatures are an HTTP matter
            text = body.decode("utf-8") if isinstance(body, bytes) else body
            envelope_id, _sent = fake.socket_mode.deliver(text)
            return ack_response(fake.socket_mode.wait_ack(envelope_id, self.timeout))

    return SocketWorkspace(fake, "", app_url="socket-mode", timeout=timeout)
