"""Redis replies as values: bytes or str in, str and id tuples out.

redis-py answers bytes unless a client decodes responses; the runtime's clients
do not (entries are decoded once, by the event codec), so every loop that reads
a name or an id out of a reply goes through :func:`text`.
"""

from __future__ import annotations

from typing import Any


def text(value: Any) -> Any:
    """``value`` decoded if it is bytes, else as it is (``None`` stays ``None``)."""
    return value.decode() if isinstance(value, bytes) else value


def id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as ``(ms, seq)``, comparable (``"5"`` is ``(5, 0)``)."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)
