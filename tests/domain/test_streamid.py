"""Parsing Last-Event-ID values."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workbench.domain.streamid import ZERO, MalformedStreamId, StreamId, parse


def test_parses_redis_ids_and_zero() -> None:
    assert parse("1700000000000-3") == StreamId(1700000000000, 3)
    assert parse(b"5-0") == StreamId(5, 0)
    assert parse("0") == ZERO
    assert str(StreamId(12, 4)) == "12-4"


def test_order_is_stream_order() -> None:
    assert parse("9-99") < parse("10-0") < parse("10-1")


@pytest.mark.parametrize(
    "text",
    ["", "abc", "1-", "-1", "1-2-3", "1.5-0", " 1-0", "1-0 ", "１-0", "99999999999999999999999-0",
     "18446744073709551616-0", "$", ">", "+", "-", "0-0; DROP"],
)  # fmt: skip
def test_rejects_anything_else_with_a_clear_message(text: str) -> None:
    with pytest.raises(MalformedStreamId) as info:
        parse(text)
    assert "stream id" in str(info.value)


def test_rejects_non_ascii_bytes() -> None:
    with pytest.raises(MalformedStreamId):
        parse(b"\xff-0")


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_round_trip(ms: int, seq: int) -> None:
    assert parse(str(StreamId(ms, seq))) == StreamId(ms, seq)


def _by_the_pattern(text: str) -> StreamId | None:
    """What parse accepts, by its definition: the pattern, ``0``, 64-bit parts."""
    if text == "0":
        return ZERO
    match = re.fullmatch(r"([0-9]{1,20})-([0-9]{1,20})", text)
    if match is None or int(match[1]) >= 2**64 or int(match[2]) >= 2**64:
        return None
    return StreamId(int(match[1]), int(match[2]))


@given(
    st.text(alphabet="0123456789-+ _\n²٣a", max_size=24)
    | st.from_regex(r"[0-9]{1,21}-[0-9]{1,21}", fullmatch=True)
)
def test_the_fast_path_accepts_exactly_what_the_pattern_does(text: str) -> None:
    expected = _by_the_pattern(text)
    for given_as in (text, text.encode()):
        if expected is None:
            with pytest.raises(MalformedStreamId):
                parse(given_as)
        else:
            assert parse(given_as) == expected
