"""The analytics pipeline: events → features → risk scores → evaluation.

::

    escrow, payment, dispute streams
        │ XREADGROUP (group "analytics", ConsumerWorker)
        ▼
    RiskScorer.handle ── one SQL transaction: inbox claim, analytics_facts rows,
        │                 seller features as of each event, risk_scores rows
        │ Lua: SET NX {prefix}:scored:analytics:<event id>, XADD {prefix}:risk
        ▼
    {prefix}:risk  (risk.scored: seller_id, score, flagged, model, version,
                    source_event_id, event_at, scored_at)

* **Features** (:mod:`.features`): per seller and per buyer, counts of escrows,
  funded, shipped, released, refunded, cancelled, expired, disputes; rates;
  fulfilment time; velocity; amounts. A function of the *set* of events, so
  at-least-once delivery and cross-stream reordering cannot change them. Two
  implementations, one answer: :class:`FeatureState` (incremental, what the
  consumer folds) and :func:`batch_features` (pandas over a run's tables).
* **Model** (:mod:`.model`): trained offline on one run (each seller's features
  after each of its events, labelled by the simulation's ground truth
  ``seller_class == "fraudulent"``), saved under ``data/models/<name>/`` with
  ``metadata.json``; evaluated on another seed against the base-rate
  classifier, with detection delays (escrows and hours until a fraudulent
  seller is flagged).
* **Online scoring** (:mod:`.consumer`): :class:`RiskScorer`, a consumer-group
  handler, publishes one ``risk.scored`` entry per source event, exactly once
  per event id; :func:`scorer_lag` reads how far it ran behind the stream.

Typical use, from a notebook::

    from simulations.run import simulate
    from simulations.scenario import load
    from workbench import analytics

    train_run = simulate(load("baseline", ["market.sellers=120"]), 1)
    test_run = simulate(load("baseline", ["market.sellers=120"]), 2)
    model = analytics.train(train_run)
    analytics.save(model)                       # data/models/seller-risk/
    result = analytics.evaluate(model, test_run)
    result.summary["roc_auc"], result.detection

``workbench worker analytics --model data/models/seller-risk`` runs the
scorer as a worker process (``workbench worker --help`` for its options).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.analytics.consumer import (
        GROUP,
        RiskNames,
        RiskScorer,
        backlog,
        lag_summary,
        online_scores,
        read_risk_stream,
        risk_table_scores,
        scorer_lag,
        streaming_features,
    )
    from workbench.analytics.features import (
        MODEL_FEATURES,
        Fact,
        FeatureState,
        batch_features,
        facts_from_published,
        features_from_facts,
        online_features,
    )
    from workbench.analytics.model import (
        Evaluation,
        RiskModel,
        coefficients,
        detection_delays,
        evaluate,
        load,
        replay_scores,
        save,
        seller_classes,
        train,
    )

__all__ = [
    "Evaluation",
    "Fact",
    "FeatureState",
    "GROUP",
    "MODEL_FEATURES",
    "RiskModel",
    "RiskNames",
    "RiskScorer",
    "backlog",
    "batch_features",
    "coefficients",
    "detection_delays",
    "evaluate",
    "facts_from_published",
    "features_from_facts",
    "lag_summary",
    "load",
    "online_features",
    "online_scores",
    "read_risk_stream",
    "replay_scores",
    "risk_table_scores",
    "save",
    "seller_classes",
    "scorer_lag",
    "streaming_features",
    "train",
]

# Where each public name lives (imported on first use).
_WHERE = {
    "GROUP": "consumer",
    "RiskNames": "consumer",
    "RiskScorer": "consumer",
    "backlog": "consumer",
    "lag_summary": "consumer",
    "online_scores": "consumer",
    "read_risk_stream": "consumer",
    "scorer_lag": "consumer",
    "risk_table_scores": "consumer",
    "streaming_features": "consumer",
    "MODEL_FEATURES": "features",
    "Fact": "features",
    "FeatureState": "features",
    "batch_features": "features",
    "facts_from_published": "features",
    "features_from_facts": "features",
    "online_features": "features",
    "Evaluation": "model",
    "RiskModel": "model",
    "coefficients": "model",
    "detection_delays": "model",
    "evaluate": "model",
    "load": "model",
    "replay_scores": "model",
    "save": "model",
    "seller_classes": "model",
    "train": "model",
}


def __getattr__(name: str) -> Any:
    # Lazy: the features need only pandas; the model and the scorer pull in scikit-learn.
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench.analytics' has no attribute {name!r}")
    return getattr(import_module(f"workbench.analytics.{module}"), name)
