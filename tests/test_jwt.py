"""JWT payload and expiry decoding, pinned against a table recorded from real Node."""

from __future__ import annotations

import base64
import json
import math
import random
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from token_refresh import decode_jwt_expiry, decode_jwt_payload
from token_refresh._jwt import _decode_base64url

from conftest import b64url, make_jwt

PREFIX = "sk-ant-si-"
HEADER = b64url(b'{"alg":"none","typ":"JWT"}')
STANDARD = string.ascii_letters + string.digits + "+/"
URLSAFE = string.ascii_letters + string.digits + "-_"


def token_with_payload_text(text: str | bytes) -> str:
    """A token whose payload segment is ``text`` (raw JSON or not) in base64url."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return f"{HEADER}.{b64url(raw)}.c2ln"


# --- the table recorded from Node (tests/data/make_node_base64url.js) -----------------


def _untag_non_finite(obj: dict[str, Any]) -> Any:
    # The generator writes Infinity, which JSON cannot hold, as {"$number": "Infinity"}.
    if obj.keys() == {"$number"}:
        return float(obj["$number"])
    return obj


_TABLE_PATH = Path(__file__).parent / "data" / "node_base64url.json"
_TABLE: dict[str, Any] = json.loads(
    _TABLE_PATH.read_text(encoding="utf-8"), object_hook=_untag_non_finite
)
NODE_CASES: list[dict[str, Any]] = _TABLE["cases"]
NODE_IDS = [f"{index}-{ascii(case['input'])[1:25]}" for index, case in enumerate(NODE_CASES)]


def node_expiry(payload: object) -> float | int | None:
    """The seed's decodeJwtExpiry on a recorded payload, minus non-finite values (CONTRACT)."""
    if not isinstance(payload, dict):
        return None
    exp = payload.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
        return None
    return exp


