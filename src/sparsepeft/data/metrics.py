"""The official GLUE metrics, from scikit-learn and SciPy (no hub download needed)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def compute_metrics(metric_names: Sequence[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics from raw model outputs (logits, or scores for regression) and reference labels.

    With more than one metric a ``combined_score`` (their mean) is added, as transformers' run_glue does.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    regression = any(m in ("pearson", "spearmanr") for m in metric_names)
    if regression:
        predicted = predictions.reshape(len(labels), -1)[:, 0]
    else:
        predicted = predictions.argmax(-1) if predictions.ndim > 1 else predictions
    results = {}
    for name in metric_names:
        if name == "accuracy":
            results[name] = float(accuracy_score(labels, predicted))
        elif name == "f1":
            results[name] = float(f1_score(labels, predicted))
        elif name == "matthews_correlation":
            results[name] = float(matthews_corrcoef(labels, predicted))
        elif name == "pearson":
            results[name] = float(pearsonr(predicted, labels)[0]) if np.std(predicted) > 0 else 0.0
        elif name == "spearmanr":
            results[name] = float(spearmanr(predicted, labels)[0]) if np.std(predicted) > 0 else 0.0
        else:
            raise ValueError(f"Unknown metric {name!r}.")
    if len(results) > 1:
        results["combined_score"] = float(np.mean(list(results.values())))
    return results


def primary_metric(metric_names: Sequence[str]) -> str:
    return "combined_score" if len(metric_names) > 1 else metric_names[0]
