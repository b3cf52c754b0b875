"""The seller risk model: trained offline on one run, scored online, evaluated on another.

**What it predicts.** The probability that a seller is a fraudster (in the
simulation, :data:`FRAUD_CLASSES`: ``fraudulent`` takes the money and never
ships, ``exit_scam`` ships honestly for a while and then stops; the shipping
timer refunds the buyers), from the seller's features
(:mod:`workbench.analytics.features`) as they stand after an event. Labels are
the market's ground truth, the ``seller_class`` column of a run's ``escrows``
table; the runtime's model calls the positive class ``fraudulent``.

**What it is trained on.** Not one row per seller at the end of the run, but
the seller's feature vector after *each* of its events, replayed in time order
(:func:`~simulations.analytics.frames.online_features`): the distribution the
online scorer sees, early snapshots with one unshipped escrow included. A
model trained on end-of-run rows alone would never have seen a seller with one
funded escrow a minute old, and would flag every honest seller at its first
sale.

**The estimator.** A scikit-learn ``Pipeline``: median imputation with
missing-value indicators (a rate is NaN while its denominator is 0, a mean
fulfilment time NaN until something ships: "no evidence", which the indicator
keeps apart from "evidence of a median value"), standard scaling, and an
L2-regularised logistic regression with balanced class weights. Linear,
deterministic (lbfgs, no randomness), fast to fit (seconds) and to score (one
``predict_proba`` per consumer batch), and its coefficients read as "what
makes a seller look risky" (:func:`coefficients`).

**The threshold.** A seller is *flagged* when one of its online scores crosses
the threshold. It is chosen on the training run, on out-of-fold scores (5-fold
``GroupKFold`` by seller, so no seller is scored by a model that saw it), to
maximise F1 of "flagged at some point" against the label: the decision the
online path actually makes.

**Evaluation** (:func:`evaluate`, on a run of another seed): per seller at the
end of the run, ROC AUC, average precision, precision and recall at the
threshold, beside the *base-rate classifier* (every seller scored with the training
run's fraud share, as ``DummyClassifier(strategy="prior")`` would: ROC AUC
0.5, average precision = prevalence, and flagging anyone flags everyone, so
its precision is the prevalence); online,
which sellers were ever flagged (precision, recall, flag rate per seller
class) and the **detection delay** of each fraudulent seller: how many of its
escrows had been opened, and how many hours had passed since its first, when
its score first crossed the threshold.

**Artefacts** (:func:`save`, :func:`load`): ``data/models/<name>/model.joblib``
and ``metadata.json`` (features, threshold, training scenario and seed, class
balance, training metrics, package versions, creation time from an injectable
clock). The version is the first 12 hex digits of the SHA-256 of the model
file: the same training data give the same version. ``load`` unpickles: load
only artefacts you made.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import io
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from simulations.analytics.frames import batch_features, facts_from_published, online_features
from workbench.analytics.features import MODEL_FEATURES
from workbench.analytics.model import (
    DEFAULT_NAME,
    METADATA_FILE,
    MODEL_FILE,
    RiskModel,
)
from workbench.domain.clock import Clock, SystemClock
from workbench.paths import data_dir

if TYPE_CHECKING:
    from simulations.analysis.tables import RunTables


def make_estimator() -> Pipeline:
    """The untrained pipeline (see the module docstring)."""
    return Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", add_indicator=True)),
            ("scale", StandardScaler()),
            ("classify", LogisticRegression(max_iter=5000, class_weight="balanced")),
        ]
    )


#: Seller classes the model should flag: both take buyers' money without shipping.
FRAUD_CLASSES = ("fraudulent", "exit_scam")


def labels(tables: RunTables, role: str = "seller") -> pd.Series:
    """Ground truth per party: True for sellers of a :data:`FRAUD_CLASSES` class
    (``role="seller"``)."""
    if role != "seller":
        raise ValueError("only sellers have a fraud label (seller_class)")
    escrows = tables.escrows.drop_duplicates("seller_id").set_index("seller_id")
    truth = escrows["seller_class"].isin(FRAUD_CLASSES)
    truth.index.name = "party"
    return truth.astype(bool)


def seller_classes(tables: RunTables) -> pd.Series:
    """``seller_class`` per seller id."""
    classes = tables.escrows.drop_duplicates("seller_id").set_index("seller_id")["seller_class"]
    classes.index.name = "party"
    return classes


def train(
    tables: RunTables,
    *,
    name: str = DEFAULT_NAME,
    clock: Clock | None = None,
    folds: int = 5,
) -> RiskModel:
    """Fit the seller risk model on one run's tables (``RunTables``).

    Rows: each seller's features after each of its events (time order);
    label: the seller is fraudulent. The threshold comes from out-of-fold
    scores (folds by seller). ``clock`` stamps ``created_at`` in the metadata.
    """
    truth = labels(tables)
    facts = facts_from_published(tables.published)
    rows = online_features(facts, "seller")
    rows = rows[rows["party"].isin(truth.index)]
    y = truth.reindex(rows["party"]).to_numpy()
    if y.all() or not y.any():
        raise ValueError(
            "the training run needs both fraudulent and other sellers "
            f"(got {int(y.sum())} fraudulent rows of {len(y)})"
        )
    x = rows[list(MODEL_FEATURES)]
    groups = rows["party"].to_numpy()
    n_sellers = rows["party"].nunique()
    cv = GroupKFold(n_splits=min(folds, n_sellers))
    oof = cross_val_predict(make_estimator(), x, y, groups=groups, cv=cv, method="predict_proba")
    oof_scores = oof[:, 1]
    threshold, oof_f1 = choose_threshold(rows["party"], oof_scores, truth)
    estimator = make_estimator().fit(x, y)

    final = batch_features(tables, "seller")
    final = final[final.index.isin(truth.index)]
    final_y = truth.reindex(final.index).to_numpy()
    final_scores = estimator.predict_proba(final[list(MODEL_FEATURES)])[:, 1]
    classes = seller_classes(tables)
    manifest = getattr(tables, "manifest", {}) or {}
    now = (clock or SystemClock()).now()
    metadata: dict[str, Any] = {
        "name": name,
        "kind": f"seller fraud risk: P(seller_class in {list(FRAUD_CLASSES)})",
        "features": list(MODEL_FEATURES),
        "threshold": threshold,
        "threshold_rule": (
            "maximises F1 of 'ever flagged' (a seller's peak online score >= threshold) "
            f"on out-of-fold scores ({cv.n_splits}-fold GroupKFold by seller); halfway "
            "between the chosen peak and the next lower one"
        ),
        "estimator": repr(estimator),
        "training": {
            "scenario": manifest.get("scenario"),
            "seed": manifest.get("seed"),
            "git_sha": manifest.get("git_sha"),
            "market": (manifest.get("params") or {}).get("market"),
            "run": (manifest.get("params") or {}).get("run"),
            "rows": len(rows),
            "positive_rows": int(y.sum()),
            "sellers": int(n_sellers),
            "sellers_by_class": {k: int(v) for k, v in classes.value_counts().items()},
            "base_rate": float(truth.mean()),
        },
        "training_metrics": {
            "out_of_fold_roc_auc_rows": float(roc_auc_score(y, oof_scores)),
            "out_of_fold_ever_flagged_f1": oof_f1,
            "in_sample_roc_auc_rows": float(roc_auc_score(y, estimator.predict_proba(x)[:, 1])),
            "in_sample_roc_auc_final": _auc(final_y, final_scores),
        },
        "created_at": now,
        "created_at_iso": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
        "versions": _versions(),
    }
    version = _digest(_dump(estimator))
    metadata["version"] = version
    return RiskModel(name, version, estimator, MODEL_FEATURES, threshold, metadata)


def choose_threshold(party: pd.Series, scores: np.ndarray, truth: pd.Series) -> tuple[float, float]:
    """The threshold maximising F1 of "ever flagged" per seller, and that F1
    (``scores``: one per row of ``party``; ``truth``: the label per party).

    A seller is flagged iff its peak score reaches the threshold, so only the
    peaks matter: each peak is a candidate cut (ties: the lowest cut, more
    recall), and the threshold sits halfway between the chosen peak and the
    next lower one, not on a training seller's exact score.
    """
    peak = pd.Series(scores, index=party.to_numpy()).groupby(level=0).max()
    y = truth.reindex(peak.index).to_numpy()
    values = peak.to_numpy()
    candidates = np.unique(values)
    best_f1, best_i = -1.0, 0
    for i, cut in enumerate(candidates):
        f1 = float(f1_score(y, values >= cut, zero_division=0.0))
        if f1 > best_f1:
            best_f1, best_i = f1, i
    cut = float(candidates[best_i])
    below = float(candidates[best_i - 1]) if best_i > 0 else cut
    return (cut + below) / 2, best_f1


def coefficients(model: RiskModel) -> pd.Series:
    """The logistic regression's coefficients per (scaled) input, largest first:
    positive pushes towards "fraudulent". Missing-value indicators are named
    ``missingindicator_<feature>``."""
    pipeline = model.estimator
    names = pipeline[:-1].get_feature_names_out(list(model.features))
    coef = pipeline[-1].coef_[0]
    return pd.Series(coef, index=names).sort_values(key=np.abs, ascending=False)


# -- artefacts ---------------------------------------------------------------------


def _dump(estimator: Any) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("escrow-workbench", "scikit-learn", "joblib", "numpy", "pandas", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def save(model: RiskModel, directory: str | Path | None = None) -> Path:
    """Write ``model.joblib`` and ``metadata.json`` to ``directory`` (default
    ``<data dir>/models/<name>/``, :func:`workbench.paths.data_dir`); return the directory."""
    out = Path(directory) if directory is not None else data_dir() / "models" / model.name
    out.mkdir(parents=True, exist_ok=True)
    data = _dump(model.estimator)
    if _digest(data) != model.version:
        raise ValueError(f"model {model.name}: its bytes do not match version {model.version}")
    (out / MODEL_FILE).write_bytes(data)
    metadata = {
        **model.metadata,
        "name": model.name,
        "version": model.version,
        "features": list(model.features),
        "threshold": model.threshold,
        "model_file": MODEL_FILE,
        "model_sha256": hashlib.sha256(data).hexdigest(),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    return out


# -- evaluation --------------------------------------------------------------------


def replay_scores(model: RiskModel, tables: RunTables) -> pd.DataFrame:
    """Score each seller after each of its events, replayed in time order: the
    online scorer's output, computed offline. Columns ``event_id, t, party, score``."""
    rows = online_features(facts_from_published(tables.published), "seller")
    return pd.DataFrame(
        {
            "event_id": rows["event_id"],
            "t": rows["t"],
            "party": rows["party"],
            "score": model.score(rows),
        }
    )


