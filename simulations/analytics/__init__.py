"""The risk model, offline: features as frames, training, evaluation.

The online scorer is the runtime's (:mod:`workbench.analytics`); here it is
trained on one run and judged on another (:mod:`.training`, whose docstring
says what it predicts and how), its features computed over whole runs
(:mod:`.frames`), and its output read back as frames (:mod:`.online`). Beside
it, two detectors that need no model (:mod:`.detectors`: the unshipped-escrow
rule and the runtime's shipping timer), and the comparison of all three
against ground truth over seeds (:mod:`.comparison`).
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
    from simulations.analytics.comparison import (
        caught_curve,
        compare_detectors,
        detector_summary,
        difference,
        evaluate_detectors,
        exposure,
        interval,
        summaries_by_seed,
    )
    from simulations.analytics.detectors import (
        fit_unshipped_rule,
        model_flags,
        never_shipped,
        timer_flags,
        unshipped_rule_flags,
    )
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
        FRAUD_CLASSES,
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
    "FRAUD_CLASSES",
    "Evaluation",
    "backlog",
    "batch_features",
    "caught_curve",
    "coefficients",
    "compare_detectors",
    "detection_delays",
    "detector_summary",
    "difference",
    "evaluate",
    "evaluate_detectors",
    "exposure",
    "facts_from_published",
    "features_from_facts",
    "fit_unshipped_rule",
    "interval",
    "labels",
    "lag_summary",
    "model_flags",
    "never_shipped",
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
    "summaries_by_seed",
    "timer_flags",
    "train",
    "unshipped_rule_flags",
]
__getattr__ = lazy(
    __name__,
    {
        "FRAUD_CLASSES": "training",
        "Evaluation": "training",
        "backlog": "online",
        "batch_features": "frames",
        "caught_curve": "comparison",
        "coefficients": "training",
        "compare_detectors": "comparison",
        "detection_delays": "training",
        "detector_summary": "comparison",
        "difference": "comparison",
        "evaluate": "training",
        "evaluate_detectors": "comparison",
        "exposure": "comparison",
        "facts_from_published": "frames",
        "features_from_facts": "frames",
        "fit_unshipped_rule": "detectors",
        "interval": "comparison",
        "labels": "training",
        "lag_summary": "online",
        "model_flags": "detectors",
        "never_shipped": "detectors",
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
        "summaries_by_seed": "comparison",
        "timer_flags": "detectors",
        "train": "training",
        "unshipped_rule_flags": "detectors",
    },
)
