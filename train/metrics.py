"""Classification metrics from every sample's label and probabilities: pure numpy, so evaluation
on any number of ranks reduces to one call on the gathered arrays, and tests count by hand.

Definitions follow torchmetrics (what training logs as val/acc and val/f1): macro F1 averages
the per-class F1 over the classes that occur in the labels or the predictions; a class never
predicted has precision 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_report(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """labels (N,) int class indices; probs (N, C) in `classes` order."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs)
    n, c = probs.shape
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((c, c), dtype=np.int64)  # rows: true class, columns: predicted
    np.add.at(confusion, (labels, predicted), 1)
    tp = np.diag(confusion)
    support, predicted_n = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = tp / np.maximum(1, predicted_n)
    recall = tp / np.maximum(1, support)
    f1 = 2 * tp / np.maximum(1, support + predicted_n)
    present = (support + predicted_n) > 0
    out = {
        "samples": int(n),
        "top1": float((predicted == labels).mean()) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
    if c > 5:
        top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
        out["top5"] = float((top5 == labels[:, None]).any(axis=1).mean()) if n else 0.0
    out["per_class"] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    out["confusion"] = confusion.tolist()
    return out
