"""Ray's cost on a tiny run: launch overhead against the local launcher, and recovery from a
killed worker.

    python scripts/bench_ray.py [--address 127.0.0.1:6379] [--json FILE]

Runs the same 2-epoch training of 240 synthetic images (test_resnet, 32 px, CPU) through
`python -m train` four ways, wall clock per command:

    local            launcher=local, one process
    ray_1            launcher=ray, 1 worker
    ray_2            launcher=ray, 2 workers
    ray_2_killed     ray_2 with rank 1 SIGKILLed at step 7 (after step 6's checkpoint),
                     launcher.max_failures=1: Ray restarts the group, which resumes

ray_1 - local is the launch overhead; ray_2_killed - ray_2 is what a lost worker costs: noticing
the death, restarting the group, restoring the checkpoint, and redoing the one step after it.
With `--address` the runs join that cluster (set RAY_AUTH_MODE=token for Ray 2.60 heads);
without, each run starts and stops a local Ray, which adds its start-up to every Ray figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from data.sources import from_synthetic
from data.write import write_dataset


def timed(cwd: str, index: str, *overrides: str, env: dict | None = None) -> float:
    args = [
        sys.executable, "-m", "train", "data=shards", f"data.index={index}", "data.image_size=32",
        "data.batch_size=16", "data.num_workers=1", "model.backbone=test_resnet", "trainer=cpu",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none",
        "checkpoint.every_n_steps=2", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(overrides)} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", help="a running Ray cluster's GCS address (default: local Ray per run)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    ray = ["launcher=ray"] + ([f"launcher.address={args.address}"] if args.address else [])
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        images = from_synthetic(240, seed=3, size=48)
        index = write_dataset(images, f"{tmp}/shards", val_fraction=0.25, shard_samples=50).index.location
        figures = {
            "local": timed(tmp, index, "name=local"),
            "ray_1": timed(tmp, index, "name=ray1", *ray, "launcher.num_workers=1"),
            "ray_2": timed(tmp, index, "name=ray2", *ray, "launcher.num_workers=2"),
            "ray_2_killed": timed(
                tmp,
                index,
                *("name=ray2k", *ray, "launcher.num_workers=2", "launcher.max_failures=1"),
                env={"SHARDTRAIN_KILL_AT_STEP": "7", "SHARDTRAIN_KILL_RANK": "1"},
            ),
        }
    figures["launch_overhead_s"] = figures["ray_1"] - figures["local"]
    figures["recovery_s"] = figures["ray_2_killed"] - figures["ray_2"]
    print(f"{os.cpu_count()} cores, Ray cluster: {args.address or 'a local one per run'}")
    for name, seconds in figures.items():
        print(f"  {name:18s} {seconds:6.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
