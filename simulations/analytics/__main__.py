"""``python -m simulations.analytics``: train and evaluate the risk model.

The scorer runs as ``workbench worker analytics --model DIR``, a worker like
every other group's (heartbeats, claims, SIGTERM finishes the batch); the lab's
``workbench sim-worker analytics`` is the same worker with fault injection
(``--crash-at`` SIGKILLs the process at a crash point).
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def main() -> None:
    """Train and evaluate the risk model (the scorer: ``workbench worker analytics``)."""


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", default="seller-risk", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="[default data/models/NAME]")
def train(run_dir: Path, name: str, out: Path | None) -> None:
    """Train the risk model on a run directory (``data/runs/...``) and save it."""
    from simulations.analysis.tables import RunTables
    from simulations.analytics.training import save
    from simulations.analytics.training import train as fit

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
    from simulations.analysis.tables import RunTables
    from simulations.analytics.training import evaluate as run_evaluation
    from workbench.analytics.model import load

    result = run_evaluation(load(model_dir), RunTables.load(run_dir))
    click.echo(json.dumps(result.summary, indent=2, default=str))


if __name__ == "__main__":
    main()
