"""Tiled training and inference on large images, in figures: region decode, the loader, memory, predict.

    python scripts/bench_tiles.py [--megapixels 20] [--big-megapixels 50] [--parts 24] [--quick] [--json FILE]

Parts are data/synthetic_large.py's (3:2, JPEG quality 90 4:2:0, with masks), tiled as
+experiment=tiles does (256 px, 32 px overlap, 16 per part, half around defect pixels). Each
figure has its baseline measured here, in the same run, on the same data:

- region_vs_full: tiles/s through data.tile_stream.read_boxes, one random grid tile per call
  (one region decode) and 16 per call (per-region or one union decode, as its cost model
  picks), against the same calls with region decode off (PIL's full decode, then crops). Goal >= 3.
- loader_vs_tight: one epoch of ShardDataModule's tiles (2 workers, batches of 32) over --parts
  parts written with data.write, against a tight loop that cuts the same 16 tiles per part from
  the same tars with the loader's TileCutter (read_boxes + TileTransform) in 2 plain processes,
  wall-clock, best of two interleaved runs each. Goal: loader / tight >= 0.85.
- peak_rss_50mp: one epoch over 6 parts of --big-megapixels in a child process: its own peak RSS
  (wait4) and its largest loader worker's (RUSAGE_CHILDREN), beside one part's decoded size.
- predict_latency_20mp: a tiny segmentation model trained 2 steps on tiles through train.run.train
  (on small parts: validation and export's parity check stay short), exported to ONNX; predict
  on one --megapixels JPEG from the checkpoint and from the bundle, median of 3 after a warm-up.

Prints one JSON line (also written to --json FILE). --quick: 2 and 3 MP, 6 parts (a test's size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from multiprocessing import get_context
from unittest import mock

import numpy as np

from data import region, tiles
from data.decode import open_image
from data.tile_stream import TileTransform, read_boxes

TILES = {"size": 256, "overlap": 32, "per_image": 16, "defect_bias": 0.5}  # conf/experiment/tiles.yaml
FRAMES = {20.0: (5472, 3648)}  # a 1-inch 20 MP sensor; other sizes: 3:2 of the area asked


def frame(megapixels: float) -> tuple[int, int]:
    if megapixels in FRAMES:
        return FRAMES[megapixels]
    width = round(math.sqrt(megapixels * 1e6 * 3 / 2))
    return width, round(width * 2 / 3)


def write_parts(
    out: str, n: int, size: tuple[int, int], val_fraction: float = 0.0, shard_samples: int = 4
) -> str:
    from data.sources import from_synthetic
    from data.write import write_dataset

    items = from_synthetic(n, seed=0, size=0, large=size)
    report = write_dataset(items, out, val_fraction=val_fraction, shard_samples=shard_samples, workers=2)
    return report.index.location


# ---- 1. region decode against a full decode ---------------------------------------------------


def tiles_per_s(data: bytes, calls: list[list[tiles.Box]], full: bool, repeats: int = 2) -> float:
    """Best of `repeats` passes over `calls` (each one read_boxes call); `full`: region decode off."""
    best = math.inf
    with mock.patch.object(region, "available", lambda: False) if full else nullcontext():
        for _ in range(repeats):
            start = time.perf_counter()
            for boxes in calls:  # a fresh header each call: PIL keeps the pixels it once decoded
                read_boxes(data, open_image(data), boxes, TILES["size"])
            best = min(best, time.perf_counter() - start)
    return sum(map(len, calls)) / best


def region_vs_full(data: bytes, width: int, height: int, calls: int) -> dict:
    rng = np.random.default_rng(1)
    grid = tiles.Tiling(TILES["size"], TILES["overlap"]).grid(width, height)
    one = [[grid[t]] for t in rng.integers(len(grid), size=calls)]
    many = [[grid[t] for t in rng.choice(len(grid), 16, replace=False)] for _ in range(max(2, calls // 8))]
    with mock.patch.object(region, "available", lambda: False):
        reference = read_boxes(data, open_image(data), many[0], TILES["size"])
    with mock.patch.object(region, "decode_region", wraps=region.decode_region) as spy:
        pixels = [read_boxes(data, open_image(data), boxes, TILES["size"]) for boxes in many]
    assert all(np.array_equal(a, b) for a, b in zip(pixels[0], reference)), "region and full decode differ"
    out = {"image": f"{width}x{height}", "jpeg_mb": round(len(data) / 2**20, 2), "grid_tiles": len(grid)}
    for name, batch in (("one_tile", one), ("sixteen_tiles", many)):
        fast, slow = tiles_per_s(data, batch, False), tiles_per_s(data, batch, True)
        out[name] = {"region_tiles_per_s": round(fast, 1), "full_tiles_per_s": round(slow, 1),
                     "ratio": round(fast / slow, 2)}  # fmt: skip
    out["sixteen_tiles"]["decodes_per_call"] = round(spy.call_count / len(many), 2)  # 1: the union
    return out


# ---- 2. the loader against a tight loop; 3. its peak memory -----------------------------------


def datamodule(index: str):
    from data.datamodule import ShardDataModule

    return ShardDataModule(index=index, tiles=TILES, target="mask", image_size=256, batch_size=32,
                           num_workers=2, shuffle_buffer=256, persistent_workers=False)  # fmt: skip


def loader_epoch(index: str) -> tuple[int, float]:
    """(tiles, seconds) of one epoch of the loader, its workers' start included."""
    dm = datamodule(index)
    _ = dm.index  # the dataset.json, read outside the clock
    start = time.perf_counter()
    n, bad = 0, 0
    for images, _, _, counts in dm.train_dataloader():  # uint8 (B, 3, 256, 256), masks, keys, bad
        n, bad = n + len(images), bad + sum(counts["reasons"].values())
    assert bad == 0, f"{bad} bad tiles"
    return n, time.perf_counter() - start


