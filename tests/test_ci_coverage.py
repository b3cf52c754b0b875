"""What CI covers: Redis 7 on PATH, and a skip of a component CI provides is a failure there.

``.ci/run`` installs PostgreSQL, Chromium and a Redis >= 7; the README says CI covers both
stores, the real browser and both Redis binaries. A test skipped for one of those under CI
would silently shrink that coverage, so ``tests/conftest.py`` turns such skips into failures
when ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PG_SKIP
from workbench.ops.redis_server import _version_of

ROOT = Path(__file__).resolve().parent.parent


def test_redis_on_path_is_7_or_newer() -> None:
    # The Redis 7 branches (XAUTOCLAIM's deleted ids, XINFO lag) run only against it.
    binary = shutil.which("redis-server")
    if binary is None or _version_of(binary)[:1] < (7,):
        pytest.skip("Redis >= 7 not on PATH: the Redis 7 branches are not covered")
    assert _version_of(binary) >= (7, 0, 0)


def _run_skipping_test(tmp_path: Path, ci: str, reason: str) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_skips.py"
    test.write_text(
        textwrap.dedent(
            f"""
            import pytest

            def test_needs_a_component():
                pytest.skip({reason!r})
            """
        )
    )
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_skipped_postgres_half_fails_under_ci(tmp_path: Path) -> None:
    result = _run_skipping_test(tmp_path, "true", PG_SKIP)
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout
    assert ".ci/run provides this component" in result.stdout


def test_the_same_skip_is_a_skip_outside_ci(tmp_path: Path) -> None:
    result = _run_skipping_test(tmp_path, "", PG_SKIP)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout


def test_an_unrelated_skip_stays_a_skip_under_ci(tmp_path: Path) -> None:
    result = _run_skipping_test(tmp_path, "true", "this Redis still computes lag")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
