"""How long the epoch plan takes at scale: one worker's sample list, fresh and after an elastic resume.

    python scripts/bench_plan.py [--shards 10000] [--samples-per-shard 1000] [--world 64] [--workers 8]

Every loader worker computes its own list at the start of each epoch, so this is start-up
latency per worker, paid in parallel across the cluster. The elastic figure is paid once, on the
first epoch after resuming on another layout: the interrupted part (here half the epoch, on the
same world × workers) is worked out again so that it can be left out.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from data.plan import EpochPlan, Part


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--samples-per-shard", type=int, default=1_000)
    parser.add_argument("--world", type=int, default=64, help="ranks")
    parser.add_argument("--workers", type=int, default=8, help="loader workers per rank")
    parser.add_argument("--batch", type=int, default=256, help="per rank")
    parser.add_argument("--buffer", type=int, default=1_000, help="shuffle buffer, samples")
    args = parser.parse_args()

    # Unequal shards, as real writers leave them: 50% to 150% of the nominal size.
    sizes = tuple(
        np.random.default_rng(0)
        .integers(args.samples_per_shard // 2, args.samples_per_shard * 3 // 2, args.shards)
        .tolist()
    )
    plan = EpochPlan(
        sizes,
        args.batch,
        seed=0,
        epoch=3,
        world_size=args.world,
        rank=args.world - 1,
        num_workers=args.workers,
        buffer_size=args.buffer,
    )
    fresh = timed(lambda: plan.worker_samples(args.workers - 1))
    half = len(plan) // 2
    part = Part(args.world, args.workers, args.batch, args.buffer, half)
    resumed = plan.resumed(part)
    elastic = timed(lambda: resumed.worker_samples(args.workers - 1))
    print(
        f"{args.shards} shards, {sum(sizes):,} samples, {args.world} ranks x {args.workers} workers, "
        f"batch {args.batch}"
    )
    print(f"  one worker's plan:                    {fresh * 1000:8.0f} ms ({len(plan)} batches per rank)")
    print(
        f"  after an elastic resume at half-epoch: {elastic * 1000:8.0f} ms ({len(resumed)} batches per rank)"
    )


if __name__ == "__main__":
    main()