class TestDecodeJwtPayload:
    def test_returns_the_parsed_payload(self) -> None:
        """A well-formed JWT yields its payload as a dict, signature unchecked."""
        payload = {"exp": 1_800_000_000, "sub": "user", "nested": {"a": [1, 2.5, None, True]}}
        assert decode_jwt_payload(make_jwt(payload)) == payload

    def test_non_ascii_payload_round_trips(self) -> None:
        """UTF-8 text in the payload (é, ☃, an emoji) decodes to the same characters."""
        raw = '{"name":"é☃😀"}'.encode()
        assert decode_jwt_payload(token_with_payload_text(raw)) == {"name": "é☃😀"}

    def test_session_ingress_prefix_is_stripped(self) -> None:
        """A token prefixed with sk-ant-si- decodes like the bare JWT."""
        payload = {"exp": 42}
        assert decode_jwt_payload(make_jwt(payload, prefix=PREFIX)) == payload

    def test_prefix_stripped_once_still_decodes(self) -> None:
        """A doubled prefix leaves one in the (unchecked) header segment: still decodes."""
        payload = {"exp": 42}
        assert decode_jwt_payload(make_jwt(payload, prefix=PREFIX * 2)) == payload

    def test_prefix_only_stripped_at_the_start(self) -> None:
        """sk-ant-si- inside the payload segment is decoded as base64, not removed."""
        segment = b64url(b'{"exp":42}')
        assert decode_jwt_payload(f"{HEADER}.{segment}.sig") == {"exp": 42}
        assert decode_jwt_payload(f"{HEADER}.{PREFIX}{segment}.sig") is None

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "no-dots-at-all",
            "only.two",
            "one.two.three.four",
            "a.b.c.d.e",
            f"{HEADER}.{b64url(b'{}')}",
            f"{HEADER}.{b64url(b'{}')}.sig.extra",
        ],
    )
    def test_requires_exactly_three_segments(self, token: str) -> None:
        """Anything but header.payload.signature is malformed."""
        assert decode_jwt_payload(token) is None

    def test_header_and_signature_may_be_empty(self) -> None:
        """Only the payload segment matters: empty header and signature are fine."""
        segment = b64url(b'{"exp":1}')
        assert decode_jwt_payload(f".{segment}.") == {"exp": 1}

    @pytest.mark.parametrize("token", ["a..c", "..", f"{PREFIX}{HEADER}..sig"])
    def test_empty_payload_segment_is_none(self, token: str) -> None:
        """An empty payload segment is malformed."""
        assert decode_jwt_payload(token) is None

    def test_payload_of_only_padding_is_none(self) -> None:
        """A payload segment that decodes to no bytes is not JSON."""
        assert decode_jwt_payload(f"{HEADER}.==.sig") is None

    def test_both_base64_alphabets_decode_alike(self) -> None:
        """The standard (+/) and URL-safe (-_) alphabets give the same payload."""
        raw = b'{"k":"???>>>\xc3\xbf"}'
        standard = base64.b64encode(raw).decode().rstrip("=")
        urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        assert "+" in standard
        assert "/" in standard
        assert "-" in urlsafe
        assert "_" in urlsafe
        expected = {"k": "???>>>ÿ"}
        assert decode_jwt_payload(f"{HEADER}.{standard}.sig") == expected
        assert decode_jwt_payload(f"{HEADER}.{urlsafe}.sig") == expected

    @pytest.mark.parametrize("padding", ["", "=", "==", "===", "====", "=junk", "==QUJD"])
    def test_padding_is_optional(self, padding: str) -> None:
        """Padding may be present, absent or excessive; what follows the first = is ignored."""
        segment = b64url(b'{"exp":7} ')  # 10 bytes: 14 characters, "==" when padded
        assert len(segment) % 4 == 2
        assert decode_jwt_payload(f"{HEADER}.{segment}{padding}.sig") == {"exp": 7}

    @pytest.mark.parametrize(
        "text",
        [
            "not json",
            "{",
            '{"exp":1,}',
            "{'exp': 1}",
            '{"exp":01}',
            "",
            " ",
            "[1] [2]",
            "undefined",
        ],
    )
    def test_invalid_json_is_none(self, text: str) -> None:
        """A payload that is not strict JSON is malformed."""
        assert decode_jwt_payload(token_with_payload_text(text)) is None

    @pytest.mark.parametrize(
        "text",
        [
            "NaN",
            "Infinity",
            "-Infinity",
            '{"exp":NaN}',
            '{"exp":Infinity}',
            '{"exp":-Infinity}',
            '{"exp":1,"other":[NaN]}',
        ],
    )
    def test_nan_and_infinity_literals_are_refused(self, text: str) -> None:
        """JSON.parse has no NaN or Infinity, so a payload using them is malformed."""
        token = token_with_payload_text(text)
        assert decode_jwt_payload(token) is None
        assert decode_jwt_expiry(token) is None

    def test_utf8_bom_is_refused(self) -> None:
        """A payload starting with a UTF-8 BOM is not JSON (JSON.parse refuses it too)."""
        token = token_with_payload_text(b'\xef\xbb\xbf{"exp":1}')
        assert decode_jwt_payload(token) is None
        assert decode_jwt_payload(token_with_payload_text(b'{"exp":1}')) == {"exp": 1}

    def test_invalid_utf8_becomes_replacement_characters(self) -> None:
        """Bytes that are not UTF-8 decode to U+FFFD, as Buffer.toString("utf8") does."""
        token = token_with_payload_text(b'{"s":"a\xffb\xed\xa0\x80c\xf0\x9f\x98"}')
        assert decode_jwt_payload(token) == {"s": "a\ufffdb\ufffd\ufffd\ufffdc\ufffd"}

    def test_lone_surrogate_escape_is_kept(self) -> None:
        """A \\ud800 escape in a JSON string decodes to a lone surrogate, as in JavaScript."""
        assert decode_jwt_payload(token_with_payload_text('{"s":"\\ud800"}')) == {"s": "\ud800"}

    @pytest.mark.parametrize(
        ("token", "kind"),
        [
            (None, "NoneType"),
            (b"a.eyJleHAiOjF9.c", "bytes"),  # a real mistake: an undecoded HTTP body
            (42, "int"),
            (["a", "e30", "c"], "list"),
            (object(), "object"),
        ],
    )
    def test_non_str_input_raises_type_error(self, token: Any, kind: str) -> None:
        """Anything but a str, bytes included, is a TypeError naming its type, as in the seed."""
        with pytest.raises(TypeError, match=f"^token must be a str, not {kind}$"):
            decode_jwt_payload(token)
        with pytest.raises(TypeError, match=f"^token must be a str, not {kind}$"):
            decode_jwt_expiry(token)

    def test_unclosed_deep_nesting_is_none(self) -> None:
        """A payload of 100,000 unclosed brackets is malformed, not a RecursionError."""
        token = token_with_payload_text("[" * 100_000)
        assert decode_jwt_payload(token) is None
        assert decode_jwt_expiry(token) is None

    def test_closed_deep_nesting_does_not_raise(self) -> None:
        """100,000 nested arrays neither raise nor yield an expiry."""
        token = token_with_payload_text("[" * 100_000 + "]" * 100_000)
        assert decode_jwt_payload(token) is None  # Node parses it; see TestKnownDifferences
        assert decode_jwt_expiry(token) is None

    def test_moderate_nesting_still_decodes(self) -> None:
        """Nesting a real payload might use (50 levels) is parsed normally."""
        inner: Any = {"exp": 1}
        for _ in range(50):
            inner = {"a": [inner]}
        assert decode_jwt_payload(make_jwt(inner)) == inner


