"""Signature version 1.0: the published test vectors, and agreement with the official SDK's signer;
V3 (ACS3-HMAC-SHA256): both published test vectors."""

from urllib.parse import parse_qsl, urlsplit

import pytest
from aliyunsdkcore.auth.composer import rpc_signature_composer
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.aliyun.signing import (
    canonical_query,
    parse_v3_authorization,
    percent_encode,
    sha256_hex,
    signature_for,
    string_to_sign,
    v3_authorization,
    v3_canonical_request,
    v3_sign,
    v3_string_to_sign,
)

IOT_EXAMPLE = {
    "AccessKeyId": "testid",
    "Action": "Pub",
    "Format": "XML",
    "MessageContent": "aGVsbG93b3JsZA=",
    "ProductKey": "12345abcdeZ",
    "Qos": "0",
    "RegionId": "cn-shanghai",
    "ServiceCode": "iot",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "0715a395-aedf-4a41-bab7-746b43d38d88",
    "SignatureVersion": "1.0",
    "Timestamp": "2017-10-02T09:39:41Z",
    "TopicFullName": "/productKey/testdevice/get",
    "Version": "2017-04-20",
}
RPC_EXAMPLE = {
    "AccessKeyId": "testid",
    "Action": "DescribeRegions",
    "Format": "XML",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
    "SignatureVersion": "1.0",
    "Timestamp": "2016-02-23T12:46:24Z",
    "Version": "2014-05-26",
}


@pytest.mark.parametrize(
    ("params", "expected"),
    [(IOT_EXAMPLE, "Y9eWn4nF8QPh3c4zAFkM/k/u7eA="), (RPC_EXAMPLE, "OLeaidS1JvxuMvnyHOwuJ+uX5qY=")],
    ids=["iot-pub-example", "generic-rpc-example"],
)
def test_published_vectors(params, expected):
    assert signature_for("GET", params, "testsecret") == expected


def test_string_to_sign_of_the_generic_example():
    assert string_to_sign("GET", RPC_EXAMPLE) == (
        "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML"
        "%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"
        "%26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26"
    )


def test_post_and_get_sign_differently():
    assert signature_for("POST", RPC_EXAMPLE, "testsecret") != signature_for("GET", RPC_EXAMPLE, "testsecret")


def test_encoding_follows_rfc3986():
    assert percent_encode("a b*c~d+e/f") == "a%20b%2Ac~d%2Be%2Ff"
    assert percent_encode("智能灯") == "%E6%99%BA%E8%83%BD%E7%81%AF"


def test_signature_parameter_and_order_do_not_matter_but_empty_values_do():
    shuffled = dict(reversed(list(RPC_EXAMPLE.items())), Signature="ignored")
    assert canonical_query(shuffled) == canonical_query(RPC_EXAMPLE)
    with_empty = {**RPC_EXAMPLE, "SignatureType": ""}
    assert "SignatureType%3D%26" in string_to_sign("POST", with_empty)
    assert signature_for("POST", with_empty, "s") != signature_for("POST", RPC_EXAMPLE, "s")


def official_signature(method: str, query: dict, body: dict, secret: str) -> tuple[str, dict]:
    """Sign with aliyun-python-sdk-core; return its Signature and the query it actually signed."""
    url, _ = rpc_signature_composer.get_signed_url(dict(query), "testid", secret, "JSON", method, dict(body))
    signed = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    return signed.pop("Signature"), signed


@pytest.mark.parametrize(
    "body",
    [
        {"DeviceName.1": "light-001", "DeviceName.2": "light_002"},
        {"DeviceNameList.1.DeviceName": "a b c", "DeviceNameList.1.DeviceNickname": "智能灯 一号"},
        {"DeviceNameList.1.DeviceName": "star*name~tilde", "DeviceNameList.1.DeviceNickname": "x+y=z&w"},
        {"DeviceNameList.1.DeviceName": "dev@home:1.2", "DeviceNameList.1.DeviceNickname": "センサー_01"},
    ],
)
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_agrees_with_official_signer(method, body):
    query = {"Action": "BatchCheckDeviceNames", "ProductKey": "a1BwAGVxxxx", "Version": "2018-01-20", "RegionId": "cn-shanghai"}
    expected, signed_query = official_signature(method, query, body, "s3cr3t")
    assert signature_for(method, {**signed_query, **body}, "s3cr3t") == expected


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12),
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),
        max_size=6,
    )
)
def test_agrees_with_official_signer_on_any_text(body):
    body = {k: v for k, v in body.items() if k != "Signature"}
    query = {"Action": "QueryPageByApplyId", "ApplyId": "1295006"}
    expected, signed_query = official_signature("POST", query, body, "key with spaces & symbols")
    assert signature_for("POST", {**signed_query, **body}, "key with spaces & symbols") == expected


# ------------------------------------------------------------------------ V3: ACS3-HMAC-SHA256

