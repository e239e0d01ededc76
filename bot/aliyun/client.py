"""A thin, typed client for the five IoT Platform operations behind batch registration.

Each method sends one RPC call the way the official Python SDKs do (always POST; ProductKey and
the other parameters in the query; the device names of BatchCheckDeviceNames in a form body),
signs it, and returns a small dataclass. Failures become the exceptions of :mod:`bot.aliyun.errors`.

Signatures: ``signature="v1"`` (the default) is signature version 1.0, HMAC-SHA1 over the
parameters, with the common parameters in the query, as ``aliyun-python-sdk-core`` sends it;
``"v3"`` is ACS3-HMAC-SHA256, the action and version in ``x-acs-*`` headers and the signature in
``Authorization``, as ``alibabacloud-tea-openapi`` sends it by default. The platform takes both.

Credentials: a fixed :class:`Credentials`, or any :class:`CredentialsProvider` (temporary
credentials from a RAM role that are refreshed before they expire): the client asks it for the
current ones at every call, and sends their security token (``SecurityToken`` in V1, in the form
body so that no URL in a log carries it;
``x-acs-security-token`` in V3) when there is one.

Retries. Throttling, ``iot.system.SystemException``, 5xx answers, timeouts and connection errors
are retried with exponential back-off and jitter, bounded in attempts and in total time, but only
where sending the request twice cannot do harm:

* ``QueryBatchRegisterDeviceStatus`` and ``QueryPageByApplyId`` only read.
* ``BatchCheckDeviceNames`` only opens a check application; a repeat opens a second one, and an
  application that nobody registers creates no device.
* ``BatchRegisterDeviceWithApplyId`` and ``BatchRegisterDevice`` create devices. They are retried
  only when the platform cannot have acted on the first attempt (it was throttled at the gateway,
  or the connection was never made). After a timeout or a 5xx the error is raised with
  ``may_have_taken_effect=True``, and the caller must look at the ApplyId's status before doing
  anything else: resending BatchRegisterDevice would create a second batch of devices.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from bot.aliyun import errors
from bot.aliyun.ratelimit import DEFAULT_QPS, Limiter, RateLimiter
from bot.aliyun.signing import (
    encode_params,
    percent_encode,
    sha256_hex,
    signature_for_encoded,
    v3_authorization,
    v3_canonical_request,
    v3_sign,
    v3_string_to_sign,
)
from bot.clock import Clock, SystemClock

log = logging.getLogger(__name__)

API_VERSION = "2018-01-20"
#: The most names one BatchCheckDeviceNames call takes; the platform silently drops the rest.
MAX_NAMES_PER_CHECK = 10_000
#: The most devices one BatchRegisterDevice call creates.
MAX_COUNT_PER_REGISTER = 10_000
#: The largest page QueryPageByApplyId serves.
MAX_PAGE_SIZE = 50

#: Operations that may be sent again after an answer that leaves their effect unknown (see above).
SAFE_TO_REPEAT = frozenset({"QueryBatchRegisterDeviceStatus", "QueryPageByApplyId", "BatchCheckDeviceNames", "QueryProductList"})
#: The two request signatures the client can make (see the module docstring).
SIGNATURES = ("v1", "v3")
#: The most products one QueryProductList page holds.
MAX_PRODUCT_PAGE_SIZE = 200


@dataclasses.dataclass(frozen=True)
class Credentials:
    """An AccessKey pair, with the security token of temporary (STS) credentials. The secret and
    the token stay out of ``repr`` and so out of logs and tracebacks.

    A fixed pair is its own :class:`CredentialsProvider`."""

    access_key_id: str
    access_key_secret: str = dataclasses.field(repr=False)
    security_token: str | None = dataclasses.field(default=None, repr=False)

    def current(self) -> Credentials:
        return self


class CredentialsProvider(Protocol):
    """Where the client gets the credentials of each call: temporary ones change over time.

    ``current`` may raise :class:`~bot.aliyun.errors.AuthError` when there are none to be had."""

    def current(self) -> Credentials: ...


class ApplyStatus(enum.StrEnum):
    """Where an application (an ApplyId) stands."""

    CHECK = "CHECK"
    CHECK_SUCCESS = "CHECK_SUCCESS"
    CHECK_FAILED = "CHECK_FAILED"
    CREATE = "CREATE"
    CREATE_SUCCESS = "CREATE_SUCCESS"
    CREATE_FAILED = "CREATE_FAILED"

    @property
    def running(self) -> bool:
        """The platform is still working on it: ask again later."""
        return self in (ApplyStatus.CHECK, ApplyStatus.CREATE)


@dataclasses.dataclass(frozen=True)
class InvalidDevice:
    """A name the platform would not accept, and why (several reasons are joined by ``|``)."""

    name: str
    nickname: str | None
    reason: str


@dataclasses.dataclass(frozen=True)
class CheckSubmitted:
    """The answer to BatchCheckDeviceNames: the ApplyId to poll, and any names refused at once."""

    apply_id: int
    request_id: str
    invalid_names: tuple[str, ...] = ()
    invalid_nicknames: tuple[str, ...] = ()
    repeated_names: tuple[str, ...] = ()
    details: tuple[InvalidDevice, ...] = ()


@dataclasses.dataclass(frozen=True)
class BatchStatus:
    """The answer to QueryBatchRegisterDeviceStatus.

    On ``CHECK_FAILED`` and ``CREATE_FAILED``, ``invalid`` holds the failed names and ``valid`` the
    rest; on the ``_SUCCESS`` states both are empty (the devices come from QueryPageByApplyId).
    """

    status: ApplyStatus
    valid: tuple[str, ...]
    invalid: tuple[str, ...]
    details: tuple[InvalidDevice, ...]
    request_id: str


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """A created device. The secret is left out of ``repr``: never log it."""

    name: str
    iot_id: str
    device_secret: str = dataclasses.field(repr=False)
    device_id: str = ""


@dataclasses.dataclass(frozen=True)
class DevicePage:
    """One page of QueryPageByApplyId."""

    page: int
    page_size: int
    page_count: int
    total: int
    devices: tuple[DeviceInfo, ...]


@dataclasses.dataclass(frozen=True)
class ProductInfo:
    """A product of QueryProductList."""

    product_key: str
    name: str
    node_type: int  # 0 device, 1 gateway
    device_count: int


@dataclasses.dataclass(frozen=True)
class ProductPage:
    """One page of QueryProductList."""

    page: int
    page_size: int
    page_count: int
    total: int
    products: tuple[ProductInfo, ...]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with jitter, bounded in attempts and in total time."""

    max_attempts: int = 5
    deadline: float = 60.0
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """How long to wait after failed attempt number ``attempt`` (1-based): half fixed, half random."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


class IotClient:
    """IoT Platform's batch registration API, one method per operation."""

    def __init__(
        self,
        endpoint: str,
        credentials: CredentialsProvider,
        *,
        signature: str = "v1",
        region_id: str = "cn-shanghai",
        instance_id: str | None = None,
        session: requests.Session | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        limiter: Limiter | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        observer: Callable[[str, str, float], None] | None = None,
    ) -> None:
        if signature not in SIGNATURES:
            raise ValueError(f"signature must be one of {', '.join(SIGNATURES)}, not {signature!r}")
        self.endpoint = endpoint.rstrip("/")
        self.credentials = credentials
        self.signature = signature
        self.region_id = region_id
        self.instance_id = instance_id
        self.session = session or _session_for(self.endpoint)
        # Checked and normalised once (requests raises here on a malformed endpoint); each call then
        # appends its query, already encoded, instead of having the whole URL parsed again.
        base = requests.PreparedRequest()
        base.prepare_url(f"{self.endpoint}/", None)
        self._base_url: str = base.url or f"{self.endpoint}/"
        self._host = urlsplit(self._base_url).netloc  # the Host header V3 signs, as requests sends it
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.clock = clock or SystemClock()
        self.limiter = limiter or RateLimiter(DEFAULT_QPS, self.clock)
        self.rng = rng or random.Random()
        #: Told of every HTTP call: the action, ``ok``, ``throttled`` or ``error``, and its seconds.
        self.observer = observer

    def close(self) -> None:
        self.session.close()
        self.limiter.close()

    def __enter__(self) -> IotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the five operations ------------------------------------------------------------------

    def batch_check_device_names(self, product_key: str, devices: Iterable[str | tuple[str, str | None]]) -> CheckSubmitted:
        """Submit up to 10,000 names (optionally with nicknames) for checking; poll the ApplyId after.

        ``devices`` holds names, or ``(name, nickname)`` pairs, or objects with ``name`` and
        ``nickname`` attributes. With any nickname present the names go as ``DeviceNameList.N.*``.
        """
        pairs = [_as_pair(d) for d in devices]
        if not pairs:
            raise ValueError("no device names to check")
        if len(pairs) > MAX_NAMES_PER_CHECK:
            # The platform would silently drop the excess: refuse instead of losing names.
            raise ValueError(f"{len(pairs)} names in one check; at most {MAX_NAMES_PER_CHECK}, split them")
        form: dict[str, str] = {}
        if any(nickname for _, nickname in pairs):
            for n, (name, nickname) in enumerate(pairs, start=1):
                form[f"DeviceNameList.{n}.DeviceName"] = name
                if nickname:
                    form[f"DeviceNameList.{n}.DeviceNickname"] = nickname
        else:
            form = {f"DeviceName.{n}": name for n, (name, _) in enumerate(pairs, start=1)}
        try:
            body = self._call("BatchCheckDeviceNames", {"ProductKey": product_key}, form)
        except errors.BusinessError as exc:
            invalid = _refused_names(exc.data, dict(pairs))
            if not invalid:
                raise
            raise errors.NamesRefused(
                exc.message, invalid=invalid, code=exc.code, request_id=exc.request_id,
                http_status=exc.http_status, action=exc.action, data=exc.data,
            ) from None
        data = body.get("Data") or {}
        return CheckSubmitted(
            apply_id=_apply_id(data, "BatchCheckDeviceNames"),
            request_id=body.get("RequestId", ""),
            invalid_names=_names(data.get("InvalidDeviceNameList"), "InvalidDeviceName"),
            invalid_nicknames=_names(data.get("InvalidDeviceNicknameList"), "InvalidDeviceNickname"),
            # "RepeatDevieNameList": the typo is the platform's own.
            repeated_names=_names(data.get("RepeatedDeviceNameList"), "RepeatDevieNameList"),
            details=_details(data.get("InvalidDetailList"), "InvalidDetailList"),
        )

    def batch_register_device_with_apply_id(self, product_key: str, apply_id: int) -> int:
        """Ask the platform to create the devices of a checked ApplyId; creation runs on after this."""
        body = self._call("BatchRegisterDeviceWithApplyId", {"ProductKey": product_key, "ApplyId": str(apply_id)})
        return _apply_id(body.get("Data") or {}, "BatchRegisterDeviceWithApplyId")

    def batch_register_device(self, product_key: str, count: int) -> int:
        """Ask the platform to create ``count`` devices with names of its own; returns the ApplyId."""
        if not 1 <= count <= MAX_COUNT_PER_REGISTER:
            raise ValueError(f"count must be between 1 and {MAX_COUNT_PER_REGISTER}, not {count}")
        body = self._call("BatchRegisterDevice", {"ProductKey": product_key, "Count": str(count)})
        return _apply_id(body.get("Data") or {}, "BatchRegisterDevice")

    def query_batch_register_device_status(self, product_key: str, apply_id: int) -> BatchStatus:
        """Where the check or the creation of ``apply_id`` stands."""
        body = self._call("QueryBatchRegisterDeviceStatus", {"ProductKey": product_key, "ApplyId": str(apply_id)})
        data = body.get("Data") or {}
        try:
            status = ApplyStatus(data.get("Status", ""))
        except ValueError:
            raise errors.RequestError(
                f"unexpected Status {data.get('Status')!r}",
                request_id=body.get("RequestId", ""),
                action="QueryBatchRegisterDeviceStatus",
            ) from None
        return BatchStatus(
            status=status,
            valid=_names(data.get("ValidList"), "Name"),
            invalid=_names(data.get("InvalidList"), "Name"),
            # Lower-case inner key here, unlike BatchCheckDeviceNames: as the platform sends it.
            details=_details(data.get("InvalidDetailList"), "invalidDetailList"),
            request_id=body.get("RequestId", ""),
        )

    def query_page_by_apply_id(self, apply_id: int, page: int = 1, page_size: int = MAX_PAGE_SIZE) -> DevicePage:
        """One page of the devices created for ``apply_id`` (``page_size`` at most 50)."""
        if not 1 <= page_size <= MAX_PAGE_SIZE or page < 1:
            raise ValueError(f"page must be 1 or more and page_size 1 to {MAX_PAGE_SIZE}")
        body = self._call(
            "QueryPageByApplyId",
            {"ApplyId": str(apply_id), "CurrentPage": str(page), "PageSize": str(page_size)},
        )
        # Paging lives at the top level of this answer, not under Data.
        infos = (body.get("ApplyDeviceList") or {}).get("ApplyDeviceInfo") or []
        return DevicePage(
            page=int(body.get("Page", page)),
            page_size=int(body.get("PageSize", page_size)),
            page_count=int(body.get("PageCount", 0)),
            total=int(body.get("Total", 0)),
            devices=tuple(
                DeviceInfo(
                    name=d.get("DeviceName", ""),
                    iot_id=d.get("IotId", ""),
                    device_secret=d.get("DeviceSecret", ""),
                    device_id=d.get("DeviceId", ""),
                )
                for d in infos
            ),
        )

    def iter_devices_by_apply_id(self, apply_id: int, page_size: int = MAX_PAGE_SIZE) -> Iterator[DeviceInfo]:
        """Every device created for ``apply_id``, walking the pages in order."""
        return _every_page(lambda page: self.query_page_by_apply_id(apply_id, page, page_size), "devices")

    def query_product_list(self, page: int = 1, page_size: int = MAX_PRODUCT_PAGE_SIZE) -> ProductPage:
        """One page of the instance's products (``page_size`` at most 200)."""
        if not 1 <= page_size <= MAX_PRODUCT_PAGE_SIZE or page < 1:
            raise ValueError(f"page must be 1 or more and page_size 1 to {MAX_PRODUCT_PAGE_SIZE}")
        body = self._call("QueryProductList", {"CurrentPage": str(page), "PageSize": str(page_size)})
        data = body.get("Data") or {}
        infos = (data.get("List") or {}).get("ProductInfo") or []
        return ProductPage(
            page=int(data.get("CurrentPage", page)),
            page_size=int(data.get("PageSize", page_size)),
            page_count=int(data.get("PageCount", 0)),
            total=int(data.get("Total", 0)),
            products=tuple(
                ProductInfo(
                    product_key=p.get("ProductKey", ""),
                    name=p.get("ProductName", ""),
                    node_type=int(p.get("NodeType", 0) or 0),
                    device_count=int(p.get("DeviceCount", 0) or 0),
                )
                for p in infos
            ),
        )

    def iter_products(self, page_size: int = MAX_PRODUCT_PAGE_SIZE) -> Iterator[ProductInfo]:
        """Every product of the instance, walking the pages in order."""
        return _every_page(lambda page: self.query_product_list(page, page_size), "products")

    # -- the wire -----------------------------------------------------------------------------

    def _call(self, action: str, params: Mapping[str, str], form: Mapping[str, str] | None = None) -> dict:
        """Send ``action`` with retries; return the decoded JSON of a successful answer."""
        started = self.clock.monotonic()
        attempt = 0
        while True:
            attempt += 1
            self.limiter.acquire(action)
            sent = time.perf_counter()
            try:
                body = self._send(action, params, form or {})
            except errors.IotError as exc:
                self.limiter.went(action)
                self._observe(action, "throttled" if isinstance(exc, errors.ThrottledError) else "error", sent)
                if not self._should_retry(exc, action, attempt, started):
                    log.info("IoT Platform call failed: %s", exc, extra={"action": action, "code": exc.code})
                    raise
                delay = self.retry.delay(attempt, self.rng)
                log.info("IoT Platform call failed: %s; retry %d in %.2fs", exc, attempt, delay, extra={"action": action, "code": exc.code})
                if isinstance(exc, errors.ThrottledError):
                    self.limiter.refused(action)  # not counted: the retry takes the same slot back
                self.clock.sleep(delay)
            else:
                self.limiter.went(action)
                self._observe(action, "ok", sent)
                return body

    def _observe(self, action: str, outcome: str, sent: float) -> None:
        if self.observer is not None:
            self.observer(action, outcome, time.perf_counter() - sent)

    def _should_retry(self, exc: errors.IotError, action: str, attempt: int, started: float) -> bool:
        if not exc.retryable or attempt >= self.retry.max_attempts:
            return False
        if exc.may_have_taken_effect and action not in SAFE_TO_REPEAT:
            return False
        # Stop when the next wait would run past the deadline (the longest it could be).
        worst_next = min(self.retry.max_delay, self.retry.base_delay * 2 ** (attempt - 1))
        return self.clock.monotonic() - started + worst_next <= self.retry.deadline

    def _send(self, action: str, params: Mapping[str, str], form: Mapping[str, str]) -> dict:
        credentials = self.credentials.current()
        if self.signature == "v3":
            query, headers, body = self._signed_v3(action, params, form, credentials)
        else:
            query, headers, body = self._signed_v1(action, params, form, credentials)
        # Prepared here and handed to Session.send, as the official SDK does: no cookies, no
        # redirects (a signed call has one destination), and the URL built from encoded parts.
        request = requests.PreparedRequest()
        request.prepare_method("POST")
        request.url = f"{self._base_url}?{query}"
        request.prepare_headers({k: v for k, v in self.session.headers.items() if v is not None} | headers)
        request.prepare_cookies({})
        request.prepare_body(body, None)
        started = self.clock.monotonic()
        try:
            response = self.session.send(request, timeout=self.timeout, allow_redirects=False)
        except requests.exceptions.ConnectTimeout as exc:
            raise errors.TransportError(f"could not connect to {self.endpoint}: {_reason(exc)}", action=action) from None
        except requests.exceptions.ConnectionError as exc:
            # Refused or unresolvable: nothing reached the server. Reset mid-way: it may have.
            sent = not _never_connected(exc)
            raise errors.TransportError(
                f"connection to {self.endpoint} failed: {_reason(exc)}", action=action, may_have_taken_effect=sent
            ) from None
        except requests.exceptions.Timeout:
            raise errors.TransportError(
                f"no answer from {self.endpoint} within {self.timeout:g}s", action=action, may_have_taken_effect=True
            ) from None
        except requests.exceptions.RequestException as exc:
            # A body cut off mid-read, a broken encoding: the request was sent and may have run.
            raise errors.TransportError(
                f"the answer from {self.endpoint} broke off: {type(exc).__name__}", action=action, may_have_taken_effect=True
            ) from None
        elapsed = self.clock.monotonic() - started
        return self._decode(action, response, elapsed)

    def _signed_v1(
        self, action: str, params: Mapping[str, str], form: Mapping[str, str], credentials: Credentials
    ) -> tuple[str, dict[str, str], str | None]:
        """Signature version 1.0: the query string, the headers and the body of the call."""
        query = {
            "Format": "JSON",
            "Version": API_VERSION,
            "AccessKeyId": credentials.access_key_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0",
            "SignatureNonce": uuid.uuid4().hex,
            "Timestamp": self.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
            "RegionId": self.region_id,
            "Action": action,
            **params,
        }
        if self.instance_id:
            query["IotInstanceId"] = self.instance_id
        if credentials.security_token:
            # In the form body, signed with the rest: a URL reaches logs (urllib3's, a proxy's).
            form = {**form, "SecurityToken": credentials.security_token}
        query_pairs, form_pairs = encode_params(query), encode_params(form)
        signature = signature_for_encoded("POST", {**query_pairs, **form_pairs}, credentials.access_key_secret)
        headers = {"Accept": "application/json"}
        if form:
            headers["Content-Type"] = FORM_CONTENT_TYPE
        query_string = f"{'&'.join(query_pairs.values())}&Signature={percent_encode(signature)}"
        return query_string, headers, _form_body(form_pairs) if form else None

    def _signed_v3(
        self, action: str, params: Mapping[str, str], form: Mapping[str, str], credentials: Credentials
    ) -> tuple[str, dict[str, str], str | None]:
        """ACS3-HMAC-SHA256: the query string, the headers (Authorization included) and the body."""
        query = dict(params)
        if self.instance_id:
            query["IotInstanceId"] = self.instance_id
        body = _form_body(encode_params(form)) if form else None
        payload_hash = sha256_hex(body.encode() if body else b"")
        signed = {
            "host": self._host,
            "x-acs-action": action,
            "x-acs-version": API_VERSION,
            "x-acs-date": self.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
            "x-acs-signature-nonce": uuid.uuid4().hex,
            "x-acs-content-sha256": payload_hash,
        }
        if form:
            signed["content-type"] = FORM_CONTENT_TYPE
        if credentials.security_token:
            signed["x-acs-security-token"] = credentials.security_token
        names = sorted(signed)
        canonical = v3_canonical_request("POST", query.items(), signed.items(), names, payload_hash)
        signature = v3_sign(credentials.access_key_secret, v3_string_to_sign(canonical))
        headers = {"Accept": "application/json", **signed}
        headers["Authorization"] = v3_authorization(credentials.access_key_id, names, signature)
        return "&".join(encode_params(query).values()), headers, body

    def _decode(self, action: str, response: requests.Response, elapsed: float) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            message = f"HTTP {response.status_code} with a body that is not JSON ({response.headers.get('Content-Type', 'no content type')})"
            if response.status_code >= 400:
                # An error page from a proxy is worth quoting; a 2xx body may hold DeviceSecrets.
                message += f": {response.text[:200].strip()!r}"
            if response.status_code >= 500:
                raise errors.ServiceError(message, http_status=response.status_code, action=action, may_have_taken_effect=True)
            # A 2xx we cannot read may still have been carried out.
            raise errors.RequestError(
                message, http_status=response.status_code, action=action, may_have_taken_effect=response.status_code < 300
            )
        request_id = str(body.get("RequestId", ""))
        log.debug("%s -> HTTP %d in %.0f ms (RequestId %s)", action, response.status_code, elapsed * 1000, request_id)
        if response.status_code >= 400:
            code, message = str(body.get("Code", "")), str(body.get("Message", ""))
            if code == "SignatureDoesNotMatch":
                message = _without_string_to_sign(action, message)
            raise errors.gateway_error(response.status_code, code, message, request_id, action)
        if body.get("Success") is False:
            message = str(body.get("ErrorMessage") or body.get("Message") or "")
            data = body.get("Data") if isinstance(body.get("Data"), dict) else None
            raise errors.business_error(str(body.get("Code", "")), message, request_id, action, data)
        return body


