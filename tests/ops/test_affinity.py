"""CPU pinning of the simulator and its redis-server (workbench.ops.affinity)."""

from __future__ import annotations

import os

import pytest

from workbench.ops import affinity
from workbench.ops.redis_server import RedisServer

CPUS = sorted(affinity.allowed_cpus())


def _allowed_of(pid: int) -> set[int]:
    return set(os.sched_getaffinity(pid))


def test_resolve_understands_auto_none_and_numbers() -> None:
    assert affinity.resolve(None) is None
    assert affinity.resolve("none") is None
    auto = affinity.resolve("auto")
    assert auto is None if len(CPUS) < 2 else auto in CPUS
    assert affinity.resolve(str(CPUS[-1])) == CPUS[-1]
    assert affinity.resolve(CPUS[0]) == CPUS[0]


@pytest.mark.parametrize("bad", ["fast", "1.5", 4096])
def test_resolve_refuses_what_cannot_be_used_and_lists_what_can(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        affinity.resolve(bad)  # type: ignore[arg-type]
    assert "allowed" in str(info.value) or "auto, none" in str(info.value)


def test_current_cpu_is_one_of_the_allowed() -> None:
    assert affinity.current_cpu() in CPUS


def test_pinned_runs_the_block_on_one_cpu_and_restores_the_set() -> None:
    before = _allowed_of(0)
    with affinity.pinned(CPUS[-1]):
        assert _allowed_of(0) == {CPUS[-1]}
        assert affinity.current_cpu() == CPUS[-1]
    assert _allowed_of(0) == before
    with affinity.pinned(None):
        assert _allowed_of(0) == before


def test_pinned_restores_the_set_when_the_block_raises() -> None:
    before = _allowed_of(0)
    with pytest.raises(RuntimeError), affinity.pinned(CPUS[0]):
        raise RuntimeError("boom")
    assert _allowed_of(0) == before


def test_a_pinned_server_stays_pinned_across_a_kill_and_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with RedisServer(tmp_path, cpu=CPUS[-1], appendonly=True) as server:
        assert server.pid is not None and _allowed_of(server.pid) == {CPUS[-1]}
        server.client().set("k", "v")
        server.restart()
        assert server.pid is not None and _allowed_of(server.pid) == {CPUS[-1]}
        assert server.client().get("k") == b"v"


def test_an_unpinned_server_may_run_anywhere(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with RedisServer(tmp_path) as server:
        assert server.pid is not None and _allowed_of(server.pid) == set(CPUS)


def test_paired_puts_this_thread_and_its_server_on_one_cpu_over_a_unix_socket(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from workbench.ops.redis_server import paired

    before = _allowed_of(0)
    with paired(None, tmp_path, CPUS[-1]) as (url, server):
        assert server is not None and server.pid is not None and url.startswith("unix://")
        assert _allowed_of(0) == _allowed_of(server.pid) == {CPUS[-1]}
    assert _allowed_of(0) == before
    with paired("redis://127.0.0.1:1/0", tmp_path, None) as (url, server):
        assert server is None and url == "redis://127.0.0.1:1/0"  # an external Redis: as given
