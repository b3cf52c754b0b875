"""Online seller-risk scoring: events -> features -> a score per event.

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

* **Features** (:mod:`.features`): per seller and per buyer, counts, rates,
  fulfilment time, velocity, amounts; a function of the *set* of events, so
  at-least-once delivery and cross-stream reordering cannot change them.
* **Model** (:mod:`.model`): a model trained in the lab
  (:mod:`simulations.analytics`), loaded and checked against its hash.
* **Scorer** (:mod:`.scorer`): :class:`RiskScorer`, a consumer-group handler
  publishing one ``risk.scored`` entry per source event, exactly once per id.

``workbench worker analytics --model data/models/seller-risk`` runs it
(loading a model needs the ``analytics`` extra: scikit-learn, joblib).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.analytics.features import MODEL_FEATURES, Fact, FeatureState
    from workbench.analytics.model import RiskModel, load
    from workbench.analytics.scorer import GROUP, RiskScorer, stored_facts

__all__ = [
    "Fact",
    "FeatureState",
    "GROUP",
    "MODEL_FEATURES",
    "RiskModel",
    "RiskScorer",
    "load",
    "stored_facts",
]
__getattr__ = lazy(
    __name__,
    {
        "Fact": "features",
        "FeatureState": "features",
        "GROUP": "scorer",
        "MODEL_FEATURES": "features",
        "RiskModel": "model",
        "RiskScorer": "scorer",
        "load": "model",
        "stored_facts": "scorer",
    },
)