def _session_for(endpoint: str) -> requests.Session:
    """A pooled session whose proxy and CA settings (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE…)
    are worked out once, here, by requests itself, instead of on every call (a scan of the whole
    environment each time; bench/bench_client.py measures it).

    A session passed to :class:`IotClient` instead is used as it is: its ``verify``, ``proxies``,
    ``headers`` and mounted adapters apply, but, as calls go through ``Session.send``, not its
    ``auth``, ``params`` or cookies, nor a CA bundle named only in the environment."""
    session = requests.Session()
    settings = session.merge_environment_settings(f"{endpoint}/", {}, None, None, None)
    session.proxies.update(settings["proxies"])
    session.verify = settings["verify"]
    session.trust_env = False
    return session


FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"


def _form_body(encoded: Mapping[str, str]) -> str:
    """The form body from the encoded pairs, with a space as "+" (as ``urlencode`` and the official
    SDK send it): "%20" in an encoded pair can only stand for a space, a "%" being "%25"."""
    return "&".join(encoded.values()).replace("%20", "+")


def _as_pair(device: str | tuple[str, str | None] | object) -> tuple[str, str | None]:
    if isinstance(device, str):
        return device, None
    if isinstance(device, tuple):
        name, nickname = device
        return name, nickname
    return getattr(device, "name"), getattr(device, "nickname", None)


