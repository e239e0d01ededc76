"""The API gateway in front of :class:`~bot.standins.emulator.backend.IotBackend`: the wire format, without HTTP.

:meth:`Gateway.handle` takes a request's method and decoded parameters (query and form body) and
returns ``(HTTP status, JSON object)``, doing what the platform's gateway does, in this order:

1. common parameters present (``MissingParameter``), a known ``Action`` of version 2018-01-20
   (``InvalidApi.NotFound``); for a V3 call (an ``ACS3-HMAC-SHA256`` Authorization header or an
   ``x-acs-action`` header and no ``Action`` parameter) the action and version come from ``x-acs-action`` / ``x-acs-version``
   and the Authorization header must be well formed and sign the ``x-acs-*`` headers
   (``IncompleteSignature``);
2. the AccessKeyId, the time's format and its 15-minute window (``Timestamp`` or ``x-acs-date``),
   the payload hash (V3), the signature (verified with :mod:`bot.aliyun.signing`, so the client and
   the emulator share one reading of each algorithm), then the nonce and, for a key that has one,
   the security token (``SecurityToken`` or ``x-acs-security-token``);
3. the account's QPS quota per action on a sliding one-second window of the injected clock;
4. injected faults (:class:`FaultPlan`), then the action's own required parameters;
5. the backend, whose ``Data`` is wrapped in the success envelope, or whose
   :class:`~bot.standins.emulator.backend.BusinessFault` becomes HTTP 200 with ``Success: false``.

Envelopes and codes follow alibaba-iot-api.md ("Responses", "Errors").
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl

from bot.aliyun.signing import (
    V3_ALGORITHM,
    parse_v3_authorization,
    sha256_hex,
    signature_for,
    string_to_sign,
    v3_canonical_request,
    v3_sign,
    v3_string_to_sign,
)
from bot.clock import Clock
from bot.aliyun.ratelimit import DEFAULT_QPS
from bot.standins.emulator.backend import BusinessFault, IotBackend

__all__ = ["API_VERSION", "FaultPlan", "Gateway", "Response", "device_name_entries", "decode_params"]

API_VERSION = "2018-01-20"
#: How far a request's Timestamp may be from the server's clock, and so how long nonces are kept.
TIMESTAMP_WINDOW = timedelta(minutes=15)
SIGNATURE_MISMATCH_PREFIX = (
    "Specified signature is not matched with our calculation. server string to sign is:"
)
THROTTLED_MESSAGE = "Request was denied due to user flow control."

# Sent by every signed RPC call. RegionId is not among them: the newer SDK omits it. Format is:
# the platform would default to XML, which the emulator does not speak, so it asks for JSON loudly.
COMMON_PARAMETERS = (
    "Action",
    "Version",
    "Format",
    "AccessKeyId",
    "SignatureMethod",
    "SignatureVersion",
    "SignatureNonce",
    "Timestamp",
    "Signature",
)

#: Headers a V3 call must send and sign (alibaba-iot-api.md, "Signature V3").
V3_SIGNED_HEADERS = ("x-acs-action", "x-acs-version", "x-acs-date", "x-acs-signature-nonce", "x-acs-content-sha256")

Response = tuple[int, dict[str, object]]


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Trouble to inject into answered calls, after authentication and quotas.

    ``error_rate``: share of calls answered 500 ``InternalError`` or 503 ``ServiceUnavailable``;
    ``errors_take_effect``: share of those errors sent after the backend has acted (the call did
    happen, only the answer was lost); ``throttle_rate``: share answered ``Throttling.User``
    although under quota; ``latency``: seconds added to every call, with ``clock.sleep`` (a
    ManualClock just moves on) or, with ``real_sleep``, with :func:`time.sleep`. ``actions``: only
    calls of these Actions get the errors and throttling (all of them when ``None``).
    """

    error_rate: float = 0.0
    throttle_rate: float = 0.0
    latency: float = 0.0
    seed: int | None = None
    errors_take_effect: float = 0.0
    real_sleep: bool = False
    actions: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for name in ("error_rate", "throttle_rate", "errors_take_effect"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share between 0 and 1")
        if self.latency < 0:
            raise ValueError("latency cannot be negative")


class _GatewayError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _missing(name: str) -> _GatewayError:
    return _GatewayError(
        400,
        "MissingParameter",
        f'The input parameter "{name}" that is mandatory for processing this request is not supplied.',
    )


@dataclasses.dataclass(frozen=True)
class _Api:
    required: tuple[str, ...]
    run: Callable[[IotBackend, Mapping[str, str]], dict[str, object]]
    top_level: bool = False  # QueryPageByApplyId: fields next to Success, not under Data


def device_name_entries(params: Mapping[str, str]) -> list[tuple[str | None, str | None]]:
    """``(DeviceName, DeviceNickname)`` pairs from ``DeviceNameList.N.*`` or, if there is none,
    ``DeviceName.N``, in order of N (doc 69482: when both are sent, DeviceNameList wins)."""
    listed: dict[int, dict[str, str]] = {}
    plain: dict[int, str] = {}
    for key, value in params.items():
        if match := re.fullmatch(r"DeviceNameList\.(\d+)\.(DeviceName|DeviceNickname)", key):
            listed.setdefault(int(match[1]), {})[match[2]] = value
        elif match := re.fullmatch(r"DeviceName\.(\d+)", key):
            plain[int(match[1])] = value
    if listed:
        return [
            (fields.get("DeviceName"), fields.get("DeviceNickname")) for _, fields in sorted(listed.items())
        ]
    return [(name, None) for _, name in sorted(plain.items())]


def _instance(params: Mapping[str, str]) -> str | None:
    return params.get("IotInstanceId") or None


APIS: Mapping[str, _Api] = {
    "BatchCheckDeviceNames": _Api(
        ("ProductKey",),
        lambda b, p: b.batch_check_device_names(
            p["ProductKey"], device_name_entries(p), iot_instance_id=_instance(p)
        ),
    ),
    "BatchRegisterDeviceWithApplyId": _Api(
        ("ProductKey", "ApplyId"),
        lambda b, p: b.batch_register_device_with_apply_id(
            p["ProductKey"], p["ApplyId"], iot_instance_id=_instance(p)
        ),
    ),
    "BatchRegisterDevice": _Api(
        ("ProductKey", "Count"),
        lambda b, p: b.batch_register_device(p["ProductKey"], p["Count"], iot_instance_id=_instance(p)),
    ),
    "QueryBatchRegisterDeviceStatus": _Api(
        ("ProductKey", "ApplyId"),
        lambda b, p: b.query_batch_register_device_status(
            p["ProductKey"], p["ApplyId"], iot_instance_id=_instance(p)
        ),
    ),
    "QueryPageByApplyId": _Api(
        ("ApplyId",),
        lambda b, p: b.query_page_by_apply_id(
            p["ApplyId"],
            current_page=p.get("CurrentPage"),
            page_size=p.get("PageSize"),
            iot_instance_id=_instance(p),
        ),
        top_level=True,
    ),
    "QueryProductList": _Api(
        ("CurrentPage", "PageSize"),
        lambda b, p: b.query_product_list(p["CurrentPage"], p["PageSize"], iot_instance_id=_instance(p)),
    ),
}


def decode_params(
    query_string: str, body: bytes = b"", content_type: str | None = None
) -> list[tuple[str, str]]:
    """Query and form-body parameters, decoded: ``%XX`` as UTF-8, and ``+`` as a space (the SDK's
    form bodies use it; its query strings send ``%20``). A body that is not a form is ignored."""
    params = parse_qsl(query_string, keep_blank_values=True, encoding="utf-8", errors="replace")
    if body and (content_type or "").lower().startswith("application/x-www-form-urlencoded"):
        text = body.decode("utf-8", errors="replace")
        params += parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="replace")
    return params


