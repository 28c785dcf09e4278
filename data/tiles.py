"""Tiles of large images as planned samples: the grid, the plan's slots, and the tiles drawn.

A line camera's 5-50 MP image resized to a model's 224 px erases a 20 px defect, so the model
sees the image in tiles at (or near) its own resolution instead. Tiles are samples of the epoch
plan: a shard of n images holds n × `per_image` slots (or, with `per_image` 0, as many slots as
its images have grid tiles, counted from the image sizes the index records), so exactly-once,
equal batches per rank, exact and elastic resume and the audit all hold per tile, unchanged.

    image W x H ──grid──▶ tiles (x, y), `size` x `size`, neighbours sharing `overlap` px; the
                          last row and column sit flush with the far edges (so every tile lies
                          inside the image unless the image is smaller than one tile: then one
                          tile at (0, 0), padded)
    slot (shard, j) ──▶ (image i of the shard, draw t)
    draw t ──▶ a tile: the grid's t-th (all tiles, row by row), or the t-th of `per_image` tiles
               drawn from (seed, epoch, shard, image): grid tiles without repeats, and a
               `defect_bias` share of them around defect pixels where the image has a mask

Pure and torch-free: the plan, the loader and `predict` share it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from data.errors import UserError

log = logging.getLogger(__name__)

Box = tuple[int, int]  # a tile's top-left corner (x, y), pixels of the full image


@dataclass(frozen=True)
class Tiling:
    size: int  # tile side, pixels of the full image
    overlap: int = 0  # pixels neighbouring tiles share, per axis
    per_image: int = 0  # training: tiles drawn per image per epoch; 0: all its tiles
    defect_bias: float = 0.0  # training: share of drawn tiles taken among those with defect pixels

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 16:
            raise UserError(f"data.tiles.size={self.size}: expected a tile side in pixels, at least 16")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.size:
            raise UserError(
                f"data.tiles.overlap={self.overlap}: expected 0 <= overlap < size ({self.size}); "
                f"tiles that overlap by their whole side never advance (try {self.size // 8})"
            )
        if not isinstance(self.per_image, int) or self.per_image < 0:
            raise UserError(
                f"data.tiles.per_image={self.per_image}: expected tiles per image >= 1, or 0 for all"
            )
        if not 0 <= self.defect_bias <= 1:
            raise UserError(f"data.tiles.defect_bias={self.defect_bias}: expected a share in [0, 1]")

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    def starts(self, length: int) -> list[int]:
        """Tile starts along an axis of `length` pixels: every `stride`, the last flush with the end."""
        if length <= self.size:
            return [0]
        n = math.ceil((length - self.overlap) / self.stride)
        return [min(k * self.stride, length - self.size) for k in range(n)]

    def grid(self, width: int, height: int) -> list[Box]:
        """Every tile's (x, y), row by row."""
        return [(x, y) for y in self.starts(height) for x in self.starts(width)]

    def count(self, width: int, height: int) -> int:
        return len(self.starts(width)) * len(self.starts(height))

    def geometry(self) -> dict:
        """What inference needs to tile an image as training did (the spec and bundle carry it)."""
        return {"size": self.size, "overlap": self.overlap}

    def to_dict(self) -> dict:
        return asdict(self)


