"""Planned tile slots → decoded tiles, inside one loader worker (data/stream.py's tile branch).

    plan.worker_samples()    (shard, slot) in the order this worker yields them
      └─ Slots.image_of      (shard, image, draw): which image each slot cuts, and which draw
         └─ read_planned     each image's raw sample once, in the order its first tile is due
            └─ cut_tiles     every tile this worker needs from the image, from one decode of the
               │             regions they need, stashed until due: uint8 (3, S, S), the tile's
               │             target, key "KEY@X,Y" (the tile's corner, px), or None (bad)
               └─ batched    (data/stream.py)

An image is decoded at most once per pass of a worker: a worker's tiles of one image are cut in
one go, and held (small, at most the shuffle buffer's reach) until the plan wants each. A JPEG
decodes only the regions its tiles need where libjpeg-turbo is at hand (data/region.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from data import region, tiles
from data.decode import decode_rgb, open_image
from data.plan import Sample
from data.samples import BadSample, image_bytes
from data.targets import MASK_EXT, find_good, mask_classes, read_mask

# Entropy decoding runs over every row down to a region's last (Huffman codes have no random
# access), IDCT, upsampling and colour only over the region: per pixel, the first costs about
# this share of a full decode (scripts/bench_region.py, 20 MP: a 256 px tile at the bottom
# 46 ms, at the top 4 ms, a full decode 134 ms).
ROW_COST = 0.33


@dataclass(frozen=True)
class TileTransform:
    """A tile's pixels (T, T, 3) → uint8 (3, S, S) (resized when the model's input S differs
    from the tile side T), with flips and quarter turns in training; a mask moves with it
    (nearest). With all three at 0.5 a tile takes each of its 8 orientations equally often."""

    size: int  # model input side, pixels
    hflip: float = 0.0  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip (parts on a line have no "up")
    rot90: float = 0.0  # probability of a quarter turn (a square tile has no "along the line")

    def __call__(self, pixels: np.ndarray, mask: np.ndarray | None = None):
        out = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        m = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))
        if out.shape[-1] != self.size:
            out = F.resize(out, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True)
            if m is not None:
                m = F.resize(m[None], [self.size, self.size], InterpolationMode.NEAREST)[0]
        if self.hflip and torch.rand(()) < self.hflip:
            out, m = out.flip(-1), None if m is None else m.flip(-1)
        if self.vflip and torch.rand(()) < self.vflip:
            out, m = out.flip(-2), None if m is None else m.flip(-2)
        if self.rot90 and torch.rand(()) < self.rot90:
            out, m = out.rot90(1, (-2, -1)), None if m is None else m.rot90(1, (-2, -1))
        return out.contiguous(), None if m is None else m.contiguous()


@dataclass(frozen=True)
class TileCutter:
    """Cuts an image's planned tiles: the grid from its own size, draws from (seed, epoch, shard,
    image) (data/tiles.py), targets cropped with their tile (`kind`: the task's target, see
    data/targets.py)."""

    tiling: tiles.Tiling
    transform: TileTransform
    targets: object  # the task's target reader: sample → class index, multi-hot or (H, W) map
    kind: str  # "class", "labels", "mask" or "anomaly"
    classes: tuple[str, ...]
    seed: int = 0
    bit_depth: int | None = None  # significant bits of 16-bit images (None: each file's own)

    def __call__(self, sample: dict, shard: int, image: int, draws: Sequence[int], epoch: int) -> list:
        """(uint8 (3, S, S), target, key) for each draw, in the order of `draws`."""
        data = image_bytes(sample)
        im = open_image(data)  # header only: the grid follows the image's own size
        target = self.targets(sample)  # a left-out defect stops here, before any pixel is decoded
        mask = self._mask(sample, target)
        if mask is not None and mask.shape != (im.height, im.width):
            raise BadSample("mask size differs from its image")
        grid = self.tiling.grid(im.width, im.height)
        if self.tiling.per_image:
            rng = np.random.default_rng([self.seed, epoch, shard, image])
            chosen = tiles.draw(self.tiling, grid, im.size, rng, mask)
            boxes = [chosen[d] for d in draws]
        else:
            if max(draws) >= len(grid):
                raise BadSample("image size differs from the index (python -m data index DIR --overwrite)")
            boxes = [grid[d] for d in draws]
        pixels = read_boxes(data, im, boxes, self.tiling.size, self.bit_depth)
        key = sample.get("__key__", "?")
        out = []
        for box, px in zip(boxes, pixels):
            m = None if mask is None else tiles.crop(mask, box, self.tiling.size)
            img, m = self.transform(px, m if self.kind in ("mask", "anomaly") else None)
            # keyed by image and tile: the tile's top-left corner in the image's pixels
            out.append((img, self._tile_target(target, m, mask, box), f"{key}@{box[0]},{box[1]}"))
        return out

    def _mask(self, sample: dict, target) -> np.ndarray | None:
        """The image's class-index mask (H, W): the target itself for segment and anomaly; read
        from KEY.mask.png for per-tile classes, when the sample has one."""
        if self.kind in ("mask", "anomaly"):
            return target
        if MASK_EXT not in sample:
            return None
        label = target if isinstance(target, int) else int(np.argmax(target))
        mask = read_mask(sample[MASK_EXT])
        if hasattr(self.targets, "mask_table"):  # a data.mix: the source's class values, renumbered
            mask = self.targets.mask_table(sample)[mask]
        return mask_classes(mask, label, len(self.classes))

    def _tile_target(self, target, tile_mask, mask, box):
        if self.kind in ("mask", "anomaly"):
            return tile_mask.numpy()
        if mask is None:
            return target  # no mask: every tile carries the image's own class
        counts = np.bincount(tiles.crop(mask, box, self.tiling.size).ravel(), minlength=len(self.classes))
        good = find_good(self.classes)
        g = self.classes.index(good) if good else 0
        counts[g] = 0
        if self.kind == "labels":
            hot = (counts > 0).astype(np.float32)
            hot[g] = float(not hot.any())
            return hot
        return int(counts.argmax()) if counts.any() else g


def read_boxes(
    data: bytes, im, boxes: Sequence[tiles.Box], size: int, bit_depth: int | None = None
) -> list[np.ndarray]:
    """uint8 (size, size, 3) pixels of each tile (padded past the image's edge), from one decode:
    region by region, or of the smallest box around them all, whichever costs less (entropy
    decoding of every row down to a region's last counted at ROW_COST a pixel). A 16-bit image
    is scaled to 8 bits by `bit_depth` (None: its own), as the loader's transforms do."""
    w, h = im.size
    rects = [(x, y, min(size, w - x), min(size, h - y)) for x, y in boxes]
    if im.format == "JPEG" and im.mode in ("RGB", "L") and region.available():
        x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
        x1, y1 = max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects)

        def cost(r):
            return ROW_COST * (r[1] + r[3]) * w + r[2] * r[3]

        union = (x0, y0, x1 - x0, y1 - y0)
        if len(rects) > 1 and sum(cost(r) for r in rects) > cost(union):
            whole = region.decode_region(data, union)
            return [tiles.crop(whole, (x - x0, y - y0), size) for x, y, _, _ in rects]
        return [tiles.crop(region.decode_region(data, r), (0, 0), size) for r in rects]
    whole = np.asarray(decode_rgb(im, 1.0, data, bit_depth))
    return [tiles.crop(whole, (x, y), size) for x, y, _, _ in rects]


def tile_items(
    samples: Sequence[Sample],
    slots: tiles.Slots,
    raw: Iterator[dict | None],
    cut: TileCutter,
    epoch: int,
    bad,
) -> Iterator[tuple | None]:
    """Per planned slot, in plan order: (tile, target, key), or None where it cannot train.
    `raw` yields the images of `image_order(...)` in that order."""
    planned = [(s, *slots.image_of(s, j)) for s, j in samples]
    draws: dict[tuple[int, int], list[int]] = {}
    for s, i, d in planned:
        draws.setdefault((s, i), []).append(d)
    stash: dict[tuple[int, int, int], tuple | None] = {}
    for s, i, d in planned:
        if (s, i, d) not in stash:  # the first tile due of the next image in `raw`
            sample = next(raw)
            stash.update(_cut(sample, s, i, draws[(s, i)], cut, epoch, bad))
        yield stash.pop((s, i, d))


def image_order(samples: Sequence[Sample], slots: tiles.Slots) -> list[Sample]:
    """The worker's images (shard, image), each once, in the order their first tile is due."""
    return list(dict.fromkeys((s, slots.image_of(s, j)[0]) for s, j in samples))


def _cut(sample: dict | None, shard: int, image: int, draws: list[int], cut: TileCutter, epoch: int, bad):
    keys = [(shard, image, d) for d in draws]
    if sample is None:  # lost upstream (a missing or broken shard): counted there, once for the image
        return dict.fromkeys(keys)
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    try:
        return dict(zip(keys, cut(sample, shard, image, draws, epoch)))
    except BadSample as e:
        reason, error = str(e), None
    except Exception as e:  # PIL and libjpeg-turbo raise many types for corrupt data
        reason, error = "undecodable image", e
    for d in draws:  # every planned tile of the image counts: batches follow plan positions
        bad(reason, url, f"{key}@{d}", error)
    return dict.fromkeys(keys)
