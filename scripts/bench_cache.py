"""The shard cache against object storage with a round trip per request, and the block shuffle.

    python scripts/bench_cache.py [--images 6000] [--shard-samples 100] [--workers 2]
                                  [--delay-ms 20 50] [--rounds 2] [--json FILE]

Starts an S3-compatible server (moto) and, in front of it, scripts/s3_proxy.py as a process of its
own, which waits 20-50 ms before forwarding each request (what a store in another zone adds) and
counts the bytes it serves. Every figure below is measured in this one run on the same shards:

1. Loader images/s over one training epoch through the real ShardDataModule (batch 64, 128 px
   crops of 160 px JPEGs, uint8), from its first batch to its last (starting workers and storage
   clients is a one-off per run), rounds interleaved, best of each:
       local         the shards on local disk (page cache warm): the baseline
       s3            streamed from the proxy, no cache
       s3 epoch 1    data.cache_dir with a budget for the whole set, starting empty: prefetched
       s3 epoch 2    the next epoch, from the cache
2. Bytes fetched per epoch (epochs 2 and 3 of 3, as a share of the data set) with a cache of 25%,
   50% and 100% of the data set, plan-ordered eviction against LRU. No delay: it counts bytes.
3. The block shuffle on shards of 1,000 images that each hold one class (as a tool writing class
   by class makes them), with a buffer of 100 (the ratio of 10,000-image shards to the default
   1,000 buffer): classes per batch of 64 and the distance of a batch's class histogram from the
   set's (total variation, 0 = a perfect mix), shards shuffled whole against blocks of 3 shards;
   and what blocks cost: bytes fetched per epoch with a cache of 3 shards (half the set), and the
   most samples a worker holds at once (read ahead of their turn), from its plan.
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
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
from bench_stream import start_moto

from data.datamodule import ShardDataModule
from data.index import load_index
from data.scan import build_index
from data.sources import from_synthetic
from data.write import write_dataset

SCRIPTS = os.path.dirname(os.path.abspath(__file__))


def loader(index: str, workers: int, cache: str | None = None, limit: int = 0, **kw) -> ShardDataModule:
    dm = ShardDataModule(
        index,
        batch_size=64,
        num_workers=workers,
        image_size=128,
        shuffle_buffer=kw.pop("buffer", 256),
        cache_dir=cache,
        cache_limit=limit or None,
        **kw,
    )
    # No trainer: a stand-in tells the plan which epoch it is, so every epoch is drawn afresh.
    dm.trainer = SimpleNamespace(current_epoch=0, world_size=1, global_rank=0)
    dm._loader_ = dm.train_dataloader()
    return dm


def close(dm: ShardDataModule) -> None:
    """Stop the loader's persistent workers (and their prefetching) before their cache goes,
    and drop them, so workers forked later do not inherit them."""
    if dm._loader_._iterator is not None:
        dm._loader_._iterator._shutdown_workers()
        dm._loader_._iterator = None


def epoch(dm: ShardDataModule, number: int) -> tuple[int, float, list[list[str]]]:
    """(images after the first batch, seconds since it, keys per batch) of one whole training
    epoch: the steady rate, without starting workers and clients (a one-off per run)."""
    dm.trainer.current_epoch = number
    images, keys, start = 0, [], None
    for batch in dm._loader_:
        if start is None:
            start = time.perf_counter()
        else:
            images += len(batch[2])
        keys.append(batch[2])
    return images, time.perf_counter() - start, keys


def start_proxy(upstream: str, delay_ms: tuple[float, float]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, f"{SCRIPTS}/s3_proxy.py", "--upstream", upstream, "--port", str(port)]
    proc = subprocess.Popen([*command, "--delay-ms", *map(str, delay_ms)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/__stats", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the proxy did not start")


def served(proxy: str, reset: bool = True) -> int:
    with urllib.request.urlopen(f"{proxy}/{'__reset' if reset else '__stats'}") as r:
        return sum(json.loads(r.read())["served"].values())


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def throughput(
    local: str, remote: str, servers: list[int], workers: int, rounds: int, tmp: str, prefetch: int
) -> dict:
    """Best images/s of each way to read, and the share of the machine's CPU the storage servers
    (moto and the proxy, on these same cores) took in the cached run's first epoch."""
    best: dict[str, float] = {}
    for r in range(rounds):
        dm = loader(local, workers)
        epoch(dm, 0)  # warm: page cache, worker imports
        n, t, _ = epoch(dm, 1)
        close(dm)
        runs = {"local": n / t}
        dm = loader(remote, workers)
        n, t, _ = epoch(dm, 1)
        close(dm)
        runs["s3"] = n / t
        cached = loader(remote, workers, f"{tmp}/cache-{r}", 10**12, prefetch=prefetch)
        before = cpu_seconds(servers)
        n, t, _ = epoch(cached, 0)
        runs["s3_epoch1"] = n / t
        best["server_cpu_share_epoch1"] = (cpu_seconds(servers) - before) / (t * (os.cpu_count() or 1))
        n, t, _ = epoch(cached, 1)
        runs["s3_epoch2"] = n / t
        close(cached)
        shutil.rmtree(f"{tmp}/cache-{r}")
        for k, v in runs.items():
            best[k] = max(best.get(k, 0.0), v)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in runs.items()), flush=True)
    return best


