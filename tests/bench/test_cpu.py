"""``bench/cpu.py``: the CPU seconds the benches subtract around a timed span."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis
import sqlalchemy

from bench.cpu import is_local_host, local_postgres_cpu_s, process_cpu_s, redis_cpu_s
from tests.conftest import PG_SKIP, PG_URL


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


def test_only_this_machine_s_hosts_count_as_local() -> None:
    for host in (None, "", "localhost", "127.0.0.1", "::1", "/var/run/postgresql"):
        assert is_local_host(host), host
    for host in ("db.example.com", "10.0.0.5", "127.0.0.2"):
        assert not is_local_host(host), host


@pytest.mark.skipif(PG_URL is None, reason=PG_SKIP)
def test_a_local_postgresql_server_s_cpu_grows_with_the_work_it_is_given() -> None:
    assert PG_URL is not None and is_local_host(sqlalchemy.engine.make_url(PG_URL).host)
    engine = sqlalchemy.create_engine(PG_URL)
    try:
        # Only the server's processes: this one's busy loop is not the server's work.
        before, mine = local_postgres_cpu_s(), process_cpu_s(os.getpid())
        while process_cpu_s(os.getpid()) < mine + 0.3:
            sum(range(100_000))
        assert local_postgres_cpu_s() - before < 0.15
        before = local_postgres_cpu_s()
        assert before > 0  # the server has run: its processes have CPU time
        deadline = time.monotonic() + 20.0
        with engine.connect() as conn:
            while local_postgres_cpu_s() <= before:  # the backend's work, not ours
                assert time.monotonic() < deadline, "no CPU counted for a busy PostgreSQL"
                conn.execute(sqlalchemy.text("SELECT count(*) FROM generate_series(1, 300000)"))
    finally:
        engine.dispose()