def _apply_id(data: Mapping, action: str) -> int:
    try:
        return int(data["ApplyId"])
    except (KeyError, TypeError, ValueError):
        # The platform said Success: the call was carried out, we just cannot tell its ApplyId.
        raise errors.RequestError("the answer carries no ApplyId", action=action, may_have_taken_effect=True) from None


def _names(wrapper: Mapping | None, key: str) -> tuple[str, ...]:
    """The list inside the platform's ``{"Key": [...]}`` wrappers; absent means empty."""
    if not isinstance(wrapper, Mapping):
        return ()
    return tuple(str(v) for v in wrapper.get(key) or ())


def _details(wrapper: Mapping | None, key: str) -> tuple[InvalidDevice, ...]:
    if not isinstance(wrapper, Mapping):
        return ()
    return tuple(
        InvalidDevice(name=str(d.get("DeviceName", "")), nickname=d.get("NickName") or None, reason=str(d.get("ErrorMsg", "")))
        for d in wrapper.get(key) or ()
    )


def _refused_names(data: Mapping, nicknames: Mapping[str, str | None]) -> tuple[InvalidDevice, ...]:
    """Every name a refused BatchCheckDeviceNames listed, with the most specific reason it gave."""
    found: dict[str, InvalidDevice] = {}
    for detail in _details(data.get("InvalidDetailList"), "InvalidDetailList"):
        found[detail.name] = detail
    for name in _names(data.get("InvalidDeviceNameList"), "InvalidDeviceName"):
        found.setdefault(name, InvalidDevice(name, nicknames.get(name), "invalid device name"))
    for name in _names(data.get("RepeatedDeviceNameList"), "RepeatDevieNameList"):
        found.setdefault(name, InvalidDevice(name, nicknames.get(name), "the name is repeated in the list"))
    by_nickname = {nickname: name for name, nickname in nicknames.items() if nickname}
    for nickname in _names(data.get("InvalidDeviceNicknameList"), "InvalidDeviceNickname"):
        name = by_nickname.get(nickname, nickname)
        found.setdefault(name, InvalidDevice(name, nickname, "invalid nickname"))
    return tuple(found.values())


