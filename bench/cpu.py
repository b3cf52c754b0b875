"""CPU seconds so far, of a process by its pid and of a redis-server by ``INFO cpu``.

The benches take these at the start and the end of a timed span and subtract:
whose work a wall-clock figure was (the server's, the client's, Redis').
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["process_cpu_s", "redis_cpu_s"]


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(client: Any) -> float:
    """user + system CPU seconds of the redis-server ``client`` talks to, all its threads."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
