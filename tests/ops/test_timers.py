"""``workbench timers``: the expiry process, on a clock it reads from the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import sqlalchemy as sa

from tests.support import ROOT
from workbench.domain.clock import ScaledClock, clock_env
from workbench.domain.escrow import EscrowState
from workbench.ops.waiting import wait_until
from workbench.service import EscrowService
from workbench.store import Store


def _timers(database_url: str, origin: float) -> subprocess.Popen[bytes]:
    """``workbench timers`` sweeping every 0.1 s on a clock of a thousand timeline
    seconds per wall second (a 900 s payment timeout is ~1 s away)."""
    return subprocess.Popen(
        [sys.executable, "-m", "workbench", "timers", "--every", "0.1"],
        env=dict(os.environ, DATABASE_URL=database_url, **clock_env(origin, origin, 1000.0)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def test_timers_expire_escrows_on_the_shared_scaled_clock(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A thousand timeline seconds per wall second: a 900 s payment timeout is ~1 s away.
    origin = time.time()
    clock = ScaledClock(origin, epoch=origin, rate=1000.0)
    service = EscrowService(store, clock=clock)
    escrow_id = service.create("buyer-1", "seller-1", 500).escrow["id"]
    untouched = service.create("buyer-2", "seller-1", 700).escrow["id"]
    service.cancel(untouched, "buyer-2")
    process = _timers(store.url, origin)
    try:
        wait_until(
            lambda: service.get(escrow_id).state is EscrowState.EXPIRED,
            timeout=60,
            what="the payment timer to expire the escrow",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
    assert process.returncode == 0, output
    assert service.get(untouched).state is EscrowState.CANCELLED
    assert "events from expired escrows" in output


def test_timers_on_a_fresh_database_create_its_tables_and_sweep(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Started on its own (not under serve, which creates the schema first): before,
    # every sweep failed with "no such table: escrows" until someone else made it.
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    origin = time.time()
    process = _timers(url, origin)
    store = Store(url)
    try:
        wait_until(
            lambda: sa.inspect(store.engine).has_table("escrows"),
            timeout=30,
            what="the timers process to create the tables",
        )
        service = EscrowService(store, clock=ScaledClock(origin, epoch=origin, rate=1000.0))
        escrow_id = service.create("buyer-1", "seller-1", 500).escrow["id"]
        wait_until(
            lambda: service.get(escrow_id).state is EscrowState.EXPIRED,
            timeout=60,
            what="a sweep to expire the escrow",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
        store.close()
    assert process.returncode == 0, output
    assert "no such table" not in output