def detection_delays(scores: pd.DataFrame, tables: RunTables, threshold: float) -> pd.DataFrame:
    """For each fraudulent seller: when its score first reached ``threshold``.

    ``scores`` has ``party`` (seller id), ``t`` (run time of the scored event)
    and ``score``: from :func:`replay_scores`, or from the risk stream
    (:func:`simulations.analytics.online.online_scores`). Columns: ``party,
    first_escrow_t, flagged, flagged_t, escrows`` (of its escrows opened by
    then), ``delay_s``, ``delay_h``.
    """
    truth = labels(tables)
    fraud = truth.index[truth.to_numpy()]
    created = tables.published[tables.published["type"] == "escrow.created"]
    created = created.drop_duplicates("event_id")
    created_seller = created["users"].str.split(",", n=1).str[1]
    opened = pd.DataFrame({"party": created_seller.to_numpy(), "t": created["t_committed"]})
    rows = []
    for seller in sorted(fraud):
        mine = opened.loc[opened["party"] == seller, "t"].sort_values()
        first = float(mine.iloc[0]) if len(mine) else np.nan
        hits = scores[(scores["party"] == seller) & (scores["score"] >= threshold)]
        if hits.empty:
            rows.append({"party": seller, "first_escrow_t": first, "flagged": False,
                         "flagged_t": np.nan, "escrows": np.nan,
                         "delay_s": np.nan, "delay_h": np.nan})  # fmt: skip
            continue
        t_flag = float(hits["t"].min())
        rows.append({"party": seller, "first_escrow_t": first, "flagged": True,
                     "flagged_t": t_flag, "escrows": int((mine <= t_flag).sum()),
                     "delay_s": t_flag - first, "delay_h": (t_flag - first) / 3600})  # fmt: skip
    return pd.DataFrame(rows, columns=["party", "first_escrow_t", "flagged", "flagged_t",
                                       "escrows", "delay_s", "delay_h"])  # fmt: skip


