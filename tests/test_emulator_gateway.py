"""The emulator's gateway: signatures, credentials, clock, nonces, parameters, quotas, faults, envelopes.

Most tests call :meth:`Gateway.handle` directly on a ManualClock; the last few go over HTTP.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from urllib.parse import urlencode

import pytest
import requests

from bot.aliyun.signing import (
    percent_encode,
    sha256_hex,
    signature_for,
    string_to_sign,
    v3_authorization,
    v3_canonical_request,
    v3_sign,
    v3_string_to_sign,
)
from bot.clock import ManualClock
from bot.standins.emulator import Emulator
from bot.standins.emulator.backend import FIRST_APPLY_ID, MSG_INVALID_NAME, IotBackend
from bot.standins.emulator.gateway import SIGNATURE_MISMATCH_PREFIX, FaultPlan, Gateway, device_name_entries

KEY_ID = "test-key-id"
SECRET = "test-key-secret"
PK = "a1TestProd1"
GATEWAY_ERROR_KEYS = {"RequestId", "HostId", "Code", "Message", "Recommend"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def gateway(clock: ManualClock) -> Gateway:
    backend = IotBackend(clock, check_seconds=2, create_seconds=3, seed=3)
    backend.add_product(PK)
    return Gateway(backend, clock, {KEY_ID: SECRET})


def common(clock: ManualClock, action: str, **extra: str) -> dict[str, str]:
    """The common parameters of a call made now, as the official SDK sends them (unsigned)."""
    return {
        "Action": action,
        "Version": "2018-01-20",
        "Format": "JSON",
        "AccessKeyId": KEY_ID,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureType": "",
        "SignatureNonce": str(uuid.uuid4()),
        "Timestamp": clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "RegionId": "cn-shanghai",
        **extra,
    }


def call(
    gateway: Gateway,
    clock: ManualClock,
    action: str,
    form: dict[str, str] | None = None,
    *,
    method: str = "POST",
    secret: str = SECRET,
    **query: str,
) -> tuple[int, dict]:
    """Sign ``query`` + ``form`` as a client would and hand them to the gateway."""
    params = common(clock, action, **query)
    form = form or {}
    params["Signature"] = signature_for(method, {**params, **form}, secret)
    return gateway.handle(method, list(params.items()), list(form.items()))


# ----------------------------------------------------------------------------------- signature


def test_a_signed_get_with_everything_in_the_query_is_answered(gateway: Gateway, clock: ManualClock) -> None:
    status, body = call(
        gateway, clock, "BatchCheckDeviceNames", method="GET", ProductKey=PK, **{"DeviceName.1": "abcd"}
    )
    assert status == 200
    assert body == {"RequestId": body["RequestId"], "Success": True, "Data": {"ApplyId": FIRST_APPLY_ID}}


def test_a_signed_post_with_names_in_the_form_body_is_answered(gateway: Gateway, clock: ManualClock) -> None:
    form = {"DeviceNameList.1.DeviceName": "lamp-0001", "DeviceNameList.1.DeviceNickname": "门厅灯"}
    status, body = call(gateway, clock, "BatchCheckDeviceNames", form, ProductKey=PK)
    assert (status, body["Success"]) == (200, True)
    assert gateway.backend.application(body["Data"]["ApplyId"]).nicknames == {"lamp-0001": "门厅灯"}


def test_the_method_is_signed(gateway: Gateway, clock: ManualClock) -> None:
    params = common(clock, "BatchRegisterDevice", ProductKey=PK, Count="1")
    params["Signature"] = signature_for("GET", params, SECRET)
    status, body = gateway.handle("POST", list(params.items()))
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


def test_empty_values_are_signed(gateway: Gateway, clock: ManualClock) -> None:
    params = common(clock, "BatchRegisterDevice", ProductKey=PK, Count="1")
    assert params["SignatureType"] == ""
    params["Signature"] = signature_for("POST", params, SECRET)
    sent_without_the_empty_one = [(k, v) for k, v in params.items() if k != "SignatureType"]
    assert gateway.handle("POST", sent_without_the_empty_one)[1]["Code"] == "SignatureDoesNotMatch"
    assert gateway.handle("POST", list(params.items()))[1]["Success"] is True


def test_the_mismatch_message_carries_the_servers_string_to_sign(
    gateway: Gateway, clock: ManualClock
) -> None:
    params = common(clock, "BatchRegisterDevice", ProductKey=PK, Count="1")
    params["Signature"] = signature_for("POST", params, "not-the-secret")
    status, body = gateway.handle("POST", list(params.items()))
    unsigned = {k: v for k, v in params.items() if k != "Signature"}
    assert status == 400
    assert set(body) == GATEWAY_ERROR_KEYS
    assert body["Code"] == "SignatureDoesNotMatch"
    assert body["Message"] == (
        "Specified signature is not matched with our calculation. server string to sign is:"
        + string_to_sign("POST", unsigned)
    )
    assert body["Message"].split(":")[1].startswith("POST&%2F&AccessKeyId%3D")  # how the SDK reads it


def test_form_bodies_decode_plus_as_a_space_and_special_characters(
    gateway: Gateway, clock: ManualClock
) -> None:
    # What the SDK sends: names in an urlencoded body (quote_plus: space is "+", "*" is "%2A",
    # "~" stays), everything else in the query with RFC 3986 encoding; signed over decoded values.
    form = {
        "DeviceNameList.1.DeviceName": "dev*01~x",
        "DeviceNameList.1.DeviceNickname": "bad nick",
        "DeviceNameList.2.DeviceName": "lamp-0002",
        "DeviceNameList.2.DeviceNickname": "智能灯一号",
        "DeviceNameList.3.DeviceName": "plus+sign",
    }
    params = common(clock, "BatchCheckDeviceNames", ProductKey=PK)
    params["Signature"] = signature_for("POST", {**params, **form}, SECRET)
    query = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in params.items())
    body = urlencode(form).encode()
    assert b"bad+nick" in body and b"plus%2Bsign" in body
    status, answer = gateway.handle_raw(
        "POST", query, body, "application/x-www-form-urlencoded; charset=UTF-8"
    )
    assert status == 200, answer
    # The signature held, and the names arrived intact: the check refuses exactly the bad ones.
    assert answer["Code"] == "iot.device.InvalidFormattedDeviceName"
    assert answer["Data"]["InvalidDeviceNameList"] == {"InvalidDeviceName": ["dev*01~x", "plus+sign"]}
    assert answer["Data"]["InvalidDeviceNicknameList"] == {"InvalidDeviceNickname": ["bad nick"]}
    assert answer["Data"]["InvalidDetailList"]["InvalidDetailList"][1] == {
        "DeviceName": "plus+sign",
        "ErrorMsg": MSG_INVALID_NAME,
    }


def test_a_body_that_is_not_a_form_is_not_read(gateway: Gateway, clock: ManualClock) -> None:
    params = common(clock, "BatchCheckDeviceNames", ProductKey=PK)
    params["Signature"] = signature_for("POST", params, SECRET)
    query = urlencode(params)
    status, body = gateway.handle_raw("POST", query, b"DeviceName.1=abcd", "application/json")
    assert (status, body["Code"]) == (200, "iot.device.NoneDeviceNameElement")


# ------------------------------------------------------------------------ key, clock and nonce


def test_an_unknown_access_key_id(gateway: Gateway, clock: ManualClock) -> None:
    params = common(clock, "BatchRegisterDevice", ProductKey=PK, Count="1", AccessKeyId="LTAI-unknown")
    params["Signature"] = signature_for("POST", params, SECRET)
    status, body = gateway.handle("POST", list(params.items()))
    assert (status, body["Code"]) == (404, "InvalidAccessKeyId.NotFound")
    assert set(body) == GATEWAY_ERROR_KEYS


@pytest.mark.parametrize(
    "stamp", ["2026-01-05 09:00:00", "2026-01-05T09:00:00", "2026-13-05T09:00:00Z", "", "yesterday"]
)
def test_a_malformed_timestamp(gateway: Gateway, clock: ManualClock, stamp: str) -> None:
    status, body = call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1", Timestamp=stamp)
    assert (status, body["Code"]) == (400, "InvalidTimeStamp.Format")


@pytest.mark.parametrize(("offset_minutes", "accepted"), [(-16, False), (16, False), (-14, True), (14, True)])
def test_the_timestamp_window_is_fifteen_minutes(
    gateway: Gateway, clock: ManualClock, offset_minutes: int, accepted: bool
) -> None:
    stamp = (clock.now() + timedelta(minutes=offset_minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, body = call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1", Timestamp=stamp)
    if accepted:
        assert (status, body["Success"]) == (200, True)
    else:
        assert (status, body["Code"]) == (400, "InvalidTimeStamp.Expired")


def test_a_nonce_is_good_once(gateway: Gateway, clock: ManualClock) -> None:
    assert (
        call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1", SignatureNonce="n-1")[0] == 200
    )
    clock.advance(60)
    status, body = call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1", SignatureNonce="n-1")
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")
    assert len(gateway.backend.applications()) == 1  # the replay did nothing


def test_a_request_refused_for_its_signature_does_not_use_up_its_nonce(
    gateway: Gateway, clock: ManualClock
) -> None:
    bad = call(
        gateway, clock, "BatchRegisterDevice", secret="wrong", ProductKey=PK, Count="1", SignatureNonce="n-2"
    )
    assert bad[1]["Code"] == "SignatureDoesNotMatch"
    assert (
        call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1", SignatureNonce="n-2")[0] == 200
    )


# ---------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "name",
    [
        "Action",
        "Version",
        "Format",
        "AccessKeyId",
        "SignatureMethod",
        "SignatureVersion",
        "SignatureNonce",
        "Timestamp",
        "Signature",
    ],
)
def test_a_missing_common_parameter(gateway: Gateway, clock: ManualClock, name: str) -> None:
    params = common(clock, "BatchRegisterDevice", ProductKey=PK, Count="1")
    params["Signature"] = signature_for("POST", params, SECRET)
    del params[name]
    status, body = gateway.handle("POST", list(params.items()))
    assert (status, body["Code"]) == (400, "MissingParameter")
    assert f'"{name}"' in body["Message"]


@pytest.mark.parametrize(
    ("action", "present", "missing"),
    [
        ("BatchCheckDeviceNames", {"DeviceName.1": "abcd"}, "ProductKey"),
        ("BatchRegisterDevice", {"ProductKey": PK}, "Count"),
        ("BatchRegisterDeviceWithApplyId", {"ProductKey": PK}, "ApplyId"),
        ("QueryBatchRegisterDeviceStatus", {"ApplyId": "1295006"}, "ProductKey"),
        ("QueryPageByApplyId", {"PageSize": "10"}, "ApplyId"),
    ],
)
def test_a_missing_action_parameter(
    gateway: Gateway, clock: ManualClock, action: str, present: dict[str, str], missing: str
) -> None:
    status, body = call(gateway, clock, action, **present)
    assert (status, body["Code"]) == (400, "MissingParameter")
    assert f'"{missing}"' in body["Message"]


def test_region_id_is_optional_and_format_is_any_case(gateway: Gateway, clock: ManualClock) -> None:
    params = common(clock, "BatchRegisterDevice", ProductKey=PK, Count="1", Format="json")
    del params["RegionId"], params["SignatureType"]
    params["Signature"] = signature_for("POST", params, SECRET)
    assert gateway.handle("POST", list(params.items()))[1]["Success"] is True


def test_xml_is_not_spoken(gateway: Gateway, clock: ManualClock) -> None:
    status, body = call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1", Format="XML")
    assert (status, body["Code"]) == (400, "MissingParameter")
    assert gateway.backend.applications() == []


@pytest.mark.parametrize(
    ("action", "version"), [("DeleteEverything", "2018-01-20"), ("BatchRegisterDevice", "2017-04-20")]
)
def test_an_unknown_api(gateway: Gateway, clock: ManualClock, action: str, version: str) -> None:
    status, body = call(gateway, clock, action, Version=version, ProductKey=PK, Count="1")
    assert (status, body["Code"]) == (404, "InvalidApi.NotFound")
    assert gateway.backend.applications() == []


def test_device_name_list_wins_and_n_is_numeric() -> None:
    params = {
        "DeviceName.1": "plain-001",
        "DeviceNameList.10.DeviceName": "tenth-001",
        "DeviceNameList.9.DeviceName": "ninth-001",
        "DeviceNameList.9.DeviceNickname": "第九",
    }
    assert device_name_entries(params) == [("ninth-001", "第九"), ("tenth-001", None)]
    assert device_name_entries({"DeviceName.2": "b-0002", "DeviceName.1": "a-0001"}) == [
        ("a-0001", None),
        ("b-0002", None),
    ]


# ----------------------------------------------------------------------------------- envelopes


def test_a_business_failure_is_http_200_with_error_message(gateway: Gateway, clock: ManualClock) -> None:
    status, body = call(
        gateway, clock, "QueryBatchRegisterDeviceStatus", ProductKey="a1NoSuchPrd", ApplyId="1295006"
    )
    assert status == 200
    assert set(body) == {"RequestId", "Success", "Code", "ErrorMessage"}
    assert (body["Success"], body["Code"]) == (False, "iot.prod.NotExistedProduct")


def test_query_page_by_apply_id_answers_at_the_top_level(gateway: Gateway, clock: ManualClock) -> None:
    apply_id = call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="3")[1]["Data"]["ApplyId"]
    clock.advance(3)
    status, body = call(
        gateway, clock, "QueryPageByApplyId", ApplyId=str(apply_id), PageSize="2", CurrentPage="2"
    )
    assert status == 200
    assert "Data" not in body
    assert {k: body[k] for k in ("Success", "Page", "PageSize", "PageCount", "Total")} == {
        "Success": True,
        "Page": 2,
        "PageSize": 2,
        "PageCount": 2,
        "Total": 3,
    }
    assert len(body["ApplyDeviceList"]["ApplyDeviceInfo"]) == 1


# -------------------------------------------------------------------------------------- quotas


def test_quotas_refuse_the_call_over_the_limit_until_the_window_slides(
    gateway: Gateway, clock: ManualClock
) -> None:
    def register() -> tuple[int, dict]:
        return call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1")

    for _ in range(5):
        assert register()[0] == 200
    clock.advance(0.5)
    for _ in range(5):
        assert register()[0] == 200
    status, body = register()  # the 11th within one second; the quota is 10
    assert (status, body["Code"], body["Message"]) == (
        400,
        "Throttling.User",
        "Request was denied due to user flow control.",
    )
    assert set(body) == GATEWAY_ERROR_KEYS
    # Quotas are per action: the status query still has its own 30.
    assert (
        call(gateway, clock, "QueryBatchRegisterDeviceStatus", ProductKey=PK, ApplyId=str(FIRST_APPLY_ID))[0]
        == 200
    )
    clock.advance(0.5)  # the first five leave the window
    for _ in range(5):
        assert register()[0] == 200
    assert register()[1]["Code"] == "Throttling.User"
    assert len(gateway.backend.applications()) == 15
    assert gateway.calls["BatchRegisterDevice"] == 17
    assert gateway.outcomes[("BatchRegisterDevice", "Success")] == 15
    assert gateway.outcomes[("BatchRegisterDevice", "Throttling.User")] == 2


def test_quotas_can_be_turned_off(gateway: Gateway, clock: ManualClock) -> None:
    gateway.enforce_quotas = False
    answers = [call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1")[0] for _ in range(40)]
    assert answers == [200] * 40


# -------------------------------------------------------------------------------------- faults


def test_injected_errors_are_500_or_503_and_skip_the_backend(gateway: Gateway, clock: ManualClock) -> None:
    gateway.enforce_quotas = False
    gateway.faults = FaultPlan(error_rate=1.0, seed=5)
    answers = [call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1") for _ in range(20)]
    assert {(status, body["Code"]) for status, body in answers} == {
        (500, "InternalError"),
        (503, "ServiceUnavailable"),
    }
    assert all(set(body) == GATEWAY_ERROR_KEYS for _, body in answers)
    assert gateway.backend.applications() == []
    gateway.faults = FaultPlan()  # changed at run time
    assert call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1")[0] == 200


def test_injected_errors_can_come_after_the_backend_acted(gateway: Gateway, clock: ManualClock) -> None:
    gateway.faults = FaultPlan(error_rate=1.0, errors_take_effect=1.0)
    status, _ = call(gateway, clock, "BatchRegisterDevice", ProductKey=PK, Count="1")
    assert status in (500, 503)
    assert len(gateway.backend.applications()) == 1  # the answer was lost, not the call


def test_a_share_of_injected_errors_is_seeded(gateway: Gateway, clock: ManualClock) -> None:
    gateway.enforce_quotas = False

    def run() -> list[int]:
        gateway.faults = FaultPlan(error_rate=0.5, seed=11)
        return [call(gateway, clock, "QueryPageByApplyId", ApplyId="1")[0] for _ in range(40)]

    first = run()
    assert 8 <= first.count(200) <= 32 and set(first) - {200} <= {500, 503}
    assert run() == first


def test_injected_throttling(gateway: Gateway, clock: ManualClock) -> None:
    gateway.faults = FaultPlan(throttle_rate=1.0)
    status, body = call(gateway, clock, "QueryPageByApplyId", ApplyId="1")
    assert (status, body["Code"]) == (400, "Throttling.User")


def test_injected_latency_waits_on_the_clock(gateway: Gateway, clock: ManualClock) -> None:
    gateway.faults = FaultPlan(latency=2.5)
    before = clock.monotonic()
    call(gateway, clock, "QueryPageByApplyId", ApplyId="1")
    assert clock.monotonic() - before == pytest.approx(2.5)
    assert clock.slept == [2.5]


def test_fault_shares_are_checked() -> None:
    with pytest.raises(ValueError):
        FaultPlan(error_rate=1.5)
    with pytest.raises(ValueError):
        FaultPlan(latency=-1)


# ------------------------------------------------------------------------ V3 (ACS3-HMAC-SHA256)


def call_v3(
    gateway: Gateway,
    clock: ManualClock,
    action: str,
    form: dict[str, str] | None = None,
    *,
    secret: str = SECRET,
    key_id: str = KEY_ID,
    headers: dict[str, str] | None = None,
    unsigned: tuple[str, ...] = (),
    body: bytes | None = None,
    **query: str,
) -> tuple[int, dict]:
    """A V3 call as the current SDK makes it: ``headers`` override or add signed headers,
    ``unsigned`` are sent but left out of SignedHeaders, ``body`` replaces the signed body."""
    payload = urlencode(form or {}).encode()
    sent = {
        "host": "iot.cn-shanghai.aliyuncs.com",
        "x-acs-action": action,
        "x-acs-version": "2018-01-20",
        "x-acs-date": clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "x-acs-signature-nonce": uuid.uuid4().hex,
        "x-acs-content-sha256": sha256_hex(payload),
        **({"content-type": "application/x-www-form-urlencoded"} if form else {}),
        **(headers or {}),
    }
    signed = sorted(name for name in sent if name not in unsigned)
    canonical = v3_canonical_request("POST", list(query.items()), list(sent.items()), signed, sha256_hex(payload))
    sent["authorization"] = v3_authorization(key_id, signed, v3_sign(secret, v3_string_to_sign(canonical)))
    body = payload if body is None else body
    return gateway.handle_raw("POST", urlencode(query), body, sent.get("content-type"), headers=list(sent.items()))


def test_a_v3_call_with_names_in_the_form_body_is_answered(gateway: Gateway, clock: ManualClock) -> None:
    form = {"DeviceNameList.1.DeviceName": "lamp-0001", "DeviceNameList.1.DeviceNickname": "门厅灯", "DeviceNameList.2.DeviceName": "lamp-0002"}
    status, body = call_v3(gateway, clock, "BatchCheckDeviceNames", form, ProductKey=PK)
    assert (status, body["Data"]) == (200, {"ApplyId": FIRST_APPLY_ID})
    application = gateway.backend.application(FIRST_APPLY_ID)
    assert (application.names, application.nicknames) == (("lamp-0001", "lamp-0002"), {"lamp-0001": "门厅灯"})
    assert gateway.outcomes[("BatchCheckDeviceNames", "Success")] == 1


def test_a_v3_wrong_secret_quotes_the_servers_string_to_sign(gateway: Gateway, clock: ManualClock) -> None:
    status, body = call_v3(gateway, clock, "QueryPageByApplyId", secret="wrong", ApplyId="1")
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")
    assert body["Message"].startswith(SIGNATURE_MISMATCH_PREFIX + "ACS3-HMAC-SHA256\n")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"unsigned": ("x-acs-date",)}, "IncompleteSignature"),
        ({"unsigned": ("x-acs-content-sha256",)}, "IncompleteSignature"),
        ({"headers": {"x-acs-security-token": "t"}, "unsigned": ("x-acs-security-token",)}, "IncompleteSignature"),
        ({"headers": {"authorization-ignored": "x"}, "body": b"DeviceName.1=other"}, "SignatureDoesNotMatch"),
        ({"headers": {"x-acs-date": "2026-01-05 10:00:00"}}, "InvalidTimeStamp.Format"),
        ({"key_id": "LTAI-unknown"}, "InvalidAccessKeyId.NotFound"),
        ({"headers": {"x-acs-version": "2017-04-20"}}, "InvalidApi.NotFound"),
    ],
    ids=["date-unsigned", "payload-hash-unsigned", "token-unsigned", "body-not-hashed", "date-malformed", "unknown-key", "other-version"],
)
def test_v3_refusals_carry_the_platforms_codes(gateway: Gateway, clock: ManualClock, change: dict, code: str) -> None:
    status, body = call_v3(gateway, clock, "QueryPageByApplyId", **change, ApplyId="1")
    assert body["Code"] == code and set(body) == GATEWAY_ERROR_KEYS
    assert status == (404 if code.endswith("NotFound") else 400)


def test_a_v3_call_without_its_action_or_authorization(gateway: Gateway, clock: ManualClock) -> None:
    status, body = gateway.handle_raw("POST", "ApplyId=1", headers=[("x-acs-action", "QueryPageByApplyId"), ("x-acs-version", "2018-01-20")])
    assert (status, body["Code"]) == (400, "IncompleteSignature")
    status, body = gateway.handle_raw("POST", "ApplyId=1", headers=[("authorization", "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=0")])
    assert (status, body["Code"], body["Message"]) == (400, "MissingParameter", 'The input parameter "x-acs-action" that is mandatory for processing this request is not supplied.')


def test_v3_time_window_and_nonce(gateway: Gateway, clock: ManualClock) -> None:
    late = (clock.now() - timedelta(minutes=15, seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert call_v3(gateway, clock, "QueryPageByApplyId", headers={"x-acs-date": late}, ApplyId="1")[1]["Code"] == "InvalidTimeStamp.Expired"
    nonce = {"x-acs-signature-nonce": "f0b9790d22896feb2b048776a5e33f78"}
    assert call_v3(gateway, clock, "QueryPageByApplyId", headers=nonce, ApplyId="1")[1]["Code"] == "iot.device.DeviceApplyIsNotFound"
    assert call_v3(gateway, clock, "QueryPageByApplyId", headers=nonce, ApplyId="1")[1]["Code"] == "SignatureNonceUsed"


def test_a_key_with_a_security_token_needs_it_with_either_signature(gateway: Gateway, clock: ManualClock) -> None:
    gateway.security_tokens = {KEY_ID: "sts-token"}
    assert call_v3(gateway, clock, "QueryPageByApplyId", ApplyId="1")[1]["Code"] == "InvalidSecurityToken.Malformed"
    assert call(gateway, clock, "QueryPageByApplyId", ApplyId="1")[1]["Code"] == "InvalidSecurityToken.Malformed"
    wrong = call_v3(gateway, clock, "QueryPageByApplyId", headers={"x-acs-security-token": "other"}, ApplyId="1")
    assert wrong[1]["Code"] == "InvalidSecurityToken.MismatchWithAccessKey"
    right = call_v3(gateway, clock, "QueryPageByApplyId", headers={"x-acs-security-token": "sts-token"}, ApplyId="1")
    assert right[1]["Code"] == "iot.device.DeviceApplyIsNotFound"  # through the gateway, to the backend
    assert call(gateway, clock, "QueryPageByApplyId", ApplyId="1", SecurityToken="sts-token")[1]["Code"] == "iot.device.DeviceApplyIsNotFound"
    gateway.security_tokens = {}
    assert call(gateway, clock, "QueryPageByApplyId", ApplyId="1", SecurityToken="sts-token")[1]["Code"] == "InvalidSecurityToken.MismatchWithAccessKey"


# ------------------------------------------------------------------------------------- over HTTP


def test_http_get_and_post_reach_the_gateway(emulator: Emulator) -> None:
    clock = emulator.clock
    assert isinstance(clock, ManualClock)
    params = common(
        clock, "BatchCheckDeviceNames", AccessKeyId=emulator.access_key_id, ProductKey=emulator.product_key
    )
    form = {"DeviceNameList.1.DeviceName": "lamp-0001", "DeviceNameList.1.DeviceNickname": "bad nick"}
    params["Signature"] = signature_for("POST", {**params, **form}, emulator.access_key_secret)
    answer = requests.post(emulator.endpoint + "/", params=params, data=form, timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json;charset=utf-8"
    assert answer.json()["Data"]["InvalidDeviceNicknameList"] == {"InvalidDeviceNickname": ["bad nick"]}

    params = common(
        clock,
        "BatchRegisterDevice",
        AccessKeyId=emulator.access_key_id,
        ProductKey=emulator.product_key,
        Count="2",
    )
    params["Signature"] = signature_for("GET", params, emulator.access_key_secret)
    answer = requests.get(emulator.endpoint + "/", params=params, timeout=5)
    assert answer.json()["Success"] is True
    assert emulator.gateway.calls == {"BatchCheckDeviceNames": 1, "BatchRegisterDevice": 1}


def test_http_other_paths_are_not_found(emulator: Emulator) -> None:
    answer = requests.get(emulator.endpoint + "/v1/devices", timeout=5)
    assert (answer.status_code, answer.json()["Code"]) == (404, "InvalidApi.NotFound")


def test_http_unsigned_requests_are_refused_as_json(emulator: Emulator) -> None:
    answer = requests.get(emulator.endpoint + "/?Action=BatchRegisterDevice", timeout=5)
    assert (answer.status_code, answer.json()["Code"]) == (400, "MissingParameter")


def test_http_a_ten_thousand_name_check_in_the_query_string_is_answered(emulator: Emulator) -> None:
    clock = emulator.clock
    assert isinstance(clock, ManualClock)
    params = common(clock, "BatchCheckDeviceNames", AccessKeyId=emulator.access_key_id, ProductKey=emulator.product_key)
    # Nicknamed, as the SDK's DeviceNameList sends them: about 0.4 MB.
    for n in range(1, 10_001):
        params[f"DeviceNameList.{n}.DeviceName"] = f"sensor-hz-{n:06d}"
        params[f"DeviceNameList.{n}.DeviceNickname"] = f"s{n:06d}"
    params["Signature"] = signature_for("GET", params, emulator.access_key_secret)
    query = urlencode(params)
    assert len(query) > 400_000
    answer = requests.get(f"{emulator.endpoint}/?{query}", timeout=30)
    assert answer.status_code == 200 and answer.json()["Success"] is True
    assert len(emulator.backend.application(answer.json()["Data"]["ApplyId"]).names) == 10_000
