"""The framework's tax: training images/s through our Lightning module vs a plain PyTorch loop.

    python scripts/bench_train.py [--backbone resnet18] [--image-size 64] [--steps 40] [--json FILE]

Both train the same network (built by `train.run.build` from the real config, same seed) on the
same batches: our data module's loader feeds both, so the ratio is what Lightning, our module
(metrics, logging, hooks) and the trainer add around forward + backward + step, not a loader
comparison (scripts/bench_loader.py is that). Each side runs `--warmup` steps first, then
`--steps` timed steps; the plain loop does what a hand-written loop must: move the batch,
forward, cross-entropy, backward, step, zero_grad. `--device cuda` runs both on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import lightning.pytorch as L
import torch
from hydra import compose, initialize_config_module

from data.sources import from_synthetic
from data.write import write_dataset
from train.run import build


class StepClock(L.Callback):
    """Wall time from the start of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            _sync(trainer.strategy.root_device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        _sync(trainer.strategy.root_device)
        self.end = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config(index: str, out: str, args: argparse.Namespace):
    overrides = [
        f"paths.output_dir={out}",
        "data=shards",
        f"data.index={index}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"model.backbone={args.backbone}",
        "optim.scheduler=null",
        "logger=none",
    ]
    with initialize_config_module("train.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def ours(cfg, args: argparse.Namespace) -> float:
    L.seed_everything(0, verbose=False)
    datamodule, module = build(cfg)
    clock = StepClock(args.warmup)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=datamodule)
    return args.steps * args.batch / (clock.end - clock.start)


def plain(cfg, args: argparse.Namespace) -> float:
    L.seed_everything(0, verbose=False)
    datamodule, module = build(cfg)
    device = torch.device(args.device)
    net = module.net.to(device).train()
    optimizer = module.optimizer_factory(net.parameters())
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.model.label_smoothing)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    start, step = 0.0, 0
    while step < args.warmup + args.steps:
        for images, labels, _, _ in datamodule.train_dataloader():
            if step == args.warmup:
                _sync(device)
                start = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast:
                loss = loss_fn(net(images), labels)  # uint8 in: the network normalises on the device
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == args.warmup + args.steps:
                break
    _sync(device)
    return args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18", help="any timm name (default resnet18)")
    parser.add_argument("--image-size", type=int, default=64, help="input side, pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader processes (2 cores: 1 decodes)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--images", type=int, default=3000, help="synthetic data set size")
    parser.add_argument("--rounds", type=int, default=2, help="alternate plain/ours this many times")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        stored = max(96, args.image_size * 3 // 2)
        images = from_synthetic(args.images, seed=1, size=stored)
        index = write_dataset(images, f"{tmp}/shards", shard_samples=500).index.location
        cfg = config(index, f"{tmp}/out", args)
        # Alternating rounds, best of each: a slow first run (caches, page faults) or a
        # neighbour on the machine does not decide the ratio.
        runs = {"plain": [], "ours": []}
        for _ in range(args.rounds):
            runs["plain"].append(plain(cfg, args))
            runs["ours"].append(ours(cfg, args))
    figures = {name: max(values) for name, values in runs.items()}
    figures["ours_over_plain"] = figures["ours"] / figures["plain"]
    figures["runs"] = runs
    print(
        f"{args.backbone} at {args.image_size} px, batch {args.batch}, {args.device} "
        f"({os.cpu_count()} cores), {args.precision}, {args.workers} loader workers, "
        f"best of {args.rounds} x {args.steps} steps"
    )
    print(f"  plain PyTorch loop  {figures['plain']:8.1f} images/s  (each round: {runs['plain']})")
    print(f"  our Lightning module {figures['ours']:7.1f} images/s  (each round: {runs['ours']})")
    print(f"  ours_over_plain      {figures['ours_over_plain']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
