"""The embedded inspection set, written once per parameter set into the cache and reused.

Every rank of a run may ask for it at once (torchrun, SLURM and Ray start them together): a lock
file lets the first write it while the others wait, then find the index.
"""

from __future__ import annotations

import fcntl
import logging
import os

from data.index import INDEX_NAME
from data.write import write_dataset

log = logging.getLogger(__name__)


def synthetic_index(
    num_samples: int, seed: int, image_size: int, cache_dir: str, multi: float = 0.0, large=None
) -> str:
    """Where the embedded set with these parameters lives under `cache_dir` (v2: with masks)."""
    name = f"inspection-v2-n{num_samples}-s{seed}-{image_size}px" + (f"-multi{multi:g}" if multi else "")
    if large:  # whole large parts (data/synthetic_large.py); image_size does not apply
        name = f"inspection-large-v1-n{num_samples}-s{seed}-{large[0]}x{large[1]}"
    return os.path.join(os.path.expanduser(cache_dir), name, INDEX_NAME)


def ensure_synthetic(
    index: str, num_samples: int, seed: int, image_size: int, multi: float = 0.0, large=None
) -> str:
    """Write the embedded inspection set to `index`'s directory unless it is already there.

    Safe to call from every rank at once: a lock file lets one process write while the others
    wait, then find the index."""
    out_dir = os.path.dirname(os.path.abspath(index))
    if os.path.exists(index):
        return index
    from data.sources import from_synthetic

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        # Ranks started together (torchrun, SLURM, Ray) queue here; the first one writes.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(index):
            return index
        log.info("writing the embedded inspection set (%d images) to %s", num_samples, out_dir)
        report = write_dataset(
            from_synthetic(num_samples, seed, image_size, multi, large),
            out_dir,
            val_fraction=0.2,
            seed=seed,
            shard_samples=50 if large else 500,  # large parts: ~1-2 MB each
            extra={
                "synthetic": {
                    "num_samples": num_samples,
                    "seed": seed,
                    "image_size": image_size,
                    "multi": multi,
                    **({"large": list(large)} if large else {}),
                }
            },
        )
    log.info("wrote %d images in %.1f s", report.written, report.seconds)
    return index