def fetched_per_epoch(
    remote: str, proxy: str, workers: int, fraction: float, policy: str, tmp: str, **kw
) -> float:
    """Bytes fetched in epochs 2 and 3, per epoch, as a share of the training split's bytes."""
    total = load_index(remote).split("train").num_bytes
    cache = f"{tmp}/cache-{policy}-{fraction}-{kw.get('shuffle_block', 0)}"
    dm = loader(remote, workers, cache, int(fraction * total), prefetch=2, cache_policy=policy, **kw)
    epoch(dm, 0)
    served(proxy)
    epoch(dm, 1)
    epoch(dm, 2)
    close(dm)
    shutil.rmtree(cache)
    return served(proxy) / 2 / total


def sorted_set(tmp: str, images: int, per_shard: int) -> str:
    """Shards that each hold one class, indexed as another tool's shards are."""
    items = [replace(i, split=f"class{i.label}") for i in from_synthetic(images, seed=2, size=64)]
    write_dataset(items, f"{tmp}/by-class", val_fraction=0.0, shard_samples=per_shard, workers=1)
    os.makedirs(f"{tmp}/sorted")
    tars = sorted(n for n in os.listdir(f"{tmp}/by-class") if n.endswith(".tar"))
    for k, name in enumerate(tars):
        os.rename(f"{tmp}/by-class/{name}", f"{tmp}/sorted/train-{k:06d}.tar")
    classes = list(load_index(f"{tmp}/by-class").classes)
    build_index(f"{tmp}/sorted", classes=classes)
    import s3fs

    s3fs.S3FileSystem().put(f"{tmp}/sorted", "bench/sorted", recursive=True)
    return "s3://bench/sorted/dataset.json"


def held_at_once(dm: ShardDataModule) -> int:
    """The most samples worker 0 holds read ahead of their turn (read_planned's stash), epoch 0."""
    _, plan, _ = dm._plan(dm.train_split, True)
    samples = plan.worker_samples(0)
    due = {s: k for k, s in enumerate(samples)}
    # A shard is read front to back as far as the sample asked for: a sample is read when the first
    # sample at or after it (in the file) falls due, and held from then until its own turn.
    read = {}
    for shard in {s for s, _ in samples}:
        mine = sorted((i, due[(shard, i)]) for s, i in samples if s == shard)
        first = len(samples)
        for i, when in reversed(mine):
            first = min(first, when)
            read[(shard, i)] = first
    events = np.zeros(len(samples) + 1, np.int64)
    for s, when in due.items():
        events[read[s]] += 1
        events[when] -= 1
    return int(np.cumsum(events).max())


