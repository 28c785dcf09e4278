"""Build (or reuse) the loader benchmark set: JPEGs that look like ImageNet to a decoder.

    python scripts/bench_data.py [--variant large|small] [--images 5000] [--seed 0]

Every image is cut from one of the two real photographs that ship with scikit-learn
(`load_sample_images()`: china.jpg and flower.jpg, 640x427) by a random crop, resize, flip and
colour jitter, then given just enough sensor-like noise (or blur) that its JPEG lands in the
variant's size band: decode cost follows pixels and entropy-coded bytes, so both must be
realistic. Nothing is downloaded; the same parameters give the same bytes.

The set is written twice under `--root` (default ~/.cache/shardtrain/bench), keyed by parameters:

    <variant>-n<N>-s<seed>-k<shard samples>-r<recipe>/
        folder/<class>/<NNNNNN>.jpg     for torchvision's ImageFolder
        shards/train-*.tar, dataset.json  our writer's shards, every image in `train`
        set.json                          parameters and size statistics; written last
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import cache
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageFilter

DEFAULT_ROOT = "~/.cache/shardtrain/bench"


@dataclass(frozen=True)
class Variant:
    long_side: tuple[int, int]  # pixels, inclusive range of the longer side
    kb: tuple[float, float]  # accepted JPEG size band, kilobytes (1000 bytes)


# large: ImageNet train as decoders meet it (~110 KB, 400-500 px typical, 640 at most here);
# small: ~256 px, where fixed per-sample costs show rather than decode time.
VARIANTS = {"large": Variant((400, 640), (80.0, 120.0)), "small": Variant((224, 288), (20.0, 34.0))}
RECIPE = 1  # part of the cache key: bump it when `render` changes its output
CLASSES = ("china-landscape", "china-portrait", "flower-landscape", "flower-portrait")


@dataclass(frozen=True)
class BenchSet:
    directory: str
    folder: str  # ImageFolder root
    index: str  # our dataset.json
    stats: dict  # parameters and sizes, as in set.json


@cache
def _photos() -> tuple[Image.Image, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(a) for a in load_sample_images().images)  # china, flower; 427x640


def _encode(pixels: Image.Image, detail: float, noise: np.ndarray, quality: int) -> bytes:
    """`detail` > 0 adds Gaussian noise of that sigma (8-bit levels); < 0 blurs with radius -detail/8
    px. JPEG size rises monotonically with it, so a bracket search can hit a size band."""
    if detail < 0:
        pixels = pixels.filter(ImageFilter.GaussianBlur(-detail / 8))
    elif detail > 0:
        arr = np.asarray(pixels, dtype=np.float32) + detail * noise
        pixels = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    pixels.save(buf, format="JPEG", quality=quality, subsampling=2)  # subsampling=2: 4:2:0
    return buf.getvalue()


def render(seed: int, i: int, variant: Variant) -> tuple[str, bytes]:
    """(class name, JPEG bytes) of image `i`: a pure function of (seed, i, variant)."""
    rng = np.random.default_rng([seed, i])
    source = i % 2
    src = _photos()[source]
    portrait = rng.random() < 0.25
    long = int(rng.integers(variant.long_side[0], variant.long_side[1] + 1))
    w, h = long, round(long / rng.uniform(1.0, 1.5))  # aspect 1:1 to 3:2, like most photographs
    if portrait:
        w, h = h, w
    # The largest box of the output's aspect inside the photo, shrunk to 30-100 % of its area.
    cw = min(src.width, src.height * w / h) * np.sqrt(rng.uniform(0.3, 1.0))
    ch = cw * h / w
    left, top = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
    im = src.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Colour jitter: brightness x0.8-1.2, per channel x0.9-1.1, saturation x0.7-1.3.
    arr = np.asarray(im, dtype=np.float32) * rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, 3)
    gray = arr.mean(axis=2, keepdims=True)
    arr = gray + rng.uniform(0.7, 1.3) * (arr - gray)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    quality = int(rng.integers(85, 96))
    noise = rng.standard_normal(arr.shape, dtype=np.float32)  # (h, w, 3), unit sigma
    # Bisect `detail` until the size is within `tol` of a target drawn so that target ± tol stays
    # inside the band (large: target 88-112 KB, accepted within 8 KB of it).
    lo_kb, hi_kb = variant.kb
    tol = 0.2 * (hi_kb - lo_kb)
    target = rng.uniform(lo_kb + tol, hi_kb - tol)
    lo, hi, detail = -16.0, 96.0, 0.0  # the smallest crops (400x270) need sigma ~60 to reach 80 KB
    for _ in range(12):
        data = _encode(im, detail, noise, quality)
        kb = len(data) / 1000
        if abs(kb - target) <= tol:
            break
        lo, hi = (detail, hi) if kb < target else (lo, detail)
        detail = (lo + hi) / 2
    return CLASSES[2 * source + portrait], data


def _write_one(job: tuple[int, int, Variant, str]) -> tuple[int, int, int]:
    """Runs in a worker: render and write image `i`; (bytes, width, height)."""
    seed, i, variant, folder = job
    label, data = render(seed, i, variant)
    with open(os.path.join(folder, label, f"{i:06d}.jpg"), "wb") as f:
        f.write(data)
    w, h = Image.open(io.BytesIO(data)).size
    return len(data), w, h


def set_name(variant: str, images: int, seed: int, shard_samples: int) -> str:
    return f"{variant}-n{images}-s{seed}-k{shard_samples}-r{RECIPE}"


def build(
    variant: str = "large",
    images: int = 5000,
    seed: int = 0,
    shard_samples: int = 250,
    root: str = DEFAULT_ROOT,
    workers: int | None = None,
) -> BenchSet:
    """The benchmark set with these parameters, built on first use (about a minute for 5,000
    large images on 2 cores) and reused after. `shard_samples` of 250 gives ~25 MB shards,
    enough of them that webdataset's per-worker shard split stays even."""
    directory = os.path.join(os.path.expanduser(root), set_name(variant, images, seed, shard_samples))
    folder, shards = os.path.join(directory, "folder"), os.path.join(directory, "shards")
    done = os.path.join(directory, "set.json")
    if os.path.exists(done):
        with open(done) as f:
            stats = json.load(f)
        return BenchSet(directory, folder, os.path.join(shards, "dataset.json"), stats)

    from data.sources import from_folder
    from data.write import write_dataset

    start = time.perf_counter()
    shutil.rmtree(directory, ignore_errors=True)  # a build interrupted before set.json
    for label in CLASSES:
        os.makedirs(os.path.join(folder, label))
    spec = VARIANTS[variant]
    workers = workers or os.cpu_count() or 1
    with get_context("fork").Pool(workers) as pool:
        jobs = [(seed, i, spec, folder) for i in range(images)]
        sizes = np.array(pool.map(_write_one, jobs, chunksize=32), dtype=np.float64)  # (N, 3)
    report = write_dataset(
        from_folder(folder),
        shards,
        val_fraction=0.0,  # every image in train: the loaders all read the same set
        seed=seed,
        shard_samples=shard_samples,
        workers=workers,
        extra={"bench": {"variant": variant, "images": images, "seed": seed}},
    )
    kb = sizes[:, 0] / 1000
    stats = {
        "variant": variant,
        "spec": asdict(spec),
        "images": images,
        "seed": seed,
        "shard_samples": shard_samples,
        "shards": len(report.index.split("train").shards),
        "kb_mean": round(float(kb.mean()), 1),
        "kb_min": round(float(kb.min()), 1),
        "kb_max": round(float(kb.max()), 1),
        "in_band": round(float(np.mean((kb >= spec.kb[0]) & (kb <= spec.kb[1]))), 4),
        "long_side_mean": round(float(sizes[:, 1:].max(axis=1).mean()), 1),
        "megapixels_mean": round(float((sizes[:, 1] * sizes[:, 2]).mean() / 1e6), 3),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    with open(done, "w") as f:
        json.dump(stats, f, indent=1)
    return BenchSet(directory, folder, report.index.location, stats)


def repeat_index(index: str, times: int) -> str:
    """A second dataset.json beside `index` whose train split lists the same shards `times`
    over (same url and sha256): `times` x the samples to stream for no extra disk."""
    from data.index import DatasetIndex, Split, load_index, save_index

    base = load_index(index)
    train = Split(base.split("train").shards * times)
    out = os.path.join(os.path.dirname(index), f"dataset-x{times}.json")
    save_index(DatasetIndex(base.classes, {"train": train}, extra=base.extra), out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="large")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-samples", type=int, default=250)
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    a = p.parse_args()
    s = build(a.variant, a.images, a.seed, a.shard_samples, a.root, a.workers)
    print(f"{s.folder}\n{s.index}")
    print(json.dumps(s.stats))


if __name__ == "__main__":
    main()
