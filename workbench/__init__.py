"""Escrow event workbench: an M-Pesa escrow runtime on Redis Streams, driven and measured.

The public surface most people need::

    import workbench
    frames = workbench.inspect(redis_client)   # streams, groups, consumers, dead letters
"""

from workbench.inspection import Inspection, inspect

__all__ = ["Inspection", "inspect"]
__version__ = "0.1.0"
