"""Signature version 1.0 (HMAC-SHA1) for Alibaba Cloud RPC APIs.

Both the client (to sign) and the emulator (to verify) use these functions, so that one reading of
the algorithm serves both; the tests hold it to the published test vectors and to the official
SDK's signer. Steps, as documented (alibaba-iot-api.md, "Signature"):

1. every parameter of the query and of the form body except ``Signature``, empty values included;
2. sorted by name;
3. names and values percent-encoded as UTF-8 per RFC 3986 (``%20`` for a space, ``%2A`` for ``*``,
   ``~`` left alone);
4. joined as ``name=value`` pairs with ``&``;
5. ``METHOD & encode("/") & encode(canonical)``;
6. base64 of HMAC-SHA1 keyed with ``AccessKeySecret + "&"``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from urllib.parse import quote

__all__ = ["percent_encode", "encode_params", "canonical_query", "string_to_sign", "sign", "signature_for", "signature_for_encoded"]

_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def percent_encode(value: str) -> str:
    """RFC 3986 encoding: only ``A-Z a-z 0-9 - _ . ~`` stay as they are."""
    if _UNRESERVED.fullmatch(value):
        return value  # most names and values: nothing to encode, and no byte-by-byte pass to find that out
    return quote(value, safe="-_.~", encoding="utf-8")


def encode_params(params: Mapping[str, str]) -> dict[str, str]:
    """Each parameter as its encoded ``name=value`` pair, keyed by its name: encoded once, then
    used both for the signature and on the wire."""
    return {name: f"{percent_encode(name)}={percent_encode(value)}" for name, value in params.items()}


def canonical_query(params: Mapping[str, str]) -> str:
    """The sorted, encoded ``name=value&…`` string, without ``Signature``."""
    return _canonical(encode_params(params))


def _canonical(encoded: Mapping[str, str]) -> str:
    return "&".join(encoded[name] for name in sorted(encoded) if name != "Signature")


def _to_sign(method: str, canonical: str) -> str:
    # The canonical string is already encoded: it holds unreserved characters and "%", "=", "&"
    # only, so encoding it again is these three substitutions ("%" first).
    again = canonical.replace("%", "%25").replace("=", "%3D").replace("&", "%26")
    return f"{method.upper()}&%2F&{again}"


def string_to_sign(method: str, params: Mapping[str, str]) -> str:
    """``GET&%2F&…`` or ``POST&%2F&…``: the method is part of what is signed."""
    return _to_sign(method, canonical_query(params))


def sign(secret: str, text: str) -> str:
    """Base64 HMAC-SHA1 of ``text`` keyed with ``secret + "&"``."""
    digest = hmac.new(f"{secret}&".encode(), text.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_for(method: str, params: Mapping[str, str], secret: str) -> str:
    """The ``Signature`` value for a request with ``params`` (query and form body together)."""
    return sign(secret, string_to_sign(method, params))


def signature_for_encoded(method: str, encoded: Mapping[str, str], secret: str) -> str:
    """The same from :func:`encode_params`'s pairs (of the query and the form body together)."""
    return sign(secret, _to_sign(method, _canonical(encoded)))
