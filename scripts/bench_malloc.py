"""CPU training steps with glibc's malloc as it comes against data/memory.py's thresholds.

    python scripts/bench_malloc.py [--steps 8] [--repeat 3] [--size 128] [--batch 32]

Each contender runs in its own fresh process (malloc's settings are per process), the two
alternating, `--repeat` times: `quickstart_segment`'s model (a Unet over test_resnet, decoder
[64, 32, 16, 16, 16], 3 classes) takes AdamW steps on random (batch, 3, size, size) input after
one warm-up step. Printed per contender: the median steps/s, minor page faults and kernel CPU
seconds per step, and the peak RSS; then the ratio of steps/s, kept / default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEPS = """
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from data import memory
from train.tasks.segment import Segment, SegmentLoss
keep, steps, size, batch = sys.argv[1] == "kept", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if keep:
    assert memory.keep_freed_memory()
torch.manual_seed(0)
net = Segment(decoder_channels=[64, 32, 16, 16, 16]).build("test_resnet", 3)
opt, loss_fn = torch.optim.AdamW(net.parameters(), 1e-3), SegmentLoss(1.0)
x, y = torch.randn(batch, 3, size, size), torch.randint(0, 3, (batch, size, size))
def step():
    loss = loss_fn(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "steps_per_s": steps / wall,
    "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
    "kernel_s_per_step": (r1.ru_stime - r0.ru_stime) / steps,
    "peak_rss_mb": r1.ru_maxrss / 1024,
}))
"""


def run(kind: str, args) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _STEPS, kind, str(args.steps), str(args.size), str(args.batch)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size", type=int, default=128, help="input side, px")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {"default": [], "kept": []}
    for _ in range(args.repeat):
        for kind in runs:
            runs[kind].append(run(kind, args))
    result = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}
    for kind, r in result.items():
        print(
            f"{kind:8s} {r['steps_per_s']:.3f} steps/s, {r['faults_per_step']:,.0f} page faults and "
            f"{r['kernel_s_per_step']:.3f} s in the kernel a step, peak RSS {r['peak_rss_mb']:,.0f} MB"
        )
    result["kept_over_default"] = result["kept"]["steps_per_s"] / result["default"]["steps_per_s"]
    print(f"steps/s, kept / default: {result['kept_over_default']:.2f}x")
    return result


if __name__ == "__main__":
    main()
