"""`predict` for every kind of loaded model: a checkpoint's `Classifier`, or an exported bundle
run by onnxruntime or TorchScript. One preprocessing path and one result format, so a notebook
compares a checkpoint with its export directly."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import numpy as np
import torch

from train.decision import Decision

# uint8 (B, 3, S, S) → class probabilities (B, C)
ProbsFn = Callable[[torch.Tensor], np.ndarray]


def predict(images, spec, probs: ProbsFn, batch_size: int = 32) -> list[dict] | dict:
    """Class probabilities for image paths, PIL images or uint8 (3, H, W) tensors (one, or a
    list), preprocessed as the model's eval transform does (`spec`: its ModelSpec):
    `{"label": "scratch", "score": 0.97, "probs": {"ok": 0.01, "scratch": 0.97, ...}}`, plus
    `"defect"` (stop the part?) and `"defect_score"` when the model carries a decision threshold."""
    from data.transforms import EvalTransform

    single = not isinstance(images, list | tuple)
    images = [images] if single else list(images)
    transform = EvalTransform(spec.image_size, spec.crop_pct)
    decision = Decision.from_dict(spec.extra["decision"]) if spec.extra.get("decision") else None
    results = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([transform.apply(as_image(x)) for x in images[i : i + batch_size]])
        p = np.asarray(probs(batch), dtype=np.float64)  # (B, C)
        scores = decision.scores(p, spec.classes) if decision else None
        for j, row in enumerate(p.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            result = {"label": spec.classes[best], "score": row[best], "probs": dict(zip(spec.classes, row))}
            if decision:
                result["defect_score"] = float(scores[j])
                result["defect"] = bool(scores[j] >= decision.threshold)
            results.append(result)
    return results[0] if single else results


def as_image(x):
    from PIL import Image

    if isinstance(x, str | os.PathLike):
        with open(x, "rb") as f:  # left unloaded: the eval transform picks a reduced JPEG scale
            return Image.open(io.BytesIO(f.read()))
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8:  # float images are taken as 0..1, the torchvision convention
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return x
    raise TypeError(f"predict takes paths, PIL images or (3, H, W) tensors, not {type(x).__name__}")