def tight_worker(index_url: str, worker: int, workers: int) -> int:
    """Every `workers`-th part of the train split, read from the tars one after the other and cut
    by the loader's own TileCutter (target, draws, read_boxes, TileTransform): the per-part work
    without the plan, the stash, batching and the DataLoader. The tiles made."""
    import torch

    from data import targets
    from data.index import load_index
    from data.samples import read_shard
    from data.tile_stream import TileCutter

    torch.set_num_threads(1)  # as in a DataLoader worker
    index = load_index(index_url)
    reader = targets.reader("mask", index.labels, train=True)
    cut = TileCutter(tiles.Tiling(**TILES), TileTransform(256, hflip=0.5), reader, "mask", index.classes)
    draws = range(TILES["per_image"])
    n, k = 0, -1
    for s, shard in enumerate(index.split("train").shards):
        for i, sample in enumerate(read_shard(index.shard_url(shard))):
            k += 1
            if k % workers == worker:
                n += len(cut(sample, s, i, draws, epoch=0))  # (uint8 (3, 256, 256), mask, key) each
    return n


def tight_epoch(index: str, workers: int = 2) -> tuple[int, float]:
    start = time.perf_counter()
    with get_context("fork").Pool(workers) as pool:  # fork: what DataLoader workers use on Linux
        n = sum(pool.starmap(tight_worker, [(index, w, workers) for w in range(workers)]))
    return n, time.perf_counter() - start


def loader_vs_tight(root: str, megapixels: float, parts: int) -> dict:
    width, height = frame(megapixels)
    index = write_parts(f"{root}/parts", parts, (width, height))
    rates: dict[str, list[float]] = {"loader": [], "tight": []}
    tiles_made = {}
    for _ in range(2):  # interleaved, so a neighbour's burst hits both alike
        for name, epoch in (("loader", loader_epoch), ("tight", tight_epoch)):
            tiles_made[name], seconds = epoch(index)
            rates[name].append(tiles_made[name] / seconds)
    loader, tight = max(rates["loader"]), max(rates["tight"])
    return {"image": f"{width}x{height}", "parts": parts, "loader_tiles": tiles_made["loader"],
            "tight_tiles": tiles_made["tight"], "loader_tiles_per_s": round(loader, 1),
            "tight_tiles_per_s": round(tight, 1), "ratio": round(loader / tight, 3)}  # fmt: skip


def child_loader(index: str) -> None:
    """--child-loader: one epoch, then its workers' largest peak RSS (they have exited and been
    reaped; a forked worker's RSS counts the parent's pages it maps, torch's among them), and
    this process's peak before the epoch (imports, the index)."""
    _ = datamodule(index).index
    with open("/proc/self/status") as f:
        start_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    n, seconds = loader_epoch(index)
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"tiles": n, "seconds": seconds, "start_mb": start_kb / 1024, "worker_peak_mb": workers_kb / 1024}
    print(json.dumps(out))


