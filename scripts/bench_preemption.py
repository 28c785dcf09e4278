"""What preemption and the settings check cost, on the quickstart.

    python scripts/bench_preemption.py [--batch 256] [--json FILE]

1. `python -m train +experiment=quickstart data.audit=true` is sent SIGTERM from outside once its
   audit lists `--batch` batches, twice: with our handling (write last.ckpt at the next step,
   exit 143) and, as the baseline in the same run on the same data, with
   `checkpoint.on_signal=[]` (Lightning's own handling: stop at the step, no checkpoint, exit 0).
   Wall seconds from the signal to the process's exit, and the exit status, for both.
2. The settings check (train/settings.py) of the composed quickstart config, median of
   `--repeat` calls, in milliseconds, against composing the same config in this process.

The embedded set is written to the cache the first time (about 20 s, not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def signalled(root: Path, batch: int, batch_size: int, *overrides: str) -> dict:
    """Start the quickstart, SIGTERM it once its audit holds `batch` batches, time the exit."""
    args = [sys.executable, "-m", "train", "+experiment=quickstart", "data.audit=true", "logger=none"]
    args += ["trainer.enable_progress_bar=false", f"paths.log_dir={root}", *overrides]
    proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    want = batch * batch_size
    while proc.poll() is None:
        if sum(len(p.read_text().splitlines()) for p in root.glob("quickstart/*/audit/epoch*.txt")) >= want:
            break
        time.sleep(0.02)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    seconds = time.perf_counter() - sent
    checkpoints = list(root.glob("quickstart/*/checkpoints/last.ckpt"))
    step = None
    if checkpoints:
        import torch

        step = torch.load(checkpoints[0], map_location="cpu", weights_only=True)["global_step"]
    line = next((x for x in out.splitlines() if "stopped by" in x), "")
    return {
        "exit_status": proc.returncode,
        "seconds": seconds,
        "last_ckpt_step": step,
        "message": line[-200:],
    }


def check_time(repeat: int) -> dict:
    from train import settings
    from train.cli import compose

    def median_ms(fn) -> float:
        fn()  # imports and caches outside the timing
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    overrides = ("+experiment=quickstart", "paths.output_dir=/tmp/unused")
    cfg = compose("train", *overrides)
    return {
        "check_ms": median_ms(lambda: settings.check(cfg, "train")),
        "compose_ms": median_ms(lambda: compose("train", *overrides)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256, help="signal once this many batches trained")
    parser.add_argument("--batch-size", type=int, default=64, help="the quickstart's data.batch_size")
    parser.add_argument("--repeat", type=int, default=50, help="settings checks to time")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more overrides for both runs (tests shrink it)"
    )
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("ours", ()), ("lightning", ("checkpoint.on_signal=[]",))):
            root = Path(tmp) / name
            root.mkdir()
            extra = (f"data.batch_size={args.batch_size}", *args.extra, *overrides)
            results[name] = signalled(root, args.batch, args.batch_size, *extra)
            r = results[name]
            print(
                f"{name:>9}: SIGTERM at batch {args.batch} -> exit {r['exit_status']} after "
                f"{r['seconds']:.2f} s, last.ckpt at step {r['last_ckpt_step']}"
            )
    results |= check_time(args.repeat)
    ms = results["check_ms"], results["compose_ms"]
    print(f"settings check of the quickstart config: {ms[0]:.1f} ms (composing it: {ms[1]:.1f} ms)")
    results["ours_over_lightning_exit"] = results["ours"]["seconds"] / results["lightning"]["seconds"]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
