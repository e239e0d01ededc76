"""Our client against the emulator over HTTP: the flow, the errors, and the quotas; with both
signatures (version 1.0 and V3), long-lived and temporary credentials."""

from __future__ import annotations

import threading

import pytest

from bot import wiring
from bot.aliyun import errors
from bot.aliyun.client import ApplyStatus, Credentials, IotClient, RetryPolicy
from bot.aliyun.ratelimit import RateLimiter
from bot.clock import SystemClock
from bot.config import DEFAULT_QPS, Settings


@pytest.fixture(params=["v1", "v3"])
def signature(request) -> str:
    return request.param


def client_for(emulator, *, secret=None, limiter=None, **kwargs) -> IotClient:
    clock = emulator.clock
    return IotClient(
        emulator.endpoint,
        Credentials(emulator.access_key_id, secret or emulator.access_key_secret),
        clock=clock,
        limiter=limiter if limiter is not None else RateLimiter(DEFAULT_QPS, clock),
        **kwargs,
    )


def test_check_register_and_page_through_the_created_devices(emulator, signature):
    client = client_for(emulator, signature=signature)
    pk = emulator.product_key
    names = [(f"sensor-{i:03d}", f"传感器_{i:03d}" if i % 2 else None) for i in range(120)]
    submitted = client.batch_check_device_names(pk, names)
    assert client.query_batch_register_device_status(pk, submitted.apply_id).status is ApplyStatus.CHECK
    emulator.clock.advance(2)
    assert client.query_batch_register_device_status(pk, submitted.apply_id).status is ApplyStatus.CHECK_SUCCESS
    assert client.batch_register_device_with_apply_id(pk, submitted.apply_id) == submitted.apply_id
    emulator.clock.advance(3)
    done = client.query_batch_register_device_status(pk, submitted.apply_id)
    assert done.status is ApplyStatus.CREATE_SUCCESS and done.valid == () and done.invalid == ()
    first = client.query_page_by_apply_id(submitted.apply_id, 1, 50)
    assert (first.total, first.page_count, len(first.devices)) == (120, 3, 50)
    devices = list(client.iter_devices_by_apply_id(submitted.apply_id))
    assert [d.name for d in devices] == [n for n, _ in names]
    assert all(len(d.device_secret) == 32 and d.iot_id for d in devices)
    nicknames = {d.device_name: d.nickname for d in emulator.backend.devices(pk)}
    assert nicknames["sensor-001"] == "传感器_001" and nicknames["sensor-000"] is None


def test_names_that_exist_fail_the_check_with_reasons(emulator, signature):
    emulator.backend.add_device(emulator.product_key, "taken-0001")
    client = client_for(emulator, signature=signature)
    apply_id = client.batch_check_device_names(emulator.product_key, ["taken-0001", "free-0001"]).apply_id
    emulator.clock.advance(2)
    status = client.query_batch_register_device_status(emulator.product_key, apply_id)
    assert status.status is ApplyStatus.CHECK_FAILED
    assert (status.invalid, status.valid) == (("taken-0001",), ("free-0001",))
    assert status.details[0].name == "taken-0001" and status.details[0].reason
    with pytest.raises(errors.BusinessError) as info:
        client.batch_register_device_with_apply_id(emulator.product_key, apply_id)
    assert info.value.code == "iot.device.ApplyManyDevicesFailed"


def test_malformed_and_repeated_names_are_refused_at_once_with_each_name(emulator):
    client = client_for(emulator)
    with pytest.raises(errors.NamesRefused) as info:
        client.batch_check_device_names(emulator.product_key, ["ok-name-1", "no", "dup-0001", "dup-0001"])
    refused = {d.name for d in info.value.invalid}
    assert refused == {"no", "dup-0001"} and all(d.reason for d in info.value.invalid)


def test_auto_named_registration(emulator, signature):
    client = client_for(emulator, signature=signature)
    apply_id = client.batch_register_device(emulator.product_key, 7)
    emulator.clock.advance(3)
    assert client.query_batch_register_device_status(emulator.product_key, apply_id).status is ApplyStatus.CREATE_SUCCESS
    assert len(list(client.iter_devices_by_apply_id(apply_id, page_size=3))) == 7


@pytest.mark.parametrize(
    ("call", "kind", "code"),
    [
        (lambda c, pk: c.batch_check_device_names("a1Missing01", ["abcd-1"]), errors.NotFoundError, "iot.prod.NotExistedProduct"),
        (lambda c, pk: c.query_batch_register_device_status(pk, 999), errors.NotFoundError, "iot.device.DeviceApplyIsNotFound"),
        (lambda c, pk: c.batch_register_device_with_apply_id(pk, 999), errors.NotFoundError, "iot.device.DeviceApplyIsNotFound"),
    ],
    ids=["unknown-product", "unknown-apply-id-status", "unknown-apply-id-register"],
)
def test_business_errors_arrive_typed(emulator, call, kind, code, signature):
    with pytest.raises(kind) as info:
        call(client_for(emulator, signature=signature), emulator.product_key)
    assert info.value.code == code and info.value.request_id


@pytest.mark.parametrize(("signature", "string_to_sign"), [("v1", "POST&%2F&"), ("v3", "ACS3-HMAC-SHA256\n")])
def test_a_wrong_secret_fails_at_once_naming_the_setting_and_keeps_the_string_to_sign_for_debug(emulator, caplog, signature, string_to_sign):
    with caplog.at_level("DEBUG", logger="bot.aliyun.client"):
        with pytest.raises(errors.AuthError) as info:
            client_for(emulator, secret="not-the-secret", signature=signature).query_page_by_apply_id(1)
    assert info.value.code == "SignatureDoesNotMatch" and info.value.http_status == 400
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in info.value.message and "string to sign" not in info.value.message
    assert emulator.gateway.calls["QueryPageByApplyId"] == 1  # not retried
    quoted = [r for r in caplog.records if "string to sign" in r.getMessage()]
    assert quoted and all(r.levelname == "DEBUG" and string_to_sign in r.getMessage() for r in quoted)
    assert not any("not-the-secret" in r.getMessage() for r in caplog.records)
    assert "not-the-secret" not in str(info.value)


