"""`python -m train.export ckpt=PATH format=onnx|torchscript|coreml out=DIR`: a deployable bundle
(see train/bundle.py), checked against the checkpoint on real images before it is published.

    checkpoint ──▶ Probabilities (uint8 in, softmax out) ──▶ model file (ONNX: dynamic batch,
    checked by onnx.checker; TorchScript: traced; Core ML: mlprogram, spec validated)
          │                                                     │
    real images of the data set (eval transform) ──▶ both ──▶ parity.json ──▶ published, or refused

A bundle whose parity fails is not published: the command exits 2 with the figures.
`register=NAME` also makes the bundle the next version of an MLflow registered model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data.errors import UserError
from data.tiles import tiling_from
from train import bundle, settings, tasks
from train.checkpoint import KEY, file_sha256, load_checkpoint, model_from_checkpoint, trained_on
from train.cli import CONFIG_PATH, run_cli
from train.convert import check_installed, convert, converter_version
from train.decision import threshold_of
from train.network import Network
from train.outputs import check_out, published
from train.tiled import cut, of_part, tiled

log = logging.getLogger("train")
# Largest difference in any class probability, export against checkpoint. fp16 carries 11
# significant bits (about 3 decimal digits), so its outputs differ by up to ~1e-3 on deep nets.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


class Probabilities(nn.Module):
    """The exported function: preprocessed pixels (N, 3, S, S), uint8 or float 0..255 →
    probabilities, float32: (N, C), or (N, C, S, S) per pixel. Normalisation and softmax (or
    sigmoid) inside, so no runtime forgets them."""

    def __init__(self, net: Network):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.probabilities(images)


def parity_images(
    index_url: str, split: str, n: int, size: int, crop_pct: float, fit: str = "crop"
) -> torch.Tensor:
    """The first `n` decodable images of `split`, through the eval transform: uint8 (n, 3, S, S)."""
    from data.index import load_index
    from data.samples import BadSample, image_bytes, read_shard
    from data.transforms import EvalTransform

    index = load_index(index_url)
    transform = EvalTransform(size, crop_pct, fit, index.extra.get("bit_depth"))  # 16-bit: as trained
    images = []
    for shard in index.split(split).shards:
        for sample in read_shard(index.shard_url(shard)):
            try:
                image = transform(image_bytes(sample))
            except (BadSample, OSError, ValueError):
                continue  # parity needs images the model can see; bad ones are `data verify`'s
            if images and image.shape != images[0].shape:
                continue  # whole parts (fit "none") of another size than the first: not stackable
            images.append(image)
            if len(images) == n:
                return torch.stack(images)
    if len(images) < 2:  # one image would leave a batch over 1 unchecked
        raise UserError(
            f"split {split!r} of {index.location} has {len(images)} decodable images; parity needs 2 or more"
        )
    return torch.stack(images)


WHOLE_PARTS = 4  # parity images of a model trained on tiles: whole parts, hundreds of tiles each

# Share of decisions (a part's class, a label, a pixel's class) the export must reproduce at
# fp32: every one, but for segmentation 99.9% of pixels (an argmax on a border pixel between two
# near-equal classes may flip with the last bit of float arithmetic).
AGREEMENT = {"classify": 1.0, "multilabel": 1.0, "segment": 0.999, "anomaly": 1.0}


def check_parity(
    reference: np.ndarray,
    exported: np.ndarray,
    tolerance: float,
    precision: str,
    task: str = "classify",
    threshold: float = 0.5,
) -> dict:
    """Decision agreement and largest probability difference: the top class per part (per
    pixel for segmentation), or each label at 0.5 for multi-label. At fp32 the task's share must
    agree. At fp16 a disagreement is excused where the checkpoint's own two choices lie within
    2 × tolerance (a near-tie the allowed rounding may flip); how many were is reported. For
    anomaly the outputs are calibrated maps, and the decision is each part's stop at `threshold`."""
    diff = float(np.abs(reference - exported).max())
    if task == "anomaly":  # calibrated maps (n, 1, S, S): each part's score, and its stop at `threshold`
        ref, got = (
            reference.reshape(len(reference), -1).max(axis=1),
            exported.reshape(len(exported), -1).max(axis=1),
        )
        agree = (ref >= threshold) == (got >= threshold)
        margin = np.abs(ref - threshold) * 2
        near_tie = margin <= 2 * tolerance
        return {
            "max_abs_diff": diff,
            "max_abs_score_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float(agree.mean()),
            "near_ties_excused": int((~agree & near_tie).sum()),
            "passed": bool(diff <= tolerance and (agree | near_tie).all()),
        }
    if task == "multilabel":
        agree = (reference >= 0.5) == (exported >= 0.5)
        margin = np.abs(reference - 0.5) * 2  # the two choices: p and 1 - p
    else:
        agree = reference.argmax(axis=1) == exported.argmax(axis=1)
        top2 = np.sort(reference, axis=1)[:, -2:]
        margin = np.take(top2, 1, axis=1) - np.take(top2, 0, axis=1)
    near_tie = margin <= 2 * tolerance if precision == "fp16" else np.zeros(agree.shape, bool)
    required = AGREEMENT[task] if precision == "fp32" else 1.0
    return {
        "max_abs_diff": diff,
        "top1_agreement": float(agree.mean()),
        "near_ties_excused": int((~agree & near_tie).sum()),
        "passed": bool(diff <= tolerance and (agree | near_tie).mean() >= required),
    }


