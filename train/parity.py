"""What an export must reproduce of its checkpoint, and on which images: the tolerances and
shares of agreeing decisions per precision and task, the parity images (real images of the data
set through the checkpoint's eval transform), and int8's calibration images."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data.errors import UserError
from data.tiles import tiling_from
from train.quantize import AGREEMENT as INT8_AGREEMENT
from train.tiled import cut

# Largest difference in any class probability, export against checkpoint. fp16 carries 11
# significant bits (about 3 decimal digits), so its outputs differ by up to ~1e-3 on deep nets.
# int8 is judged on decisions alone (train/quantize.py): no bound on probabilities.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": float("inf")}


def parity_images(
    index_url: str, split: str, n: int, size: int, crop_pct: float, fit: str = "crop"
) -> torch.Tensor:
    """The first `n` decodable images of `split`, through the eval transform: uint8 (n, 3, S, S)."""
    from data.index import load_index
    from data.samples import BadSample, image_bytes, read_shard
    from data.transforms import EvalTransform

    index = load_index(index_url)
    transform = EvalTransform(size, crop_pct, fit, index.extra.get("bit_depth"))  # 16-bit: as trained
    images = []
    for shard in index.split(split).shards:
        for sample in read_shard(index.shard_url(shard)):
            try:
                image = transform(image_bytes(sample))
            except (BadSample, OSError, ValueError):
                continue  # parity needs images the model can see; bad ones are `data verify`'s
            if images and image.shape != images[0].shape:
                continue  # whole parts (fit "none") of another size than the first: not stackable
            images.append(image)
            if len(images) == n:
                return torch.stack(images)
    if len(images) < 2:  # one image would leave a batch over 1 unchecked
        raise UserError(
            f"split {split!r} of {index.location} has {len(images)} decodable images; parity needs 2 or more"
        )
    return torch.stack(images)


WHOLE_PARTS = 4  # parity images of a model trained on tiles: whole parts, hundreds of tiles each

# Share of decisions (a part's class, a label, a pixel's class) the export must reproduce at
# fp32: every one, but for segmentation 99.9% of pixels (an argmax on a border pixel between two
# near-equal classes may flip with the last bit of float arithmetic).
AGREEMENT = {"classify": 1.0, "multilabel": 1.0, "segment": 0.999, "anomaly": 1.0}


def check_parity(
    reference: np.ndarray,
    exported: np.ndarray,
    tolerance: float,
    precision: str,
    task: str = "classify",
    threshold: float = 0.5,
) -> dict:
    """Decision agreement and largest probability difference: the top class per part (per
    pixel for segmentation), or each label at 0.5 for multi-label. At fp32 the task's share must
    agree. At fp16 a disagreement is excused where the checkpoint's own two choices lie within
    2 × tolerance (a near-tie the allowed rounding may flip); how many were is reported. For
    anomaly the outputs are calibrated maps, and the decision is each part's stop at `threshold`."""
    diff = float(np.abs(reference - exported).max())
    if task == "anomaly":  # calibrated maps (n, 1, S, S): each part's score, and its stop at `threshold`
        ref, got = (
            reference.reshape(len(reference), -1).max(axis=1),
            exported.reshape(len(exported), -1).max(axis=1),
        )
        agree = (ref >= threshold) == (got >= threshold)
        margin = np.abs(ref - threshold) * 2
        near_tie = margin <= 2 * tolerance if precision != "int8" else np.zeros(agree.shape, bool)
        required = INT8_AGREEMENT if precision == "int8" else 1.0
        return {
            "max_abs_diff": diff,
            "max_abs_score_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float(agree.mean()),
            "near_ties_excused": int((~agree & near_tie).sum()),
            "passed": bool(diff <= tolerance and (agree | near_tie).mean() >= required),
        }
    if task == "multilabel":
        agree = (reference >= 0.5) == (exported >= 0.5)
        margin = np.abs(reference - 0.5) * 2  # the two choices: p and 1 - p
    else:
        agree = reference.argmax(axis=1) == exported.argmax(axis=1)
        top2 = np.sort(reference, axis=1)[:, -2:]
        margin = np.take(top2, 1, axis=1) - np.take(top2, 0, axis=1)
    near_tie = margin <= 2 * tolerance if precision == "fp16" else np.zeros(agree.shape, bool)
    required = {"fp32": AGREEMENT[task], "fp16": 1.0, "int8": INT8_AGREEMENT}[precision]
    return {
        "max_abs_diff": diff,
        "top1_agreement": float(agree.mean()),
        "near_ties_excused": int((~agree & near_tie).sum()),
        "passed": bool(diff <= tolerance and (agree | near_tie).mean() >= required),
    }


def calibration_images(index: str, calibration, spec, fit: str) -> torch.Tensor:
    """uint8 (N, 3, S, S): `calibration.samples` images of `calibration.split` as the model sees
    them (its eval preprocessing; for a tiled model, tiles of whole parts, resized alike)."""
    n, split = int(calibration.samples), str(calibration.split)
    tiling = tiling_from(spec.tiles)
    if not tiling:
        return parity_images(index, split, n, spec.image_size, spec.crop_pct, fit)
    tiles: list[torch.Tensor] = []
    for part in parity_images(index, split, max(1, n // 16), 0, 1.0, "none"):
        h, w = part.shape[-2:]
        grid = tiling.grid(w, h)
        step = max(1, len(grid) // 16)  # 16 tiles spread over each part
        cuts = cut(part, grid[::step][:16], tiling.size)
        tiles += list(TF.resize(cuts, [spec.image_size] * 2, InterpolationMode.BILINEAR, antialias=True))
    return (
        torch.stack(tiles[:n])
        if tiles
        else torch.zeros(0, 3, spec.image_size, spec.image_size, dtype=torch.uint8)
    )