def _without_string_to_sign(action: str, message: str) -> str:
    """The platform's answer to a wrong secret quotes its string to sign: worth comparing when
    debugging the signer (``-vv``), noise in a warning or an error a person reads."""
    said, marker, string_to_sign = message.partition("server string to sign is:")
    if marker:
        log.debug("%s: IoT Platform's string to sign: %s", action, string_to_sign)
    return f"{said.strip() or 'the signature does not match'} Check ALIBABA_CLOUD_ACCESS_KEY_SECRET."


def _never_connected(exc: requests.exceptions.ConnectionError) -> bool:
    """Whether a connection error happened before the request could be sent."""
    text = repr(exc)
    return any(marker in text for marker in ("NewConnectionError", "NameResolutionError", "Connection refused"))


def _reason(exc: Exception) -> str:
    """A short cause, without the URL (which carries the signature and the key id): the system's
    words (``Connection refused``, ``Name or service not known``) when there are some."""
    text = str(exc.args[0] if exc.args else exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno[1].strip()
    if "(Caused by " in text:
        cause = text.split("(Caused by ", 1)[-1].rstrip(")")
        return re.sub(r"^\w+\(.*?\): ", "", cause.split("(", 1)[0] if cause.startswith(("ConnectTimeout", "ReadTimeout")) else cause)[:160]
    return type(exc).__name__


def _every_page(fetch: Callable[[int], Any], items: str) -> Iterator[Any]:
    """The ``items`` of every page ``fetch(page)`` answers, in order, up to its ``page_count``
    (or the first empty page)."""
    page = 1
    while True:
        result = fetch(page)
        found = getattr(result, items)
        yield from found
        if page >= result.page_count or not found:
            return
        page += 1