@dataclass
class Evaluation:
    """What :func:`evaluate` found: ``summary`` (flat dict of numbers),
    ``sellers`` (per seller: class, final score, flagged at the end, ever
    flagged online) and ``detection`` (per fraudulent seller)."""

    summary: dict[str, Any]
    sellers: pd.DataFrame
    detection: pd.DataFrame


def _auc(y: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else float("nan")


def evaluate(model: RiskModel, tables: RunTables, scores: pd.DataFrame | None = None) -> Evaluation:
    """Evaluate ``model`` on a run it was not trained on.

    End of run (one row per seller, :func:`~simulations.analytics.frames.batch_features`):
    ROC AUC, average precision, precision, recall and F1 at the threshold, and
    the same for the base-rate classifier (the training run's fraud share, from
    the model's metadata, as everyone's score). Online (``scores``: the risk stream's,
    or by default :func:`replay_scores`): which sellers were ever flagged, and
    the detection delay of each fraudulent seller.
    """
    truth = labels(tables)
    classes = seller_classes(tables)
    final = batch_features(tables, "seller")
    final = final[final.index.isin(truth.index)]
    y = truth.reindex(final.index).to_numpy()
    final_scores = model.score(final)
    flagged_end = final_scores >= model.threshold

    base_rate_train = float(model.metadata.get("training", {}).get("base_rate", y.mean()))
    # The base-rate classifier: everyone gets the training run's fraud share.
    dummy_scores = np.full(len(y), base_rate_train)

    if scores is None:
        scores = replay_scores(model, tables)
    peak = scores.groupby("party")["score"].max().reindex(final.index)
    ever = (peak >= model.threshold).fillna(False).to_numpy()
    detection = detection_delays(scores, tables, model.threshold)
    hit = detection[detection["flagged"]]

    sellers = pd.DataFrame(
        {
            "seller_class": classes.reindex(final.index),
            "fraudulent": y,
            "final_score": final_scores,
            "flagged_at_end": flagged_end,
            "peak_online_score": peak.to_numpy(),
            "ever_flagged": ever,
        },
        index=final.index,
    )
    flag_rate = sellers.groupby("seller_class")["ever_flagged"].mean()
    summary: dict[str, Any] = {
        "model": model.name,
        "version": model.version,
        "threshold": model.threshold,
        "scenario": tables.manifest.get("scenario"),
        "seed": tables.manifest.get("seed"),
        "sellers": int(len(y)),
        "fraudulent": int(y.sum()),
        "base_rate": float(y.mean()),
        "roc_auc": _auc(y, final_scores),
        "average_precision": float(average_precision_score(y, final_scores)),
        "precision": float(precision_score(y, flagged_end, zero_division=0.0)),
        "recall": float(recall_score(y, flagged_end, zero_division=0.0)),
        "f1": float(f1_score(y, flagged_end, zero_division=0.0)),
        "base_rate_classifier": {
            "score": base_rate_train,
            "roc_auc": _auc(y, dummy_scores),
            "average_precision": float(average_precision_score(y, dummy_scores)),
            # It gives everyone the same score: flagging anyone flags everyone.
            "precision": float(y.mean()),
            "recall": 1.0,
        },
        "online": {
            "ever_flagged_precision": float(precision_score(y, ever, zero_division=0.0)),
            "ever_flagged_recall": float(recall_score(y, ever, zero_division=0.0)),
            "flag_rate_by_class": {str(k): float(v) for k, v in flag_rate.items()},
            "detected": int(len(hit)),
            "detection_escrows_median": _median(hit["escrows"]),
            "detection_escrows_mean": _mean(hit["escrows"]),
            "detection_hours_median": _median(hit["delay_h"]),
            "detection_hours_mean": _mean(hit["delay_h"]),
            "detection_seconds_median": _median(hit["delay_s"]),
        },
    }
    summary["margin_roc_auc"] = summary["roc_auc"] - summary["base_rate_classifier"]["roc_auc"]
    summary["margin_average_precision"] = (
        summary["average_precision"] - summary["base_rate_classifier"]["average_precision"]
    )
    summary["margin_precision"] = summary["precision"] - summary["base_rate"]
    return Evaluation(summary, sellers, detection)


def _median(values: pd.Series) -> float:
    return float(values.median()) if len(values) else float("nan")


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else float("nan")
