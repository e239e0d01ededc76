"""What the client does with each kind of failure: retry, or stop and say exactly what happened.

The transport is scripted (a requests adapter that answers from a list), so every case is exact.
"""

from __future__ import annotations

import logging
import random
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from requests.adapters import BaseAdapter
from urllib3.exceptions import NewConnectionError

from bot.aliyun import errors
from bot.aliyun.client import ApplyStatus, Credentials, IotClient, RetryPolicy
from bot.aliyun.ratelimit import RateLimiter, SlotLater, deferring
from bot.aliyun.signing import signature_for
from bot.clock import ManualClock

SECRET = "very-secret-value-0123456789"
ENDPOINT = "http://iot.test"


class ScriptedAdapter(BaseAdapter):
    """Answers each request with the next scripted outcome: ``(status, json)`` or an exception."""

    def __init__(self, outcomes):
        super().__init__()
        self.outcomes = list(outcomes)
        self.requests: list[requests.PreparedRequest] = []

    def send(self, request, **kwargs):
        self.requests.append(request)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        status, body, *headers = outcome
        response = requests.Response()
        response.status_code = status
        response.request = request
        response.url = request.url
        if isinstance(body, (bytes, str)):
            response._content = body.encode() if isinstance(body, str) else body
            response.headers["Content-Type"] = "text/html"
        else:
            import json

            response._content = json.dumps(body).encode()
            response.headers["Content-Type"] = "application/json"
        response.headers.update(*headers)
        return response

    def close(self):
        pass


def make_client(outcomes, **retry):
    clock = ManualClock()
    session = requests.Session()
    adapter = ScriptedAdapter(outcomes)
    session.mount(ENDPOINT, adapter)
    client = IotClient(
        ENDPOINT,
        Credentials("test-key-id", SECRET),
        session=session,
        clock=clock,
        limiter=RateLimiter({}, clock),
        retry=RetryPolicy(**retry),
        rng=random.Random(7),
    )
    return client, adapter, clock


def ok(data, **top):
    return (200, {"RequestId": "req-ok", "Success": True, "Data": data, **top})


def gateway(status, code, message="failed"):
    return (status, {"RequestId": f"req-{code}", "HostId": "iot.test", "Code": code, "Message": message, "Recommend": ""})


def business(code, message="no"):
    return (200, {"RequestId": f"req-{code}", "Success": False, "Code": code, "ErrorMessage": message})


THROTTLED = gateway(400, "Throttling.User", "Request was denied due to user flow control.")
UNAVAILABLE = gateway(503, "ServiceUnavailable", "The request has failed due to a temporary failure of the server.")
STATUS_OK = ok({"Status": "CHECK_SUCCESS", "ValidList": {"Name": []}, "InvalidList": {"Name": []}})


