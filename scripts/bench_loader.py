"""Data-loader benchmark: our shard pipeline against its limit and the usual alternatives.

    python scripts/bench_loader.py [--variant large|small] [--images 5000] [--workers N]
                                   [--only L0,L3] [--repeat 2] [--epochs 2] [--quick] [--json FILE]

With the `bench` extra installed (pip install -e ".[bench]"), the peers Mosaic Streaming and
LitData run too, each as its users write it and with our transform (scripts/bench_peers.py);
without it, the benchmark says so and runs the rest.

Every contender turns the same images (scripts/bench_data.py, cached; page cache warm) into the
same model input, a RandomResizedCrop(224), flipped batch of 256, the way its own docs teach,
with one loader worker per core and every thread pool at 1 per process. Each runs in a fresh
subprocess, so its CPU time and memory (workers included) are its own. Throughput is timed over
one epoch after a warm-up of one batch per worker: from the W-th batch's arrival to the last's;
with --epochs N, over the N-th epoch, the earlier ones untimed (L0 has no state to warm: one pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from bench_data import VARIANTS, build, repeat_index
from meter import TreeMeter, busy_seconds, wait_idle
from torch.utils.data import DataLoader
from torchvision import transforms as T

CONTENDERS = {
    "L0": "the limit: data.transforms.TrainTransform(224) on JPEG bytes already in memory, a tight loop "
    "in one process per core (a fork Pool hands out chunks of B images; no loader, no batch; its 1st "
    "batch includes reading every JPEG into memory)",
    "L1": "torchvision ImageFolder + DataLoader(shuffle, drop_last) over the same images as files, "
    "Compose(RandomResizedCrop(224), RandomHorizontalFlip(), ToTensor(), Normalize()) in the workers: "
    "float32 batches",
    "L2": "webdataset over our shards: WebDataset(urls, shardshuffle=100) (its default workersplitter "
    "gives each worker its own shards: every image once) .shuffle(1000).decode('pil').to_tuple('jpg',"
    "'cls').map_tuple(L1's Compose, identity).batched(B, partial=False), DataLoader(batch_size=None): "
    "float32 batches",
    "L3": "ours: data.datamodule.ShardDataModule(index, batch_size=B, num_workers=W, image_size=224)"
    ".train_dataloader(): uint8 batches; normalisation runs on the device, so is not charged here",
    "L3f": "L3 with batch_slots=0: every batch stacked into fresh shared memory, as before the "
    "reused slots of data/batch_pool.py (their baseline)",
    "mosaic": "Mosaic Streaming over the same bytes in MDS: StreamingDataset(local, shuffle=True) "
    "subclassed to decode with PIL and apply L1's Compose, DataLoader(drop_last): float32 batches",
    "mosaic+ours": "the same Mosaic loader with our TrainTransform(224) on the bytes: uint8 batches",
    "litdata": "LitData over the same bytes (litdata.optimize): StreamingDataset(shuffle=True) subclassed "
    "to decode with PIL and apply L1's Compose, StreamingDataLoader(drop_last): float32 batches",
    "litdata+ours": "the same LitData loader with our TrainTransform(224) on the bytes: uint8 batches",
}
BASELINE = ("L0", "L1", "L2", "L3")  # the default contenders; the peers join them when installed
MEMORY_CHECK = "L3x10"  # L3 over an index that lists every shard 10 times
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, for L1's and L2's Normalize
_JPEGS: list[bytes] = []  # L0's input: filled before the pool forks, so its workers share it


def _one_thread(*_) -> None:
    torch.set_num_threads(1)  # DataLoader workers do this already; L0's Pool does not


def _identity(x):
    return x


def _torchvision_transform() -> T.Compose:
    return T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    )


def _train_urls(index: str) -> list[str]:
    from data.index import load_index

    ds = load_index(index)
    return [ds.shard_url(s) for s in ds.split("train").shards]


def _l0_chunk(chunk: range) -> tuple[int, tuple]:
    from data.transforms import TrainTransform

    transform = TrainTransform(224)
    for i in chunk:
        out = transform(_JPEGS[i])  # uint8 (3, 224, 224)
    return len(chunk), tuple(out.shape)


def l0(index: str, folder: str, workers: int, batch: int) -> Iterator[tuple[int, str]]:
    from multiprocessing import get_context

    from data.samples import image_bytes, read_shard

    _JPEGS[:] = [image_bytes(s) for url in _train_urls(index) for s in read_shard(url)]
    chunks = [range(i, min(i + batch, len(_JPEGS))) for i in range(0, len(_JPEGS), batch)]
    with get_context("fork").Pool(workers, initializer=_one_thread) as pool:
        for n, shape in pool.imap_unordered(_l0_chunk, chunks):
            yield n, f"uint8 {shape} each"


def l1(index: str, folder: str, workers: int, batch: int) -> Iterable:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(folder, _torchvision_transform())
    kw = {"num_workers": workers, "worker_init_fn": _one_thread}
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, **kw)


def l2(index: str, folder: str, workers: int, batch: int) -> Iterable:
    import webdataset as wds

    pipeline = (
        wds.WebDataset(_train_urls(index), shardshuffle=100)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(_torchvision_transform(), _identity)
        .batched(batch, partial=False)  # collated in the workers: (B, 3, 224, 224) float32
    )
    return DataLoader(pipeline, batch_size=None, num_workers=workers, worker_init_fn=_one_thread)


def l3(index: str, folder: str, workers: int, batch: int, slots: int | None = None) -> Iterable:
    from data.batch_pool import SLOTS
    from data.datamodule import ShardDataModule

    slots = SLOTS if slots is None else slots
    dm = ShardDataModule(
        index=index, batch_size=batch, num_workers=workers, image_size=224, batch_slots=slots
    )
    return dm.train_dataloader()  # (uint8 (B, 3, 224, 224), labels, keys, bad counts)


def l3f(index: str, folder: str, workers: int, batch: int) -> Iterable:
    return l3(index, folder, workers, batch, slots=0)


def peer(name: str) -> Callable[[str, str, int, int], Iterable]:
    """A peer's loader (scripts/bench_peers.py) over its copy of the set, next to `folder`."""

    def loader(index: str, folder: str, workers: int, batch: int) -> Iterable:
        import bench_peers

        base, ours = name.split("+")[0], name.endswith("+ours")
        make = getattr(bench_peers, base)
        return make(os.path.dirname(folder), workers, batch, ours, _torchvision_transform())

    return loader


