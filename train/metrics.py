"""Classification, multi-label and segmentation metrics from every sample's targets and
probabilities (or a pixel confusion matrix): pure numpy, so evaluation on any number of ranks
reduces to one call on the gathered arrays, and tests count by hand.

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


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """AP of one label as torchmetrics computes it: the sum over distinct scores (descending) of
    precision × the recall gained there; nan when no sample has the label."""
    truth, scores = np.asarray(truth, bool), np.asarray(scores, np.float64)
    if not truth.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(t)[last]
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0, tp]) / truth.sum()
    return float((precision * recall_gain).sum())


def multilabel_report(
    truth: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    labels: Sequence[int],
    thresholds: np.ndarray,
) -> dict:
    """truth (N, C) bool, probs (N, C); per defect label (`labels`, columns) AP and, at each
    label's threshold, precision, recall, F1; their macro means; and exact-set accuracy (every
    defect label of a part right)."""
    truth, probs = np.asarray(truth, bool), np.asarray(probs)
    predicted = probs >= np.asarray(thresholds)[None, :]
    per = {}
    for j in labels:
        t, p = truth[:, j], predicted[:, j]
        tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
        per[classes[j]] = {
            "ap": average_precision(t, probs[:, j]),
            "precision": tp / max(1, tp + fp),
            "recall": tp / max(1, tp + fn),
            "f1": 2 * tp / max(1, 2 * tp + fp + fn),
            "threshold": float(thresholds[j]),
            "support": int(t.sum()),
        }
    cols = list(labels)
    aps = [v["ap"] for v in per.values() if not np.isnan(v["ap"])]
    n = len(truth)
    return {
        "samples": n,
        "macro_ap": float(np.mean(aps)) if aps else 0.0,
        "macro_f1": float(np.mean([v["f1"] for v in per.values()])) if per else 0.0,
        "exact_set_accuracy": float((predicted[:, cols] == truth[:, cols]).all(axis=1).mean()) if n else 0.0,
        "per_label": per,
    }


def segmentation_report(confusion: np.ndarray, classes: Sequence[str], good: int | None) -> dict:
    """From the pixel confusion matrix (C, C) (rows: true class, columns: predicted): per-class
    IoU = tp / (tp + fp + fn) and Dice = 2 tp / (2 tp + fp + fn), their means over the classes
    present (in the truth or the prediction), and defect-pixel IoU: every class but `good`
    merged into one, against good."""
    m = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(m)
    fp, fn = m.sum(axis=0) - tp, m.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    iou = tp / np.maximum(1, tp + fp + fn)
    dice = 2 * tp / np.maximum(1, 2 * tp + fp + fn)
    out = {
        "pixels": int(m.sum()),
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "mdice": float(dice[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {"iou": float(iou[i]), "dice": float(dice[i]), "pixels": int(m[i].sum())}
            for i, c in enumerate(classes)
        },
        "confusion": m.tolist(),
    }
    if good is not None:
        d = np.ones(len(classes), bool)
        d[good] = False
        both, t, p = int(m[np.ix_(d, d)].sum()), int(m[d].sum()), int(m[:, d].sum())
        out["defect_iou"] = both / max(1, t + p - both)
        out["defect_dice"] = 2 * both / max(1, t + p)
    return out


# ---- anomaly maps: pixel AUROC and AUPRO from histograms, so memory stays flat however many
# pixels a split has (a 1024 x 1024 image is a million) and rank parts add up exactly.

BINS = 10_000  # histogram bins over calibrated map values in [0, 1]: a resolution of 1e-4
PRO_FPR = 0.3  # AUPRO integrates the per-region overlap up to this false-positive rate (MVTec AD)


def pixel_counts(values: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(4, BINS) float64 for one image, summed over a split: [good pixels, defect pixels, the
    sum over defect regions of each region's pixel share, regions] per bin of `values` (H, W)
    in [0, 1]; `truth` (H, W) uint8 is 0 good, 1 defect (regions: 8-connected)."""
    from scipy import ndimage

    bins = np.minimum((np.clip(values, 0, 1) * BINS).astype(np.int64), BINS - 1).ravel()
    t = np.asarray(truth).ravel()
    out = np.zeros((4, BINS))
    out[0] = np.bincount(bins[t == 0], minlength=BINS)
    out[1] = np.bincount(bins[t == 1], minlength=BINS)
    labels, n = ndimage.label(np.asarray(truth) == 1, structure=np.ones((3, 3), bool))
    if n:
        region = labels.ravel()
        inside = region > 0
        size = np.bincount(region[inside], minlength=n + 1)
        # each defect pixel weighs 1 / its region's size: a region's weights sum to 1
        out[2] = np.bincount(bins[inside], weights=1.0 / size[region[inside]], minlength=BINS)
        out[3, 0] = n
    return out


def pixel_report(counts: np.ndarray) -> dict:
    """Pixel AUROC and AUPRO (normalised over false-positive rates up to PRO_FPR) from
    `pixel_counts` summed over a split; thresholds are the bin edges, descending."""
    good, defect, pro, regions = counts[0], counts[1], counts[2], counts[3, 0]
    if not defect.sum() or not good.sum():
        return {}
    # at threshold bin k: pixels with a value in bins >= k are called defect
    fpr = np.r_[0.0, np.cumsum(good[::-1]) / good.sum()]
    tpr = np.r_[0.0, np.cumsum(defect[::-1]) / defect.sum()]
    overlap = np.r_[0.0, np.cumsum(pro[::-1]) / regions]
    upto = np.searchsorted(fpr, PRO_FPR, side="right")
    x = np.r_[fpr[:upto], PRO_FPR]
    y = np.r_[overlap[:upto], np.interp(PRO_FPR, fpr, overlap)]
    return {
        "pixel_auroc": float(np.trapezoid(tpr, fpr)),
        "aupro": float(np.trapezoid(y, x) / PRO_FPR),
        "defect_pixels": int(defect.sum()),
        "defect_regions": int(regions),
    }


def f1_max(is_defect: np.ndarray, scores: np.ndarray) -> dict:
    """The best F1 of "defect" over every threshold on the image scores, and that threshold."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], is_defect[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = np.cumsum(1 - y)[last]
    f1 = 2 * tp / np.maximum(1e-12, tp + fp + y.sum())
    best = int(f1.argmax())
    return {"f1_max": float(f1[best]), "f1_max_threshold": float(s[last][best])}
