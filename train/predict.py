"""`predict` for every kind of loaded model: a checkpoint's `Network`, or an exported bundle
run by onnxruntime or TorchScript. One preprocessing path and one result format, so a notebook
compares a checkpoint with its export directly."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import numpy as np
import torch

from train.decision import defect_indices, threshold_of

# uint8 (B, 3, S, S) → probabilities (B, C), or per pixel (B, C, S, S)
ProbsFn = Callable[[torch.Tensor], np.ndarray]


def predict(images, spec, probs: ProbsFn, batch_size: int = 32) -> list[dict] | dict:
    """Predictions for image paths, file bytes, PIL images, uint8 (3, H, W) tensors or numpy arrays
    (uint8 or uint16, (H, W) or (H, W, 3) RGB), one or a list, preprocessed as the model's eval
    transform does (`spec`: its ModelSpec). 16-bit images (PNG/TIFF files, PIL I;16, uint16 arrays)
    are scaled to 8 bits by the model's bit depth as its training data was (data/decode.py); a
    16-bit RGB file comes as its path, bytes or a PIL image not yet loaded (PIL decodes only its
    high bytes). One dict per image, the task's own (train/tasks): classify `{"label", "score",
    "probs"}`; multilabel `{"labels", "probs"}`; segment `{"label", "mask" (H, W) uint8 at the
    image's own size, "areas", "probs"}`; each with `"defect_score"` and `"defect"` (stop the
    part?) when the model knows its good class, at the threshold evaluation chose (else 0.5);
    anomaly `{"label": "good" or "defect", "defect_score", "defect", "anomaly_map" (H, W) float32
    in [0, 1], "raw_score"}`. A model trained on tiles (`spec.tiles`) sees each whole image in
    tiles of its training grid (train/tiled.py)."""
    from data.transforms import EvalTransform
    from train import tasks

    single = not isinstance(images, list | tuple)
    images = [images] if single else list(images)
    task = tasks.of(spec)
    transform = EvalTransform(spec.image_size, spec.crop_pct, task.eval_fit, spec.bit_depth)
    defects, threshold = defect_indices(spec), threshold_of(spec)
    if spec.tiles:  # trained on tiles: each whole image is tiled with the training grid, stitched
        return _tiled(images, spec, probs, task, batch_size, single)
    results = []
    for i in range(0, len(images), batch_size):
        opened = [as_image(x, spec.bit_depth) for x in images[i : i + batch_size]]
        batch = torch.stack([transform.apply(x) for x in opened])
        p = np.asarray(probs(batch), dtype=np.float32)  # (B, C) or (B, C, S, S)
        for row, image in zip(p, opened):
            results.append(task.result(row, spec, image_size(image), defects, threshold))
    return results[0] if single else results


def _tiled(images: list, spec, probs: ProbsFn, task, batch_size: int, single: bool) -> list[dict] | dict:
    """One whole image at a time (a 50 MP part is 150 MB decoded), its tiles `batch_size` at a
    time; segment and anomaly maps come back at the image's own size, stitched."""
    from data.tiles import tiling_from
    from data.transforms import EvalTransform
    from train.tiled import of_part, tiled

    whole = EvalTransform(spec.image_size, spec.crop_pct, "none", spec.bit_depth)
    tiling = tiling_from(spec.tiles)
    defects, threshold = defect_indices(spec), threshold_of(spec)
    results = []
    for x in images:
        image = as_image(x, spec.bit_depth)
        pixels = image if isinstance(image, torch.Tensor) else whole.apply(image)  # uint8 (3, H, W)
        p = of_part(tiled(probs, pixels, tiling, spec.image_size, batch_size), spec)
        results.append(task.result(p.numpy(), spec, image_size(image), defects, threshold))
    return results[0] if single else results


def image_size(image) -> tuple[int, int]:
    """(H, W) of a PIL image or a (3, H, W) tensor."""
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else (image.height, image.width)


def as_image(x, bit_depth: int | None = None):
    """A PIL image (left unloaded: the eval transform picks a reduced JPEG scale, and a 16-bit file
    decodes from its bytes) or a uint8 (3, H, W) tensor; uint16 arrays scaled by `bit_depth`."""
    from PIL import Image

    if isinstance(x, str | os.PathLike):
        with open(x, "rb") as f:
            return Image.open(io.BytesIO(f.read()))
    if isinstance(x, bytes | bytearray):
        return Image.open(io.BytesIO(bytes(x)))
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, np.ndarray):
        return _from_array(x, bit_depth)
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8:  # float images are taken as 0..1, the torchvision convention
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return x
    raise TypeError(
        f"predict takes paths, bytes, PIL images, arrays or (3, H, W) tensors, not {type(x).__name__}"
    )


def _from_array(x: np.ndarray, bit_depth: int | None) -> torch.Tensor:
    """uint8 (3, H, W) from uint8 or uint16 (H, W) or (H, W, 3) RGB (a 4th channel, alpha, dropped)."""
    from data.decode import to_8bit

    shaped = x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (3, 4))
    if not shaped or x.dtype not in (np.uint8, np.uint16):
        raise TypeError(
            f"predict takes uint8 or uint16 arrays of (H, W) or (H, W, 3), not {x.dtype} {x.shape}"
        )
    if x.dtype == np.uint16:
        x = to_8bit(x, bit_depth or 16)  # as the loader scales a 16-bit file (data/decode.py)
    x = x[..., :3] if x.ndim == 3 else np.repeat(x[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous()
