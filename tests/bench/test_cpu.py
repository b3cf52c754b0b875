"""``bench/cpu.py``: the CPU seconds the benches subtract around a timed span."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import redis

from bench.cpu import process_cpu_s, redis_cpu_s


def test_a_process_s_cpu_grows_with_its_work_and_a_gone_one_has_none() -> None:
    before = process_cpu_s(os.getpid())
    deadline = time.monotonic() + 5.0
    while process_cpu_s(os.getpid()) <= before:  # clock ticks: 10 ms apart at most
        assert time.monotonic() < deadline, "no CPU time counted for this busy process"
        sum(range(100_000))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_cpu_s(child.pid) == 0.0  # reaped: no /proc entry


def test_redis_server_s_cpu_is_read_from_info(r: redis.Redis) -> None:
    first = redis_cpu_s(r)
    for i in range(2000):
        r.set(f"cpu:{i}", "x")
    assert redis_cpu_s(r) > first > 0
    r.delete(*(f"cpu:{i}" for i in range(2000)))
