"""The seller risk model as the online scorer uses it: load it, score feature vectors.

A model is trained and evaluated in the lab (:mod:`simulations.analytics.training`,
which says what it predicts, what it is trained on and how it is judged) and
saved as ``<data dir>/models/<name>/model.joblib`` beside ``metadata.json``
(features, threshold, version, provenance). The version is the first 12 hex
digits of the SHA-256 of the model file; :func:`load` checks the file against
the recorded hash, then unpickles it: load only artefacts you made.

Loading and scoring need numpy, scikit-learn and joblib (the ``analytics``
extra, :data:`ANALYTICS_EXTRA`); importing this module needs none of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


DEFAULT_NAME = "seller-risk"
MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"
POSITIVE_CLASS = "fraudulent"
#: What loading and scoring a model needs beyond the runtime (module names).
ANALYTICS_EXTRA = ("numpy", "sklearn", "joblib")


@dataclass(frozen=True)
class RiskModel:
    """A fitted estimator with what it takes to use it: its features, threshold
    and version (and the rest of its metadata)."""

    name: str
    version: str
    estimator: Any
    features: tuple[str, ...]
    threshold: float
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def score(self, features: Any) -> np.ndarray:
        """P(fraudulent) for each row of a feature frame (extra columns ignored)."""
        import numpy as np

        if len(features) == 0:
            return np.zeros(0)
        return self.estimator.predict_proba(features[list(self.features)])[:, 1]

    def score_rows(self, rows: list[dict[str, float]]) -> np.ndarray:
        """P(fraudulent) for feature vectors as dicts (what the consumer holds)."""
        import numpy as np

        if not rows:
            return np.zeros(0)
        matrix = np.array([[row[f] for f in self.features] for row in rows], dtype="float64")
        with warnings.catch_warnings():
            # Fitted on a frame; given plain arrays in the same column order, which
            # scikit-learn accepts with a warning about the missing column names.
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            return self.estimator.predict_proba(matrix)[:, 1]


def load(directory: str | Path) -> RiskModel:
    """A model saved by the lab's ``simulations.analytics.save``. Checks the file
    against its recorded hash."""
    path = Path(directory)
    meta_path = path / METADATA_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a model directory (no {METADATA_FILE})")
    metadata = json.loads(meta_path.read_text())
    data = (path / metadata.get("model_file", MODEL_FILE)).read_bytes()
    if hashlib.sha256(data).hexdigest() != metadata["model_sha256"]:
        raise ValueError(f"{path}: {MODEL_FILE} does not match the hash in {METADATA_FILE}")
    import joblib  # the analytics extra: unpickling needs scikit-learn too

    estimator = joblib.load(io.BytesIO(data))
    return RiskModel(
        metadata["name"],
        metadata["version"],
        estimator,
        tuple(metadata["features"]),
        float(metadata["threshold"]),
        metadata,
    )