class TestDecodeJwtExpiry:
    @pytest.mark.parametrize(
        "exp",
        [1_800_000_000, 1_800_000_000.5, 1, -1, -1_800_000_000.25, 1e-300, 10**300, 2**53 + 1],
    )
    def test_numeric_exp_is_returned_unchanged(self, exp: float) -> None:
        """A finite numeric exp comes back with the same value and type."""
        result = decode_jwt_expiry(make_jwt({"sub": "u", "exp": exp}))
        assert result == exp
        assert type(result) is type(exp)

    def test_zero_exp_is_returned_as_zero(self) -> None:
        """exp 0 is returned as 0: the scheduler, not the decoder, treats it as missing."""
        result = decode_jwt_expiry(make_jwt({"exp": 0}))
        assert result == 0
        assert result is not None
        assert decode_jwt_expiry(make_jwt({"exp": 0.0})) == 0.0

    def test_prefixed_token(self) -> None:
        """The sk-ant-si- prefix is stripped before the expiry is read."""
        assert decode_jwt_expiry(make_jwt({"exp": 123}, prefix=PREFIX)) == 123

    @pytest.mark.parametrize("exp", [True, False])
    def test_bool_exp_is_none(self, exp: bool) -> None:
        """A boolean exp is not a number (typeof true !== "number")."""
        assert decode_jwt_expiry(make_jwt({"exp": exp})) is None

    @pytest.mark.parametrize("exp", ["1800000000", "", None, [1800000000], {"exp": 1}])
    def test_non_numeric_exp_is_none(self, exp: object) -> None:
        """A string, null, list or object exp is no expiry."""
        assert decode_jwt_expiry(make_jwt({"exp": exp})) is None

    def test_missing_exp_is_none(self) -> None:
        """A payload without exp (even with other times, or exp nested deeper) has no expiry."""
        assert decode_jwt_expiry(make_jwt({"iat": 1, "nbf": 2})) is None
        assert decode_jwt_expiry(make_jwt({"claims": {"exp": 3}})) is None
        assert decode_jwt_expiry(make_jwt({})) is None

    @pytest.mark.parametrize(
        "payload", [[{"exp": 1}], ["exp"], 1_800_000_000, 1.5, "exp", None, True]
    )
    def test_non_object_payload_is_none(self, payload: object) -> None:
        """A payload that is a list, number, string, bool or null has no expiry."""
        token = make_jwt(payload)
        assert decode_jwt_payload(token) == payload
        assert decode_jwt_expiry(token) is None

    @pytest.mark.parametrize("literal", ["1e400", "-1e400", "1E+999"])
    def test_overflowing_float_exp_is_none(self, literal: str) -> None:
        """An exp that overflows to +-Infinity is not a finite number."""
        token = token_with_payload_text(f'{{"exp":{literal}}}')
        payload = decode_jwt_payload(token)
        assert isinstance(payload, dict)
        assert math.isinf(payload["exp"])
        assert decode_jwt_expiry(token) is None

    @pytest.mark.parametrize("exp", [10**400, -(10**400), 2**1024])
    def test_int_too_large_for_a_float_is_none(self, exp: int) -> None:
        """An integer exp beyond float range is not finite (and does not OverflowError)."""
        token = make_jwt({"exp": exp})
        assert decode_jwt_payload(token) == {"exp": exp}
        assert decode_jwt_expiry(token) is None

    def test_largest_float_sized_int_is_kept(self) -> None:
        """An integer exp just inside float range is still a finite expiry."""
        exp = int(1.7976931348623157e308)
        assert decode_jwt_expiry(make_jwt({"exp": exp})) == exp

    def test_duplicate_exp_keys_last_wins(self) -> None:
        """With exp given twice, the last one counts, as with JSON.parse."""
        assert decode_jwt_expiry(token_with_payload_text('{"exp":1,"exp":2}')) == 2

    def test_malformed_token_is_none(self) -> None:
        """A token that is not a JWT has no expiry."""
        assert decode_jwt_expiry("not-a-jwt") is None
        assert decode_jwt_expiry(f"{HEADER}..sig") is None


