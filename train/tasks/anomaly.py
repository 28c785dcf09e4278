"""`task=anomaly`: learns what good parts look like from good images only, and scores how far a
part strays from it: a map per pixel and a score per part. Defects found in the train split
are left out and counted (data/targets.py: AnomalyMap); validation and evaluation score good and
defect parts, with masks where they exist.

Two methods, one task (`task.method`):

    draem      from scratch, no downloaded weights (the default): a segmentation network
               learns synthetic defects pasted onto good images (train/tasks/draem.py)
    patchcore  a frozen backbone's mid-level features in a memory bank cut to a budget, scored
               by the nearest good patch (train/tasks/patchcore.py); needs model.pretrained

Both give a raw anomaly map (B, 1, S, S) on the method's own scale (the network's output and
the exported graph's). A raw image score is the map's maximum. Calibration makes them
comparable and readable: with q the `quantile` (0.99) of the raw scores of the good validation
images,

    defect_score = raw / (raw + q)      in [0, 1); 0.5 = as strange as the 1% strangest good part

and the same for every pixel of the map. q is learned at every validation (stored in the
spec's extra["calibration"], so in every checkpoint and bundle); the decision threshold is then
chosen on that score like every task's (train/decision.py, train/evaluate.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data.errors import UserError
from data.targets import UNKNOWN
from train.network import ModelSpec
from train.tasks.regions import to_size
from train.tasks.segment import nearest

METHODS = ("draem", "patchcore")


def calibrated(raw, q: float):
    """raw / (raw + q), elementwise: numpy or torch, any shape."""
    return raw / (raw + q)


def scale_of(spec: ModelSpec) -> float:
    """The calibration q of a model: learned on good validation images, else 1 (raw / (raw + 1)
    keeps the order of scores, so rankings and AUROC hold, but 0.5 means nothing yet)."""
    c = spec.extra.get("calibration")
    return float(c["q"]) if c else 1.0


def image_pixel_counts(raw_map, truth: np.ndarray, q: float) -> np.ndarray | None:
    """train.metrics.pixel_counts of one image: its raw map (1, S, S) resized to the truth's
    (H, W) and calibrated; None for a defect whose place is unknown (no pixel truth)."""
    from train.metrics import pixel_counts

    if (truth == UNKNOWN).any():
        return None
    return pixel_counts(calibrated(to_size(raw_map, truth.shape)[0].numpy(), q), truth)


def learn_calibration(good_raw: np.ndarray, quantile: float) -> dict:
    """The calibration of raw scores from good images' raw scores (N,): q, their `quantile`."""
    q = float(np.quantile(np.asarray(good_raw, dtype=np.float64), quantile))
    return {"q": max(q, 1e-12), "quantile": quantile, "good_images": len(good_raw)}


