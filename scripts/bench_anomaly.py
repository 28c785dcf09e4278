"""What task=anomaly costs and reaches, per method, at 1x and 10x the training images:

    python scripts/bench_anomaly.py [--images 500] [--scale 10] [--image-size 64] [--json FILE]

For each method (draem: one epoch from scratch; patchcore: its one pass, over the backbone of a
classifier this script trains first, since nothing is downloaded) and each size (--images and
--scale times as many embedded-set samples, a fifth of them good), `python -m train` runs as a
child process, timed, with its peak RSS read from the kernel (ru_maxrss of the child). Then the
10x model is evaluated on its validation split (image and pixel AUROC) and exported to ONNX, and
`predict` is timed per image from the checkpoint and from the bundle on the same images.

Ratios are against the same method's 1x run, or the checkpoint, measured here on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

BASE = ("data=synthetic", "data.num_workers=1", "model.backbone=test_resnet", "trainer=cpu",
        "trainer.enable_progress_bar=false", "logger=none", "trainer.max_epochs=1")  # fmt: skip


def child(cmd: list[str], cwd: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a child process run to the end: the kernel's own account of
    that one process (wait4), not of every child so far."""
    start = time.perf_counter()
    with open(os.path.join(cwd, "child.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        with open(os.path.join(cwd, "child.log")) as f:
            sys.exit(f"{' '.join(cmd)} failed:\n{f.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024  # kilobytes on Linux


def train_cmd(root: str, name: str, n: int, args, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", *BASE, f"data.synthetic.num_samples={n}",
            f"data.synthetic.image_size={args.image_size}", f"data.image_size={args.image_size}",
            f"paths.log_dir={root}", f"paths.cache_dir={root}/cache", f"name={name}", *extra]  # fmt: skip


def last_ckpt(root: str, name: str) -> str:
    (path,) = [
        os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, name)) for f in fs if f == "last.ckpt"
    ]
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="embedded-set samples at 1x (a fifth good)")
    p.add_argument("--scale", type=int, default=10, help="the larger run's multiple of --images")
    p.add_argument("--image-size", type=int, default=64, help="stored and input side, pixels")
    p.add_argument("--budget-mb", type=float, default=2.0, help="patchcore's memory bank budget")
    p.add_argument("--classifier-epochs", type=int, default=8, help="training of patchcore's backbone")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench_anomaly_")
    figures: dict = {"images": args.images, "scale": args.scale, "image_size": args.image_size}

    # A classifier of our own: the frozen backbone patchcore reads features from.
    classifier = train_cmd(
        root, "cls", args.images * args.scale, args, f"trainer.max_epochs={args.classifier_epochs}"
    )
    child(classifier, root)
    state = torch.load(last_ckpt(root, "cls"), map_location="cpu", weights_only=True)["state_dict"]
    weights = os.path.join(root, "backbone.pth")
    torch.save(
        {k.removeprefix("net.backbone."): v for k, v in state.items() if k.startswith("net.backbone.")},
        weights,
    )

    methods = {
        "draem": ("task=anomaly", "task.decoder_channels=[32,16,16,8,8]"),
        "patchcore": (
            "task=anomaly",
            "task.method=patchcore",
            f"model.pretrained={weights}",
            f"task.budget_mb={args.budget_mb}",
        ),
    }
    for method, extra in methods.items():
        runs = {}
        for times in (1, args.scale):
            name = f"{method}_{times}x"
            seconds, rss = child(train_cmd(root, name, args.images * times, args, *extra), root)
            runs[f"{times}x"] = {"train_s": round(seconds, 1), "peak_rss_mb": round(rss)}
        small, large = runs["1x"], runs[f"{args.scale}x"]
        runs["time_ratio"] = round(large["train_s"] / small["train_s"], 2)
        runs["rss_ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 2)
        runs |= scored(root, last_ckpt(root, f"{method}_{args.scale}x"), method)
        figures[method] = runs
        print(method, json.dumps(runs), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def scored(root: str, ckpt: str, method: str) -> dict:
    """Validation AUROCs of `ckpt`, and predict's seconds per image: checkpoint vs ONNX bundle."""
    from train import load_model
    from train.cli import compose
    from train.evaluate import evaluate
    from train.export import export

    evaluate(compose("evaluate", f"ckpt={ckpt}", f"out={root}/{method}_eval", "trainer=cpu",
                     "trainer.enable_progress_bar=false", "data.num_workers=1"))  # fmt: skip
    with open(f"{root}/{method}_eval/metrics.json") as f:
        report = json.load(f)
    export(
        compose("export", f"ckpt={root}/{method}_eval/model.ckpt", "format=onnx", f"out={root}/{method}_onnx")
    )
    with open(f"{root}/{method}_onnx/parity.json") as f:
        parity = json.load(f)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=gen)
              for i in range(64)]  # fmt: skip
    per_image = {}
    torch.set_num_threads(1)  # one image at a time on one core: an edge box's view
    for kind, path in (("checkpoint", f"{root}/{method}_eval/model.ckpt"), ("onnx", f"{root}/{method}_onnx")):
        model = load_model(path)
        model.predict(images[:4], batch_size=1)  # warm-up
        start = time.perf_counter()
        model.predict(images, batch_size=1)
        per_image[kind] = (time.perf_counter() - start) / len(images)
    return {
        "image_auroc": report.get("image_auroc"),
        "pixel_auroc": report.get("pixel_auroc"),
        "aupro": report.get("aupro"),
        "onnx_parity_max_abs_diff": parity["batches"]["1"]["max_abs_diff"],
        "predict_ms_checkpoint": round(1000 * per_image["checkpoint"], 2),
        "predict_ms_onnx": round(1000 * per_image["onnx"], 2),
        "onnx_speedup": round(per_image["checkpoint"] / per_image["onnx"], 2),
    }


if __name__ == "__main__":
    main()
