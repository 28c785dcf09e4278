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
    draw t ──▶ grid tile: all tiles in grid order, or `per_image` tiles drawn without repeats
               from (seed, epoch, shard, image), a `defect_bias` share of them among the tiles
               that hold defect pixels

Pure and torch-free: the plan, the loader and `predict` share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from data.errors import UserError

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
        if tiling.per_image:
            self.per_shard = tuple(n * tiling.per_image for n in num_samples)
            self._ends = None
            return
        if sizes is None or any(len(expand_sizes(s)) != n for s, n in zip(sizes, num_samples)):
            raise UserError(
                "data.tiles.per_image=0 (every tile of every image) needs each image's size, and this "
                "data set's index does not record them: index it again (python -m data index DIR) or "
                "write it with this version, or draw a fixed number of tiles (data.tiles.per_image=16)"
            )
        self._ends = [np.cumsum(tile_counts(tiling, s)) for s in sizes]  # per shard: (N,) cumulative
        self.per_shard = tuple(int(e[-1]) if len(e) else 0 for e in self._ends)

    def image_of(self, shard: int, slot: int) -> tuple[int, int]:
        """(image number in the shard, draw number within the image) of a slot."""
        if self._ends is None:
            return divmod(slot, self.tiling.per_image)
        ends = self._ends[shard]
        i = int(np.searchsorted(ends, slot, side="right"))
        return i, slot - (int(ends[i - 1]) if i else 0)


@lru_cache(maxsize=64)
def _counts(tiling: Tiling, runs: tuple) -> np.ndarray:
    return np.array([tiling.count(int(w), int(h)) for w, h in expand_sizes(runs)], np.int64)


def tile_counts(tiling: Tiling, runs: Sequence[Sequence[int]]) -> np.ndarray:
    return _counts(tiling, tuple(tuple(r) for r in runs))


def defect_tiles(tiling: Tiling, boxes: Sequence[Box], mask: np.ndarray | None) -> list[int]:
    """The grid tiles whose pixels include a defect (mask value > 0)."""
    if mask is None or not mask.any():
        return []
    s = tiling.size
    return [t for t, (x, y) in enumerate(boxes) if mask[y : y + s, x : x + s].any()]


def draw(tiling: Tiling, n_tiles: int, rng: np.random.Generator, defects: Sequence[int] = ()) -> list[int]:
    """`per_image` grid tiles for one image and epoch, without repeats while the grid lasts.
    Each draw, with probability `defect_bias`, is taken among the defect tiles not yet drawn."""
    chosen: list[int] = []
    left = list(range(n_tiles))
    marked = set(defects)
    for _ in range(tiling.per_image):
        if not left:
            left = list(range(n_tiles))  # a grid smaller than per_image: a second round
        pool = left
        if marked and rng.random() < tiling.defect_bias:
            pool = [t for t in left if t in marked] or left
        t = pool[int(rng.integers(len(pool)))]
        chosen.append(t)
        left.remove(t)
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
