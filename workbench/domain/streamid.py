"""Redis stream entry ids as values: parsed, compared, printed.

A user-stream id is what an SSE client sends back as ``Last-Event-ID``, so it
arrives as untrusted text. :func:`parse` accepts exactly the ``<ms>-<seq>``
form Redis produces (and ``0``, "before the first entry"), and says what is
wrong with anything else.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX = 2**64 - 1
_new_tuple = tuple.__new__


class MalformedStreamId(ValueError):
    """The text is not a stream entry id."""


class StreamId(NamedTuple):
    """``ms-seq``; tuples compare in stream order."""

    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO = StreamId(0, 0)
#: The largest id Redis can name: no entry can follow it.
MAX_ID = StreamId(_MAX, _MAX)


def parse(text: str | bytes) -> StreamId:
    """Parse ``<ms>-<seq>`` (or ``0``); raise :class:`MalformedStreamId` otherwise."""
    # The common case first, without the regular expression: every entry of every
    # replayed page and live message has two ids. ASCII digits only (str.isdigit
    # alone would take other scripts' digits), 1 to 20 of each: what _ID matches;
    # the tuple made without StreamId's Python-level __new__.
    ms, sep, seq = text.partition(b"-" if isinstance(text, bytes) else "-")  # type: ignore[arg-type]
    if (
        sep
        and text.isascii()
        and 0 < len(ms) <= 20
        and 0 < len(seq) <= 20
        and ms.isdigit()
        and seq.isdigit()
    ):
        whole: StreamId = _new_tuple(StreamId, (int(ms), int(seq)))
        if whole[0] <= _MAX and whole[1] <= _MAX:
            return whole
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedStreamId("a stream id is ASCII digits: <ms>-<seq>") from None
    if text == "0":
        return ZERO
    match = _ID.fullmatch(text)
    if match is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise MalformedStreamId(
            f"{shown!r} is not a stream id; expected <milliseconds>-<sequence>, "
            "e.g. 1700000000000-0"
        )
    ms, seq = int(match[1]), int(match[2])
    if ms > _MAX or seq > _MAX:
        raise MalformedStreamId(f"{text!r} is out of range for a stream id")
    return StreamId(ms, seq)


def next_id(last: StreamId, now_ms: int) -> StreamId:
    """The id an entry appended at ``now_ms`` gets after ``last``: what Redis' ``*``
    does, on a clock of our own.

    ``now_ms-0`` when the clock has passed ``last``'s millisecond, otherwise the next
    sequence number in ``last``'s millisecond, so ids grow strictly even when the
    clock stands still (many entries at one virtual instant) or is behind ``last``.
    Simulations give every entry an id this way, from the simulation's clock, so
    ids, retention windows and dedupe lifetimes all run on simulation time.
    """
    if now_ms > last.ms:
        return StreamId(now_ms, 0)
    return StreamId(last.ms, last.seq + 1)