LOADERS = {"L0": l0, "L1": l1, "L2": l2, "L3": l3, "L3f": l3f, MEMORY_CHECK: l3}
LOADERS |= {name: peer(name) for name in ("mosaic", "mosaic+ours", "litdata", "litdata+ours")}
IMPORTS = {"L0": "data.transforms", "L1": "torchvision.datasets", "L2": "webdataset", "L3": "data.datamodule"}
IMPORTS |= {
    "L3f": "data.datamodule",
    MEMORY_CHECK: "data.datamodule",
    "mosaic": "streaming",
    "litdata": "litdata",
}
IMPORTS |= {"mosaic+ours": "streaming", "litdata+ours": "litdata"}


def child(name: str, index: str, folder: str, workers: int, batch: int, epochs: int = 1) -> dict:
    """Run one contender in this fresh process and time its last epoch; its figures."""
    import importlib

    torch.set_num_threads(1)
    importlib.import_module(IMPORTS[name])  # before the clock: a trainer has paid for it
    meter = TreeMeter().start()
    t0 = time.perf_counter()
    loader = LOADERS[name](index, folder, workers, batch)
    if name != "L0":  # L0 keeps nothing from one pass to the next: its one pass is its steady state
        for _ in range(epochs - 1):  # untimed: what a loader keeps (workers, memory) is then warm
            for _ in loader:
                pass
        t0 = time.perf_counter()
        images = (b[0] for b in loader)
        loader = ((len(x), f"{str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}") for x in images)
    n = count = 0
    first = start = end = cpu0 = cpu1 = busy0 = busy1 = 0.0
    for size, shape in loader:
        count += 1
        if count == 1:
            first, first_shape = time.perf_counter() - t0, shape
        if count == workers:  # warm-up over: every worker has delivered once
            start, cpu0, busy0 = time.perf_counter(), meter.cpu_seconds(), busy_seconds()
        elif count > workers:
            n += size
            end, cpu1, busy1 = time.perf_counter(), meter.cpu_seconds(), busy_seconds()  # workers alive
    meter.stop()
    if not n:
        raise SystemExit(f"{name}: {count} batches, none after the warm-up of {workers}: use more --images")
    return {
        "images_timed": n,
        "seconds": end - start,
        "img_s": n / (end - start),
        "img_per_cpu_s": n / (cpu1 - cpu0),  # the tree's CPU: main process and workers
        "cores": (cpu1 - cpu0) / (end - start),
        # Cores that other processes (or the hypervisor) took meanwhile: on a shared machine a
        # contender timed beside a busy neighbour gets fewer img/s.
        "others_cores": (busy1 - busy0 - (cpu1 - cpu0)) / (end - start),
        "first_batch_s": first,
        "peak_rss_mb": meter.peak_rss / 2**20,
        "peak_pss_mb": meter.peak_pss / 2**20,
        "batch": first_shape,
    }


