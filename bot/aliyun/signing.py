"""Alibaba Cloud's two request signatures for RPC APIs: version 1.0 (HMAC-SHA1, parameters) and
V3 (ACS3-HMAC-SHA256, an ``Authorization`` header).

Both the client (to sign) and the emulator (to verify) use these functions, so that one reading of
each algorithm serves both; the tests hold them to the published test vectors and to the official
SDKs' signers.

Version 1.0, as documented (alibaba-iot-api.md, "Signature"):

1. every parameter of the query and of the form body except ``Signature``, empty values included;
2. sorted by name;
3. names and values percent-encoded as UTF-8 per RFC 3986 (``%20`` for a space, ``%2A`` for ``*``,
   ``~`` left alone);
4. joined as ``name=value`` pairs with ``&``;
5. ``METHOD & encode("/") & encode(canonical)``;
6. base64 of HMAC-SHA1 keyed with ``AccessKeySecret + "&"``.

V3 (alibaba-iot-api.md, "Signature V3"): a canonical request of the method, ``/``, the sorted and
encoded query, the signed headers (``name:value`` lines, then their names ``;``-joined) and the
hex SHA-256 of the body; its hex SHA-256 after ``ACS3-HMAC-SHA256\n`` is the string to sign, and
the signature is the hex HMAC-SHA256 of that keyed with the secret alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import quote

__all__ = [
    "percent_encode", "encode_params", "canonical_query", "string_to_sign", "sign", "signature_for", "signature_for_encoded",
    "V3_ALGORITHM", "sha256_hex", "v3_canonical_query", "v3_canonical_headers", "v3_canonical_request",
    "v3_string_to_sign", "v3_sign", "v3_authorization", "parse_v3_authorization",
]

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


# -- V3: ACS3-HMAC-SHA256 -------------------------------------------------------------------------

V3_ALGORITHM = "ACS3-HMAC-SHA256"


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256: the payload hash (``x-acs-content-sha256``) and the canonical request's."""
    return hashlib.sha256(data).hexdigest()


def v3_canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """The decoded query's pairs, sorted by name, encoded per RFC 3986, ``name=value`` joined by ``&``
    (an empty value is ``name=``; no query is the empty string)."""
    return "&".join(f"{percent_encode(name)}={percent_encode(value)}" for name, value in sorted(pairs))


def v3_canonical_headers(headers: Iterable[tuple[str, str]], signed: Sequence[str]) -> str:
    """``name:value\n`` for each signed header, names lower-case and values trimmed; a header that
    comes more than once has its values sorted and joined by ``,``."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value.strip())
    return "".join(f"{name}:{','.join(sorted(values.get(name, ())))}\n" for name in signed)


def v3_canonical_request(
    method: str, query: Iterable[tuple[str, str]], headers: Iterable[tuple[str, str]], signed: Sequence[str], payload_hash: str
) -> str:
    """``METHOD\n/\nquery\nheaders\nsigned;names\npayload-hash``; ``signed`` lower-case and sorted."""
    return "\n".join(
        [method.upper(), "/", v3_canonical_query(query), v3_canonical_headers(headers, signed), ";".join(signed), payload_hash]
    )


def v3_string_to_sign(canonical_request: str) -> str:
    return f"{V3_ALGORITHM}\n{sha256_hex(canonical_request.encode())}"


def v3_sign(secret: str, text: str) -> str:
    """Hex HMAC-SHA256 of ``text`` keyed with the secret itself (no ``&``, unlike version 1.0)."""
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def v3_authorization(access_key_id: str, signed: Sequence[str], signature: str) -> str:
    """The ``Authorization`` header's value."""
    return f"{V3_ALGORITHM} Credential={access_key_id},SignedHeaders={';'.join(signed)},Signature={signature}"


def parse_v3_authorization(value: str) -> tuple[str, tuple[str, ...], str]:
    """``(AccessKeyId, signed header names, signature)`` of an ``Authorization`` header; ValueError
    naming what is wrong when it is not ``ACS3-HMAC-SHA256 Credential=…,SignedHeaders=…,Signature=…``."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != V3_ALGORITHM:
        raise ValueError(f"the Authorization header does not start with {V3_ALGORITHM}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, field = part.strip().partition("=")
        if not sep:
            raise ValueError(f"{part.strip()!r} in the Authorization header is not name=value")
        fields[name] = field
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if not fields.get(name)]
    if missing:
        raise ValueError(f"the Authorization header lacks {', '.join(missing)}")
    return fields["Credential"], tuple(fields["SignedHeaders"].split(";")), fields["Signature"]
