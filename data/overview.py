"""`python -m data inspect`: what is in a data set, at a glance.

A class histogram per split (one sequential pass over the shards, labels only) and a PNG grid
with a row of sample images per class, each row labelled, for a person to check that the
classes look like what they are called; where a sample has a mask, its defect pixels are
outlined in red over the image, to check that masks and images line up.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

from data.decode import decode_rgb, open_image
from data.index import DatasetIndex
from data.samples import BadSample, image_bytes, read_shard
from data.targets import MASK_EXT, Mask

THUMB = 96  # grid cell side, pixels
LABEL_WIDTH = 110  # left margin for the class names, pixels


def histogram(index: DatasetIndex) -> dict[str, Counter]:
    """Per split: class name → sample count, as the shards hold them (not as the index says)."""
    counts = {}
    for name, split in index.splits.items():
        counts[name] = Counter()
        for shard in split.shards:
            url = index.shard_url(shard)
            for sample in read_shard(url):
                try:
                    counts[name][index.classes[index.labels(sample)]] += 1
                except BadSample as e:
                    counts[name][f"<{e}>"] += 1
    return counts


def _overlay(im: Image.Image, mask: np.ndarray) -> Image.Image:
    """The thumbnail with the mask's defect pixels tinted red (half transparent)."""
    m = np.asarray(Image.fromarray((mask > 0).astype(np.uint8) * 255).resize(im.size, Image.NEAREST)) > 0
    pixels = np.asarray(im.convert("RGB")).copy()
    pixels[m] = (pixels[m] * 0.5 + np.array([255, 0, 0]) * 0.5).astype(np.uint8)
    return Image.fromarray(pixels)


def sample_grid(index: DatasetIndex, split: str, per_class: int = 8) -> Image.Image:
    """The first `per_class` decodable images of each class in `split`, one row per class."""
    rows: dict[int, list[Image.Image]] = {c: [] for c in range(len(index.classes))}
    depth = index.extra.get("bit_depth")  # 16-bit images scaled as the loader scales them
    for shard in index.split(split).shards:
        url = index.shard_url(shard)
        for sample in read_shard(url):
            try:
                c = index.labels(sample)
                if len(rows[c]) < per_class:
                    data = image_bytes(sample)
                    im = open_image(data)
                    im = decode_rgb(im, min(im.size) / THUMB, data, depth)
                    im = im.resize((THUMB, THUMB), Image.BILINEAR)
                    if MASK_EXT in sample:
                        im = _overlay(im, Mask(index.labels)(sample))
                    rows[c].append(im)
            except (BadSample, OSError, ValueError):
                continue  # the grid shows what decodes; `data verify` reports the rest
        if all(len(r) == per_class for r in rows.values()):
            break
    grid = Image.new("RGB", (LABEL_WIDTH + per_class * THUMB, len(rows) * THUMB), "white")
    draw = ImageDraw.Draw(grid)
    for c, thumbs in rows.items():
        y = c * THUMB
        draw.text((6, y + THUMB // 2 - 6), index.classes[c][:16], fill="black")
        for i, thumb in enumerate(thumbs):
            grid.paste(thumb, (LABEL_WIDTH + i * THUMB, y))
    return grid
