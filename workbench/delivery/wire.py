"""SSE frames as bytes, encoded once: what a session writes to its socket.

The wire format is the one ``sse_starlette.ServerSentEvent.encode`` writes
(``\\r\\n`` line ends; a ``data:`` line per line of data; CR and LF dropped
from ``id`` and ``event``), byte for byte: a test holds the two together.
It is written here by concatenation instead, because every live message and
every replayed entry goes through it: no ``StringIO``, no regular expression
unless a value holds a line break (an envelope is one-line JSON, so it does not).

:class:`LiveEntry` is a live entry with its :class:`LiveEvent` (the frame):
the live reader makes one per message and the hub hands that same object to
every session of the user, so a message is encoded once per server process,
not once per session. A ``LiveEvent`` answers ``id``, ``event``, ``data`` and
``encode()`` as a ``ServerSentEvent`` does, so code that reads sessions'
messages does not need to tell them apart.
"""

from __future__ import annotations

import re

from workbench.delivery.entries import UserEntry
from workbench.domain.streamid import StreamId

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
#: The first bytes of a heartbeat comment: what clients and proxies see between events.
HEARTBEAT = b": ping\r\n\r\n"
_set = object.__setattr__


def _one_line(value: str) -> str:
    return _LINE_BREAK.sub("", value) if ("\n" in value or "\r" in value) else value


def _data_lines(data: str) -> str:
    if "\n" in data or "\r" in data:
        return "".join(f"data: {chunk}\r\n" for chunk in _LINE_BREAK.split(data))
    return f"data: {data}\r\n"


def encode_event(id: str, event: str, data: str) -> bytes:
    """One event frame: ``id``, ``event`` and ``data`` lines, then a blank line."""
    text = id + event + data
    if "\n" not in text and "\r" not in text:  # the usual one-line envelope, built at once
        return f"id: {id}\r\nevent: {event}\r\ndata: {data}\r\n\r\n".encode()
    return f"id: {_one_line(id)}\r\nevent: {_one_line(event)}\r\n{_data_lines(data)}\r\n".encode()


def encode_entry(entry: UserEntry) -> bytes:
    """The frame of one user-stream entry (its id is the SSE id, its type the event)."""
    return encode_event(str(entry.id), entry.type, entry.data)


def encode_page(entries: list[UserEntry]) -> bytes:
    """A replayed page as one body chunk: one ASGI send and one socket write, not one
    per event. One string is built and encoded once, not a bytes object per entry."""
    parts = []
    for entry in entries:
        parts.append(
            f"id: {_one_line(str(entry.id))}\r\nevent: {_one_line(entry.type)}\r\n"
            f"{_data_lines(entry.data)}\r\n"
        )
    return "".join(parts).encode()


def encode_comment(text: str) -> bytes:
    """A comment frame (``: text``); clients ignore it, proxies see traffic."""
    return "".join(f": {chunk}\r\n" for chunk in _LINE_BREAK.split(text)).encode() + b"\r\n"


class LiveEvent:
    """A live event as a session yields it: ``id``, ``event``, ``data`` as text (as a
    ``ServerSentEvent`` has them) and ``frame``, the encoded bytes; made once per message."""

    __slots__ = ("id", "event", "data", "frame")

    def __init__(self, entry: UserEntry) -> None:
        self.id = f"{entry.id[0]}-{entry.id[1]}"  # str(StreamId), without its call
        self.event = entry.type
        self.data = entry.data
        self.frame = encode_event(self.id, self.event, self.data)

    def encode(self) -> bytes:
        """The frame (already encoded: the same bytes object every time)."""
        return self.frame

    def __repr__(self) -> str:
        return f"<LiveEvent {self.id} {self.event}>"


class LiveEntry(UserEntry):
    """A user entry from the live feed, with its :class:`LiveEvent` made once.

    Still a :class:`UserEntry` to everyone (equal to the plain entry with the
    same fields, same hash), so the hub's subscribers that want entries get them.
    """

    __slots__ = ("sse",)
    sse: LiveEvent

    def __init__(self, id: StreamId, prev: StreamId, event_id: str, type: str, data: str) -> None:
        # What the frozen dataclass's __init__ does (object's setattr: it refuses
        # every assignment), without its call; then ``sse``, not a field.
        _set(self, "id", id)
        _set(self, "prev", prev)
        _set(self, "event_id", event_id)
        _set(self, "type", type)
        _set(self, "data", data)
        _set(self, "sse", LiveEvent(self))

    @classmethod
    def of(cls, entry: UserEntry) -> LiveEntry:
        if isinstance(entry, LiveEntry):
            return entry
        return cls(entry.id, entry.prev, entry.event_id, entry.type, entry.data)

    def _fields(self) -> tuple[StreamId, StreamId, str, str, str]:
        return (self.id, self.prev, self.event_id, self.type, self.data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UserEntry):
            return self._fields() == (other.id, other.prev, other.event_id, other.type, other.data)
        return NotImplemented

    __hash__ = UserEntry.__hash__


__all__ = [
    "HEARTBEAT",
    "LiveEvent",
    "encode_comment",
    "encode_entry",
    "encode_event",
    "encode_page",
]