def refused():
    return requests.exceptions.ConnectionError(NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused"))


def test_throttled_registration_is_retried_because_the_gateway_never_ran_it():
    client, adapter, clock = make_client([THROTTLED, THROTTLED, ok({"ApplyId": 1295006})])
    assert client.batch_register_device("a1ProductKey", 100) == 1295006
    assert len(adapter.requests) == 3
    assert len(clock.slept) == 2 and clock.slept[1] > clock.slept[0] * 0.99 / 2


def test_a_throttled_calls_retry_takes_its_slot_back_rather_than_one_at_the_end_of_the_queue():
    """The platform did not count a refused call: its retry moves the same slot to its own time,
    instead of waiting for the next free slot (here the next second's)."""
    client, adapter, clock = make_client([THROTTLED, STATUS_OK])
    client.limiter = limiter = RateLimiter({"QueryBatchRegisterDeviceStatus": 2}, clock, margin=0, spacing=0)
    limiter.acquire("QueryBatchRegisterDeviceStatus")  # another call takes this second's other slot
    assert client.query_batch_register_device_status("a1ProductKey", 5).status is ApplyStatus.CHECK_SUCCESS
    assert len(adapter.requests) == 2 and limiter.moved == {"QueryBatchRegisterDeviceStatus": 1}
    [backoff] = clock.slept  # the back-off alone, not a wait for the next second
    assert clock.monotonic() == pytest.approx(backoff) and backoff < 0.5
    # The next second's slots: one a second after the other call, one a second after the retry.
    booked = []
    for holder in ("next", "after"):
        with deferring(holder, patience=0.1), pytest.raises(SlotLater) as later:
            limiter.acquire("QueryBatchRegisterDeviceStatus")
        booked.append(clock.monotonic() + later.value.wait)
    assert booked == pytest.approx([1.0, 1.0 + backoff])
    assert limiter.missed == {}


def test_registration_after_a_5xx_is_not_resent_and_says_it_may_have_run():
    client, adapter, _ = make_client([UNAVAILABLE, ok({"ApplyId": 1})])
    with pytest.raises(errors.ServiceError) as info:
        client.batch_register_device_with_apply_id("a1ProductKey", 1295006)
    assert len(adapter.requests) == 1
    assert info.value.may_have_taken_effect and info.value.retryable
    assert info.value.code == "ServiceUnavailable" and info.value.http_status == 503


def test_registration_after_a_read_timeout_is_not_resent():
    client, adapter, _ = make_client([requests.exceptions.ReadTimeout("read timed out"), ok({"ApplyId": 1})])
    with pytest.raises(errors.TransportError) as info:
        client.batch_register_device("a1ProductKey", 10)
    assert len(adapter.requests) == 1
    assert info.value.may_have_taken_effect


def test_registration_is_retried_when_the_connection_was_refused():
    client, adapter, _ = make_client([refused(), ok({"ApplyId": 77})])
    assert client.batch_register_device_with_apply_id("a1ProductKey", 77) == 77
    assert len(adapter.requests) == 2


@pytest.mark.parametrize(
    "failure",
    [UNAVAILABLE, gateway(500, "InternalError"), business("iot.system.SystemException"), THROTTLED],
    ids=["503", "500", "SystemException", "throttled"],
)
def test_status_queries_are_retried_through_transient_failures(failure):
    client, adapter, _ = make_client([failure, requests.exceptions.ReadTimeout("slow"), STATUS_OK])
    assert client.query_batch_register_device_status("a1ProductKey", 5).status is ApplyStatus.CHECK_SUCCESS
    assert len(adapter.requests) == 3


def test_retries_stop_after_max_attempts_with_the_last_error():
    client, adapter, clock = make_client([UNAVAILABLE], max_attempts=4)
    with pytest.raises(errors.ServiceError, match="ServiceUnavailable"):
        client.query_page_by_apply_id(5)
    assert len(adapter.requests) == 4
    assert len(clock.slept) == 3


def test_retries_stop_at_the_deadline():
    client, adapter, clock = make_client([THROTTLED], max_attempts=50, deadline=3.0, base_delay=0.5, max_delay=8)
    with pytest.raises(errors.ThrottledError):
        client.query_page_by_apply_id(5)
    assert clock.monotonic() <= 3.0
    assert 2 <= len(adapter.requests) < 50


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    policy = RetryPolicy(base_delay=0.25, max_delay=2.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (8, 2.0)]:
        delays = {policy.delay(attempt, rng) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jitter: callers that failed together do not retry together


@pytest.mark.parametrize(
    ("answer", "kind", "code"),
    [
        (business("iot.prod.NotExistedProduct", "product not found"), errors.NotFoundError, "iot.prod.NotExistedProduct"),
        (business("iot.device.DeviceApplyIsNotFound"), errors.NotFoundError, "iot.device.DeviceApplyIsNotFound"),
        (business("iot.device.AlreadyExistedDeviceName"), errors.BusinessError, "iot.device.AlreadyExistedDeviceName"),
        (gateway(400, "SignatureDoesNotMatch", "Specified signature is not matched with our calculation. server string to sign is:POST&%2F&x"), errors.AuthError, "SignatureDoesNotMatch"),
        (gateway(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found."), errors.AuthError, "InvalidAccessKeyId.NotFound"),
        (gateway(400, "InvalidTimeStamp.Expired"), errors.AuthError, "InvalidTimeStamp.Expired"),
        (gateway(400, "MissingParameter"), errors.RequestError, "MissingParameter"),
        (gateway(404, "InvalidApi.NotFound"), errors.RequestError, "InvalidApi.NotFound"),
    ],
)
def test_final_errors_are_typed_carry_their_request_id_and_are_not_retried(answer, kind, code):
    client, adapter, _ = make_client([answer])
    with pytest.raises(kind) as info:
        client.query_batch_register_device_status("a1ProductKey", 5)
    assert len(adapter.requests) == 1
    assert info.value.code == code and not info.value.retryable
    assert info.value.request_id == f"req-{code}"
    assert f"RequestId req-{code}" in str(info.value) and "QueryBatchRegisterDeviceStatus" in str(info.value)


def test_an_html_error_page_from_a_proxy_is_a_service_error():
    client, _, _ = make_client([(502, "<html><body>Bad Gateway</body></html>")], max_attempts=1)
    with pytest.raises(errors.ServiceError, match="not JSON"):
        client.query_page_by_apply_id(5)


def test_the_secret_never_reaches_an_error_or_a_log_line(caplog):
    caplog.set_level(logging.DEBUG)
    outcomes = [gateway(400, "SignatureDoesNotMatch"), refused(), UNAVAILABLE, requests.exceptions.ReadTimeout("x")]
    for outcome in outcomes:
        client, _, _ = make_client([outcome], max_attempts=2)
        with pytest.raises(errors.IotError) as info:
            client.batch_register_device("a1ProductKey", 1)
        assert SECRET not in str(info.value) and SECRET not in repr(info.value.__dict__)
        assert "Signature=" not in str(info.value)
    assert SECRET not in repr(client.credentials) and SECRET not in caplog.text


def test_names_travel_in_a_signed_form_body_like_the_official_sdk():
    client, adapter, clock = make_client([ok({"ApplyId": 1295006})])
    submitted = client.batch_check_device_names(
        "a1ProductKey", [("light-001", "客厅 灯"), ("light-002", None), ("cam@door:1", "front door")]
    )
    assert submitted.apply_id == 1295006 and submitted.invalid_names == ()
    request = adapter.requests[0]
    assert request.method == "POST"
    query = dict(parse_qsl(urlsplit(request.url).query, keep_blank_values=True))
    form = dict(parse_qsl(request.body, keep_blank_values=True))
    assert form == {
        "DeviceNameList.1.DeviceName": "light-001",
        "DeviceNameList.1.DeviceNickname": "客厅 灯",
        "DeviceNameList.2.DeviceName": "light-002",
        "DeviceNameList.3.DeviceName": "cam@door:1",
        "DeviceNameList.3.DeviceNickname": "front door",
    }
    assert "+" in request.body  # a space is '+' in the body, as the official SDK sends it
    assert query["Action"] == "BatchCheckDeviceNames" and query["ProductKey"] == "a1ProductKey"
    assert query["Format"] == "JSON" and query["Version"] == "2018-01-20" and query["SignatureVersion"] == "1.0"
    assert query["Timestamp"] == clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
    signature = query.pop("Signature")
    assert signature == signature_for("POST", {**query, **form}, SECRET)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=16),
                          st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=16)),
                min_size=1, max_size=5))
