"""What can go wrong when calling IoT Platform, grouped by what the caller should do::

    IotError                      root; every one carries code, message, request_id, http_status
    ├── TransportError            no answer at all (timeout, refused, reset)          retry may help
    ├── ThrottledError            Throttling.* : over the per-account QPS quota       retry helps
    ├── ServiceError              5xx, or iot.system.SystemException                  retry may help
    ├── AuthError                 credentials, token, signature, clock, nonce         fix the config
    ├── RequestError              MissingParameter, InvalidApi.NotFound, other 4xx    fix the request
    └── BusinessError             HTTP 200 with Success: false (iot.prod.*, iot.device.*) per code
        ├── NotFoundError         the product or the ApplyId does not exist
        └── NamesRefused          BatchCheckDeviceNames refused names at once; .invalid says why

``retryable`` says whether the same request sent again can succeed. ``may_have_taken_effect`` says
whether the server may have acted on a request that failed this way (a timeout after the request
was sent, a 5xx): an operation that must not run twice is only retried when it is ``False``.
"""

from __future__ import annotations


class IotError(Exception):
    """A failed IoT Platform call."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str = "",
        request_id: str = "",
        http_status: int | None = None,
        action: str = "",
        may_have_taken_effect: bool = False,
        data: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id
        self.http_status = http_status
        self.action = action
        self.may_have_taken_effect = may_have_taken_effect
        #: The ``Data`` of a business failure, when the platform sent one (it lists refused names).
        self.data = data or {}

    def __str__(self) -> str:
        parts = [f"{self.action}: " if self.action else "", f"{self.code}: " if self.code else "", self.message]
        if self.request_id:
            parts.append(f" (RequestId {self.request_id})")
        return "".join(parts)


class TransportError(IotError):
    """No HTTP answer: connection refused, reset, or timed out."""

    retryable = True


class ThrottledError(IotError):
    """The gateway refused the call before running it: over the account's QPS quota."""

    retryable = True


class ServiceError(IotError):
    """The platform failed on its side (5xx, ``iot.system.SystemException``); try again later."""

    retryable = True


class AuthError(IotError):
    """The platform did not accept who we are: key, secret, signature, clock or nonce."""


class RequestError(IotError):
    """The request itself is wrong (a missing parameter, an unknown action, another 4xx)."""


class BusinessError(IotError):
    """The platform ran the call and said no (``Success: false``); ``code`` tells why."""


class NotFoundError(BusinessError):
    """The product or the ApplyId named in the call does not exist."""


class NamesRefused(BusinessError):
    """BatchCheckDeviceNames refused the list at once; ``invalid`` says which names and why."""

    def __init__(self, message: str, *, invalid: tuple = (), **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.invalid = invalid


AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidTimeStamp.Expired",
        "InvalidTimeStamp.Format",
        "SignatureNonceUsed",
        "Forbidden.RAM",
        "InvalidSecurityToken.Malformed",
        "InvalidSecurityToken.Expired",
        "InvalidSecurityToken.MismatchWithAccessKey",
    }
)
NOT_FOUND_CODES = frozenset({"iot.prod.NotExistedProduct", "iot.device.DeviceApplyIsNotFound"})
RETRYABLE_BUSINESS_CODES = frozenset({"iot.system.SystemException"})


def gateway_error(status: int, code: str, message: str, request_id: str, action: str) -> IotError:
    """The exception for an HTTP 4xx/5xx answer with the gateway's ``Code``/``Message`` envelope."""
    kwargs = {"code": code, "request_id": request_id, "http_status": status, "action": action}
    if code.startswith("Throttling"):
        return ThrottledError(message, **kwargs)
    if status >= 500:
        return ServiceError(message, may_have_taken_effect=True, **kwargs)
    if code in AUTH_CODES:
        return AuthError(message, **kwargs)
    return RequestError(message, **kwargs)


def business_error(code: str, message: str, request_id: str, action: str, data: dict | None = None) -> IotError:
    """The exception for an HTTP 200 answer with ``Success: false``."""
    kwargs = {"code": code, "request_id": request_id, "http_status": 200, "action": action, "data": data}
    if code in RETRYABLE_BUSINESS_CODES:
        return ServiceError(message, may_have_taken_effect=True, **kwargs)
    if code in NOT_FOUND_CODES:
        return NotFoundError(message, **kwargs)
    return BusinessError(message, **kwargs)