class TestNodeCompatibility:
    def test_table_covers_the_tricky_inputs(self) -> None:
        """The recorded table is large and holds every kind of input it is meant to pin."""
        inputs = [case["input"] for case in NODE_CASES]
        assert len(inputs) >= 300
        assert len(set(inputs)) == len(inputs)
        assert "" in inputs
        assert {len(text) for text in inputs} >= set(range(21))
        for needle in ["-", "_", "+", "/", " ", "\t", "\n", "$", ".", "%", "é", "☃", "\u0100"]:
            assert any(needle in text for text in inputs), needle
        assert any("\x00" in text for text in inputs)
        assert any(any(ord(char) > 0xFFFF for char in text) for text in inputs)
        assert any(0 < text.find("=") < len(text.rstrip("=")) for text in inputs)
        assert sum(case["payload"] is not None for case in NODE_CASES) >= 20

    @pytest.mark.parametrize("case", NODE_CASES, ids=NODE_IDS)
    def test_base64url_bytes_match_node(self, case: dict[str, Any]) -> None:
        """_decode_base64url gives exactly Buffer.from(input, "base64url")."""
        assert list(_decode_base64url(case["input"])) == case["bytes"]

    @pytest.mark.parametrize("case", NODE_CASES, ids=NODE_IDS)
    def test_payload_and_expiry_match_node(self, case: dict[str, Any]) -> None:
        """decode_jwt_payload matches the seed's decodeJwtPayload; the expiry follows it."""
        token = f"{_TABLE['header']}.{case['input']}.sig"
        assert decode_jwt_payload(token) == case["payload"]
        assert decode_jwt_expiry(token) == node_expiry(case["payload"])

    @pytest.mark.parametrize(
        ("segment", "expected"),
        [
            ("QUJD", b"ABC"),
            ("QUJDRA", b"ABCD"),
            ("QUJDR", b"ABC"),  # a lone trailing character is dropped
            ("QU=JD", b"A"),  # decoding stops at the first "="
            ("QU JD\n", b"ABC"),  # whitespace is skipped
            ("Q$U%J.D", b"ABC"),  # so is anything outside both alphabets
            ("\u0141\u0141\u0141\u0141", b"\x00\x00\x00"),  # U+0141's low byte is "A"
            ("QUJD\u263dQUJD", b"ABC"),  # U+263D's low byte is "="
            ("QU\U0001f600JD", b"A"),  # the emoji's high surrogate D83D ends in "="
            ("-_-_", b"\xfb\xff\xbf"),
            ("+/+/", b"\xfb\xff\xbf"),
        ],
    )
    def test_node_quirks_by_example(self, segment: str, expected: bytes) -> None:
        """Node's lenient decoding rules, one readable example each."""
        assert _decode_base64url(segment) == expected


class TestKnownDifferencesFromNode:
    def test_huge_number_elsewhere_does_not_hide_exp(self) -> None:
        """A 5000-digit number in another claim does not hide exp (Node returns 1)."""
        token = token_with_payload_text('{"exp":1,"x":' + "1" * 5000 + "}")
        assert decode_jwt_expiry(token) == 1

    @pytest.mark.xfail(
        strict=True,
        raises=AssertionError,
        reason="Python's json recurses (RecursionError); V8's JSON.parse does not",
    )
    def test_deeply_nested_claim_does_not_hide_exp(self) -> None:
        """A claim nested 100,000 deep does not hide exp (Node returns 1)."""
        token = token_with_payload_text('{"exp":1,"x":' + "[" * 100_000 + "]" * 100_000 + "}")
        assert decode_jwt_expiry(token) == 1


# --- fuzzing ---------------------------------------------------------------------------

_JUNK = " \t\n\r$.%=!~\x00\x7féÿ☃\u0100\u0141\u263d\ufeff\ud800\udc3d😀🌍"
_FUZZ_POOL = STANDARD + "-_" + _JUNK


