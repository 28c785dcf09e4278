"""`task=segment`: a class per pixel, so a defect's area and position can be judged and shown.

A timm encoder under a segmentation_models_pytorch decoder (timm encoders as `tu-NAME`),
cross-entropy plus Dice (defect pixels are a few percent of an image: Dice keeps them from being
drowned), per-class IoU and Dice, and defect-pixel IoU (every defect class against good). A
part's defect score is the strength of its strongest defect region of at least `min_area` pixels
(train/tasks/regions.py); with the default threshold 0.5 a part is a defect when such a region is
more likely defect than good. Targets are masks of class indices, 0 the good class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics as tm
from torch import nn

from data.errors import UserError
from train.network import ModelSpec, backbone_problem, load_pretrained
from train.tasks.regions import region_score, to_size


def logits_at(logits: torch.Tensor, masks: torch.Tensor | list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits (C, H, W), mask (H, W)) pairs, the logits resized to each mask's size: training
    masks are cropped with the image (same size), evaluation masks keep the image's own size."""
    if isinstance(masks, torch.Tensor) and masks.shape[-2:] == logits.shape[-2:]:
        return [(logits, masks)]
    if isinstance(masks, torch.Tensor) and masks.ndim == 3:  # one size for the whole batch
        return [(F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False), masks)]
    return [
        (F.interpolate(lg[None], size=m.shape[-2:], mode="bilinear", align_corners=False), m[None])
        for lg, m in zip(logits, masks)
    ]


class SegmentLoss(nn.Module):
    def __init__(self, dice: float):
        super().__init__()
        self.dice = dice

    def forward(self, logits: torch.Tensor, masks: torch.Tensor | list) -> torch.Tensor:
        total, pixels = 0.0, 0
        for lg, m in logits_at(logits, masks):  # lg (B, C, H, W), m (B, H, W)
            m = m.long()
            n = m.numel()
            loss = F.cross_entropy(lg.float(), m)
            if self.dice:
                p = lg.float().softmax(dim=1)
                onehot = F.one_hot(m, p.shape[1]).permute(0, 3, 1, 2).float()
                inter, union = (p * onehot).sum((0, 2, 3)), (p + onehot).sum((0, 2, 3))
                present = onehot.sum((0, 2, 3)) > 0  # classes absent from both add nothing
                dice = 1 - (2 * inter + 1) / (union + 1)
                loss = loss + self.dice * dice[present | (p.sum((0, 2, 3)) > 1)].mean()
            total, pixels = total + loss * n, pixels + n
        return total / pixels


class SegmentMetrics(nn.Module):
    """The pixel confusion matrix (C, C), summed over ranks at `compute()`: exact."""

    def __init__(self, classes: tuple[str, ...], good: int | None):
        super().__init__()
        self.classes, self.good = classes, good
        self.matrix = tm.ConfusionMatrix(task="multiclass", num_classes=len(classes))
        self.confusion: list[list[int]] | None = None

    def update(self, logits: torch.Tensor, masks) -> None:
        # Probabilities, not logits, are resampled to the mask's size: as predict and evaluation
        # do, so the counts here are theirs.
        for p, m in logits_at(logits.float().softmax(dim=1), masks):
            self.matrix.update(p.argmax(dim=1).flatten(), m.flatten().long())

    def compute(self) -> dict[str, torch.Tensor]:
        from train.metrics import segmentation_report

        counts = self.matrix.compute()
        self.confusion = counts.tolist()
        r = segmentation_report(counts.cpu().numpy(), self.classes, self.good)
        values = {"val/miou": r["miou"], "val/mdice": r["mdice"]}
        if "defect_iou" in r:
            values["val/defect_iou"] = r["defect_iou"]
        values |= {f"val/iou/{c}": v["iou"] for c, v in r["per_class"].items()}
        return {k: torch.tensor(float(v)) for k, v in values.items()}

    def reset(self) -> None:
        self.matrix.reset()


