"""The HTTP edge of `iotreg serve` as deployed, tried as an attacker would: clients that never
finish a body, huge bodies, malformed signatures and junk. Each must leave the bot answering Slack,
refuse before reading, and cost at most one log line without a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from test_serve import free_port, stop, wait_until

from bot.standins.slack import FakeSlack, Workspace, signature_headers

SECRET = "edge-signing-secret"
STALLED = 24  # more than the server's threads (IOTREG_WORKERS = 16)


class Served:
    def __init__(self, port: int, log: Path, fake: FakeSlack) -> None:
        self.port, self.log, self.fake = port, log, fake
        self.url = f"http://127.0.0.1:{port}"
        self.ws = Workspace(fake, SECRET, app_url=f"{self.url}/slack/events", timeout=5)

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def raw(self, request: bytes, *, read: bool = True) -> socket.socket | bytes:
        """Send raw bytes; with ``read``, the whole answer (the server closes or answers)."""
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        conn.sendall(request)
        if not read:
            return conn
        with conn:
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("edge")
    port = free_port()
    with FakeSlack() as fake:
        fake.add_channel("C0OPS", "iot-ops")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIBABA_CLOUD_", "IOT_", "SLACK_", "IOTREG_"))}
        env.update({"SLACK_BOT_TOKEN": fake.bot_token, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": fake.api_url,
                    "IOTREG_DB": str(tmp / "iotreg.db"), "PORT": str(port), "IOTREG_WORKERS": "16"})
        log = tmp / "serve.log"
        with log.open("w") as out:
            process = subprocess.Popen([sys.executable, "-m", "bot", "serve", "--emulator", "--host", "127.0.0.1"],
                                       env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200), log.read_text()
            yield Served(port, log, fake)
        finally:
            stop(process)
        assert "Traceback" not in log.read_text(), log.read_text()
        assert process.returncode == 0


def post_headers(length: int, extra: str = "") -> bytes:
    return (f"POST /slack/events HTTP/1.1\r\nHost: bot\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def test_clients_that_never_finish_a_body_or_their_headers_do_not_stop_acks_or_healthz(served):
    stalled = [served.raw(post_headers(5000) + b"command=%2Fdevices&te", read=False) for _ in range(STALLED)]
    stalled += [served.raw(b"POST /slack/events HTTP/1.1\r\nHost: bot\r\nX-Slack-Sig", read=False) for _ in range(STALLED)]
    try:
        started = time.monotonic()
        answer = served.ws.command("U0ALICE", "C0OPS", "help")
        assert answer.status_code == 200 and "/devices register" in answer.text
        assert requests.get(f"{served.url}/healthz", timeout=5).json()["ok"] is True
        assert requests.get(f"{served.url}/metrics", timeout=5).status_code == 200
        assert time.monotonic() - started < 2.0
    finally:
        for conn in stalled:
            conn.close()


def test_a_body_over_1_mb_is_refused_from_its_content_length_before_it_is_sent(served):
    for length in (1_048_577, 100_000_000):
        started = time.monotonic()
        answer = served.raw(post_headers(length))  # the body is never sent: the answer cannot wait for it
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        assert time.monotonic() - started < 2.0


def test_a_chunked_body_is_refused_once_it_passes_1_mb(served):
    conn = served.raw(b"POST /slack/events HTTP/1.1\r\nHost: bot\r\nTransfer-Encoding: chunked\r\n\r\n", read=False)
    with conn:
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        try:
            for _ in range(64):  # 4 MB offered; the server answers and closes after the first 1 MB
                conn.sendall(chunk)
        except OSError:
            pass
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


def test_a_body_of_1_mb_is_still_read_and_checked(served):
    body = b"x" * 1_048_576
    headers = {"Content-Type": "application/x-www-form-urlencoded", **signature_headers(body, SECRET + "-wrong", int(time.time()))}
    assert requests.post(f"{served.url}/slack/events", data=body, headers=headers, timeout=10).status_code == 401


@pytest.mark.parametrize("timestamp, signature", [
    ("abc", "v0=" + "0" * 64),
    ("", ""),
    ("1700000000", "v1=nothex"),
    ("99999999999999999999", "v0=" + "0" * 64),
])
def test_a_malformed_timestamp_or_signature_is_401(served, timestamp, signature):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    headers.update({k: v for k, v in {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature}.items() if v})
    answer = requests.post(f"{served.url}/slack/events", data="command=%2Fdevices&text=help", headers=headers, timeout=5)
    assert answer.status_code == 401


def test_unauthenticated_junk_is_refused_with_one_log_line_each_and_no_traceback(served):
    junk = [
        "payload=%7Bnot-json",
        "payload=" + "%FF" * 300,
        "\x00\x01\x02 binary junk",
        "command=%2Fdevices&text=" + "A" * 50_000,
    ]
    before = len(served.lines())
    for body in junk:
        for forged in ({}, signature_headers(body, "not-the-secret", int(time.time())), {"X-Slack-Request-Timestamp": "abc", "X-Slack-Signature": "v0=zz"}):
            answer = requests.post(f"{served.url}/slack/events", data=body.encode("latin-1"), headers=forged, timeout=5)
            assert answer.status_code == 401
    sent = len(junk) * 3
    new = served.lines()[before:]
    assert len(new) <= sent, new
    assert not any("Traceback" in line or line.startswith("  File ") for line in new), new
    assert all("refused a request" in line for line in new), new