def test_the_form_body_is_what_the_official_sdk_would_send_for_any_text(devices):
    client, adapter, _ = make_client([ok({"ApplyId": 1}) for _ in devices])
    client.batch_check_device_names("a1ProductKey", devices)
    form = {}
    for n, (name, nickname) in enumerate(devices, start=1):
        form[f"DeviceNameList.{n}.DeviceName"] = name
        form[f"DeviceNameList.{n}.DeviceNickname"] = nickname
    request = adapter.requests[0]
    assert request.body == urlencode(form)  # the SDK's body: urlencode, a space as "+"
    query = dict(parse_qsl(urlsplit(request.url).query, keep_blank_values=True))
    assert query.pop("Signature") == signature_for("POST", {**query, **form}, SECRET)


def test_a_redirect_is_reported_not_followed():
    # A signed call has one destination: a proxy or a captive portal answering 302 is an error to
    # show, not a place to send the AccessKeyId and the names.
    client, adapter, _ = make_client([(302, "<html>moved</html>", {"Location": "http://elsewhere.test/"}), ok({})], max_attempts=1)
    with pytest.raises(errors.RequestError, match="HTTP 302"):
        client.query_batch_register_device_status("a1ProductKey", 5)
    assert len(adapter.requests) == 1


def test_names_without_nicknames_use_the_short_form():
    client, adapter, _ = make_client([ok({"ApplyId": 9})])
    client.batch_check_device_names("a1ProductKey", ["alpha-1", "beta-2"])
    assert dict(parse_qsl(adapter.requests[0].body)) == {"DeviceName.1": "alpha-1", "DeviceName.2": "beta-2"}


def test_the_instance_id_is_sent_when_configured():
    client, adapter, _ = make_client([STATUS_OK])
    client.instance_id = "iot-cn-0pp1n8t"
    client.query_batch_register_device_status("a1ProductKey", 5)
    assert dict(parse_qsl(urlsplit(adapter.requests[0].url).query))["IotInstanceId"] == "iot-cn-0pp1n8t"


