"""task=anomaly's validation metrics during training: image AUROC from every rank's image
scores, pixel AUROC and AUPRO from summed histograms, and the calibration learned on the good
validation images (train/tasks/anomaly.py says what it means)."""

from __future__ import annotations

import numpy as np
import torch
import torchmetrics as tm
from torch import nn

from train.network import ModelSpec
from train.tasks.anomaly import image_pixel_counts, learn_calibration, scale_of


class AnomalyMetrics(nn.Module):
    """Validation: image scores and truths (gathered over ranks by torchmetrics), and the pixel
    histograms of train.metrics.pixel_counts (summed over ranks), on maps calibrated with the
    model's current q. `compute()` also learns the new q from the good images' raw scores."""

    def __init__(self, spec: ModelSpec, quantile: float):
        super().__init__()
        from train.metrics import BINS

        self.spec, self.quantile = spec, quantile
        self.scores, self.truth = tm.CatMetric(), tm.CatMetric()
        self.pixels = _Sum((4, BINS))
        self.calibration: dict | None = None
        self.confusion = None

    def update(self, maps: torch.Tensor, targets) -> None:

        q = scale_of(self.spec)
        raw = maps.flatten(1).amax(dim=1)
        truth = torch.stack([(t > 0).any() for t in targets]).to(raw.device)
        self.scores.update(raw)
        self.truth.update(truth.float())
        for m, t in zip(maps.cpu(), targets):
            t = t.cpu().numpy()
            counts = image_pixel_counts(m, t, q)
            if counts is not None:  # None: a defect with no mask, no pixel truth
                self.pixels.update(torch.from_numpy(counts).to(raw.device))

    def compute(self) -> dict[str, torch.Tensor]:
        from train.decision import area, curves
        from train.metrics import pixel_report

        scores = _array(self.scores)
        truth = _array(self.truth).astype(bool)
        good = scores[~truth]
        self.calibration = learn_calibration(good, self.quantile) if good.size else None
        out = {"val/good_score_q": self.calibration["q"] if self.calibration else float("nan")}
        if truth.any() and not truth.all():
            c = curves(scores[truth], scores[~truth])
            out["val/image_auroc"] = area(c["false_alarm_rate"], c["detection_rate"])
        else:
            # No defects to rank against (or no good parts): the checkpoint keeps the last epoch.
            out["val/image_auroc"] = float("nan")
        out |= {
            f"val/{k}": v
            for k, v in pixel_report(self.pixels.compute().cpu().numpy()).items()
            if k in ("pixel_auroc", "aupro")
        }
        return {k: torch.tensor(float(v)) for k, v in out.items()}

    def reset(self) -> None:
        for m in (self.scores, self.truth, self.pixels):
            m.reset()


class _Sum(tm.Metric):
    """A tensor of fixed shape, summed over updates and ranks."""

    full_state_update = False

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor) -> None:
        self.total += value.to(self.total)

    def compute(self) -> torch.Tensor:
        return self.total


def _array(metric: tm.CatMetric) -> np.ndarray:
    try:
        return metric.compute().detach().cpu().double().numpy().reshape(-1)
    except ValueError:  # nothing was updated (a rank, or a run, with no validation batch)
        return np.zeros(0)