@dataclasses.dataclass(frozen=True)
class _Call:
    """One request as the gateway reads it: the query apart (V3 signs it alone), every parameter
    together, the headers lower-cased, the raw body (V3 signs its hash)."""

    method: str
    query: list[tuple[str, str]]
    params: dict[str, str]
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str:
        return next((value.strip() for key, value in self.headers if key == name), "")

    @property
    def v3(self) -> bool:
        # The older SDK sends x-acs-action beside its Action parameter: the parameter decides.
        signed_v3 = self.header("authorization").startswith(V3_ALGORITHM)
        return signed_v3 or ("Action" not in self.params and bool(self.header("x-acs-action")))


class Gateway:
    """Signature, credentials, clock, nonce, quotas and faults in front of the backend.

    ``credentials`` maps AccessKeyIds to their secrets; all belong to one account, which is what
    the QPS quotas are counted against. ``security_tokens`` maps the AccessKeyIds that stand for
    temporary (STS) credentials to the token each call with them must carry. ``calls`` counts requests per Action (whatever became of
    them) and ``outcomes`` per ``(Action, "Success" or error code)``. Thread-safe.
    """

    def __init__(
        self,
        backend: IotBackend,
        clock: Clock,
        credentials: Mapping[str, str],
        *,
        quotas: Mapping[str, float] = DEFAULT_QPS,
        enforce_quotas: bool = True,
        faults: FaultPlan | None = None,
        security_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self._clock = clock
        self.credentials = dict(credentials)
        #: AccessKeyIds that are temporary credentials, with the security token each must send.
        self.security_tokens = dict(security_tokens or {})
        self.quotas = dict(quotas)
        self.enforce_quotas = enforce_quotas
        self._lock = threading.Lock()
        self._nonces: dict[tuple[str, str], datetime] = {}
        self._nonce_order: collections.deque[tuple[datetime, tuple[str, str]]] = collections.deque()
        self._windows: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.calls: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.faults = faults or FaultPlan()

    @property
    def faults(self) -> FaultPlan:
        """The fault plan in force; assign a new one at any time (its seed restarts the draws)."""
        return self._faults

    @faults.setter
    def faults(self, plan: FaultPlan) -> None:
        with self._lock:
            self._faults = plan
            self._fault_rng = random.Random(plan.seed)

    def reset_counts(self) -> None:
        """Forget ``calls`` and ``outcomes`` (a benchmark's warm-up, say)."""
        with self._lock:
            self.calls.clear()
            self.outcomes.clear()

    def handle_raw(
        self,
        method: str,
        query_string: str,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Response:
        """:meth:`handle` for an undecoded query string and body (and the headers, for V3)."""
        query = parse_qsl(query_string, keep_blank_values=True, encoding="utf-8", errors="replace")
        form = decode_params("", body, content_type)
        return self.handle(method, query, form, headers=headers, body=body)

    def handle(
        self,
        method: str,
        query: Iterable[tuple[str, str]],
        form: Iterable[tuple[str, str]] = (),
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Response:
        """Answer one call: ``(HTTP status, JSON object)``. Form values win over query values of the
        same name (no SDK sends both). ``headers`` and the raw ``body`` matter to V3 calls only."""
        query, headers = list(query), [(name.lower(), value) for name, value in headers]
        params = dict(query)
        params.update(form)
        call = _Call(method.upper(), query, params, headers, body)
        action = call.header("x-acs-action") if call.v3 else params.get("Action", "")
        request_id = str(uuid.uuid4()).upper()
        with self._lock:
            self.calls[action] += 1
            plan = self._faults
        if plan.latency:
            (time.sleep if plan.real_sleep else self._clock.sleep)(plan.latency)
        try:
            status, answer = 200, self._answer(call, action, request_id)
            outcome = "Success" if answer["Success"] else str(answer["Code"])
        except _GatewayError as error:
            status, outcome = error.status, error.code
            region = params.get("RegionId") or "cn-shanghai"
            answer = {
                "RequestId": request_id,
                "HostId": f"iot.{region}.aliyuncs.com",
                "Code": error.code,
                "Message": error.message,
                "Recommend": f"https://api.aliyun.com/troubleshoot?q={error.code}&product=Iot",
            }
        with self._lock:
            self.outcomes[(action, outcome)] += 1
        return status, answer

    # ------------------------------------------------------------------------------ the steps

    def _answer(self, call: _Call, action: str, request_id: str) -> dict[str, object]:
        params = call.params
        if call.v3:
            version = call.header("x-acs-version")
            if not action:
                raise _missing("x-acs-action")
        else:
            for name in COMMON_PARAMETERS:
                if name not in params:
                    raise _missing(name)
            if params["Format"].lower() != "json":
                raise _GatewayError(400, "MissingParameter", 'The emulator answers only "Format=JSON".')
            version = params["Version"]
        api = APIS.get(action) if version == API_VERSION else None
        if api is None:
            raise _GatewayError(
                404, "InvalidApi.NotFound", "Specified api is not found, please check your url and method."
            )
        if call.v3:
            self._authenticate_v3(call)
        else:
            self._authenticate(call.method, params)
        self._throttle(action)
        errors_after = self._draw_faults(action)
        for name in api.required:
            if name not in params:
                raise _missing(name)
        body: dict[str, object] = {"RequestId": request_id}
        try:
            data = api.run(self.backend, params)
        except BusinessFault as fault:
            body.update(Success=False, Code=fault.code, ErrorMessage=fault.message)
            if fault.data is not None:
                body["Data"] = fault.data
        else:
            body["Success"] = True
            if api.top_level:
                body.update(data)
            else:
                body["Data"] = data
        if errors_after is not None:
            raise errors_after  # the backend has acted; only the answer is lost
        return body

    def _authenticate(self, method: str, params: Mapping[str, str]) -> None:
        secret = self._secret(params["AccessKeyId"])
        now = self._check_time(params["Timestamp"])
        # Every parameter but Signature is signed, empty ones included (the SDK's SignatureType=).
        signed = {name: value for name, value in params.items() if name != "Signature"}
        expected = signature_for(method, signed, secret)
        if not hmac.compare_digest(expected.encode(), params["Signature"].encode()):
            # The SDK compares the text after the colon with its own StringToSign to tell a wrong
            # secret from a wrong canonicalisation: no space may follow the colon.
            raise _GatewayError(
                400, "SignatureDoesNotMatch", SIGNATURE_MISMATCH_PREFIX + string_to_sign(method, signed)
            )
        self._use_nonce(params["AccessKeyId"], params["SignatureNonce"], now)
        self._check_token(params["AccessKeyId"], params.get("SecurityToken"))

    def _authenticate_v3(self, call: _Call) -> None:
        try:
            key_id, signed, signature = parse_v3_authorization(call.header("authorization"))
        except ValueError as error:
            raise _GatewayError(400, "IncompleteSignature", f"The request signature is incomplete: {error}.") from None
        unsigned = [name for name in V3_SIGNED_HEADERS if name not in signed or not call.header(name)]
        if call.header("x-acs-security-token") and "x-acs-security-token" not in signed:
            unsigned.append("x-acs-security-token")
        if unsigned or list(signed) != sorted(signed):
            what = f"{', '.join(unsigned)} must be sent and signed" if unsigned else "SignedHeaders must be sorted"
            raise _GatewayError(400, "IncompleteSignature", f"The request signature is incomplete: {what}.")
        secret = self._secret(key_id)
        now = self._check_time(call.header("x-acs-date"))
        payload_hash = sha256_hex(call.body)
        if call.header("x-acs-content-sha256") != payload_hash:
            raise _GatewayError(
                400, "SignatureDoesNotMatch", "The x-acs-content-sha256 header is not the SHA-256 of the request body."
            )
        canonical = v3_canonical_request(call.method, call.query, call.headers, signed, payload_hash)
        to_sign = v3_string_to_sign(canonical)
        if not hmac.compare_digest(v3_sign(secret, to_sign).encode(), signature.encode()):
            raise _GatewayError(400, "SignatureDoesNotMatch", SIGNATURE_MISMATCH_PREFIX + to_sign)
        self._use_nonce(key_id, call.header("x-acs-signature-nonce"), now)
        self._check_token(key_id, call.header("x-acs-security-token") or None)

    def _secret(self, access_key_id: str) -> str:
        secret = self.credentials.get(access_key_id)
        if secret is None:
            raise _GatewayError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        return secret

    def _check_time(self, text: str) -> datetime:
        """The server's now, once ``text`` (``YYYY-MM-DDThh:mm:ssZ``) is found within the window."""
        try:
            stamp = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        except ValueError:
            raise _GatewayError(
                400, "InvalidTimeStamp.Format", "Specified time stamp or date value is not well formatted."
            ) from None
        now = self._clock.now()
        if abs(now - stamp) > TIMESTAMP_WINDOW:
            raise _GatewayError(
                400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired."
            )
        return now

    def _check_token(self, access_key_id: str, token: str | None) -> None:
        """A key with a security token (temporary credentials) must send it; others must not."""
        expected = self.security_tokens.get(access_key_id)
        if expected is None and token is None:
            return
        if token is None:
            raise _GatewayError(
                400, "InvalidSecurityToken.Malformed", "The security token you provided is missing or malformed."
            )
        if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
            raise _GatewayError(
                400, "InvalidSecurityToken.MismatchWithAccessKey", "The security token does not match the access key."
            )

    def _use_nonce(self, access_key_id: str, nonce: str, now: datetime) -> None:
        key = (access_key_id, nonce)
        with self._lock:
            # A nonce older than the Timestamp window cannot come back: its request would be expired.
            while self._nonce_order and now - self._nonce_order[0][0] > TIMESTAMP_WINDOW:
                self._nonces.pop(self._nonce_order.popleft()[1], None)
            if key in self._nonces:
                raise _GatewayError(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
            self._nonces[key] = now
            self._nonce_order.append((now, key))

    def _throttle(self, action: str) -> None:
        quota = self.quotas.get(action)
        if not self.enforce_quotas or quota is None:
            return
        now = self._clock.monotonic()
        with self._lock:
            window = self._windows[action]
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= quota:
                raise _GatewayError(400, "Throttling.User", THROTTLED_MESSAGE)
            window.append(now)

    def _draw_faults(self, action: str) -> _GatewayError | None:
        """Raise an injected fault now, or return one to raise after the backend has acted."""
        with self._lock:
            plan, rng = self._faults, self._fault_rng
            if plan.actions is not None and action not in plan.actions:
                return None
            throttled = plan.throttle_rate > 0 and rng.random() < plan.throttle_rate
            failed = plan.error_rate > 0 and rng.random() < plan.error_rate
            after = failed and rng.random() < plan.errors_take_effect
            unavailable = failed and rng.random() < 0.5
        if throttled:
            raise _GatewayError(400, "Throttling.User", THROTTLED_MESSAGE)
        if not failed:
            return None
        error = (
            _GatewayError(
                503, "ServiceUnavailable", "The request has failed due to a temporary failure of the server."
            )
            if unavailable
            else _GatewayError(
                500, "InternalError", "The request processing has failed due to some unknown error."
            )
        )
        if after:
            return error
        raise error
