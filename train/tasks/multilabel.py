"""`task=multilabel`: any set of defect labels per part. One sigmoid per class (BCE, or the
asymmetric loss of Ridnik et al. 2021, which down-weights the many easy negatives), per-label
AP and F1; the part's defect score is its largest defect-label probability.

The target is multi-hot over the data set's classes; the good class, where there is one, is on
exactly when no defect label is, so a classification data set trains as multi-label unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torchmetrics as tm
from torch import nn

from train.network import ModelSpec, build_backbone


class AsymmetricLoss(nn.Module):
    """ASL: focusing gamma_neg on negatives (gamma_pos on positives) and a probability margin
    `clip` that discards very easy negatives; on (B, C) logits and multi-hot targets."""

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05):
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = logits.float().sigmoid()
        p_neg = (p - self.clip).clamp(min=0) if self.clip else p
        pos = targets * torch.log(p.clamp(min=1e-8)) * (1 - p) ** self.gamma_pos
        neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg**self.gamma_neg
        return -(pos + neg).sum(dim=1).mean()


class MultiLabelMetrics(nn.Module):
    """Per-label AP and F1 (at 0.5) over the defect labels, their macro means, and exact-set
    accuracy; AP keeps every score until `compute()`, which gathers them over ranks: exact."""

    def __init__(self, classes: tuple[str, ...], labels: list[int]):
        super().__init__()
        self.names = [classes[i] for i in labels]
        self.register_buffer("columns", torch.tensor(labels), persistent=False)
        n = len(labels)
        self.ap = tm.classification.MultilabelAveragePrecision(num_labels=n, average=None)
        self.f1 = tm.classification.MultilabelF1Score(num_labels=n, average=None)
        self.exact = tm.classification.MultilabelExactMatch(num_labels=n)
        self.confusion = None

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        p, t = logits.sigmoid()[:, self.columns], targets[:, self.columns].long()
        for metric in (self.ap, self.f1, self.exact):
            metric.update(p, t)

    def compute(self) -> dict[str, torch.Tensor]:
        ap, f1 = self.ap.compute(), self.f1.compute()
        values = {"val/map": ap.nanmean(), "val/f1": f1.mean(), "val/exact": self.exact.compute()}
        values |= {f"val/ap/{n}": v for n, v in zip(self.names, ap)}
        return values | {f"val/f1/{n}": v for n, v in zip(self.names, f1)}

    def reset(self) -> None:
        for metric in (self.ap, self.f1, self.exact):
            metric.reset()


def best_f1_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The score threshold (predict "on" at >= it) with the highest F1; the highest on ties."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each distinct score
    tp = np.cumsum(t)[last]
    f1 = 2 * tp / (last + 1 + t.sum())  # 2 tp / (predicted + actual)
    return float(s[last][np.argmax(f1)])


def defect_labels(spec: ModelSpec) -> list[int]:
    """The columns that are labels a part can have: every class but the good one."""
    return [i for i, c in enumerate(spec.classes) if c != spec.good]


class MultiLabel:
    name = "multilabel"
    target = "labels"  # each sample's target: multi-hot (C,) float
    eval_fit = "crop"
    monitor = "val/f1"

    def __init__(self, loss: str = "asl", threshold: float = 0.5):
        self.loss_name, self.threshold = loss, threshold  # threshold: each label's, until evaluated

    def options(self) -> dict:
        return {"loss": self.loss_name, "threshold": self.threshold}

    def build(self, backbone: str, num_classes: int, pretrained: str | None = None, drop_rate: float = 0.0):
        return build_backbone(backbone, num_classes, pretrained, drop_rate)

    def loss(self, label_smoothing: float = 0.0) -> nn.Module:
        return AsymmetricLoss() if self.loss_name == "asl" else nn.BCEWithLogitsLoss()

    def train_metric(self, spec: ModelSpec) -> None:
        return None

    def metrics(self, spec: ModelSpec) -> MultiLabelMetrics:
        return MultiLabelMetrics(spec.classes, defect_labels(spec))

    def thresholds(self, spec: ModelSpec) -> np.ndarray:
        """(C,) each label's threshold: chosen by evaluation (the decision's `labels`), else ours."""
        chosen = (spec.extra.get("decision") or {}).get("labels") or {}
        return np.array([float(chosen.get(c, self.threshold)) for c in spec.classes])

    def defect_scores(self, probs: np.ndarray, spec: ModelSpec, defects: list[int]) -> np.ndarray:
        """(N,) the largest defect-label probability, from probabilities (N, C)."""
        return np.asarray(probs, dtype=np.float64)[:, defects].max(axis=1)

    def result(self, probs: np.ndarray, spec: ModelSpec, size: tuple[int, int], defects, threshold) -> dict:
        """From probs (C,): the labels at or above their own thresholds, and the part's decision."""
        row = np.asarray(probs, dtype=np.float64)
        on = row >= self.thresholds(spec)
        labels = [c for i, c in enumerate(spec.classes) if on[i] and c != spec.good]
        out = {"labels": labels, "probs": dict(zip(spec.classes, row.tolist()))}
        if defects:
            score = float(row[defects].max())
            out |= {"defect_score": score, "defect": score >= threshold}
        return out

    def label_thresholds(self, r: dict, spec: ModelSpec, target_escape: float) -> dict[str, float]:
        """Each defect label's own threshold: the one with the best F1 on the evaluated split
        (which labels a part shows is a report, the stop decision is the part's defect score
        at the target escape rate); a label no evaluated part has keeps the default."""
        out = {}
        for j in defect_labels(spec):
            has = r["truth"][:, j]
            out[spec.classes[j]] = best_f1_threshold(r["probs"][:, j], has) if has.any() else self.threshold
        return out

    # ---- evaluation -----------------------------------------------------------------------------

    def collect(self, probs: torch.Tensor, targets: torch.Tensor, spec: ModelSpec, defects: list[int]):
        """probs (B, C), targets multi-hot (B, C); the gallery shows parts with a label wrong."""
        p, t = probs.cpu().numpy(), targets.cpu().numpy() > 0.5
        on = p >= self.thresholds(spec)
        wrong = np.abs(p - t).max(axis=1)  # the worst-judged label of each part

        def names(row) -> str:
            return ";".join(spec.classes[j] for j in defect_labels(spec) if row[j]) or "-"

        gallery = [
            {"badness": float(wrong[i]), "index": int(i), "caption": f"{names(t[i])} -> {names(on[i])}"}
            for i in np.flatnonzero((on != t)[:, defect_labels(spec)].any(axis=1))
        ]
        return {"truth": t, "probs": p, "is_defect": t[:, defects].any(axis=1), "gallery": gallery}

    def report(self, r: dict, spec: ModelSpec) -> dict:
        from train.metrics import multilabel_report

        return multilabel_report(
            r["truth"], r["probs"], spec.classes, defect_labels(spec), self.thresholds(spec)
        )

    def rows(self, r: dict, spec: ModelSpec, scores: np.ndarray | None, threshold: float | None):
        classes, thresholds = spec.classes, self.thresholds(spec)
        labels = defect_labels(spec)
        head = ["key", "labels", "predicted"] + (["defect_score", "defect"] if scores is not None else [])
        yield head + [f"p_{c}" for c in classes]
        for i, key in enumerate(r["keys"]):
            p = r["probs"][i]
            true = ";".join(classes[j] for j in labels if r["truth"][i, j])
            predicted = ";".join(classes[j] for j in labels if p[j] >= thresholds[j])
            row = [key, true, predicted]
            if scores is not None:
                row += [f"{scores[i]:.6f}", int(scores[i] >= threshold)]
            yield row + [f"{v:.6f}" for v in p]