def test_limits_are_enforced_before_anything_is_sent():
    client, adapter, _ = make_client([ok({"ApplyId": 1})])
    with pytest.raises(ValueError, match="at most 10000"):
        client.batch_check_device_names("a1ProductKey", [f"device-{i:05d}" for i in range(10_001)])
    with pytest.raises(ValueError):
        client.batch_register_device("a1ProductKey", 10_001)
    with pytest.raises(ValueError):
        client.query_page_by_apply_id(1, page_size=51)
    assert adapter.requests == []


def test_check_failure_lists_are_read_with_the_platforms_own_keys():
    data = {
        "ApplyId": 42,
        "InvalidDeviceNameList": {"InvalidDeviceName": ["ab"]},
        "InvalidDeviceNicknameList": {"InvalidDeviceNickname": ["x"]},
        "RepeatedDeviceNameList": {"RepeatDevieNameList": ["dup-0001"]},
        "InvalidDetailList": {"InvalidDetailList": [{"DeviceName": "ab", "NickName": "", "ErrorMsg": "too short|bad"}]},
    }
    client, _, _ = make_client([ok(data)])
    result = client.batch_check_device_names("a1ProductKey", ["ab", "dup-0001", "dup-0001"])
    assert (result.invalid_names, result.invalid_nicknames, result.repeated_names) == (("ab",), ("x",), ("dup-0001",))
    assert result.details[0].reason == "too short|bad" and result.details[0].nickname is None


def test_status_lists_and_paging():
    status = ok(
        {
            "Status": "CREATE_FAILED",
            "ValidList": {"Name": ["good-0001"]},
            "InvalidList": {"Name": ["bad-0001"]},
            "InvalidDetailList": {"invalidDetailList": [{"DeviceName": "bad-0001", "NickName": "n", "ErrorMsg": "exists"}]},
        }
    )
    page = lambda n, names, count: (200, {  # noqa: E731
        "RequestId": "r", "Success": True, "Page": n, "PageSize": 2, "PageCount": count, "Total": 3,
        "ApplyDeviceList": {"ApplyDeviceInfo": [{"DeviceId": "d", "DeviceName": x, "DeviceSecret": "s" * 32, "IotId": f"iot-{x}"} for x in names]},
    })
    client, adapter, _ = make_client([status, page(1, ["a", "b"], 2), page(2, ["c"], 2)])
    result = client.query_batch_register_device_status("a1ProductKey", 5)
    assert result.status is ApplyStatus.CREATE_FAILED and not result.status.running
    assert (result.valid, result.invalid, result.details[0].reason) == (("good-0001",), ("bad-0001",), "exists")
    devices = list(client.iter_devices_by_apply_id(5, page_size=2))
    assert [d.name for d in devices] == ["a", "b", "c"] and devices[2].iot_id == "iot-c"
    assert "s" * 32 not in repr(devices)
    pages = [dict(parse_qsl(urlsplit(r.url).query))["CurrentPage"] for r in adapter.requests[1:]]
    assert pages == ["1", "2"]


@pytest.mark.parametrize(
    "answer",
    [(200, "<html>cut"), (200, {"RequestId": "r", "Success": True, "Data": {}})],
    ids=["unreadable-200", "success-without-apply-id"],
)
def test_an_unusable_success_to_a_creating_call_says_it_may_have_run_and_is_not_resent(answer):
    client, adapter, _ = make_client([answer, ok({"ApplyId": 2})])
    with pytest.raises(errors.IotError) as info:
        client.batch_register_device("a1ProductKey", 5)
    assert info.value.may_have_taken_effect
    assert len(adapter.requests) == 1


def test_a_body_that_breaks_off_is_a_transport_error_that_may_have_run():
    client, adapter, _ = make_client([requests.exceptions.ChunkedEncodingError("broke off"), ok({"ApplyId": 2})])
    with pytest.raises(errors.TransportError) as info:
        client.batch_register_device_with_apply_id("a1ProductKey", 2)
    assert info.value.may_have_taken_effect and len(adapter.requests) == 1


def test_device_secrets_in_an_unreadable_page_never_reach_the_error(caplog):
    caplog.set_level(logging.DEBUG)
    leaked = "DeviceSecret=" + "f" * 32
    client, _, _ = make_client([(200, "{\"ApplyDeviceList\": [" + leaked)], max_attempts=1)
    with pytest.raises(errors.IotError) as info:
        client.query_page_by_apply_id(5)
    assert leaked not in str(info.value) and "f" * 32 not in caplog.text