def run(name: str, index: str, folder: str, workers: int, batch: int, wait: float, epochs: int = 1) -> dict:
    """`child` in a fresh interpreter, with every native thread pool capped at 1 thread, once the
    machine is idle (or `wait` seconds have passed)."""
    busy = wait_idle(wait)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", name, index, folder, str(workers), str(batch), str(epochs)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "busy_cores_before": busy}


def machine() -> dict:
    import PIL
    import torchvision
    import webdataset
    from PIL import features

    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "webdataset": webdataset.__version__,
        **{dist: _version(dist) for dist in ("mosaicml-streaming", "litdata")},
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def report(results: dict[str, dict]) -> dict:
    """Print the table and the derived figures; return the derived figures."""
    columns = ("img/s", 7), ("img/CPU-s", 10), ("cores", 6), ("others", 7), ("1st batch s", 12)
    head = "".join(f"{c:>{w}}" for c, w in (*columns, ("RSS MiB", 8), ("PSS MiB", 8)))
    print(f"\n{'':13}{head}  batch")
    for name, r in results.items():
        print(
            f"{name:13}{r['img_s']:7.0f}{r['img_per_cpu_s']:10.1f}{r['cores']:6.2f}{r['others_cores']:7.2f}"
            f"{r['first_batch_s']:12.2f}{r['peak_rss_mb']:8.0f}{r['peak_pss_mb']:8.0f}  {r['batch']}"
        )
    print(
        "img/s: one epoch after a warm-up of W batches. img/CPU-s, cores: CPU of the contender's whole\n"
        "process tree in that window. others: cores other processes took meanwhile. 1st batch: from\n"
        "building the loader (imports done) to the first batch. RSS: peak of the sum over the tree (pages\n"
        "shared with forked workers counted in each); PSS: the same with shared pages split."
    )
    derived: dict = {}
    l3 = results.get("L3")
    for other in ("L0", "L1", "L2", "L3f", "mosaic", "mosaic+ours", "litdata", "litdata+ours"):
        if l3 and other in results:
            key, theirs = f"l3_over_{other.lower().replace('+', '_')}", results[other]
            derived[key] = l3["img_s"] / theirs["img_s"]
            derived[f"{key}_per_cpu"] = l3["img_per_cpu_s"] / theirs["img_per_cpu_s"]
            print(f"L3/{other}: {derived[key]:.2f} in img/s, {derived[f'{key}_per_cpu']:.2f} in img/CPU-s")
    if "L0" in results:  # each loader's share of the decode limit
        for name in ("L3", "mosaic+ours", "litdata+ours"):
            if name in results:
                key = f"{name.lower().replace('+', '_')}_over_l0"
                derived[key] = results[name]["img_s"] / results["L0"]["img_s"]
                print(f"{name}/L0: {derived[key]:.2f} in img/s")
    if l3:
        # A core kept busy feeds img/CPU-s images a second, whatever a neighbour took meanwhile.
        print(f"L3 gives {l3['img_per_cpu_s']:.0f} images per CPU-second (all its processes)")
        for target in (2500, 7000):
            derived[f"cores_per_gpu_at_{target}"] = target / l3["img_per_cpu_s"]
            print(f"cores per GPU at {target} img/s: {derived[f'cores_per_gpu_at_{target}']:.1f}")
    if l3 and MEMORY_CHECK in results:
        x10 = results[MEMORY_CHECK]
        derived["rss_10x_over_1x"] = x10["peak_rss_mb"] / l3["peak_rss_mb"]
        derived["pss_10x_over_1x"] = x10["peak_pss_mb"] / l3["peak_pss_mb"]
        print(
            f"memory, L3 streaming 10x the samples ({x10['images_timed']} timed): peak RSS "
            f"x{derived['rss_10x_over_1x']:.3f}, PSS x{derived['pss_10x_over_1x']:.3f} of the 1x run"
        )
    return derived


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        name, index, folder, workers, batch, epochs = sys.argv[2:8]
        print(json.dumps(child(name, index, folder, int(workers), int(batch), int(epochs))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="large", help="400-640 px or ~256 px")
    p.add_argument("--small", action="store_const", const="small", dest="variant", help="= --variant small")
    p.add_argument("--images", type=int, default=None, help="benchmark set size (default 5000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="per loader (default: cores)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256")
    p.add_argument(
        "--only", help=f"comma-separated contenders (default: {','.join(BASELINE)} and the peers installed)"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs each, interleaved; the fastest counts")
    p.add_argument(
        "--epochs", type=int, default=1,
        help="epochs each loader runs; the last is timed (2: the steady state of a loader that keeps "
        "its workers and batch memory across epochs, as ours does; the first pays for starting them)",
    )  # fmt: skip
    p.add_argument("--wait-idle", type=float, default=60, help="s to wait for idle cores before each run")
    p.add_argument("--no-memory-check", action="store_true", help=f"skip {MEMORY_CHECK}")
    p.add_argument("--quick", action="store_true", help="640 images in batches of 64, for development")
    p.add_argument("--root", default="~/.cache/shardtrain/bench", help="where benchmark sets are cached")
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    a = p.parse_args()
    images = a.images or (640 if a.quick else 5000)
    batch = a.batch_size or (64 if a.quick else 256)
    import bench_peers

    have = bench_peers.available()
    if a.only:
        names = [n.strip() for n in a.only.split(",")]
    else:
        names = [*BASELINE, *(f"{peer}{way}" for peer, ok in have.items() if ok for way in ("", "+ours"))]
    if unknown := set(names) - set(CONTENDERS):
        p.error(f"--only: unknown {sorted(unknown)}; expected some of {list(CONTENDERS)}")
    asked = {n.split("+")[0] for n in names}
    if missing := sorted(peer for peer, ok in have.items() if not ok and (peer in asked or not a.only)):
        print(f"peers not installed, skipped: {', '.join(missing)} ({bench_peers.EXTRA} installs them)")
        names = [n for n in names if n.split("+")[0] not in missing]
    if a.epochs < 1:
        p.error(f"--epochs {a.epochs}: at least 1")
    if a.workers < 1:
        p.error(f"--workers {a.workers}: every contender needs at least one worker process")

    info = machine()
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    bench = build(a.variant, images, root=a.root)
    s = bench.stats
    print(
        f"set: {s['images']} {a.variant} JPEGs, {s['kb_mean']} KB mean ({s['kb_min']}-{s['kb_max']}), "
        f"long side {s['long_side_mean']} px mean, {s['shards']} shards: {bench.directory}"
    )
    print(f"workers {a.workers}, batch {batch}; each contender in its own process:")
    for name in names:
        print(f"  {name}: {CONTENDERS[name]}")
    bench_peers.prepare(bench.index, bench.directory, names)  # their copies of the set, once
    runs = [(n, bench.index) for _ in range(a.repeat) for n in names]
    if "L3" in names and not a.no_memory_check:
        runs.append((MEMORY_CHECK, repeat_index(bench.index, 10)))
        print(f"  {MEMORY_CHECK}: L3 over a dataset.json listing every shard 10 times, for its peak memory")
    every: dict[str, list[dict]] = {}
    for name, index in runs:
        r = run(name, index, bench.folder, a.workers, batch, a.wait_idle, a.epochs)
        every.setdefault(name, []).append(r)
        busy = r["busy_cores_before"]
        note = f" (started as others kept {busy:.2f} cores busy)" if busy > 0.25 else ""
        print(f"  {name}: {r['img_s']:.0f} img/s over {r['images_timed']} images{note}", flush=True)
    results = {name: max(rs, key=lambda r: r["img_s"]) for name, rs in every.items()}
    derived = report(results)
    if a.json:
        doc = {"machine": info, "set": s, "workers": a.workers, "batch": batch, "epochs": a.epochs}
        doc["results"] = results
        with open(a.json, "w") as f:
            json.dump({**doc, **derived, "runs": every}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
