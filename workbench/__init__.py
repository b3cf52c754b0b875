"""Escrow event workbench: an M-Pesa escrow runtime on Redis Streams, driven and measured.

The public surface most people need::

    import workbench
    frames = workbench.inspect(redis_client)   # streams, groups, consumers, dead letters
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.inspection import Inspection, inspect

__all__ = ["Inspection", "inspect"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: inspection needs pandas, which workers and API processes do not.
    if name in __all__:
        from workbench import inspection

        return getattr(inspection, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
