"""Properties of what ``publish`` accepts, over generated input (hypothesis).

Accepted payloads are stored exactly as given (decoding the stored JSON gives the value
back); a NaN or infinity anywhere is refused with the path to it; text that no driver can
send (a lone surrogate, NUL) is refused as ``InvalidMessageError`` naming the argument,
never a ``UnicodeEncodeError`` or ``TypeError`` from below.
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import outbox_lib
from outbox_lib._encoding import DEFAULT_MAX_PAYLOAD_BYTES, JSON, encode_message, encode_payload
from outbox_lib.inbox import Inbox

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson writes as numbers
FINITE = st.floats(allow_nan=False, allow_infinity=False)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
SCALARS = st.none() | st.booleans() | INT64 | FINITE | st.text()
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)
CONTAINERS = st.lists(JSON_VALUES, max_size=5) | st.dictionaries(st.text(), JSON_VALUES, max_size=5)
LONE_SURROGATE = st.integers(min_value=0xD800, max_value=0xDFFF).map(chr)


def _encode(**overrides: object) -> None:
    args: dict[str, Any] = {
        "topic": "orders.created",
        "payload": {},
        "key": None,
        "headers": None,
        "idempotency_key": None,
        "max_payload_bytes": DEFAULT_MAX_PAYLOAD_BYTES,
    }
    args.update(overrides)
    encode_message(**args)


@settings(max_examples=300)
@given(CONTAINERS)
def test_accepted_json_payloads_decode_to_the_value_given(payload: Any) -> None:
    body, content_type = encode_payload(payload)
    assert content_type == JSON
    assert orjson.loads(body) == payload


@st.composite
def with_a_non_finite_float(draw: st.DrawFn) -> tuple[Any, str, float]:
    """A payload, the path (as the error spells it) to the one non-finite float in it."""
    bad = draw(NON_FINITE)
    value: Any = bad
    path = ""
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if draw(st.booleans()):
            siblings = draw(st.lists(JSON_VALUES, max_size=3))
            index = draw(st.integers(min_value=0, max_value=len(siblings)))
            value = [*siblings[:index], value, *siblings[index:]]
            path = f"[{index}]{path}"
        else:
            name = draw(st.text(max_size=8))
            others = draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
            others.pop(name, None)
            value = {**others, name: value}
            path = f"[{name!r}]{path}"
    return value, f"payload{path}", bad


@settings(max_examples=300)
@given(with_a_non_finite_float())
def test_a_nan_or_infinity_anywhere_is_refused_with_its_path(case: tuple[Any, str, float]) -> None:
    payload, path, bad = case
    with pytest.raises(outbox_lib.InvalidMessageError) as caught:
        encode_payload(payload)
    assert str(caught.value).startswith(f"{path} is {bad!r}: JSON has no NaN or infinity")


# Around the surrogate, only what every argument takes (no NUL, spaces or controls, which
# are refused with errors of their own).
PLAIN = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=10)


@st.composite
def text_with(draw: st.DrawFn, bad: st.SearchStrategy[str]) -> str:
    return draw(PLAIN) + draw(bad) + draw(PLAIN)


ARGUMENTS = {
    "topic": lambda text: {"topic": "t." + text},
    "key": lambda text: {"key": text},
    "header name": lambda text: {"headers": {"x-" + text: "v"}},
    "header": lambda text: {"headers": {"x-h": text}},
    "idempotency_key": lambda text: {"idempotency_key": text},
}


@pytest.mark.parametrize("argument", list(ARGUMENTS))
@settings(max_examples=100)
@given(text=text_with(LONE_SURROGATE))
def test_a_lone_surrogate_is_refused_naming_the_argument(argument: str, text: str) -> None:
    with pytest.raises(outbox_lib.InvalidMessageError) as caught:
        _encode(**ARGUMENTS[argument](text))
    assert str(caught.value).startswith(argument), str(caught.value)
    assert re.search(r"not valid UTF-8: lone surrogate '\\ud[89a-f][0-9a-f]{2}'", str(caught.value))


@pytest.mark.parametrize("argument", ["key", "header"])
@settings(max_examples=100)
@given(
    text=st.text(
        st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
        min_size=1,
        max_size=100,
    )
)
def test_any_other_text_is_accepted(argument: str, text: str) -> None:
    _encode(**ARGUMENTS[argument](text))


PRINTABLE_ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@settings(max_examples=100)
@given(text=st.text(PRINTABLE_ASCII, min_size=1, max_size=100).map(lambda t: f"k{t}k"))
def test_any_printable_ascii_idempotency_key_is_accepted(text: str) -> None:
    _encode(idempotency_key=text)


@settings(max_examples=200)
@given(
    text=text_with(
        st.characters(min_codepoint=1, max_codepoint=0x1F)
        | st.just("\x7f")
        | st.characters(min_codepoint=0x80, exclude_categories=("Cs",))
    )
    | st.text(PRINTABLE_ASCII, max_size=20).flatmap(
        lambda t: st.sampled_from([f" {t}", f"{t} ", f" {t} "])
    )
)
def test_an_idempotency_key_no_http_header_can_carry_as_is_is_refused(text: str) -> None:
    """It travels as webhook-id and idempotency-key: printable ASCII, no space at its ends."""
    with pytest.raises(outbox_lib.InvalidMessageError) as caught:
        _encode(idempotency_key=text)
    assert f"idempotency_key {text!r} must be printable ASCII with no space at either end" in str(
        caught.value
    )


@settings(max_examples=200)
@given(st.text(max_size=30) | st.binary(max_size=30) | st.integers() | st.none())
def test_an_inbox_consumer_is_refused_up_front_or_storable(consumer: Any) -> None:
    try:
        Inbox(consumer)
    except outbox_lib.ConfigurationError:
        return
    assert isinstance(consumer, str) and consumer and "\x00" not in consumer
    consumer.encode("utf-8")  # what every driver does with it
