"""The framework's tax: training images/s through our Lightning module vs a plain PyTorch loop.

    python scripts/bench_train.py [--backbone resnet18] [--image-size 64] [--steps 40] [--json FILE]

Three contenders train the same network (built by `train.run.build` from the real config, same
seed, same batch):

    plain      a hand-written loop: move the batch, forward, cross-entropy, backward, step,
               zero_grad; fed by our data module's loader
    ours       our Lightning module and trainer, fed by the same loader
    resident   ours again, fed one real batch already on the device, over and over: the
               ceiling when data costs nothing

ours / plain is what Lightning, our module (metrics, logging, hooks) and the trainer add around
the step, not a loader comparison (scripts/bench_loader.py is that); ours / resident is how much
of the device's speed the data path keeps. `--recipes` adds, in the same rounds, ours with
`ema.decay=0.999` (Lightning's EMAWeightAveraging, every step) and ours with mixup and cutmix
(`mixup.alpha=0.2 mixup.cutmix_alpha=1.0`, on the device): `ema_over_ours`, `mixup_over_ours`.
Each runs `--warmup` steps, then `--steps` timed steps. `--index` trains on a given data set
(else a synthetic one is written to a temporary directory); `--device cuda --precision
bf16-mixed --channels-last` is the GPU configuration.
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


def config(index: str, out: str, args: argparse.Namespace, *extra: str):
    overrides = [
        *extra,
        f"paths.output_dir={out}",
        "data=shards",
        f"data.index={index}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"model.backbone={args.backbone}",
        f"model.channels_last={str(args.channels_last).lower()}",
        f"data.pin_memory={str(args.pin_memory).lower()}",
        "optim.scheduler=null",
        "logger=none",
    ]
    with initialize_config_module("train.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


class Resident:
    """One batch, already on the device, `steps` times: a loader that costs nothing."""

    def __init__(self, batch: tuple, device: str, steps: int):
        self.batch = (batch[0].to(device), batch[1].to(device), batch[2], {})
        self.steps = steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def ours(cfg, args: argparse.Namespace, resident: bool = False, ema: bool = False) -> float:
    L.seed_everything(0, verbose=False)
    datamodule, module = build(cfg)
    if resident:
        batch = next(iter(datamodule.train_dataloader()))
        datamodule = None
        loader = Resident(batch, args.device, args.warmup + args.steps)
    clock = StepClock(args.warmup)
    averaging = []
    if ema:  # first, as train.run puts it
        from lightning.pytorch.callbacks import EMAWeightAveraging

        averaging = [EMAWeightAveraging(decay=0.999)]
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
        callbacks=[*averaging, clock],
    )
    if resident:
        trainer.fit(module, train_dataloaders=loader)
    else:
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
            if args.channels_last:  # as the module does: NHWC input for the NHWC weights
                images = images.contiguous(memory_format=torch.channels_last)
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
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs")
    parser.add_argument("--pin-memory", action="store_true", help="page-locked batches (GPU)")
    parser.add_argument("--index", help="a dataset.json to train on (default: write a synthetic one)")
    parser.add_argument("--images", type=int, default=3000, help="synthetic data set size")
    parser.add_argument("--rounds", type=int, default=2, help="alternate plain/ours this many times")
    parser.add_argument("--recipes", action="store_true", help="also ours with EMA, and with mixup + cutmix")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        index = args.index
        if not index:
            stored = max(96, args.image_size * 3 // 2)
            images = from_synthetic(args.images, seed=1, size=stored)
            index = write_dataset(images, f"{tmp}/shards", shard_samples=500).index.location
        cfg = config(index, f"{tmp}/out", args)
        mixed = config(index, f"{tmp}/out", args, "mixup.alpha=0.2", "mixup.cutmix_alpha=1.0")
        # Alternating rounds, best of each: a slow first run (caches, page faults) or a
        # neighbour on the machine does not decide the ratio.
        runs = {"plain": [], "ours": [], "resident": []} | ({"ema": [], "mixup": []} if args.recipes else {})
        for _ in range(args.rounds):
            runs["plain"].append(plain(cfg, args))
            runs["ours"].append(ours(cfg, args))
            runs["resident"].append(ours(cfg, args, resident=True))
            if args.recipes:
                runs["ema"].append(ours(cfg, args, ema=True))
                runs["mixup"].append(ours(mixed, args))
    figures = {name: max(values) for name, values in runs.items()}
    figures["ours_over_plain"] = figures["ours"] / figures["plain"]
    figures["ours_over_resident"] = figures["ours"] / figures["resident"]
    for recipe in ("ema", "mixup"):
        if recipe in figures:
            figures[f"{recipe}_over_ours"] = figures[recipe] / figures["ours"]
    figures["runs"] = runs
    print(
        f"{args.backbone} at {args.image_size} px, batch {args.batch}, {args.device} "
        f"({os.cpu_count()} cores), {args.precision}, {args.workers} loader workers, "
        f"pin_memory={args.pin_memory}, "
        f"best of {args.rounds} x {args.steps} steps"
    )
    for name in runs:
        rounds = ", ".join(f"{v:.1f}" for v in runs[name])
        print(f"  {name:9s} {figures[name]:9.1f} images/s  (rounds: {rounds})")
    print(f"  ours_over_plain     {figures['ours_over_plain']:.3f}")
    print(f"  ours_over_resident  {figures['ours_over_resident']:.3f}")
    for recipe in ("ema", "mixup"):
        if f"{recipe}_over_ours" in figures:
            print(f"  {recipe}_over_ours{' ' * (9 - len(recipe))}{figures[f'{recipe}_over_ours']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