def mixing(keys: list[list[str]], label_of: dict[str, int], classes: int) -> tuple[float, float]:
    """(classes per batch, total variation of a batch's class histogram from the whole's)."""
    labels = [np.array([label_of[k] for k in batch]) for batch in keys if len(batch) == 64]
    whole = np.bincount(np.concatenate(labels), minlength=classes) / sum(map(len, labels))
    tv = [0.5 * np.abs(np.bincount(b, minlength=classes) / len(b) - whole).sum() for b in labels]
    return float(np.mean([len(set(b.tolist())) for b in labels])), float(np.mean(tv))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6000)
    p.add_argument(
        "--shard-samples", type=int, default=100, help="images per shard (6000: 54 training shards)"
    )
    p.add_argument(
        "--sorted-shard-samples", type=int, default=1000, help="part 3: images per one-class shard"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2, help="data.prefetch of the cached runs")
    p.add_argument("--delay-ms", type=float, nargs=2, default=(20.0, 50.0))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_cache_")
    moto = proxy_proc = None
    try:
        moto = start_moto()
        upstream = os.environ["AWS_ENDPOINT_URL"]
        import s3fs

        s3fs.S3FileSystem().mkdir("bench")
        items = from_synthetic(args.images, seed=1, size=160)
        for out in (f"{tmp}/shards", "s3://bench/ds"):  # the same bytes in both places
            write_dataset(items, out, shard_samples=args.shard_samples, workers=args.workers)
        ordered = sorted_set(tmp, args.images, args.sorted_shard_samples)
        proxy_proc, proxy = start_proxy(upstream, tuple(args.delay_ms))
        os.environ["AWS_ENDPOINT_URL"] = proxy
        local, remote, ordered = (
            f"{tmp}/shards/dataset.json",
            "s3://bench/ds/dataset.json",
            "s3://bench/sorted",
        )
        index = load_index(remote)
        shards = index.split("train").shards
        print(
            f"{len(shards)} training shards of {args.shard_samples} images, "
            f"{index.split('train').num_bytes / 1e6:.0f} MB"
        )
        servers = [moto.pid, proxy_proc.pid]
        figures: dict = throughput(local, remote, servers, args.workers, args.rounds, tmp, args.prefetch)
        for k in ("s3", "s3_epoch1", "s3_epoch2"):
            figures[f"{k}_over_local"] = figures[k] / figures["local"]

        proxy_proc.terminate()  # counting bytes: no delay needed
        proxy_proc, proxy = start_proxy(upstream, (0, 0))
        os.environ["AWS_ENDPOINT_URL"] = proxy
        for fraction in (0.25, 0.5, 1.0):
            for policy in ("plan", "lru"):
                share = fetched_per_epoch(remote, proxy, args.workers, fraction, policy, tmp)
                figures[f"fetched_{policy}_{int(fraction * 100)}"] = share
                print(
                    f"  cache {fraction:.0%} of the set, {policy}: {share:.2f} of the set fetched per epoch",
                    flush=True,
                )

        label_of = {}
        sorted_index = load_index(ordered)
        from data.samples import read_shard

        for s in sorted_index.split("train").shards:
            for sample in read_shard(sorted_index.shard_url(s)):
                label_of[sample["__key__"]] = int(sample["cls"])
        buffer, block = args.sorted_shard_samples // 10, 3 * args.sorted_shard_samples
        for name, kw in (
            ("shards", {"buffer": buffer}),
            ("blocks", {"buffer": buffer, "shuffle_block": block}),
        ):
            dm = loader(ordered, args.workers, **kw)
            _, _, keys = epoch(dm, 0)
            close(dm)
            per_batch, tv = mixing(keys, label_of, len(sorted_index.classes))
            cost = fetched_per_epoch(ordered, proxy, args.workers, 0.5, "plan", tmp, **kw)
            held = held_at_once(dm)
            figures |= {f"{name}_classes_per_batch": per_batch, f"{name}_tv": tv}
            figures |= {f"{name}_fetched_50": cost, f"{name}_held": held}
            print(
                f"  {name}: {per_batch:.2f} classes per batch, TV {tv:.3f}; {cost:.2f} of the set fetched "
                f"per epoch with a cache of half the set; {held} samples held at once by a worker"
            )
    finally:
        for proc in (proxy_proc, moto):
            if proc:
                proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"{os.cpu_count()} cores, {args.workers} loader workers, {args.images} images, "
        f"{args.delay_ms[0]:.0f}-{args.delay_ms[1]:.0f} ms a request"
    )
    for k in ("local", "s3", "s3_epoch1", "s3_epoch2"):
        print(
            f"  {k:10s} {figures[k]:7.0f} images/s"
            + (f"  {figures[k + '_over_local']:.2f} of local" if k != "local" else "")
        )
    share = figures["server_cpu_share_epoch1"]
    print(f"  the storage servers on these cores took {share:.0%} of their CPU in the cached run's epoch 1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
