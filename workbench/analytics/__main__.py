"""``python -m workbench.analytics``: the scorer as a worker process, and training.

Not wired into the ``workbench`` command yet; it mirrors ``workbench worker``
(heartbeats, claims, SIGTERM finishes the batch, ``--crash-at`` SIGKILLs the
process at a crash point for fault-injection tests).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from workbench.consumer import CRASH_POINTS, ConsumerSettings, ConsumerWorker, sigkill_at


@click.group()
def main() -> None:
    """The analytics pipeline: train the risk model, run the scorer."""


@main.command()
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="model directory (model.joblib + metadata.json)",
)
@click.option("--redis-url", envvar="REDIS_URL", help="[env REDIS_URL]")
@click.option("--database-url", envvar="DATABASE_URL", help="[env DATABASE_URL]")
@click.option("--prefix", default="wb", show_default=True, help="key prefix of the source streams")
@click.option("--risk-prefix", help="key prefix of the risk stream [default: --prefix]")
@click.option("--group", default="analytics", show_default=True)
@click.option("--consumer", help="consumer name [default analytics-PID]")
@click.option("--batch-size", default=500, show_default=True)
@click.option("--block-ms", default=1000, show_default=True)
@click.option("--dead-after", default=10.0, show_default=True, help="seconds")
@click.option(
    "--crash-at",
    type=click.Choice(CRASH_POINTS),
    help="fault injection: SIGKILL this process at this point",
)
@click.option("--crash-batch", default=1, show_default=True)
@click.option("-v", "--verbose", is_flag=True)
def worker(
    model_dir: Path,
    redis_url: str | None,
    database_url: str | None,
    prefix: str,
    risk_prefix: str | None,
    group: str,
    consumer: str | None,
    batch_size: int,
    block_ms: int,
    dead_after: float,
    crash_at: str | None,
    crash_batch: int,
    verbose: bool,
) -> None:
    """Score events until SIGTERM (finishes the batch, acks, exits)."""
    from workbench.analytics.consumer import RiskNames, RiskScorer
    from workbench.analytics.model import load
    from workbench.clock import clock_from_env
    from workbench.log import StreamNames, connect
    from workbench.store import Store
    from workbench.store import database_url as default_database_url

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not redis_url:
        raise click.UsageError("no Redis URL: pass --redis-url or set REDIS_URL")
    store = Store(database_url or default_database_url())
    store.create_schema()
    client = connect(redis_url)
    names = StreamNames(prefix)
    clock = clock_from_env()
    scorer = RiskScorer(
        store, client, load(model_dir), group=group, names=names,
        risk_names=RiskNames(risk_prefix or prefix), clock=clock,
    )  # fmt: skip
    w = ConsumerWorker(
        client,
        scorer,
        consumer=consumer or f"{group}-{os.getpid()}",
        names=names,
        settings=ConsumerSettings(batch_size=batch_size, block_ms=block_ms,
                                  dead_after_s=dead_after),
        clock=clock,
        crash_hook=sigkill_at(crash_at, crash_batch) if crash_at else None,
    )  # fmt: skip
    w.install_signal_handlers()
    w.setup()
    click.echo(f"{w.consumer}: scoring {group} from {', '.join(w.streams)}", err=True)
    w.run()
    w.leave()
    click.echo(f"{w.consumer}: stopped; {w.stats}; published {scorer.published}", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", default="seller-risk", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="[default data/models/NAME]")
def train(run_dir: Path, name: str, out: Path | None) -> None:
    """Train the risk model on a run directory (``data/runs/...``) and save it."""
    from workbench.analytics.model import save
    from workbench.analytics.model import train as fit
    from workbench.runs import RunTables

    model = fit(RunTables.load(run_dir), name=name)
    path = save(model, out)
    click.echo(json.dumps({"model": str(path), "version": model.version,
                           "threshold": model.threshold,
                           **model.metadata["training_metrics"]}, indent=2))  # fmt: skip


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def evaluate(model_dir: Path, run_dir: Path) -> None:
    """Evaluate a saved model on another run directory; print the summary as JSON."""
    from workbench.analytics.model import evaluate as run_evaluation
    from workbench.analytics.model import load
    from workbench.runs import RunTables

    result = run_evaluation(load(model_dir), RunTables.load(run_dir))
    click.echo(json.dumps(result.summary, indent=2, default=str))


if __name__ == "__main__":
    main()
