"""GPU JPEG decode (nvJPEG through torchvision) against our CPU decode, on the same JPEG bytes.

    python scripts/gpu_decode.py --index DATASET_JSON [--images 2048] [--batch 256] [--json FILE]

Both produce what the trainer takes: a uint8 (B, 3, 224, 224) RandomResizedCrop, flipped.

    cpu   data.transforms.TrainTransform(224) per image in one process on one core: the
          crop-aware reduced-scale PIL decode our loader workers run (img/s per core)
    gpu   torchvision.io.decode_jpeg(batch, device="cuda"), then the crop, resize and flip
          per image on the GPU (img/s for the whole GPU, and the CPU seconds it still takes)

Divide a GPU's training rate by the cpu figure for the cores a CPU loader needs; the gpu
figure says whether moving decode to the GPU could feed it instead (decode then competes with
training for the same GPU, so it is an option only where it is far faster than needed).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torchvision.io import decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from data.index import load_index
from data.samples import image_bytes, read_shard
from data.transforms import TrainTransform


def jpegs(index: str, count: int) -> list[bytes]:
    ds = load_index(index)
    out: list[bytes] = []
    for shard in ds.split("train").shards:
        for sample in read_shard(ds.shard_url(shard)):
            out.append(image_bytes(sample))
            if len(out) == count:
                return out
    return out


def cpu_rate(data: list[bytes], size: int) -> float:
    torch.set_num_threads(1)  # one core, as in a loader worker
    transform = TrainTransform(size)
    for b in data[:32]:
        transform(b)
    start = time.perf_counter()
    for b in data:
        transform(b)
    return len(data) / (time.perf_counter() - start)


def gpu_batch(encoded: list[torch.Tensor], size: int) -> torch.Tensor:
    images = decode_jpeg(encoded, device="cuda")  # list of uint8 (3, H, W) on the GPU
    out = []
    for im in images:
        top, left, h, w = RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3])
        crop = F.resized_crop(im, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
        out.append(F.horizontal_flip(crop) if torch.rand(()) < 0.5 else crop)
    return torch.stack(out)  # uint8 (B, 3, size, size)


def gpu_rate(data: list[bytes], size: int, batch: int) -> tuple[float, float]:
    """(images/s, CPU seconds per 1,000 images) for decode + augment on the GPU."""
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    gpu_batch(encoded[:batch], size)  # warm-up: nvJPEG handles, kernels
    torch.cuda.synchronize()
    cpu0, start = time.process_time(), time.perf_counter()
    for i in range(0, len(encoded), batch):
        gpu_batch(encoded[i : i + batch], size)
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return len(encoded) / wall, 1000 * cpu / len(encoded)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--index", required=True, help="dataset.json of JPEG shards (split train)")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="output side, pixels")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    data = jpegs(args.index, args.images)
    figures = {"images": len(data), "mean_kb": sum(map(len, data)) / len(data) / 1000}
    figures["cpu_per_core"] = cpu_rate(data, args.size)
    if torch.cuda.is_available():
        figures["gpu"], figures["gpu_cpu_ms_per_1000"] = gpu_rate(data, args.size, args.batch)
        figures["gpu_name"] = torch.cuda.get_device_name()
        figures["gpu_over_cpu_core"] = figures["gpu"] / figures["cpu_per_core"]
    for target in (2500, 7000):
        figures[f"cores_for_{target}"] = target / figures["cpu_per_core"]
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
