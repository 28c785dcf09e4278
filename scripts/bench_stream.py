"""What the data layer's extras cost the loader: the per-sample audit, object storage, and
starting loader workers afresh every epoch instead of keeping them.

    python scripts/bench_stream.py [--images 4000] [--workers 2] [--json FILE]

Writes a synthetic data set (JPEGs, 160 px) to a temporary directory and streams its training
split through the real `ShardDataModule` (batch 64, 128 px crops, uint8) four ways, each
measured over whole epochs in this one run on the same data:

    local            shards on local disk
    local + audit    the same, with every batch's keys appended to an audit file as the
                     trainer does (data.audit=true)
    s3               the same shards uploaded to an S3-compatible server (moto) that this
                     script starts on 127.0.0.1, read through s3fs
    s3 + audit
    local, restart   local, with data.persistent_workers=false: workers start afresh, and
                     the pipeline refills, at every epoch

and prints images/s with the ratios audit / no audit and s3 / local. moto is a Python server
on the same cores, so the s3 figure is a floor for a real object store, not a forecast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from data.audit import Audit
from data.datamodule import ShardDataModule
from data.sources import from_synthetic
from data.write import write_dataset


def measure(index: str, audit_dir: str | None, persistent: bool, workers: int, epochs: int) -> float:
    """Images per second over `epochs` whole training epochs (the first pass warms caches)."""
    dm = ShardDataModule(
        index,
        batch_size=64,
        num_workers=workers,
        image_size=128,
        shuffle_buffer=256,
        persistent_workers=persistent,
    )
    loader = dm.train_dataloader()
    audit = Audit(audit_dir, 0) if audit_dir else None
    for _ in loader:  # warm-up: page cache, imports in workers
        pass
    images, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in loader:
            if audit:
                audit.record(epoch, batch[2])  # what the data module does before each step
            images += len(batch[2])
    if audit:
        audit.close()
    return images / (time.perf_counter() - start)


def start_moto() -> subprocess.Popen:
    """moto's S3 server on a free 127.0.0.1 port, with s3fs pointed at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    server = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=4000, help="training + validation images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader processes")
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per contender")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_stream_")
    server = None
    try:
        server = start_moto()
        import s3fs

        s3fs.S3FileSystem().mkdir("bench")
        for out in (f"{tmp}/shards", "s3://bench/ds"):  # the same bytes in both places
            images = from_synthetic(args.images, seed=1, size=160)
            write_dataset(images, out, shard_samples=500, workers=args.workers)
        local = f"{tmp}/shards/dataset.json"
        runs = {
            "local": (local, None, True),
            "local_audit": (local, f"{tmp}/audit-local", True),
            "s3": ("s3://bench/ds/dataset.json", None, True),
            "s3_audit": ("s3://bench/ds/dataset.json", f"{tmp}/audit-s3", True),
            "local_restart": (local, None, False),
        }
        figures = {name: measure(*run, args.workers, args.epochs) for name, run in runs.items()}
    finally:
        if server:
            server.terminate()
        shutil.rmtree(tmp, ignore_errors=True)

    figures["audit_over_none_local"] = figures["local_audit"] / figures["local"]
    figures["audit_over_none_s3"] = figures["s3_audit"] / figures["s3"]
    figures["s3_over_local"] = figures["s3"] / figures["local"]
    figures["persistent_over_restart"] = figures["local"] / figures["local_restart"]
    print(f"{os.cpu_count()} cores, {args.workers} loader workers, {args.images} images, 160 -> 128 px")
    for name in runs:
        print(f"  {name:12s} {figures[name]:8.0f} images/s")
    for name in ("audit_over_none_local", "audit_over_none_s3", "s3_over_local", "persistent_over_restart"):
        print(f"  {name:22s} {figures[name]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
