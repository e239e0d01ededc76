"""The emulator driven by the official SDK (aliyun-python-sdk-core + aliyun-python-sdk-iot) over HTTP.

If the SDK's requests pass the emulator's signature check and its answers parse in the SDK, the
emulator speaks the platform's wire format; the SDK's own tell (``InvalidAccessKeySecret`` only
when the server's StringToSign equals the SDK's) checks the mismatch message to the character.
The SDK signs with the real time, so the fixture's ManualClock starts at the real now.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
from aliyunsdkcore.acs_exception.exceptions import ServerException
from aliyunsdkcore.client import AcsClient
from aliyunsdkcore.request import RpcRequest
from aliyunsdkiot.request.v20180120.BatchCheckDeviceNamesRequest import BatchCheckDeviceNamesRequest
from aliyunsdkiot.request.v20180120.BatchRegisterDeviceRequest import BatchRegisterDeviceRequest
from aliyunsdkiot.request.v20180120.BatchRegisterDeviceWithApplyIdRequest import (
    BatchRegisterDeviceWithApplyIdRequest,
)
from aliyunsdkiot.request.v20180120.QueryBatchRegisterDeviceStatusRequest import (
    QueryBatchRegisterDeviceStatusRequest,
)
from aliyunsdkiot.request.v20180120.QueryPageByApplyIdRequest import QueryPageByApplyIdRequest

from bot.standins.emulator import Emulator, FaultPlan


class Sdk:
    """An AcsClient pointed at the emulator: plain HTTP to 127.0.0.1 on the emulator's port."""

    def __init__(self, emulator: Emulator, *, key_id: str | None = None, secret: str | None = None) -> None:
        url = urlsplit(emulator.endpoint)
        self.host = url.hostname
        # auto_retry off: every answer reaches the test as the server gave it.
        self.client = AcsClient(
            key_id or emulator.access_key_id,
            secret or emulator.access_key_secret,
            "cn-shanghai",
            auto_retry=False,
            port=url.port,
        )

    def __call__(self, request: RpcRequest) -> dict:
        request.set_endpoint(self.host)
        request.set_protocol_type("http")
        return json.loads(self.client.do_action_with_exception(request))


def check_request(product_key: str, entries: list[dict[str, str]]) -> BatchCheckDeviceNamesRequest:
    request = BatchCheckDeviceNamesRequest()
    request.set_ProductKey(product_key)
    request.set_DeviceNameLists(entries)
    return request


def status_request(product_key: str, apply_id: int) -> QueryBatchRegisterDeviceStatusRequest:
    request = QueryBatchRegisterDeviceStatusRequest()
    request.set_ProductKey(product_key)
    request.set_ApplyId(apply_id)
    return request


def page_request(apply_id: int, page: int, size: int) -> QueryPageByApplyIdRequest:
    request = QueryPageByApplyIdRequest()
    request.set_ApplyId(apply_id)
    request.set_CurrentPage(page)
    request.set_PageSize(size)
    return request


def test_the_whole_flow_through_the_sdk(emulator: Emulator) -> None:
    sdk, pk = Sdk(emulator), emulator.product_key
    entries = [
        {"DeviceName": "lamp-0001", "DeviceNickname": "门厅灯"},
        {"DeviceName": "lamp.0002@hall:east", "DeviceNickname": "Hall_lamp_2"},
        {"DeviceName": "lamp_0003"},
    ]
    checked = sdk(check_request(pk, entries))
    assert checked["Success"] is True
    apply_id = checked["Data"]["ApplyId"]
    assert sdk(status_request(pk, apply_id))["Data"]["Status"] == "CHECK"

    emulator.clock.advance(2)
    assert sdk(status_request(pk, apply_id))["Data"]["Status"] == "CHECK_SUCCESS"
    register = BatchRegisterDeviceWithApplyIdRequest()
    register.set_ProductKey(pk)
    register.set_ApplyId(apply_id)
    registered = sdk(register)
    assert (registered["Success"], registered["Data"]) == (True, {"ApplyId": apply_id})
    assert sdk(status_request(pk, apply_id))["Data"]["Status"] == "CREATE"

    emulator.clock.advance(3)
    done = sdk(status_request(pk, apply_id))["Data"]
    assert done["Status"] == "CREATE_SUCCESS"
    assert done["InvalidList"] == {"Name": []}

    listed = []
    for page in (1, 2):
        answer = sdk(page_request(apply_id, page, 2))
        assert (answer["Total"], answer["PageCount"], answer["Page"]) == (3, 2, page)
        listed += answer["ApplyDeviceList"]["ApplyDeviceInfo"]
    secrets = {device.device_name: device.device_secret for device in emulator.backend.devices(pk)}
    assert {info["DeviceName"]: info["DeviceSecret"] for info in listed} == secrets
    assert set(secrets) == {"lamp-0001", "lamp.0002@hall:east", "lamp_0003"}
    assert emulator.backend.devices(pk)[0].nickname == "门厅灯"


