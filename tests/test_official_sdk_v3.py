"""The emulator driven by the current official SDK (alibabacloud-iot20180120 on
alibabacloud-tea-openapi) over HTTP, with its default signature V3 (ACS3-HMAC-SHA256).

The SDK puts the action, version, date, nonce and payload hash in ``x-acs-*`` headers and the
signature in ``Authorization``; the emulator must verify all of it as the platform does. Its
``signature_algorithm='v2'`` (signature version 1.0 with ``Format=json`` and no RegionId) is driven
too. The SDK signs with the real time, so the fixture's ManualClock starts at the real now.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from alibabacloud_iot20180120 import models
from alibabacloud_iot20180120.client import Client
from alibabacloud_tea_openapi import models as open_api_models
from alibabacloud_tea_util import models as util_models
from Tea.exceptions import TeaException

from bot.standins.emulator import Emulator


def sdk(emulator: Emulator, *, key_id: str | None = None, secret: str | None = None, token: str | None = None, v2: bool = False) -> Client:
    """The current SDK's client pointed at the emulator (plain HTTP, no retries)."""
    config = open_api_models.Config(
        access_key_id=key_id or emulator.access_key_id,
        access_key_secret=secret or emulator.access_key_secret,
        security_token=token,
        endpoint=urlsplit(emulator.endpoint).netloc,
        protocol="http",
        region_id="cn-shanghai",
    )
    if v2:
        config.signature_algorithm = "v2"
    return Client(config)


def check(client: Client, product_key: str, entries: list[tuple[str, str | None]]) -> models.BatchCheckDeviceNamesResponseBody:
    listed = [
        models.BatchCheckDeviceNamesRequestDeviceNameList(device_name=name, device_nickname=nickname)
        for name, nickname in entries
    ]
    request = models.BatchCheckDeviceNamesRequest(product_key=product_key, device_name_list=listed)
    return client.batch_check_device_names_with_options(request, util_models.RuntimeOptions()).body


def status(client: Client, product_key: str, apply_id: int) -> models.QueryBatchRegisterDeviceStatusResponseBody:
    request = models.QueryBatchRegisterDeviceStatusRequest(product_key=product_key, apply_id=apply_id)
    return client.query_batch_register_device_status(request).body


def refusal(call) -> TeaException:
    with pytest.raises(TeaException) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("v2", [False, True], ids=["v3-signature", "v2-signature"])
def test_the_whole_flow_through_the_current_sdk(emulator: Emulator, v2: bool) -> None:
    client, pk = sdk(emulator, v2=v2), emulator.product_key
    checked = check(client, pk, [("lamp-0001", "门厅灯"), ("lamp.0002@hall:east", "Hall_lamp_2"), ("lamp_0003", None)])
    assert checked.success is True
    apply_id = checked.data.apply_id
    assert status(client, pk, apply_id).data.status == "CHECK"

    emulator.clock.advance(2)
    assert status(client, pk, apply_id).data.status == "CHECK_SUCCESS"
    registered = client.batch_register_device_with_apply_id(
        models.BatchRegisterDeviceWithApplyIdRequest(product_key=pk, apply_id=apply_id)
    ).body
    assert (registered.success, registered.data.apply_id) == (True, apply_id)
    assert status(client, pk, apply_id).data.status == "CREATE"

    emulator.clock.advance(3)
    done = status(client, pk, apply_id).data
    assert (done.status, done.invalid_list.name) == ("CREATE_SUCCESS", [])

    listed = []
    for page in (1, 2):
        answer = client.query_page_by_apply_id(
            models.QueryPageByApplyIdRequest(apply_id=apply_id, current_page=page, page_size=2)
        ).body
        assert (answer.total, answer.page_count, answer.page) == (3, 2, page)
        listed += answer.apply_device_list.apply_device_info
    secrets = {device.device_name: device.device_secret for device in emulator.backend.devices(pk)}
    assert {info.device_name: info.device_secret for info in listed} == secrets
    assert set(secrets) == {"lamp-0001", "lamp.0002@hall:east", "lamp_0003"}
    assert emulator.backend.devices(pk)[0].nickname == "门厅灯"
    assert emulator.gateway.outcomes[("BatchCheckDeviceNames", "Success")] == 1