def _random_text(rng: random.Random) -> str:
    """Short text mostly from base64 alphabets, with junk, dots and random code points."""
    chars: list[str] = []
    for _ in range(rng.randrange(0, 48)):
        roll = rng.random()
        if roll < 0.85:
            chars.append(rng.choice(_FUZZ_POOL))
        elif roll < 0.95:
            chars.append(chr(rng.randrange(0x10000)))
        else:
            chars.append(chr(rng.randrange(0x10000, 0x110000)))
    return "".join(chars)


def _check_never_raises(token: str) -> None:
    payload = decode_jwt_payload(token)
    expiry = decode_jwt_expiry(token)
    if expiry is not None:
        assert isinstance(payload, dict)
        assert not isinstance(expiry, bool)
        assert math.isfinite(expiry)
        assert payload["exp"] == expiry


_segment_text = st.sampled_from([STANDARD + "=", URLSAFE + "=", _FUZZ_POOL]).flatmap(
    lambda alphabet: st.text(alphabet=alphabet, max_size=40)
)
_json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
_json_value = st.recursive(
    _json_scalar,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_finite_exp = st.integers(min_value=-(10**300), max_value=10**300) | st.floats(
    allow_nan=False, allow_infinity=False
)


class TestFuzz:
    def test_thirty_thousand_random_strings_never_raise(self) -> None:
        """30,000 seeded random tokens decode to None or a consistent finite expiry."""
        rng = random.Random(0x95E18224)
        decoded = 0
        for _ in range(30_000):
            shape = rng.random()
            if shape < 0.4:
                token = _random_text(rng)
            elif shape < 0.9:
                token = ".".join(_random_text(rng) for _ in range(3))
            else:
                claims = {"exp": rng.choice([1, -2.5, True, "x", None, 1e300])}
                token = make_jwt(claims, prefix=rng.choice(["", PREFIX]))
                token = token[: rng.randrange(len(token) + 1)]
            _check_never_raises(token)
            decoded += decode_jwt_payload(token) is not None
        assert decoded > 100  # the loop reaches the JSON parser, not only the early exits

    def test_decoded_length_is_bounded(self) -> None:
        """Decoding never yields more than 3 bytes per 4 UTF-16 code units of input."""
        rng = random.Random(20)
        for _ in range(5_000):
            text = _random_text(rng)
            code_units = len(text.encode("utf-16-le", "surrogatepass")) // 2
            assert len(_decode_base64url(text)) <= code_units * 3 // 4

    @settings(max_examples=400, deadline=None)
    @given(st.text() | st.text(st.characters(categories=["Cs", "Ll", "Nd", "Po", "So", "Zs"])))
    def test_any_text_never_raises(self, token: str) -> None:
        """No str, lone surrogates included, makes the decoders raise."""
        _check_never_raises(token)

    @settings(max_examples=400, deadline=None)
    @given(_segment_text, _segment_text, _segment_text, st.sampled_from(["", PREFIX]))
    def test_three_base64ish_segments_never_raise(
        self, header: str, payload: str, signature: str, prefix: str
    ) -> None:
        """Three segments of base64-ish text and junk never make the decoders raise."""
        _check_never_raises(f"{prefix}{header}.{payload}.{signature}")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=64))
    def test_any_bytes_round_trip_through_both_alphabets(self, raw: bytes) -> None:
        """Bytes encoded with either alphabet, padded or not, decode to themselves."""
        standard = base64.b64encode(raw).decode()
        urlsafe = base64.urlsafe_b64encode(raw).decode()
        assert _decode_base64url(standard) == raw
        assert _decode_base64url(urlsafe) == raw
        assert _decode_base64url(urlsafe.rstrip("=")) == raw

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(st.text(max_size=8), _json_value, max_size=5),
        _finite_exp,
        st.sampled_from(["", PREFIX]),
    )
    def test_finite_exp_round_trips(self, claims: dict[str, Any], exp: float, prefix: str) -> None:
        """For any JSON object with a finite numeric exp, the decoder returns that exp."""
        payload = {**claims, "exp": exp}
        token = make_jwt(payload, prefix=prefix)
        assert decode_jwt_payload(token) == payload
        result = decode_jwt_expiry(token)
        assert result == exp
        assert type(result) is type(exp)