def peak_rss(root: str, megapixels: float) -> dict:
    width, height = frame(megapixels)
    index = write_parts(f"{root}/big", 6, (width, height), shard_samples=3)
    with open(f"{root}/child.out", "w+") as out, open(f"{root}/child.err", "w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child-loader", index], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the kernel's account of that one process
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            sys.exit(f"bench_tiles: the loader child failed:\n{err.read()[-3000:]}")
        out.seek(0)
        child = json.loads(out.read().splitlines()[-1])
    return {"image": f"{width}x{height}", "parts": 6, "tiles": child["tiles"],
            "tiles_per_s": round(child["tiles"] / child["seconds"], 1),
            "decoded_image_mb": round(width * height * 3 / 2**20, 1),
            "main_peak_mb": round(usage.ru_maxrss / 1024), "main_before_epoch_mb": round(child["start_mb"]),
            "worker_peak_mb": round(child["worker_peak_mb"])}  # fmt: skip


# ---- 4. predict on a whole part: checkpoint against ONNX bundle -------------------------------


def predict_latency(root: str, jpeg: str, width: int, height: int) -> dict:
    from train import load_model
    from train.cli import compose
    from train.export import export
    from train.run import train

    # The model tiles any size: trained on 8 parts of 6 tiles, 4 train (64 draws, one batch of the
    # default 64) and 4 val (one validates, two check the export's parity)
    index = write_parts(f"{root}/small", 8, (640, 480), val_fraction=0.5)
    cfg = compose("train", "data=shards", f"data.index={index}", "+experiment=tiles", "task=segment",
                  "model.backbone=test_resnet", "task.decoder_channels=[64,32,16,16,16]",
                  "data.image_size=256", "data.num_workers=0", "trainer=cpu", "trainer.max_steps=2",
                  "trainer.limit_val_batches=1", "logger=none", f"paths.log_dir={root}",
                  f"paths.output_dir={root}/run", "trainer.enable_progress_bar=false")  # fmt: skip
    result = train(cfg)
    ckpt = result["best_checkpoint"] or result["last_checkpoint"]
    export(compose("export", f"ckpt={ckpt}", "format=onnx", f"out={root}/bundle", "parity.samples=2"))
    ms = {}
    for kind, path in (("checkpoint", ckpt), ("onnx", f"{root}/bundle")):
        model = load_model(path)
        model.predict(jpeg)  # warm-up
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            model.predict(jpeg)
            runs.append(time.perf_counter() - start)
        ms[kind] = 1000 * statistics.median(runs)
    return {"image": f"{width}x{height}", "tiles_per_image": tiles.Tiling(256, 32).count(width, height),
            "checkpoint_ms": round(ms["checkpoint"], 1), "onnx_ms": round(ms["onnx"], 1),
            "onnx_speedup": round(ms["checkpoint"] / ms["onnx"], 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megapixels", type=float, default=20.0, help="sections 1, 2, 4 (20: 5472x3648)")
    p.add_argument("--big-megapixels", type=float, default=50.0, help="parts of section 3 (50: 8660x5773)")
    p.add_argument("--parts", type=int, default=24, help="parts the loader and the tight loop read")
    p.add_argument("--quick", action="store_true", help="2 and 3 MP, 6 parts: that it runs, not figures")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--child-loader", help=argparse.SUPPRESS)  # section 3's child process: an index
    args = p.parse_args()
    if args.child_loader:
        return child_loader(args.child_loader)
    if args.quick:
        args.megapixels, args.big_megapixels, args.parts = 2.0, 3.0, 6
    from data.synthetic_large import encode_jpeg, render_large

    width, height = frame(args.megapixels)
    data = encode_jpeg(render_large(0, 1, width, height)[0])
    figures: dict = {"cpus": os.cpu_count(), "region_decode": region.available()}
    with tempfile.TemporaryDirectory(prefix="bench_tiles_") as root:
        with open(f"{root}/part.jpg", "wb") as f:
            f.write(data)
        figures["region_vs_full"] = region_vs_full(data, width, height, 16 if args.quick else 40)
        figures["loader_vs_tight"] = loader_vs_tight(root, args.megapixels, args.parts)
        figures["peak_rss_50mp"] = peak_rss(root, args.big_megapixels)
        figures["predict_latency_20mp"] = predict_latency(root, f"{root}/part.jpg", width, height)
    print(json.dumps(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