V3_RUN_INSTANCES_HEADERS = [
    ("host", "ecs.cn-shanghai.aliyuncs.com"),
    ("x-acs-action", "RunInstances"),
    ("x-acs-version", "2014-05-26"),
    ("x-acs-date", "2023-10-26T10:22:32Z"),
    ("x-acs-signature-nonce", "3156853299f313e23d1673dc12e1703d"),
    ("x-acs-content-sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
]


def test_v3_published_vector_with_fixed_values():
    query = [("RegionId", "cn-shanghai"), ("ImageId", "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd")]
    signed = sorted(name for name, _ in V3_RUN_INSTANCES_HEADERS)
    canonical = v3_canonical_request("POST", query, V3_RUN_INSTANCES_HEADERS, signed, sha256_hex(b""))
    assert sha256_hex(canonical.encode()) == "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
    signature = v3_sign("YourAccessKeySecret", v3_string_to_sign(canonical))
    assert signature == "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"


def test_v3_vector_of_the_openapi_util_merges_repeated_headers_and_signs_empty_values():
    payload = "55e12e91650d2fec56ec74e1d3e4ddbfce2ef3a65890c2a19ecf88a307e76a23"
    headers = [("x-acs-test", "http"), ("x-acs-TEST", "https")]
    canonical = v3_canonical_request("GET", [("test", "ok"), ("empty", "")], headers, ["x-acs-test"], payload)
    assert canonical == f"GET\n/\nempty=&test=ok\nx-acs-test:http,https\n\nx-acs-test\n{payload}"
    signature = v3_sign("secret", v3_string_to_sign(canonical))
    assert signature == "d16b30a7699ae9e43875b13195b2f81bcc3ed10c14a9b5eb780e51619aa50be1"
    authorization = v3_authorization("acesskey", ["x-acs-test"], signature)
    assert authorization == f"ACS3-HMAC-SHA256 Credential=acesskey,SignedHeaders=x-acs-test,Signature={signature}"
    assert parse_v3_authorization(authorization) == ("acesskey", ("x-acs-test",), signature)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("HMAC-SHA1 Credential=a,SignedHeaders=b,Signature=c", "does not start with ACS3-HMAC-SHA256"),
        ("ACS3-HMAC-SHA256 Credential=a,SignedHeaders=b", "lacks Signature"),
        ("ACS3-HMAC-SHA256 Credential=a,SignedHeaders,Signature=c", "not name=value"),
    ],
)
def test_v3_malformed_authorization_says_what_is_wrong(value, problem):
    with pytest.raises(ValueError, match=problem):
        parse_v3_authorization(value)


def test_our_v3_requests_agree_with_the_current_sdks_signer():
    # What our client puts on the wire, signed again by alibabacloud-openapi-util (the current
    # SDK's signer) from the same method, query, signed headers and body.
    import json as json_module

    import requests
    from alibabacloud_openapi_util.client import Client as OpenApiUtil
    from requests.adapters import BaseAdapter
    from Tea.request import TeaRequest

    from bot.aliyun.client import Credentials, IotClient
    from bot.aliyun.ratelimit import RateLimiter

    class Capture(BaseAdapter):
        def __init__(self):
            super().__init__()
            self.sent = []

        def send(self, request, **kwargs):
            self.sent.append(request)
            response = requests.Response()
            response.status_code, response.request = 200, request
            response._content = json_module.dumps({"RequestId": "r", "Success": True, "Data": {"ApplyId": 1, "Status": "CHECK"}}).encode()
            return response

        def close(self):
            pass

    session, capture = requests.Session(), Capture()
    session.mount("https://", capture)
    credentials = Credentials("STS.key-id", "the secret", "a token")
    client = IotClient("https://iot.cn-shanghai.aliyuncs.com", credentials, signature="v3", session=session, limiter=RateLimiter({}))
    client.instance_id = "iot-cn-0pp1n8t"
    client.batch_check_device_names("a1TestProd1", [("lamp 0001*", "门厅灯_1"), ("lamp~0002", None)])
    client.query_batch_register_device_status("a1TestProd1", 1295006)
    for sent in capture.sent:
        key_id, signed, _ = parse_v3_authorization(sent.headers["Authorization"])
        request = TeaRequest()
        request.method, request.pathname = sent.method, "/"
        request.query = dict(parse_qsl(urlsplit(sent.url).query, keep_blank_values=True))
        request.headers = {name: sent.headers[name] for name in signed}
        body = (sent.body or "").encode() if isinstance(sent.body, str) or sent.body is None else sent.body
        expected = OpenApiUtil.get_authorization(request, "ACS3-HMAC-SHA256", sha256_hex(body), key_id, "the secret")
        assert sent.headers["Authorization"] == expected
        assert {"host", "x-acs-action", "x-acs-security-token", "x-acs-content-sha256"} <= set(signed)
        assert "a token" not in sent.url and "the secret" not in str(sent.headers)
