"""``iotreg emulator``: prints what to set, answers signed calls with those credentials, stops on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone

import requests
from click.testing import CliRunner

from bot.aliyun.signing import signature_for
from bot.cli import cli


def signed_call(env: dict[str, str], **extra: str) -> dict:
    """BatchRegisterDevice of two devices, signed with the printed credentials (and ``extra``)."""
    params = {
        "Action": "BatchRegisterDevice",
        "Version": "2018-01-20",
        "Format": "JSON",
        "AccessKeyId": env["ALIBABA_CLOUD_ACCESS_KEY_ID"],
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": str(uuid.uuid4()),
        "Timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ProductKey": "a1CliProd01",
        "Count": "2",
        **extra,
    }
    params["Signature"] = signature_for("GET", params, env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"])
    return requests.get(env["IOT_ENDPOINT"] + "/", params=params, timeout=5).json()


def test_the_command_serves_until_interrupted() -> None:
    run_emulator([], check_printed=lambda env: set(env) == {"IOT_ENDPOINT", "ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"})


def test_with_a_security_token_every_call_must_carry_it() -> None:
    def check(env: dict[str, str]) -> bool:
        refused = signed_call({k: v for k, v in env.items() if k != "ALIBABA_CLOUD_SECURITY_TOKEN"})
        assert refused["Code"] == "InvalidSecurityToken.Malformed"
        return env["ALIBABA_CLOUD_SECURITY_TOKEN"] == "sts-token-cli"

    run_emulator(["--security-token", "sts-token-cli"], check_printed=check)


def run_emulator(options: list[str], check_printed) -> None:
    """Start ``iotreg emulator``, check what it printed, make one call with it, Ctrl-C it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "emulator", "--port", "0", "--seed", "1", "--product-key", "a1CliProd01", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    guard = threading.Timer(20, process.kill)  # a hung emulator fails the test instead of the run
    guard.start()
    try:
        lines = []
        while not lines or lines[-1] != "Ctrl-C to stop.":
            line = process.stdout.readline()
            assert line, f"the emulator exited early: {process.stderr.read()}"
            lines.append(line.strip())
        env = dict(line.split("=", 1) for line in lines if "=" in line)
        assert check_printed(env)
        assert "a1CliProd01" in "\n".join(lines)
        token = env.get("ALIBABA_CLOUD_SECURITY_TOKEN")
        answer = signed_call(env, **({"SecurityToken": token} if token else {}))
        assert answer["Success"] is True and answer["Data"]["ApplyId"] >= 1295006

        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=10)
        assert process.returncode == 0
        assert "emulator stopped" in out
    finally:
        guard.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_bad_product_key_is_a_one_line_error() -> None:
    result = CliRunner().invoke(cli, ["emulator", "--port", "0", "--product-key", "not a key"])
    assert result.exit_code == 1
    assert "is not a ProductKey" in result.output