def tiling_from(value) -> Tiling | None:
    """`data.tiles` (a mapping, or None / empty for whole images) as a Tiling."""
    if not value:
        return None
    if isinstance(value, Tiling):
        return value
    known = set(Tiling.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown or "size" not in value:
        raise UserError(
            f"data.tiles: {'unknown keys ' + ', '.join(unknown) if unknown else 'no size'} "
            f"(expected size, overlap, per_image, defect_bias)"
        )
    return Tiling(**{k: value[k] for k in value})


def expand_sizes(runs: Sequence[Sequence[int]]) -> np.ndarray:
    """An index's run-length image sizes [[w, h, n], ...] → int64 (N, 2) of (w, h) per sample."""
    if not runs:
        return np.zeros((0, 2), np.int64)
    a = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    return np.repeat(a[:, :2], a[:, 2], axis=0)


def run_lengths(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """(w, h) per sample → [[w, h, n], ...]: a camera's fixed size costs one entry per shard."""
    runs: list[list[int]] = []
    for w, h in sizes:
        if runs and runs[-1][0] == w and runs[-1][1] == h:
            runs[-1][2] += 1
        else:
            runs.append([int(w), int(h), 1])
    return runs


class Slots:
    """The plan's slots of one split under a tiling: per shard, how many, and which image and draw
    each one is. `sizes` is each shard's run-length image sizes (needed when every tile is used)."""

    def __init__(self, tiling: Tiling, num_samples: Sequence[int], sizes: Sequence[Sequence] | None):
        self.tiling = tiling
        self.num_samples = tuple(num_samples)
        small = sum(int((expand_sizes(s).min(axis=1) < tiling.size).sum()) for s in sizes or () if s)
        if small:  # a note, not an error: such an image is one tile, zero-padded
            _note_small(small, tiling.size)
        if tiling.per_image:
            self.per_shard = tuple(n * tiling.per_image for n in num_samples)
            self._ends = None
            return
        if sizes is None or any(len(expand_sizes(s)) != n for s, n in zip(sizes, num_samples)):
            raise UserError(
                "data.tiles.per_image=0 (every tile of every image) needs each image's size, and this "
                "data set's index does not record them: index it again (python -m data index DIR "
                "--overwrite) or write it with this version, or draw a fixed number of tiles "
                "(data.tiles.per_image=16)"
            )
        self._ends = [np.cumsum(tile_counts(tiling, s)) for s in sizes]  # per shard: (N,) cumulative
        self.per_shard = tuple(int(e[-1]) if len(e) else 0 for e in self._ends)

    def image_of(self, shard: int, slot: int) -> tuple[int, int]:
        """(image number in the shard, draw number within the image) of a slot. A slot past the
        shard's count is a repeat (an up-sampled source, data/plan.py): its image counts on past
        the shard's images too, so the stream reads it again and draws its tiles afresh."""
        repeat, slot = divmod(slot, self.per_shard[shard])
        if self._ends is None:
            i, draw = divmod(slot, self.tiling.per_image)
        else:
            ends = self._ends[shard]
            i = int(np.searchsorted(ends, slot, side="right"))
            draw = slot - (int(ends[i - 1]) if i else 0)
        return repeat * self.num_samples[shard] + i, draw


@lru_cache(maxsize=16)  # once per process, not at every epoch's loader
def _note_small(count: int, size: int) -> None:
    log.warning("%d images are smaller than a %d px tile: each is one tile, zero-padded", count, size)


@lru_cache(maxsize=64)
def _counts(tiling: Tiling, runs: tuple) -> np.ndarray:
    return np.array([tiling.count(int(w), int(h)) for w, h in expand_sizes(runs)], np.int64)


def tile_counts(tiling: Tiling, runs: Sequence[Sequence[int]]) -> np.ndarray:
    return _counts(tiling, tuple(tuple(r) for r in runs))


def draw(
    tiling: Tiling,
    grid: Sequence[Box],
    size: tuple[int, int],
    rng: np.random.Generator,
    mask: np.ndarray | None,
) -> list[Box]:
    """`per_image` tiles of one image (width, height) for one epoch. Each draw, with probability
    `defect_bias` when the image has defect pixels (mask > 0), is a tile around a random defect
    pixel (anywhere in its middle half, so the defect is seen at many places in the tile);
    otherwise a grid tile not drawn yet (every grid tile once before any repeats). Positions never
    repeat within the epoch while the image has room for them."""
    w, h = size
    s = tiling.size
    marked = np.flatnonzero(mask > 0) if mask is not None and tiling.defect_bias else np.zeros(0, np.int64)
    left = list(range(len(grid)))
    chosen: list[Box] = []
    for _ in range(tiling.per_image):
        box = None
        if marked.size and rng.random() < tiling.defect_bias:
            for _ in range(8):  # a fresh position, unless the defect leaves no room for one
                y, x = divmod(int(marked[rng.integers(marked.size)]), mask.shape[1])
                dx, dy = rng.integers(s // 4, s - s // 4, size=2)
                box = (int(np.clip(x - dx, 0, max(0, w - s))), int(np.clip(y - dy, 0, max(0, h - s))))
                if box not in chosen:
                    break
        while box is None or (box in chosen and left):
            if not left:
                left = list(range(len(grid)))  # more draws than grid tiles: a second round
            box = grid[left.pop(int(rng.integers(len(left))))]
        chosen.append(box)
    return chosen


def crop(a: np.ndarray, box: Box, size: int, fill: int = 0) -> np.ndarray:
    """a[y:y+size, x:x+size] of an (H, W, ...) array, padded with `fill` past the image's edge."""
    x, y = box
    part = a[y : y + size, x : x + size]
    if part.shape[:2] == (size, size):
        return part
    out = np.full((size, size, *a.shape[2:]), fill, a.dtype)
    out[: part.shape[0], : part.shape[1]] = part
    return out
