"""Credentials the way Alibaba Cloud users hold them: an AccessKey in the settings, temporary (STS)
credentials with their token, or the official default chain (credentials file and its profiles,
RAM roles) whose refreshed credentials are used from the next call on. Never logged.

No test here reaches a metadata service: explicit keys never build the chain, and the processes
that run the real chain have the ECS instance role turned off (ALIBABA_CLOUD_ECS_METADATA_DISABLED).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
from alibabacloud_credentials.client import Client as ChainClient
from alibabacloud_credentials.provider.refreshable import Credentials as ChainCredentials

from bot import wiring
from bot.aliyun import errors
from bot.aliyun.client import ApplyStatus, Credentials
from bot.config import ConfigError, Settings


class RoleProvider:
    """A RAM role's temporary credentials, as an ``ICredentialsProvider`` of the official library;
    ``rotate`` is the role's refresh handing out the next ones."""

    def __init__(self, key_id: str, secret: str, token: str) -> None:
        self.rotate(key_id, secret, token)

    def rotate(self, key_id: str, secret: str, token: str) -> None:
        self.now = ChainCredentials(access_key_id=key_id, access_key_secret=secret, security_token=token, provider_name="role")

    def get_credentials(self) -> ChainCredentials:
        return self.now

    async def get_credentials_async(self) -> ChainCredentials:
        return self.now

    def get_provider_name(self) -> str:
        return "role"


def never_built() -> wiring.DefaultChain:
    raise AssertionError("the default chain was built although the settings hold an AccessKey")


def test_an_access_key_in_the_settings_is_used_without_the_chain(emulator):
    settings = Settings.from_env({**emulator.env(), "ALIBABA_CLOUD_SECURITY_TOKEN": "sts-token"})
    provider = wiring.credentials(settings, chain=never_built)
    assert provider == Credentials(emulator.access_key_id, emulator.access_key_secret, "sts-token")
    assert "sts-token" not in repr(settings) and emulator.access_key_secret not in repr(settings)


def test_half_an_access_key_names_the_missing_variable():
    with pytest.raises(ConfigError, match="ALIBABA_CLOUD_ACCESS_KEY_SECRET"):
        wiring.credentials(Settings.from_env({"ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAI-only"}), chain=never_built)
    with pytest.raises(ConfigError, match="ALIBABA_CLOUD_SECURITY_TOKEN is set without ALIBABA_CLOUD_ACCESS_KEY_ID"):
        Settings.from_env({"ALIBABA_CLOUD_SECURITY_TOKEN": "sts-token"})


@pytest.mark.parametrize("signature", ["v1", "v3"])
def test_the_chains_refreshed_credentials_are_used_from_the_next_call(make_emulator, caplog, signature):
    emulator = make_emulator(access_key_id="STS.first", access_key_secret="first-secret", security_token="token-1")
    pk = emulator.product_key
    role = RoleProvider("STS.first", "first-secret", "token-1")
    settings = Settings.from_env({"IOT_ENDPOINT": emulator.endpoint, "IOT_SIGNATURE": signature})
    caplog.set_level(logging.DEBUG)
    client = wiring.iot_client(settings, clock=emulator.clock, chain=lambda: wiring.DefaultChain(lambda: ChainClient(provider=role)))
    apply_id = client.batch_check_device_names(pk, ["role-0001"]).apply_id

    # The role's refresh: new key, secret and token; the platform stops taking the old ones.
    role.rotate("STS.second", "second-secret", "token-2")
    emulator.gateway.credentials = {"STS.second": "second-secret"}
    emulator.gateway.security_tokens = {"STS.second": "token-2"}
    assert client.query_batch_register_device_status(pk, apply_id).status is ApplyStatus.CHECK
    assert emulator.gateway.outcomes[("QueryBatchRegisterDeviceStatus", "Success")] == 1
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert not any(secret in logged for secret in ("first-secret", "second-secret", "token-1", "token-2"))


def test_rotating_key_ids_share_one_rate_limiter(emulator):
    role = RoleProvider("STS.first", "secret", "token")
    settings = Settings.from_env({"IOT_ENDPOINT": emulator.endpoint})
    chain = lambda: wiring.DefaultChain(lambda: ChainClient(provider=role))  # noqa: E731
    first = wiring.iot_client(settings, chain=chain)
    role.rotate("STS.second", "secret", "token")
    assert wiring.iot_client(settings, chain=chain).limiter is first.limiter


def test_a_chain_that_finds_nothing_stops_at_start_with_one_line():
    class Failing:
        def get_credential(self):
            raise RuntimeError("unable to load credentials from any of the providers in the chain")

    with pytest.raises(ConfigError) as caught:
        wiring.credentials(Settings.from_env({}), chain=lambda: wiring.DefaultChain(Failing))
    message = str(caught.value)
    assert message.startswith("no Alibaba Cloud credentials: set ALIBABA_CLOUD_ACCESS_KEY_ID") and "\n" not in message
    assert "providers in the chain" in message


def test_a_chain_that_fails_later_is_an_auth_error():
    class FailsOnce:
        def get_credential(self):
            raise RuntimeError("metadata service unreachable")

    with pytest.raises(errors.AuthError, match="metadata service unreachable"):
        wiring.DefaultChain(FailsOnce).current()


def iotreg(args: list[str], env: dict[str, str], home) -> subprocess.CompletedProcess:
    """``iotreg`` in a process of its own, as a user runs it: the real default chain, with no
    AccessKey in the environment, the ECS instance role and the aliyun CLI's profiles off."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ALIBABA_CLOUD_", "IOT_", "IOTREG_"))}
    clean.update(HOME=str(home), ALIBABA_CLOUD_ECS_METADATA_DISABLED="true", ALIBABA_CLOUD_CLI_PROFILE_DISABLED="true", **env)
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], env=clean, cwd=home, capture_output=True, text=True, timeout=60
    )


def test_the_credentials_file_and_its_profile_through_the_real_chain(make_emulator, tmp_path):
    from bot.clock import SystemClock

    emulator = make_emulator(clock=SystemClock(), access_key_id="LTAI-from-file", access_key_secret="file-secret")
    apply_id = emulator.backend.batch_check_device_names(emulator.product_key, [("file-0001", None)])["ApplyId"]
    credentials_file = tmp_path / "credentials"
    credentials_file.write_text(
        "[default]\ntype = access_key\naccess_key_id = LTAI-wrong\naccess_key_secret = wrong\n\n"
        "[iotreg]\ntype = access_key\naccess_key_id = LTAI-from-file\naccess_key_secret = file-secret\n"
    )
    env = {"IOT_ENDPOINT": emulator.endpoint, "ALIBABA_CLOUD_CREDENTIALS_FILE": str(credentials_file), "ALIBABA_CLOUD_PROFILE": "iotreg"}
    result = iotreg(["status", str(apply_id), "-p", emulator.product_key], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"ApplyId {apply_id} on IoT Platform: CHECK" in result.stdout
    assert "file-secret" not in result.stdout + result.stderr


def test_no_credentials_anywhere_is_one_clear_line(tmp_path):
    started = time.monotonic()
    result = iotreg(["status", "1", "-p", "a1TestProd1"], {"IOT_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Error: no Alibaba Cloud credentials: set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET" in result.stderr
    assert time.monotonic() - started < 30
