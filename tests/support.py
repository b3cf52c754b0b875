"""Helpers shared by the runtime tests: lifecycles to publish, worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from workbench.domain.clock import ManualClock
from workbench.domain.escrow import ADMIN
from workbench.domain.ids import IdFactory
from workbench.payments.mpesa import GatewayBehaviour, SimulatedGateway, parse_callback
from workbench.service import EscrowService
from workbench.store import Store
from workbench.streams.partitions import Partitioning

ROOT = Path(__file__).resolve().parent.parent


def make_service(
    store: Store,
    clock: ManualClock,
    seed: int = 1,
    *,
    partitioning: Partitioning | None = None,
    **behaviour: float,
) -> tuple[EscrowService, SimulatedGateway]:
    gateway = SimulatedGateway(clock, GatewayBehaviour(**behaviour), seed=seed)
    service = EscrowService(
        store, clock=clock, ids=IdFactory(seed), gateway=gateway, partitioning=partitioning
    )
    return service, gateway


def run_lifecycles(
    service: EscrowService,
    gateway: SimulatedGateway,
    clock: ManualClock,
    count: int,
    *,
    prefix: str = "e",
) -> list[str]:
    """Take ``count`` escrows through mixed lifecycles; return their ids.

    Every third is disputed (alternately refunded and released), the rest are
    confirmed. Payments that fail are retried until they succeed.
    """
    ids = []
    for i in range(count):
        buyer, seller = f"{prefix}-buyer-{i % 7}", f"{prefix}-seller-{i % 5}"
        escrow_id = service.create(buyer, seller, 100 + i, escrow_id=f"{prefix}-{i}").escrow["id"]
        ids.append(escrow_id)
        service.fund(escrow_id, buyer)
    for _ in range(20):
        clock.advance(gateway.behaviour.delay_max * 2 + 1)
        for body in gateway.due():
            service.record_payment_result(parse_callback(body))
        waiting = [e for e in ids if service.get(e).state.value == "created"]
        if not waiting and not gateway.pending:
            break
        for escrow_id in waiting:
            service.fund(escrow_id, service.get(escrow_id).buyer_id)
    for i, escrow_id in enumerate(ids):
        escrow = service.get(escrow_id)
        if escrow.state.value != "funded":
            continue
        service.ship(escrow_id, escrow.seller_id)
        if i % 3 == 0:
            service.dispute(escrow_id, escrow.buyer_id, "broken")
            service.resolve(escrow_id, ADMIN, "refund" if i % 2 else "release")
        else:
            service.confirm(escrow_id, escrow.buyer_id)
    return ids


_LAB_WORKER_OPTIONS = {"--crash-at", "--crash-on-signal", "--record", "--ack-before-effect"}


def spawn_worker(
    group: str,
    consumer: str,
    redis_url: str,
    database_url: str,
    *args: str,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """A real ``workbench worker`` OS process (``sim-worker``, the lab's, when ``args``
    ask for fault injection or a handling log)."""
    env = dict(os.environ, REDIS_URL=redis_url, DATABASE_URL=database_url)
    lab = any(a in _LAB_WORKER_OPTIONS for a in args)
    argv = [
        sys.executable,
        "-m",
        "workbench",
        "sim-worker" if lab else "worker",
        group,
        "--consumer",
        consumer,
        "--block-ms",
        "100",
        *args,
    ]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
