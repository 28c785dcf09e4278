"""The shard writer's speed: local against `--ray` on the same cores, folder against SQL sources,
and an append of 10% more images against rewriting the whole set.

    python scripts/bench_write.py [--images 10000] [--runs 2] [--ray ADDRESS] [--quick]

Images are bench_data.py's large JPEGs (~110 KB, ImageNet-like), built once and reused. Every
figure is a median over `--runs` interleaved runs in this process, on the same files:

    local        write_dataset on a folder, a process per core (the default writer)
    ray          the same write as Ray tasks, one per shard (Ray started, or reached, beforehand:
                 its start-up is reported apart, since a cluster is started once, not per write)
    sql          local, the files listed by a query on a SQLite table instead of a folder walk
    append       10% more images appended to the set; against `rewrite`, the whole 110% written anew

Prints one JSON line with images/s, seconds and the ratios (`ray_over_local`, `append_over_rewrite`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_data

from data.sources import from_folder
from data.sql import from_sql
from data.write import write_dataset

SHARD_SAMPLES = 250  # ~27 MB shards: enough groups (40 per 10,000 images) to keep every core busy


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _sqlite(folder: str, db: str) -> str:
    """A table listing the folder's images (path, label, and a camera column), as an inspection
    database would: the query reads what from_folder finds."""
    rows = [
        (os.path.join(folder, i.source), i.label, f"cam{n % 4}") for n, i in enumerate(from_folder(folder))
    ]
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE shots (path TEXT, label TEXT, camera TEXT)")
        con.executemany("INSERT INTO shots VALUES (?, ?, ?)", rows)
    return "SELECT path, label, camera FROM shots ORDER BY rowid"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--ray", default="local", help="a cluster address, or local: start one on this machine")
    p.add_argument("--root", default=bench_data.DEFAULT_ROOT, help="where the image sets are built")
    p.add_argument("--quick", action="store_true", help="400 images, one run: checks the script runs")
    a = p.parse_args()
    if a.quick:
        a.images, a.runs = 400, 1
    cores = os.cpu_count() or 1
    bench = bench_data.build("large", a.images, seed=0, root=a.root)
    work = tempfile.mkdtemp(prefix="bench-write-")
    try:
        query = _sqlite(bench.folder, os.path.join(work, "shots.db"))
        extra = bench_data.build("large", a.images // 10, seed=1, root=a.root)  # a tenth more, other images

        import ray

        start = time.perf_counter()
        ray.init(
            address=a.ray,  # "local": a new instance of its own, even beside a running cluster
            num_cpus=cores if a.ray == "local" else None,
            logging_level="WARNING",
            log_to_driver=False,
        )
        ray_start = time.perf_counter() - start

        def write(items, name: str, **kw) -> None:
            out = os.path.join(work, name)
            write_dataset(items, out, val_fraction=0.1, shard_samples=SHARD_SAMPLES, overwrite=True, **kw)

        both = from_folder(bench.folder) + from_folder(extra.folder)
        times: dict[str, list[float]] = {k: [] for k in ("local", "ray", "sql", "append", "rewrite")}
        for _ in range(a.runs):  # interleaved: drift in the machine hits every writer alike
            times["local"].append(_timed(lambda: write(from_folder(bench.folder), "local")))
            times["ray"].append(_timed(lambda: write(from_folder(bench.folder), "ray", ray="auto")))
            times["sql"].append(
                _timed(lambda: write(from_sql(query, f"sqlite:///{work}/shots.db")[0], "sql"))
            )
            shutil.copytree(os.path.join(work, "local"), os.path.join(work, "grown"), dirs_exist_ok=True)
            times["append"].append(
                _timed(
                    lambda: write_dataset(
                        from_folder(extra.folder),
                        os.path.join(work, "grown"),
                        shard_samples=SHARD_SAMPLES,
                        append=True,
                    )
                )
            )
            shutil.rmtree(os.path.join(work, "grown"))
            times["rewrite"].append(_timed(lambda: write(both, "rewrite")))
        med = {k: statistics.median(v) for k, v in times.items()}
        n = a.images
        print(
            json.dumps(
                {
                    "images": n,
                    "appended": a.images // 10,
                    "cores": cores,
                    "runs": a.runs,
                    "kb_mean": bench.stats["kb_mean"],
                    "local_images_per_s": round(n / med["local"], 1),
                    "ray_images_per_s": round(n / med["ray"], 1),
                    "sql_images_per_s": round(n / med["sql"], 1),
                    "ray_over_local": round(med["local"] / med["ray"], 3),
                    "sql_over_folder": round(med["local"] / med["sql"], 3),
                    "append_s": round(med["append"], 2),
                    "rewrite_s": round(med["rewrite"], 2),
                    "append_over_rewrite": round(med["append"] / med["rewrite"], 3),
                    "ray_start_s": round(ray_start, 1),
                    "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