def export(cfg: DictConfig) -> dict:
    """Write and check the bundle; return parity.json's content."""
    if not cfg.ckpt:
        raise UserError("ckpt is not set: give the checkpoint to export (ckpt=outputs/.../model.ckpt)")
    settings.check(cfg, "export")
    fmt, precision = str(cfg.format), str(cfg.precision)
    check_installed(fmt)
    out = check_out(cfg.out, cfg.overwrite, bundle.PREPROCESS, inputs=(cfg.ckpt,))
    ckpt = load_checkpoint(cfg.ckpt)
    meta = ckpt[KEY]
    net = model_from_checkpoint(ckpt)
    spec = net.spec
    if not spec.extra.get("decision"):
        log.warning(
            "%s carries no defect threshold: export the model.ckpt that python -m train.evaluate writes "
            "to ship one",
            cfg.ckpt,
        )
    # parity images: the data set given, or the one it trained on (a mix's first source)
    data = trained_on(meta)
    index = cfg.data.index or data.get("index") or data["mix"][0]["index"]
    task = tasks.of(spec)
    tiling = tiling_from(spec.tiles)
    if tiling:  # whole parts, each hundreds of tiles: a few make the check
        images = parity_images(index, cfg.parity.split, min(cfg.parity.samples, WHOLE_PARTS), 0, 1.0, "none")
        h, w = images[0].shape[-2:]
        example = cut(images[0], tiling.grid(w, h)[:2], tiling.size)  # two tiles trace the graph
        example = TF.resize(example, [spec.image_size] * 2, InterpolationMode.BILINEAR, antialias=True)
    else:
        images = parity_images(
            index, cfg.parity.split, cfg.parity.samples, spec.image_size, spec.crop_pct, task.eval_fit
        )
        example = images[:2]

    def scored(run, batch: int) -> np.ndarray:
        """(n, C) or (n, C, S, S); tiled: each whole part's (C,) or stitched (C, H, W), tiles in
        batches of `batch`."""
        if tiling:
            parts = [of_part(tiled(run, im, tiling, spec.image_size, batch), spec) for im in images]
            return torch.stack(parts).numpy()
        return np.concatenate([np.asarray(run(images[i : i + batch])) for i in range(0, len(images), batch)])

    with torch.inference_mode():
        # the checkpoint in fp32, eager
        reference = scored(Probabilities(net), 32 if tiling else len(images))
    # anomaly: compared as the calibrated maps and scores predict returns, [0, 1] like probabilities
    view = task.parity_view(spec) if hasattr(task, "parity_view") else (lambda x: x)
    model = Probabilities(copy.deepcopy(net).half() if precision == "fp16" else net).eval()
    tolerance = float(TOLERANCE[precision] if cfg.parity.tolerance is None else cfg.parity.tolerance)

    with published(out) as tmp:
        try:
            checks = convert(model, fmt, os.path.join(tmp, bundle.FILES[fmt]), example)
        except UserError:
            raise
        except Exception as e:  # a converter's own failure, typically after a torch upgrade
            raise UserError(
                f"{fmt} conversion failed with torch {torch.__version__}{converter_version(fmt)}: "
                f"{type(e).__name__}: {e}"
            ) from e
        source = _source(cfg.ckpt, meta, index)
        with open(os.path.join(tmp, bundle.PREPROCESS), "w") as f:
            json.dump(bundle.describe(spec, fmt, precision, source), f, indent=2)
        report = {
            "format": fmt,
            "precision": precision,
            "images": len(images),
            "data": {"index": index, "split": cfg.parity.split},
            "tolerance": {
                "max_abs_diff": tolerance,
                "top1_agreement": AGREEMENT[task.name]
                if precision == "fp32"
                else "1.0 but for near-ties (top two within 2 x tolerance)",
            },
            "checks": checks,
            "batches": {},
        }
        if fmt == "coreml" and sys.platform != "darwin":
            report["skipped"] = (
                "Core ML runs models only on macOS: conversion and spec validation ran here; run the same "
                "export on a Mac for the parity check"
            )
            log.warning("parity skipped: %s", report["skipped"])
        else:
            exported = bundle.load_bundle(tmp)  # the loader users call, on the files just written
            chunk = 16 if tiling else min(len(images), 16)  # tiled: tiles per batch
            for batch in (1, chunk) if fmt != "coreml" else (1,):
                got = scored(exported, batch)
                report["batches"][str(batch)] = check_parity(
                    view(reference), view(got), tolerance, precision, task.name, threshold_of(spec)
                )
        # None: not checked (Core ML off macOS), which is not the same as passed.
        report["passed"] = all(b["passed"] for b in report["batches"].values()) if report["batches"] else None
        with open(os.path.join(tmp, "parity.json"), "w") as f:
            json.dump(report, f, indent=2)
        if report["passed"] is False:
            worst = ", ".join(
                f"batch {b}: top-1 agreement {r['top1_agreement']:.4f}, max |Δp| {r['max_abs_diff']:.2e}"
                for b, r in report["batches"].items()
            )
            allowed = AGREEMENT[task.name] if precision == "fp32" else 1
            raise UserError(
                f"the {fmt} {precision} export does not reproduce the checkpoint on {len(images)} images "
                f"({worst}; allowed: agreement {allowed}, max |Δp| {tolerance:.0e}), so it was not written"
            )
    for batch, r in report["batches"].items():
        log.info(
            "parity at batch %s on %d images: top-1 agreement %.4f, max |Δp| %.2e (tolerance %.0e)",
            batch,
            len(images),
            r["top1_agreement"],
            r["max_abs_diff"],
            tolerance,
        )
    log.info("bundle written to %s", out)
    if cfg.register:
        from train.registry import register

        register(out, str(cfg.register), cfg.mlflow.tracking_uri, meta, report)
    return report


def _source(ckpt_path: str, meta: dict, index: str) -> dict:
    """Where the bundle came from, for an auditor: the checkpoint file and its lineage."""
    lineage = meta["lineage"]
    return {
        "checkpoint": os.path.abspath(ckpt_path),
        "checkpoint_sha256": file_sha256(ckpt_path),
        "dataset": lineage["dataset"],
        "code_version": lineage["code_version"],
        "evaluation": meta.get("evaluation"),
        "exported_with": {"torch": torch.__version__},
    }


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    run_cli(export, cfg)


if __name__ == "__main__":
    main()