def test_an_auto_named_batch_through_the_current_sdk(emulator: Emulator) -> None:
    client, pk = sdk(emulator), emulator.product_key
    generated = client.batch_register_device(models.BatchRegisterDeviceRequest(product_key=pk, count=4)).body
    emulator.clock.advance(3)
    assert status(client, pk, generated.data.apply_id).data.status == "CREATE_SUCCESS"
    page = client.query_page_by_apply_id(models.QueryPageByApplyIdRequest(apply_id=generated.data.apply_id, page_size=50)).body
    assert page.total == 4 and len(page.apply_device_list.apply_device_info) == 4


def test_refusals_reach_the_current_sdk_with_the_platforms_codes(emulator: Emulator) -> None:
    client, pk = sdk(emulator), emulator.product_key
    refused = check(client, pk, [("ok-name-01", "bad nick"), ("twice-01", None), ("twice-01", None)])
    assert (refused.success, refused.code) == (False, "iot.device.InvalidFormattedDeviceName")
    assert refused.data.repeated_device_name_list.repeat_devie_name_list == ["twice-01"]
    assert status(client, "a1NoSuchPrd", 1).code == "iot.prod.NotExistedProduct"

    wrong_secret = refusal(lambda: status(sdk(emulator, secret="wrong-secret"), pk, 1))
    assert (wrong_secret.code, wrong_secret.data["statusCode"]) == ("SignatureDoesNotMatch", 400)
    assert "server string to sign is:ACS3-HMAC-SHA256\n" in wrong_secret.message
    unknown = refusal(lambda: status(sdk(emulator, key_id="LTAI-not-known"), pk, 1))
    assert (unknown.code, unknown.data["statusCode"]) == ("InvalidAccessKeyId.NotFound", 404)


def test_throttling_reaches_the_current_sdk(emulator: Emulator) -> None:
    client, pk = sdk(emulator), emulator.product_key
    for number in range(10):
        assert check(client, pk, [(f"burst-{number:03d}", None)]).success is True
    throttled = refusal(lambda: check(client, pk, [("burst-010", None)]))
    assert (throttled.code, throttled.data["statusCode"]) == ("Throttling.User", 400)
    emulator.clock.advance(1)
    assert check(client, pk, [("burst-010", None)]).success is True


def test_temporary_credentials_through_the_current_sdk(make_emulator) -> None:
    emulator = make_emulator(access_key_id="STS.test-key-id", security_token="sts-token-1")
    pk = emulator.product_key
    assert check(sdk(emulator, token="sts-token-1"), pk, [("sts-0001", None)]).success is True
    assert check(sdk(emulator, token="sts-token-1", v2=True), pk, [("sts-0002", None)]).success is True
    missing = refusal(lambda: status(sdk(emulator), pk, 1))
    assert (missing.code, missing.data["statusCode"]) == ("InvalidSecurityToken.Malformed", 400)
    wrong = refusal(lambda: status(sdk(emulator, token="sts-token-2"), pk, 1))
    assert wrong.code == "InvalidSecurityToken.MismatchWithAccessKey"


def test_a_ten_thousand_name_check_through_the_current_sdk(emulator: Emulator) -> None:
    client, pk = sdk(emulator), emulator.product_key
    names = [(f"sensor-{number:05d}", f"传感器_{number:05d}") for number in range(10_000)]
    apply_id = check(client, pk, names).data.apply_id
    assert len(emulator.backend.application(apply_id).names) == 10_000
    emulator.clock.advance(1)
    over = check(client, pk, [*names, ("sensor-10000", None)])
    assert (over.success, over.code) == (False, "iot.device.DeviceCountExceeded")