def test_device_name_n_and_generated_names_through_the_sdk(emulator: Emulator) -> None:
    sdk, pk = Sdk(emulator), emulator.product_key
    plain = BatchCheckDeviceNamesRequest()
    plain.set_ProductKey(pk)
    plain.set_DeviceNames(["sensor-01", "sensor-02"])
    apply_id = sdk(plain)["Data"]["ApplyId"]
    assert emulator.backend.application(apply_id).names == ("sensor-01", "sensor-02")

    generate = BatchRegisterDeviceRequest()
    generate.set_ProductKey(pk)
    generate.set_Count(4)
    generated = sdk(generate)["Data"]["ApplyId"]
    emulator.clock.advance(3)
    assert sdk(status_request(pk, generated))["Data"]["Status"] == "CREATE_SUCCESS"
    assert sdk(page_request(generated, 1, 50))["Total"] == 4


def test_a_refused_check_through_the_sdk_carries_the_lists(emulator: Emulator) -> None:
    # Values with spaces travel as "+" in the SDK's form body and are signed as "%20".
    answer = Sdk(emulator)(
        check_request(
            emulator.product_key,
            [
                {"DeviceName": "ok-name-01", "DeviceNickname": "bad nick"},
                {"DeviceName": "twice-01"},
                {"DeviceName": "twice-01"},
            ],
        )
    )
    assert (answer["Success"], answer["Code"]) == (False, "iot.device.InvalidFormattedDeviceName")
    assert answer["Data"]["InvalidDeviceNicknameList"] == {"InvalidDeviceNickname": ["bad nick"]}
    assert answer["Data"]["RepeatedDeviceNameList"] == {"RepeatDevieNameList": ["twice-01"]}


def test_a_failed_check_through_the_sdk(emulator: Emulator) -> None:
    sdk, pk = Sdk(emulator), emulator.product_key
    emulator.backend.add_device(pk, "taken-001")
    apply_id = sdk(check_request(pk, [{"DeviceName": "taken-001"}, {"DeviceName": "fresh-001"}]))["Data"][
        "ApplyId"
    ]
    emulator.clock.advance(2)
    data = sdk(status_request(pk, apply_id))["Data"]
    assert data["Status"] == "CHECK_FAILED"
    assert (data["InvalidList"], data["ValidList"]) == ({"Name": ["taken-001"]}, {"Name": ["fresh-001"]})
    register = BatchRegisterDeviceWithApplyIdRequest()
    register.set_ProductKey(pk)
    register.set_ApplyId(apply_id)
    assert sdk(register)["Code"] == "iot.device.ApplyManyDevicesFailed"


def test_an_unknown_product_is_a_business_failure_the_sdk_returns(emulator: Emulator) -> None:
    # HTTP 200: the SDK raises nothing and hands back Success false with the code.
    answer = Sdk(emulator)(check_request("a1NoSuchPrd", [{"DeviceName": "abcd"}]))
    assert (answer["Success"], answer["Code"]) == (False, "iot.prod.NotExistedProduct")
    assert "ErrorMessage" in answer


def test_a_wrong_secret_is_recognised_by_the_sdk(emulator: Emulator) -> None:
    # The SDK turns SignatureDoesNotMatch into InvalidAccessKeySecret only when the text after the
    # message's colon equals its own StringToSign: the emulator canonicalises exactly as it does.
    with pytest.raises(ServerException) as caught:
        Sdk(emulator, secret="wrong-secret")(
            check_request(emulator.product_key, [{"DeviceName": "abcd", "DeviceNickname": "门厅灯"}])
        )
    assert (caught.value.get_http_status(), caught.value.get_error_code()) == (400, "InvalidAccessKeySecret")
    assert emulator.gateway.outcomes[("BatchCheckDeviceNames", "SignatureDoesNotMatch")] == 1


def test_an_unknown_key_id_through_the_sdk(emulator: Emulator) -> None:
    with pytest.raises(ServerException) as caught:
        Sdk(emulator, key_id="LTAI-not-known")(status_request(emulator.product_key, 1295006))
    assert (caught.value.get_http_status(), caught.value.get_error_code()) == (
        404,
        "InvalidAccessKeyId.NotFound",
    )


def test_throttling_and_faults_through_the_sdk(emulator: Emulator) -> None:
    sdk, pk = Sdk(emulator), emulator.product_key
    for number in range(10):
        assert sdk(check_request(pk, [{"DeviceName": f"burst-{number:03d}"}]))["Success"] is True
    with pytest.raises(ServerException) as caught:
        sdk(check_request(pk, [{"DeviceName": "burst-010"}]))
    assert (caught.value.get_http_status(), caught.value.get_error_code()) == (400, "Throttling.User")
    assert caught.value.get_error_msg() == "Request was denied due to user flow control."
    emulator.clock.advance(1)
    assert sdk(check_request(pk, [{"DeviceName": "burst-010"}]))["Success"] is True

    emulator.gateway.faults = FaultPlan(error_rate=1.0, seed=1)
    with pytest.raises(ServerException) as caught:
        sdk(status_request(pk, 1295006))
    assert caught.value.get_error_code() in {"InternalError", "ServiceUnavailable"}
    assert caught.value.get_http_status() in {500, 503}
