"""The loader's fixed cost per sample, stage by stage: everything it does besides the decode.

    python scripts/bench_stages.py [--variant small|large] [--repeat 5] [--json FILE]

The decode and transform (L0's work, printed for scale) is swapped for one that hands back a
ready uint8 (3, 224, 224) tensor, so what is left is the loader's own cost, measured without the
decode's noise. Each line runs the pipeline of data/stream.py up to one more stage over one loader
worker's planned samples, in this process as a worker runs it; a stage's cost is its line minus
the line before:

    tar             the shards' samples, parsed (data/tar.py): raw bytes per sample
    plan            + read in plan order (read_planned: the shuffle buffer's stash, passes)
    decode wrapper  + decode_samples (the transform swapped out) and the target
    batch           + batched into shared memory as a loader worker does: fresh memory per batch
                    (batch_slots=0, before data/batch_pool.py) and a reused slot
    loader          the real loader, 2 workers and the main process, over 3 epochs after a first
                    untimed one (persistent workers: their steady state): CPU of the whole process
                    tree per sample, fresh memory and reused slots; minus the batch line, the
                    hand-over to the main process and the main process's own work

CPU microseconds per sample, the least of `--repeat` runs (one thread; page cache warm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from bench_data import VARIANTS, build

SIZE = 224
LOADER = """
import sys, time, torch
sys.path.insert(0, {scripts!r})
from meter import TreeMeter
torch.set_num_threads(1)
from data.datamodule import ShardDataModule
dm = ShardDataModule(index={index!r}, batch_size={batch}, num_workers={workers}, image_size={size},
                     batch_slots={slots})
loader = dm.train_dataloader()
ready = torch.zeros(3, {size}, {size}, dtype=torch.uint8)
loader.dataset.transform = lambda data: ready  # the decode's own allocation is L0's too: not counted
for _ in loader:  # untimed: workers start, slots are made
    pass
meter, n = TreeMeter().start(), 0
cpu = meter.cpu_seconds()
for _ in range(3):
    for batch in loader:
        n += len(batch[0])
    del batch
print(n, meter.cpu_seconds() - cpu)
meter.stop()
"""


def _as_worker() -> None:
    """Make batching think it runs in a loader worker: it then builds batches in shared memory."""
    import torch.utils.data._utils.worker as worker

    worker._worker_info = worker.WorkerInfo(id=0, num_workers=1, seed=0, dataset=None)


def stages(index: str, batch: int, repeat: int) -> tuple[dict[str, float], int]:
    from data.batch_pool import SlotPool
    from data.batching import batched
    from data.datamodule import ShardDataModule
    from data.samples import image_bytes, read_shard
    from data.stream import BadSamples, decode_samples, read_planned

    dm = ShardDataModule(index=index, batch_size=batch, num_workers=1, image_size=SIZE)
    stream = dm.train_dataloader().dataset
    samples = stream.plan.worker_samples(0)
    urls, sizes = stream.shards.urls, stream.shards.sizes
    ready = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    pool = SlotPool("bench-stages")

    def read():
        return read_planned(samples, urls, BadSamples(), sizes=sizes)

    def wrapped():
        return decode_samples(read(), lambda data: ready, stream.targets, BadSamples())

    def slotted() -> None:
        for images, *_ in batched(wrapped(), batch, BadSamples(), pool):
            pool.unreserve(images.slot)  # as if the main process let go at once

    jpegs = [image_bytes(s) for url in urls for s in read_shard(url)][: min(len(samples), 1000)]
    _as_worker()
    runs: dict[str, Callable[[], object]] = {
        "L0 (decode + transform)": lambda: [stream.transform(j) for j in jpegs],
        "tar": lambda: [s for url in urls for s in read_shard(url)],
        "plan": lambda: list(read()),
        "decode wrapper": lambda: list(wrapped()),
        "batch, fresh memory": lambda: list(batched(wrapped(), batch, BadSamples())),
        "batch, reused slot": slotted,
    }
    best: dict[str, float] = {}
    for _ in range(repeat):  # interleaved, so a slow spell of the machine hits every line alike
        for name, run in runs.items():
            count = len(jpegs) if name.startswith("L0") else len(samples)
            t = time.process_time()
            out = run()
            del out
            best[name] = min(best.get(name, float("inf")), (time.process_time() - t) / count * 1e6)
    return best, len(samples)


def loader_cpu(index: str, batch: int, workers: int, slots: int) -> float:
    """CPU us per sample of the real loader's process tree, decode swapped out (LOADER)."""
    code = LOADER.format(
        scripts=os.path.dirname(os.path.abspath(__file__)), index=index, batch=batch, workers=workers,
        size=SIZE, slots=slots,
    )  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the loader run failed:\n{out.stderr[-3000:]}")
    n, cpu = out.stdout.split()[-2:]
    return float(cpu) / int(n) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="small")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="loader workers of the loader lines")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--root", default="~/.cache/shardtrain/bench")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    torch.set_num_threads(1)
    bench = build(a.variant, a.images, root=a.root)
    s = bench.stats
    print(f"set: {s['images']} {a.variant} JPEGs, {s['kb_mean']} KB mean: {bench.directory}")
    best, n = stages(bench.index, a.batch_size, a.repeat)
    for slots, name in ((0, "loader, fresh memory"), (8, "loader, reused slots")):
        best[name] = min(loader_cpu(bench.index, a.batch_size, a.workers, slots) for _ in range(a.repeat))
    print(f"\nCPU us per sample, least of {a.repeat} ({n} samples; batch {a.batch_size}):")
    line = "  {:26}{:8.1f}   {}"
    print(line.format("L0 (decode + transform)", best["L0 (decode + transform)"], "for scale"))
    steps = [("tar", None), ("plan", "tar"), ("decode wrapper", "plan")]
    steps += [("batch, fresh memory", "decode wrapper"), ("batch, reused slot", "decode wrapper")]
    steps += [("loader, fresh memory", "batch, fresh memory"), ("loader, reused slots", "batch, reused slot")]
    stage: dict[str, float] = {}
    for name, before in steps:
        stage[name] = best[name] - (best[before] if before else 0.0)
        what = "hand-over and main process" if name.startswith("loader") else "this stage"
        print(line.format(name, best[name], f"+{stage[name]:.1f} {what}"))
    l0 = best["L0 (decode + transform)"]
    for name in ("loader, fresh memory", "loader, reused slots"):
        share = l0 / (l0 + best[name])
        print(f"{name}: the loader's fixed cost {best[name]:.0f} us, L0/(L0 + it) = {share:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"set": s, "us_per_sample": best, "stage_us": stage}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
