"""`task=classify`: one class per part. Softmax over the classes, cross-entropy, accuracy and
macro F1; the part's defect score is the summed probability of the defect classes (1 - p(good)
when every other class is a defect)."""

from __future__ import annotations

import numpy as np
import torch
import torchmetrics as tm
from torch import nn

from train.network import ModelSpec, build_backbone


class ClassifyMetrics(nn.Module):
    """Validation metrics, synced over ranks by torchmetrics at `compute()`: exact whatever each
    rank's batch count was."""

    def __init__(self, classes: tuple[str, ...]):
        super().__init__()
        self.classes = classes
        task = {"task": "multiclass", "num_classes": len(classes)}
        val = {"acc": tm.Accuracy(**task), "f1": tm.F1Score(**task, average="macro")}
        if len(classes) > 5:
            val["acc5"] = tm.Accuracy(**task, top_k=5)
        self.collection = tm.MetricCollection(val, prefix="val/")
        self.recall = tm.Recall(**task, average="none")
        self.matrix = tm.ConfusionMatrix(**task)
        self.confusion: list[list[int]] | None = None  # rows: true class, columns: predicted

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for metric in (self.collection, self.recall, self.matrix):
            metric.update(logits, labels)

    def compute(self) -> dict[str, torch.Tensor]:
        values = dict(self.collection.compute())
        values |= {f"val/recall/{c}": r for c, r in zip(self.classes, self.recall.compute())}
        self.confusion = self.matrix.compute().tolist()
        return values

    def reset(self) -> None:
        for metric in (self.collection, self.recall, self.matrix):
            metric.reset()


class Classify:
    name = "classify"
    target = "class"  # each sample's target: its class index
    eval_fit = "crop"  # eval geometry: short side to image_size / crop_pct, centre crop
    monitor = "val/acc"

    def options(self) -> dict:
        return {}

    def build(self, backbone: str, num_classes: int, pretrained: str | None = None, drop_rate: float = 0.0):
        return build_backbone(backbone, num_classes, pretrained, drop_rate)

    def loss(self, label_smoothing: float = 0.0) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def train_metric(self, spec: ModelSpec) -> tm.Metric:
        return tm.Accuracy(task="multiclass", num_classes=len(spec.classes))

    def metrics(self, spec: ModelSpec) -> ClassifyMetrics:
        return ClassifyMetrics(spec.classes)

    def defect_scores(self, probs: np.ndarray, spec: ModelSpec, defects: list[int]) -> np.ndarray:
        """(N,) summed probability of the defect classes, from probabilities (N, C)."""
        return np.asarray(probs, dtype=np.float64)[:, defects].sum(axis=1)

    def result(self, probs: np.ndarray, spec: ModelSpec, size: tuple[int, int], defects, threshold) -> dict:
        """`predict`'s dict for one image, from probs (C,); with the defect score and decision
        when the model knows its defect classes (`defects`, indices)."""
        row = np.asarray(probs, dtype=np.float64).tolist()
        best = max(range(len(row)), key=row.__getitem__)
        out = {"label": spec.classes[best], "score": row[best], "probs": dict(zip(spec.classes, row))}
        if defects:
            score = float(self.defect_scores(probs[None], spec, defects)[0])
            out |= {"defect_score": score, "defect": score >= threshold}
        return out

    # ---- evaluation: per batch on each rank, then one report from the gathered arrays ----------

    def collect(self, probs: torch.Tensor, labels: torch.Tensor, spec: ModelSpec, defects: list[int]):
        """What evaluation keeps of a batch: probs (B, C), labels (B,); the gallery shows the most
        confident mistakes."""
        p, y = probs.cpu().numpy(), labels.cpu().numpy()
        confidence, predicted = p.max(axis=1), p.argmax(axis=1)
        gallery = [
            {
                "badness": float(confidence[i]),
                "index": int(i),
                "caption": f"{spec.classes[y[i]]} -> {spec.classes[predicted[i]]} ({confidence[i]:.2f})",
            }
            for i in np.flatnonzero(predicted != y)
        ]
        return {"truth": y, "probs": p, "is_defect": np.isin(y, defects), "gallery": gallery}

    def report(self, r: dict, spec: ModelSpec) -> dict:
        from train.metrics import classification_report

        return classification_report(r["truth"], r["probs"], spec.classes)

    def rows(self, r: dict, spec: ModelSpec, scores: np.ndarray | None, threshold: float | None):
        """predictions.csv: a header and one row per sample."""
        classes, probs = spec.classes, r["probs"]
        predicted = probs.argmax(axis=1)
        head = ["key", "label", "predicted", "confidence"] + (
            ["defect_score", "defect"] if scores is not None else []
        )
        yield head + [f"p_{c}" for c in classes]
        for i, key in enumerate(r["keys"]):
            p = probs[i]
            row = [key, classes[r["truth"][i]], classes[predicted[i]], f"{p[predicted[i]]:.6f}"]
            if scores is not None:
                row += [f"{scores[i]:.6f}", int(scores[i] >= threshold)]
            yield row + [f"{v:.6f}" for v in p]
