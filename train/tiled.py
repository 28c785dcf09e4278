"""Whole parts through a model trained on tiles: cut with the training grid, batched, stitched.

    image uint8 (3, H, W) ──grid (data/tiles.py)──▶ tiles (n, 3, T, T), padded past the edge
        ──resize to the model's input S (if T != S)──▶ probs(batch) per chunk of tiles
        ──per-pixel outputs (n, C, S, S): back to T, overlaps averaged──▶ (C, H, W) at full size
        ──per-tile outputs (n, C) (classification)──▶ kept per tile; the part is its strongest

One function for validation, evaluation, `predict` from a checkpoint and from an exported bundle,
so they all see a part the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data.tiles import Box, Tiling


def cut(image: torch.Tensor, boxes: list[Box], size: int) -> torch.Tensor:
    """(n, C, size, size) tiles of a (C, H, W) image at `boxes`, zero past its edge."""
    out = image.new_zeros((len(boxes), image.shape[0], size, size))
    for k, (x, y) in enumerate(boxes):
        part = image[:, y : y + size, x : x + size]
        out[k, :, : part.shape[1], : part.shape[2]] = part
    return out


class Stitcher:
    """Per-pixel tile outputs averaged into a (C, H, W) float32 map as they come, chunk by chunk,
    so a 50 MP part never holds all its tiles' outputs at once. A running mean per pixel
    (m += (x - m) / k at the k-th tile to cover it): a map cut into overlapping tiles stitches
    back bit for bit (x - m is exactly 0 where the values agree), in 4 bytes a value plus one
    count plane."""

    def __init__(self, channels: int, height: int, width: int, tiling: Tiling):
        self.out = torch.zeros((channels, height, width), dtype=torch.float32)
        deep = (math.ceil(tiling.size / tiling.stride) + 1) ** 2  # tiles over one pixel, at most
        self.count = torch.zeros((height, width), dtype=torch.uint8 if deep < 256 else torch.int32)
        self.size = tiling.size

    def add(self, tiles: torch.Tensor, boxes: list[Box]) -> None:
        """tiles (n, C, T, T) at `boxes`."""
        for tile, (x, y) in zip(tiles, boxes):
            out, count = (
                self.out[:, y : y + self.size, x : x + self.size],
                self.count[y : y + self.size, x : x + self.size],
            )
            count += 1
            out += (tile[:, : out.shape[1], : out.shape[2]] - out) / count.float()


def stitch(tiles: torch.Tensor, boxes: list[Box], height: int, width: int, tiling: Tiling) -> torch.Tensor:
    """(C, H, W) float32 from (n, C, T, T) tile maps at `boxes`, overlaps averaged."""
    s = Stitcher(tiles.shape[1], height, width, tiling)
    s.add(tiles, boxes)
    return s.out


def tiled(
    probs: Callable[[torch.Tensor], torch.Tensor | np.ndarray],
    image: torch.Tensor,
    tiling: Tiling,
    input_size: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """`probs` (uint8 (B, 3, S, S) → (B, C) or (B, C, S, S)) over a whole part uint8 (3, H, W):
    per-pixel outputs stitched to (C, H, W), per-tile outputs as (n, C)."""
    h, w = image.shape[-2:]
    boxes = tiling.grid(w, h)
    t = tiling.size
    rows, stitcher = [], None
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        batch = cut(image, chunk, t)
        if t != input_size:
            batch = TF.resize(batch, [input_size, input_size], InterpolationMode.BILINEAR, antialias=True)
        p = probs(batch)
        p = p.float().cpu() if isinstance(p, torch.Tensor) else torch.from_numpy(np.asarray(p, np.float32))
        if p.ndim == 2:  # one row per tile (classification)
            rows.append(p)
            continue
        if p.shape[-1] != t:
            p = F.interpolate(p, size=(t, t), mode="bilinear", align_corners=False)
        stitcher = stitcher or Stitcher(p.shape[1], h, w, tiling)
        stitcher.add(p, chunk)
    return torch.cat(rows) if rows else stitcher.out


def strongest(tile_probs: torch.Tensor, good: int | None, multilabel: bool = False) -> torch.Tensor:
    """A part's class probabilities (C,) from its tiles' (n, C): the row of the tile most likely
    a defect (least likely good); multi-label, every defect's strongest tile and the good class's
    weakest (a part is good only if every tile is)."""
    if multilabel:
        out = tile_probs.max(dim=0).values
        if good is not None:
            out[good] = tile_probs[:, good].min()
        return out
    if good is None:
        return tile_probs[tile_probs.max(dim=1).values.argmax()]
    return tile_probs[tile_probs[:, good].argmin()]


def part_probs(net, image: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """A checkpoint network's probabilities for one whole part (3, H, W) on its device: (C, H, W)
    per pixel (segment, anomaly) or (C,) per part (classify, multilabel), as `predict` gives."""
    from data.tiles import tiling_from

    spec = net.spec
    p = tiled(net.probabilities, image, tiling_from(spec.tiles), spec.image_size, batch_size)
    return of_part(p, spec)


def of_part(p: torch.Tensor, spec) -> torch.Tensor:
    """`tiled`'s output as the part's: stitched maps as they are, per-tile rows → `strongest`."""
    if p.ndim == 3:
        return p
    good = spec.classes.index(spec.good) if spec.good in spec.classes else None
    return strongest(p, good, spec.task == "multilabel")
