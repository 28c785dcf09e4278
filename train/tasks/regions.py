"""Pixel maps → part-level numbers, in numpy (shared by the checkpoint, bundles and evaluation):
probabilities mapped back to an image's own size, and the strength of its strongest region."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_size(probs: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel probabilities (C, S, S) at the model's input → (C, H, W) at the image's own
    size. The eval transform resized the whole image to (S, S), so bilinear resampling with
    pixel centres aligned (align_corners=False) maps each output pixel back to where it was."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    if tuple(p.shape[-2:]) == tuple(size):
        return p
    return F.interpolate(p[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def _largest_region(above: np.ndarray) -> int:
    """Pixels in the largest 8-connected region of a boolean map."""
    from scipy import ndimage

    labels, n = ndimage.label(above, structure=np.ones((3, 3), bool))
    return int(np.bincount(labels.ravel())[1:].max()) if n else 0


def region_score(prob: np.ndarray, min_area: int) -> float:
    """The strength of the strongest region of at least `min_area` pixels: the largest t for
    which {prob >= t} holds an 8-connected region that large. A region's size only shrinks as t
    grows, so a binary search over the map's own values finds t exactly (about log2(H*W) label
    passes). 0 when the whole map is smaller than `min_area`."""
    prob = np.asarray(prob, dtype=np.float32)
    if min_area <= 1:
        return float(prob.max())
    if prob.size < min_area:
        return 0.0
    values = np.unique(prob)  # ascending; at values[0] the whole map is one region
    lo, hi = 0, len(values) - 1  # invariant: values[lo] holds a large enough region
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _largest_region(prob >= values[mid]) >= min_area:
            lo = mid
        else:
            hi = mid - 1
    return float(values[lo])