class Anomaly:
    name = "anomaly"
    target = "anomaly"  # uint8 (H, W): 0 good pixel, 1 defect, 255 defect at an unknown place
    eval_fit = "stretch"  # the whole image resized to (S, S): the map maps back onto every pixel
    monitor = "val/image_auroc"
    scores_maps = True  # validation metrics take the anomaly maps (no loss on real defects)

    def __init__(
        self,
        method: str = "draem",
        sigma: float = 2.0,
        quantile: float = 0.99,
        # draem: the segmentation network and the share of training images given a defect
        arch: str = "Unet",
        decoder_channels=None,
        dice: float = 1.0,
        defect_prob: float = 0.5,
        # patchcore: feature levels, their pooling, and the memory bank's budget
        layers=(2, 3),
        pool: int = 3,
        budget_mb: float = 64.0,
        budget_patches: int | None = None,
    ):
        if method not in METHODS:
            raise UserError(f"task.method={method}: expected one of {', '.join(METHODS)}")
        self.method_name, self.sigma, self.quantile = method, float(sigma), float(quantile)
        if method == "draem":
            from train.tasks.draem import Draem

            self.method = Draem(self.sigma, arch, decoder_channels, dice, defect_prob)
        else:
            from train.tasks.patchcore import PatchCore

            self.method = PatchCore(self.sigma, layers, pool, budget_mb, budget_patches)

    def options(self) -> dict:
        return {
            "method": self.method_name,
            "sigma": self.sigma,
            "quantile": self.quantile,
            **self.method.options(),
        }

    def build(self, backbone: str, num_classes: int, pretrained: str | None = None, drop_rate: float = 0.0):
        return self.method.build(backbone, pretrained)

    def loss(self, label_smoothing: float = 0.0) -> nn.Module | None:
        return self.method.loss()

    @property
    def frozen(self) -> bool:  # patchcore: no gradient step (TaskModule)
        return getattr(self.method, "frozen", False)

    @property
    def augments(self) -> bool:  # patchcore: training reads images as evaluation does
        return getattr(self.method, "augments", True)

    def train_step(self, module, images: torch.Tensor, targets, keys: list[str]) -> torch.Tensor | None:
        return self.method.train_step(module, images, keys)

    def on_train_epoch_start(self, module) -> None:
        if hasattr(self.method, "on_train_epoch_start"):
            self.method.on_train_epoch_start(module)

    def on_validation_start(self, module) -> None:
        if hasattr(self.method, "on_validation_start"):
            self.method.on_validation_start(module)

    def train_metric(self, spec: ModelSpec) -> None:
        return None

    def metrics(self, spec: ModelSpec):
        from train.tasks.anomaly_metrics import AnomalyMetrics

        return AnomalyMetrics(spec, self.quantile)

    # ---- one image: predict -----------------------------------------------------------------

    def result(self, probs: np.ndarray, spec: ModelSpec, size: tuple[int, int], defects, threshold) -> dict:
        """From the raw map (1, S, S): the calibrated anomaly map (H, W) float32 at the image's
        own size, the defect score (the calibrated maximum at the model's size) and the decision."""
        q = scale_of(spec)
        raw = float(np.max(probs))
        score = float(calibrated(raw, q))
        heat = calibrated(to_size(probs, size)[0].numpy(), q).astype(np.float32)
        return {
            "label": "defect" if score >= threshold else "good",
            "defect_score": score,
            "defect": score >= threshold,
            "anomaly_map": heat,
            "raw_score": raw,
        }

    def parity_view(self, spec: ModelSpec):
        """Raw maps → calibrated maps: export parity compares what predict returns."""
        q = scale_of(spec)
        return lambda maps: calibrated(np.asarray(maps, dtype=np.float64), q)

    # ---- evaluation -------------------------------------------------------------------------

    def collect(self, probs: torch.Tensor, targets, spec: ModelSpec, defects: list[int]):
        """raw maps (B, 1, S, S); targets at each image's own size. Keeps per part the raw
        score and whether it is a defect, and the pixel histograms; the gallery shows the defects
        scored lowest and the good parts scored highest, with their maps."""

        q = scale_of(spec)
        raw = probs.flatten(1).amax(dim=1).cpu().double().numpy()
        truth, counts, gallery, in_truth = [], None, [], []
        for i in range(len(probs)):
            t = targets[i].cpu().numpy()
            is_defect = bool((t > 0).any())
            truth.append(is_defect)
            place = t == 1  # defect pixels of a known place (UNKNOWN marks a defect without a mask)
            if place.any():  # the strongest raw value inside the true defect, at the target's size
                in_truth.append(float(to_size(probs[i].cpu(), t.shape)[0].numpy()[place].max()))
            else:
                in_truth.append(np.nan)
            c = image_pixel_counts(probs[i].cpu(), t, q)
            if c is not None:
                counts = c if counts is None else counts + c
            s = float(calibrated(raw[i], q))
            side = tuple(probs.shape[-2:])
            gallery.append(
                {
                    "badness": 1 - s if is_defect else s,
                    "index": i,
                    "caption": f"{'defect' if is_defect else 'good'}, score {s:.2f}",
                    "mask": nearest((torch.from_numpy(t) > 0).to(torch.uint8), side),
                    "heat": calibrated(probs[i, 0].cpu(), q).numpy(),
                }
            )
        if counts is None:
            from train.metrics import BINS

            counts = np.zeros((4, BINS))
        return {
            "raw_scores": raw,
            "is_defect": np.array(truth),
            "in_truth_raw": np.array(in_truth, dtype=np.float64),
            "pixel_counts": counts,
            "gallery": gallery,
        }

    def calibrate(self, r: dict, spec: ModelSpec) -> tuple[ModelSpec, dict]:
        """The spec with its calibration (the model's own, else learned on this split's good
        images) and r["defect_scores"] (N,) calibrated from r["raw_scores"]."""
        from dataclasses import replace

        stored = spec.extra.get("calibration")
        good = r["raw_scores"][~r["is_defect"]]
        if stored:
            section = {**stored, "learned_on": "the validation of the run that trained the model"}
        elif good.size:
            stored = learn_calibration(good, self.quantile)
            section = {**stored, "learned_on": "this split's good images (the model had no calibration)"}
            spec = replace(spec, extra={**spec.extra, "calibration": stored})
        else:
            section = {
                "q": 1.0,
                "learned_on": "nothing: no calibration and no good images; defect_score = raw / (raw + 1)",
            }
        r["defect_scores"] = calibrated(r["raw_scores"], scale_of(spec))
        r["in_truth"] = calibrated(r["in_truth_raw"], scale_of(spec))
        return spec, section

    def report(self, r: dict, spec: ModelSpec) -> dict:
        from train.decision import area, curves
        from train.metrics import average_precision, f1_max, pixel_report

        raw, is_defect = r["raw_scores"], r["is_defect"]
        out: dict = {"samples": len(r["keys"]), "method": self.method_name}
        out["raw_scores"] = {
            "good": _summary(raw[~is_defect]),
            "defect": _summary(raw[is_defect]),
            "note": "the method's own scale (the maximum of the raw map); defect_score is calibrated",
        }
        if is_defect.any() and not is_defect.all():
            c = curves(raw[is_defect], raw[~is_defect])
            out["image_auroc"] = area(c["false_alarm_rate"], c["detection_rate"])
            out["image_ap"] = average_precision(is_defect, raw)
            best = f1_max(is_defect, raw)
            out["f1_max"] = best["f1_max"]
            out["f1_max_defect_score"] = float(calibrated(best["f1_max_threshold"], scale_of(spec)))
        out |= pixel_report(r["pixel_counts"])
        return out

    def rows(self, r: dict, spec: ModelSpec, scores: np.ndarray | None, threshold: float | None):
        yield ["key", "defect_true", "raw_score", "defect_score", "defect"]
        scores = r["defect_scores"] if scores is None else scores
        for i, key in enumerate(r["keys"]):
            decided = "" if threshold is None else int(scores[i] >= threshold)
            yield [key, int(r["is_defect"][i]), f"{r['raw_scores'][i]:.6g}", f"{scores[i]:.6f}", decided]


def _summary(x: np.ndarray) -> dict | None:
    if not x.size:
        return None
    q = np.quantile(x, [0.5, 0.99])
    return {
        "n": int(x.size),
        "min": float(x.min()),
        "median": float(q[0]),
        "p99": float(q[1]),
        "max": float(x.max()),
    }
