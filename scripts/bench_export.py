"""Export parity per format, and ONNX Runtime CPU latency against PyTorch eager.

    python scripts/bench_export.py [--ckpt PATH] [--backbone resnet18] [--image-size 224]
                                   [--parity-images 256] [--repeat 20] [--json FILE]

Parity: `python -m train.export`'s own check (train.export.export) for each of onnx and
torchscript at fp32 and fp16, on `--parity-images` real images of the checkpoint's data set;
Core ML is converted and validated (its parity needs macOS). Without `--ckpt`, a checkpoint of a
randomly initialised `--backbone` over a freshly written synthetic data set stands in (its
probabilities sit near uniform, which makes top-1 agreement a harder test, not an easier one).

Latency: the same fp32 network as the checkpoint's eager `Network` (torch.inference_mode) and
as the exported ONNX model in onnxruntime's CPU provider, on the same uint8 batch, both with
their default thread counts; per image, median of `--repeat` timed runs after 3 warm-up runs,
at batch 1 and 32. `ort_over_eager` is eager time / onnxruntime time (above 1: onnxruntime faster).

INT8 (`--int8`): the fp32 ONNX model quantized as `precision=int8` does it (train/quantize.py,
calibrated on 256 train images), against the fp32 one: file size, onnxruntime latency at batch 1
and 32, and the export's own gate (`python -m train.export ... precision=int8`): top-1 agreement
on the parity images and the escape rate at the stored threshold, or the figures it refused on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch

from data.sources import from_synthetic
from data.write import write_dataset
from train.bundle import load_bundle
from train.checkpoint import load_checkpoint, model_from_checkpoint, save_model
from train.cli import compose
from train.export import export
from train.network import Network, build_backbone, spec_for


def stand_in_checkpoint(root: str, backbone: str, image_size: int) -> str:
    data = write_dataset(from_synthetic(400, seed=1, size=96), os.path.join(root, "data"), val_fraction=0.5)
    index = data.index
    net = build_backbone(backbone, len(index.classes))
    model = Network(net, spec_for(net, backbone, index.classes, image_size, 0.875))
    path = os.path.join(root, "model.ckpt")
    lineage = {"config": {"name": "bench"}, "dataset": {"index": index.location, "sha256": index.sha256}}
    save_model(path, model, {"run_ids": {}, "lineage": {**lineage, "code_version": "bench", "packages": {}}})
    return path


def latency(run, batch: torch.Tensor, repeat: int) -> float:
    """Median milliseconds per image of `run(batch)`."""
    for _ in range(3):
        run(batch)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(batch)


def int8_figures(ckpt: str, onnx_dir: str, root: str, size: int, args) -> dict:
    """Size, latency and the export gate's verdict of the int8 model against the fp32 one."""
    import onnxruntime as ort

    from data.errors import UserError
    from train.checkpoint import KEY, trained_on
    from train.export import calibration_images
    from train.quantize import quantize

    meta = load_checkpoint(ckpt)[KEY]
    spec = model_from_checkpoint(load_checkpoint(ckpt)).spec
    data = trained_on(meta)
    index = data.get("index") or data["mix"][0]["index"]
    calibration = compose("export", f"ckpt={ckpt}").calibration
    images = calibration_images(index, calibration, spec, "crop")
    int8_path = f"{root}/int8.onnx"
    out = {"quantization": quantize(f"{onnx_dir}/model.onnx", int8_path, images)}
    out["size_bytes"] = {
        "fp32": os.path.getsize(f"{onnx_dir}/model.onnx"),
        "int8": os.path.getsize(int8_path),
    }
    sessions = {
        k: ort.InferenceSession(p) for k, p in (("fp32", f"{onnx_dir}/model.onnx"), ("int8", int8_path))
    }
    out["latency_ms_per_image"] = {}
    for batch in (1, 32):
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).numpy()
        out["latency_ms_per_image"][f"batch{batch}"] = {
            k: latency(lambda a, s=sess: s.run(None, {"images": a}), x, args.repeat)
            for k, sess in sessions.items()
        }
    try:
        report = export(
            compose(
                "export",
                f"ckpt={ckpt}",
                "precision=int8",
                f"out={root}/onnx-int8",
                f"parity.samples={args.parity_images}",
            )
        )
        out["gate"] = {"published": True, "batches": report["batches"], "escape": report.get("escape")}
    except UserError as e:
        out["gate"] = {"published": False, "refused": str(e)}
    print(f"int8: {out['size_bytes']}, {out['latency_ms_per_image']}, gate: {out['gate']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a checkpoint to export (default: a random stand-in)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--parity-images", type=int, default=256)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--formats", default="onnx/fp32,onnx/fp16,torchscript/fp32,torchscript/fp16,coreml/fp16")
    p.add_argument("--int8", action="store_true", help="also quantize to int8 and compare (needs a data set)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="bench_export-")
    ckpt = args.ckpt or stand_in_checkpoint(root, args.backbone, args.image_size)
    figures: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    figures["parity"] = {}
    for entry in args.formats.split(","):
        fmt, precision = entry.split("/")
        overrides = [f"ckpt={ckpt}", f"format={fmt}", f"precision={precision}", f"out={root}/{entry}"]
        report = export(compose("export", *overrides, f"parity.samples={args.parity_images}"))
        batches = {
            f"batch{b}": {k: r[k] for k in ("max_abs_diff", "top1_agreement")}
            for b, r in report["batches"].items()
        }
        figures["parity"][entry] = report.get("skipped") or {
            "images": report["images"],
            "tolerance": report["tolerance"]["max_abs_diff"],
            **batches,
        }

    eager = model_from_checkpoint(load_checkpoint(ckpt))
    onnx_dir = f"{root}/onnx/fp32"
    if not os.path.isdir(onnx_dir):
        export(compose("export", f"ckpt={ckpt}", f"out={onnx_dir}", "parity.samples=8"))
    ort = load_bundle(onnx_dir)
    size = eager.spec.image_size

    def torch_eager(x: torch.Tensor):
        with torch.inference_mode():
            return eager(x).softmax(dim=1)

    figures["latency_ms_per_image"], figures["ort_over_eager"] = {}, {}
    for batch in (1, 32):
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        t_eager, t_ort = latency(torch_eager, x, args.repeat), latency(ort, x, args.repeat)
        figures["latency_ms_per_image"][f"batch{batch}"] = {"eager": t_eager, "onnxruntime": t_ort}
        figures["ort_over_eager"][f"batch{batch}"] = t_eager / t_ort
        print(
            f"batch {batch:>2}: eager {t_eager:.2f} ms/image, onnxruntime {t_ort:.2f} ms/image "
            f"-> onnxruntime is {t_eager / t_ort:.2f}x eager"
        )
    if args.int8:
        figures["int8"] = int8_figures(ckpt, onnx_dir, root, size, args)
    for entry, r in figures["parity"].items():
        print(f"parity {entry}: {r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
