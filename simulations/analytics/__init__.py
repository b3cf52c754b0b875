"""The risk model, offline: features as frames, training, evaluation.

The online scorer is the runtime's (:mod:`workbench.analytics`); here it is
trained on one run and judged on another (:mod:`.training`, whose docstring
says what it predicts and how), its features computed over whole runs
(:mod:`.frames`), and its output read back as frames (:mod:`.online`).
``python -m simulations.analytics`` trains and evaluates from the shell.

Typical use, from a notebook::

    from simulations import load, simulate
    from simulations import analytics

    train_run = simulate(load("baseline", ["market.sellers=120"]), 1)
    test_run = simulate(load("baseline", ["market.sellers=120"]), 2)
    model = analytics.train(train_run)
    analytics.save(model)                       # data/models/seller-risk/
    result = analytics.evaluate(model, test_run)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from simulations.analytics.frames import (
        batch_features,
        facts_from_published,
        features_from_facts,
        online_features,
        state_frame,
    )
    from simulations.analytics.online import (
        backlog,
        lag_summary,
        online_scores,
        read_risk_stream,
        risk_table_scores,
        scorer_lag,
        streaming_features,
    )
    from simulations.analytics.training import (
        Evaluation,
        coefficients,
        detection_delays,
        evaluate,
        labels,
        replay_scores,
        save,
        seller_classes,
        train,
    )

__all__ = [
    "Evaluation",
    "backlog",
    "batch_features",
    "coefficients",
    "detection_delays",
    "evaluate",
    "facts_from_published",
    "features_from_facts",
    "labels",
    "lag_summary",
    "online_features",
    "online_scores",
    "read_risk_stream",
    "replay_scores",
    "risk_table_scores",
    "save",
    "scorer_lag",
    "seller_classes",
    "state_frame",
    "streaming_features",
    "train",
]
__getattr__ = lazy(
    __name__,
    {
        "Evaluation": "training",
        "backlog": "online",
        "batch_features": "frames",
        "coefficients": "training",
        "detection_delays": "training",
        "evaluate": "training",
        "facts_from_published": "frames",
        "features_from_facts": "frames",
        "labels": "training",
        "lag_summary": "online",
        "online_features": "frames",
        "online_scores": "online",
        "read_risk_stream": "online",
        "replay_scores": "training",
        "risk_table_scores": "online",
        "save": "training",
        "scorer_lag": "online",
        "seller_classes": "training",
        "state_frame": "frames",
        "streaming_features": "online",
        "train": "training",
    },
)
