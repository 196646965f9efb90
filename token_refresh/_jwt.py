"""JWT payload decoding without signature checks, as lenient as the seed's."""

from __future__ import annotations

import binascii
import json
import math
import re

_SESSION_INGRESS_PREFIX = "sk-ant-si-"

# Node's base64url decoder reads each UTF-16 code unit's low byte, skips bytes
# outside both alphabets and stops at the first "=": "a.b$c=junk.c" decodes
# like "a.bc.c", and an astral character (a surrogate ending in 0x3D) ends it.
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/\-_]")


def _refuse_constant(name: str) -> object:
    # JSON.parse has no NaN or Infinity; Python's json accepts them by default.
    raise ValueError(f"JSON constant {name} is not allowed")


def _parse_int(text: str) -> int | float:
    # Python refuses int literals over 4300 digits; JSON.parse reads them as
    # doubles (Infinity when out of range), which float() does too.
    try:
        return int(text)
    except ValueError:
        return float(text)


# One decoder for every call: json.loads(..., parse_int=...) builds a new one each time.
_JSON = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_parse_int)


def _decode_base64url(segment: str) -> bytes:
    """Decode like Node's ``Buffer.from(segment, "base64url")``: never raises."""
    low_bytes = segment.encode("utf-16-le", "surrogatepass")[0::2]
    text = _NOT_BASE64.sub(b"", low_bytes.partition(b"=")[0])
    text = text.replace(b"-", b"+").replace(b"_", b"/")
    if len(text) % 4 == 1:
        # A lone trailing character carries fewer than 8 bits: Node drops it.
        text = text[:-1]
    return binascii.a2b_base64(text + b"=" * (-len(text) % 4))


def decode_jwt_payload(token: str) -> object | None:
    """Return a JWT's parsed payload without verifying it, or None if malformed.

    A leading ``sk-ant-si-`` session-ingress prefix is stripped first. Never
    raises on a ``str``; anything else (``bytes`` too) is a TypeError, as the
    seed throws.
    """
    if not isinstance(token, str):  # callers without type checking
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    jwt = token.removeprefix(_SESSION_INGRESS_PREFIX)
    parts = jwt.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    text = _decode_base64url(parts[1]).decode("utf-8", errors="replace")
    try:
        payload: object = _JSON.decode(text)
    except (ValueError, RecursionError):
        return None
    return payload


def decode_jwt_expiry(token: str) -> float | int | None:
    """Return a JWT's ``exp`` claim (Unix seconds), or None if it has no usable one.

    ``exp`` must be a finite real number: booleans, strings, NaN and
    infinities are "no expiry", as in the seed. A ``token`` that is not a
    ``str`` is a TypeError.
    """
    payload = decode_jwt_payload(token)
    if not isinstance(payload, dict):
        return None
    return finite_number(payload.get("exp"))


def finite_number(value: object) -> float | int | None:
    """A JSON number that is a finite real (never a bool), as it is; else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return None
    return value if finite else None
