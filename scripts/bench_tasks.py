"""What a task costs: loader images/s with masks against without, and training images/s of
task=segment (and multilabel) against task=classify, same data, size and backbone.

    python scripts/bench_tasks.py [--backbone test_resnet] [--image-size 96] [--images 2000]
                                  [--steps 30] [--rounds 2] [--json FILE]

One synthetic data set with masks (the embedded generator's, `--stored` px) serves every
contender. The loader runs read one epoch of the train split through ShardDataModule's
train_dataloader (target "class" vs "mask": the mask's PNG decode and its nearest-neighbour
crop are the difference), timed from the first batch's arrival. Training runs our module and
trainer (scripts/bench_train.py's `ours`) with `task=` switched; rounds alternate and the best of
each counts, so a neighbour on the machine does not decide a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench_train import config, ours

from data.datamodule import ShardDataModule
from data.sources import from_synthetic
from data.write import write_dataset


def loader(index: str, target: str, args: argparse.Namespace) -> float:
    dm = ShardDataModule(
        index, batch_size=args.batch, num_workers=args.workers, image_size=args.image_size,
        train_scale=(0.5, 1.0), persistent_workers=False, target=target,
    )  # fmt: skip
    batches = iter(dm.train_dataloader())
    first = next(batches)
    start, n = time.perf_counter(), 0
    for images, *_ in batches:
        n += len(images)
    assert len(first[0]) and n, "the epoch is too short to time: give more --images"
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backbone", default="test_resnet", help="timm encoder / classifier (default test_resnet)"
    )
    p.add_argument("--image-size", type=int, default=96, help="input side, pixels (a multiple of 32)")
    p.add_argument("--stored", type=int, default=192, help="stored image side, pixels")
    p.add_argument("--images", type=int, default=2000, help="synthetic data set size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="loader processes (2 cores: 1 decodes)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--steps", type=int, default=30, help="timed training steps")
    p.add_argument("--rounds", type=int, default=2, help="alternate the contenders this many times")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    args.device, args.precision, args.channels_last, args.pin_memory = "cpu", "32-true", False, False

    runs: dict[str, list[float]] = {
        k: [] for k in ("loader_class", "loader_mask", "classify", "multilabel", "segment")
    }
    with tempfile.TemporaryDirectory(prefix="bench_tasks_") as tmp:
        items = from_synthetic(args.images, seed=1, size=args.stored, multi=0.5)
        index = write_dataset(items, f"{tmp}/shards", shard_samples=500).index.location
        for _ in range(args.rounds):
            runs["loader_class"].append(loader(index, "class", args))
            runs["loader_mask"].append(loader(index, "mask", args))
            for task in ("classify", "multilabel", "segment"):
                cfg = config(index, f"{tmp}/out", args)
                cfg.merge_with_dotlist([f"task._target_=train.tasks.{_module(task)}"])
                runs[task].append(ours(cfg, args))
    best = {k: max(v) for k, v in runs.items()}
    figures = {
        **best,
        "loader_mask_over_class": best["loader_mask"] / best["loader_class"],
        "segment_over_classify": best["segment"] / best["classify"],
        "multilabel_over_classify": best["multilabel"] / best["classify"],
        "runs": runs,
    }
    print(
        f"{args.backbone} at {args.image_size} px from {args.stored} px images, batch {args.batch}, "
        f"{os.cpu_count()} cores, {args.workers} loader workers, best of {args.rounds}"
    )
    for name, values in runs.items():
        print(f"  {name:13s} {best[name]:9.1f} images/s  (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    for key in ("loader_mask_over_class", "segment_over_classify", "multilabel_over_classify"):
        print(f"  {key:26s} {figures[key]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


def _module(task: str) -> str:
    return {
        "classify": "classify.Classify",
        "multilabel": "multilabel.MultiLabel",
        "segment": "segment.Segment",
    }[task]


if __name__ == "__main__":
    main()
