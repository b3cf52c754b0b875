"""CPU seconds so far, of a process by its pid, of a redis-server by ``INFO cpu``
and of a PostgreSQL server running on this machine.

The benches take these at the start and the end of a timed span and subtract:
whose work a wall-clock figure was (the server's, the client's, Redis', the
database server's when it shares these cores).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["is_local_host", "local_postgres_cpu_s", "process_cpu_s", "redis_cpu_s"]

#: How a PostgreSQL server's processes are named (``/proc/<pid>/comm``): the
#: postmaster and every backend, checkpointer, WAL writer, autovacuum worker.
POSTGRES_COMM = "postgres"


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process so far (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def is_local_host(host: str | None) -> bool:
    """Whether a database URL's host is this machine (no host: a Unix socket)."""
    return host in (None, "", "localhost", "127.0.0.1", "::1") or str(host).startswith("/")


def local_postgres_cpu_s() -> float:
    """user + system CPU seconds so far of every PostgreSQL server process on this
    machine, with those of the children they reaped (a backend that ended is counted
    in the postmaster's): the database's work when it shares the cores with the
    service. 0 when none runs (or ``/proc`` cannot say)."""
    total = 0
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != POSTGRES_COMM:
                continue
        except OSError:
            continue  # gone meanwhile
        fields = _stat_fields(entry.name)
        if fields is not None:  # utime, stime, cutime, cstime
            total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(client: Any) -> float:
    """user + system CPU seconds of the redis-server ``client`` talks to, all its threads."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