def test_temporary_credentials_carry_their_token(make_emulator, signature):
    emulator = make_emulator(access_key_id="STS.test-key-id", security_token="sts-token-1")
    pk = emulator.product_key
    credentials = Credentials(emulator.access_key_id, emulator.access_key_secret, "sts-token-1")
    client = IotClient(emulator.endpoint, credentials, signature=signature, clock=emulator.clock)
    assert client.batch_check_device_names(pk, ["sts-00001"]).apply_id
    assert "sts-token-1" not in repr(credentials) and emulator.access_key_secret not in repr(credentials)
    for token, code in [(None, "InvalidSecurityToken.Malformed"), ("sts-token-2", "InvalidSecurityToken.MismatchWithAccessKey")]:
        wrong = IotClient(emulator.endpoint, Credentials(emulator.access_key_id, emulator.access_key_secret, token), signature=signature, clock=emulator.clock)
        with pytest.raises(errors.AuthError) as info:
            wrong.batch_check_device_names(pk, ["sts-00002"])
        assert info.value.code == code and "sts-token" not in str(info.value)


def test_refreshed_credentials_are_used_from_the_next_call(make_emulator, signature):
    emulator = make_emulator(access_key_id="STS.first", security_token="token-1")
    pk = emulator.product_key

    class Rotating:
        """Temporary credentials that a RAM role's refresh replaces between two calls."""

        def __init__(self) -> None:
            self.now = Credentials("STS.first", emulator.access_key_secret, "token-1")

        def current(self) -> Credentials:
            return self.now

    provider = Rotating()
    client = IotClient(emulator.endpoint, provider, signature=signature, clock=emulator.clock)
    apply_id = client.batch_check_device_names(pk, ["rotate-0001"]).apply_id
    # The role's next credentials: a new key, secret and token; the old key stops working.
    emulator.gateway.credentials = {"STS.second": "second-secret"}
    emulator.gateway.security_tokens = {"STS.second": "token-2"}
    provider.now = Credentials("STS.second", "second-secret", "token-2")
    assert client.query_batch_register_device_status(pk, apply_id).status is ApplyStatus.CHECK
    assert emulator.gateway.outcomes[("QueryBatchRegisterDeviceStatus", "Success")] == 1


def test_a_clock_off_by_more_than_15_minutes_is_refused(emulator, signature):
    class LateClock(SystemClock):
        def now(self):
            from datetime import timedelta

            return emulator.clock.now() - timedelta(minutes=16)

    client = client_for(emulator, signature=signature)
    client.clock = LateClock()
    with pytest.raises(errors.AuthError, match="InvalidTimeStamp.Expired"):
        client.query_page_by_apply_id(1)


def test_without_the_limiter_the_quota_is_hit(emulator):
    pk = emulator.product_key
    apply_id = client_for(emulator).batch_check_device_names(pk, ["quota-0001"]).apply_id
    unlimited = client_for(emulator, limiter=RateLimiter({}), retry=RetryPolicy(max_attempts=1))
    with pytest.raises(errors.ThrottledError, match="Throttling.User"):
        for _ in range(31):
            unlimited.query_batch_register_device_status(pk, apply_id)


def test_threads_sharing_the_limiter_never_hit_the_quota_on_the_real_clock(make_emulator):
    # Real time on both sides: concurrent sleeps overlap here, as they do in production.
    emulator = make_emulator(clock=SystemClock())
    pk = emulator.product_key
    # A wide margin: on a busy machine a request can reach the server tens of milliseconds after
    # its slot, which is what the margin is for; the test is about threads sharing one quota.
    limited = client_for(emulator, retry=RetryPolicy(max_attempts=1), limiter=RateLimiter(DEFAULT_QPS, SystemClock(), margin=0.5))
    apply_id = limited.batch_check_device_names(pk, ["quota-0001"]).apply_id
    failures: list[Exception] = []

    def poll() -> None:
        try:
            for _ in range(15):
                limited.query_batch_register_device_status(pk, apply_id)
        except errors.IotError as exc:
            failures.append(exc)

    workers = [threading.Thread(target=poll) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []
    assert emulator.gateway.outcomes[("QueryBatchRegisterDeviceStatus", "Success")] == 45


def test_settings_build_a_working_client(emulator):
    settings = Settings.from_env(emulator.env())
    client = wiring.iot_client(settings, clock=emulator.clock)
    assert client.endpoint == emulator.endpoint
    apply_id = client.batch_check_device_names(emulator.product_key, ["from-settings-1"]).apply_id
    assert client.query_batch_register_device_status(emulator.product_key, apply_id).status is ApplyStatus.CHECK


def test_the_product_list_comes_page_by_page_with_every_product(make_emulator):
    keys = tuple(f"a1Prod{i:05d}" for i in range(5))
    emulator = make_emulator(product_keys=keys)
    client = client_for(emulator)
    first = client.query_product_list(1, 2)
    assert (first.page, first.page_size, first.page_count, first.total) == (1, 2, 3, 5)
    assert [p.product_key for p in first.products] == list(keys[:2])
    assert [p.product_key for p in client.iter_products(page_size=2)] == list(keys)
    with pytest.raises(ValueError):
        client.query_product_list(1, 201)