class Segment:
    name = "segment"
    target = "mask"  # each sample's target: uint8 (H, W) class indices, 0 the good class
    eval_fit = "stretch"  # eval geometry: the whole image resized to (S, S), so masks map back
    monitor = "val/defect_iou"

    def __init__(self, arch: str = "Unet", min_area: int = 16, dice: float = 1.0, decoder_channels=None):
        self.arch, self.min_area, self.dice = arch, int(min_area), float(dice)
        self.decoder_channels = list(decoder_channels) if decoder_channels else None

    def options(self) -> dict:
        return {
            "arch": self.arch,
            "min_area": self.min_area,
            "dice": self.dice,
            "decoder_channels": self.decoder_channels,
        }

    def build(self, backbone: str, num_classes: int, pretrained: str | None = None, drop_rate: float = 0.0):
        import segmentation_models_pytorch as smp

        problem = "a torchvision model has no encoder for it" if backbone.startswith("tv/") else None
        problem = problem or backbone_problem(backbone)
        if problem:
            raise UserError(
                f"model.backbone={backbone}: task=segment takes a timm encoder (e.g. resnet18, "
                f"convnext_tiny): {problem}"
            )
        kw = {"decoder_channels": self.decoder_channels} if self.decoder_channels else {}
        try:
            net = smp.create_model(
                self.arch, f"tu-{backbone}", encoder_weights=None, classes=num_classes, **kw
            )
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"task.arch={self.arch} with model.backbone={backbone}: {e}") from None
        if pretrained:
            load_pretrained(net.encoder.model, pretrained)  # a classifier's weights: the head is skipped
        return net

    def loss(self, label_smoothing: float = 0.0) -> nn.Module:
        return SegmentLoss(self.dice)

    def train_metric(self, spec: ModelSpec) -> None:
        return None

    def metrics(self, spec: ModelSpec) -> SegmentMetrics:
        return SegmentMetrics(spec.classes, _good(spec))

    def part_scores(self, probs: torch.Tensor, defects: list[int]) -> tuple[np.ndarray, float]:
        """From per-pixel probabilities (C, H, W) at the image's size: each class's strongest
        region (C,) (the good class: its largest value) and the defect score."""
        p = probs.numpy()
        per_class = np.array([region_score(p[c], self.min_area) for c in range(len(p))])
        score = region_score(p[defects].sum(axis=0), self.min_area) if defects else 0.0
        return per_class, score

    def result(self, probs: np.ndarray, spec: ModelSpec, size: tuple[int, int], defects, threshold) -> dict:
        """From probs (C, S, S): the mask (H, W) at the image's own size, each class's area in
        pixels, per-class region scores, and the part's decision."""
        p = to_size(probs, size)
        mask = p.argmax(dim=0).to(torch.uint8).numpy()
        per_class, score = self.part_scores(p, defects or [])
        counts = np.bincount(mask.ravel(), minlength=len(spec.classes))
        out = {
            "mask": mask,
            "areas": {c: int(counts[i]) for i, c in enumerate(spec.classes) if i != _good(spec)},
            "probs": dict(zip(spec.classes, per_class.tolist())),
            "label": spec.good or spec.classes[int(per_class.argmax())],
        }
        if defects:
            out |= {"defect_score": score, "defect": score >= threshold}
            if score >= threshold:
                out["label"] = spec.classes[max(defects, key=lambda c: per_class[c])]
        return out

    # ---- evaluation -----------------------------------------------------------------------------

    def collect(self, probs: torch.Tensor, masks, spec: ModelSpec, defects: list[int]):
        """probs (B, C, S, S); masks at each image's own size. Keeps per part: class region
        scores, defect score, whether the truth has defect pixels, and the pixel counts."""
        c = probs.shape[1]
        counts = np.zeros((c, c), np.int64)
        rows, scores, truth, gallery, in_truth = [], [], [], [], []
        for i in range(len(probs)):
            m = masks[i].cpu()
            p = to_size(probs[i].cpu(), tuple(m.shape))
            predicted = p.argmax(dim=0)
            counts += np.bincount((m.long() * c + predicted).flatten().numpy(), minlength=c * c).reshape(c, c)
            per_class, score = self.part_scores(p, defects)
            rows.append(per_class)
            scores.append(score)
            true_d, pred_d = np.isin(m.numpy(), defects), np.isin(predicted.numpy(), defects)
            truth.append(true_d.any())
            # the strongest defect probability inside the true defect: localised at a threshold below it
            in_truth.append(float(p[defects].sum(dim=0).numpy()[true_d].max()) if true_d.any() else np.nan)
            union = (true_d | pred_d).sum()
            if union:  # the gallery: the parts whose defect pixels were judged worst
                side = probs.shape[-2:]  # drawn at the model's input size, as the image is
                iou = float((true_d & pred_d).sum() / union)
                gallery.append(
                    {
                        "badness": 1 - iou,
                        "index": i,
                        "caption": f"defect IoU {iou:.2f}, score {score:.2f}",
                        "mask": nearest(m, side),
                        "predicted_mask": nearest(predicted, side),
                    }
                )
        return {
            "truth": np.array(truth),
            "probs": np.array(rows).reshape(len(probs), c),
            "defect_scores": np.array(scores),
            "is_defect": np.array(truth),
            "in_truth": np.array(in_truth, dtype=np.float64),
            "counts": counts,
            "gallery": gallery,
        }

    def report(self, r: dict, spec: ModelSpec) -> dict:
        from train.metrics import segmentation_report

        return {"samples": len(r["keys"]), **segmentation_report(r["counts"], spec.classes, _good(spec))}

    def rows(self, r: dict, spec: ModelSpec, scores: np.ndarray | None, threshold: float | None):
        head = ["key", "defect_pixels_true"] + (["defect_score", "defect"] if scores is not None else [])
        yield head + [f"region_{c}" for c in spec.classes]
        for i, key in enumerate(r["keys"]):
            row = [key, int(r["truth"][i])]
            if scores is not None:
                row += [f"{scores[i]:.6f}", int(scores[i] >= threshold)]
            yield row + [f"{v:.6f}" for v in r["probs"][i]]


def nearest(mask: torch.Tensor, size) -> torch.Tensor:
    """A mask (H, W) resized to `size` by nearest neighbour (class indices never blend), uint8."""
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0].to(torch.uint8)


def _good(spec: ModelSpec) -> int | None:
    return spec.classes.index(spec.good) if spec.good in spec.classes else None
