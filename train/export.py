"""`python -m train.export ckpt=PATH format=onnx|torchscript|coreml out=DIR`: a deployable bundle
(see train/bundle.py), checked against the checkpoint on real images before it is published.

    checkpoint ──▶ Probabilities (uint8 in, softmax out) ──▶ model file (ONNX: dynamic batch,
    checked by onnx.checker; TorchScript: traced; Core ML: mlprogram, spec validated)
          │                                                     │
    real images of the data set (eval transform) ──▶ both ──▶ parity.json ──▶ published, or refused

A bundle whose parity fails is not published: the command exits 2 with the figures.
`register=NAME` also makes the bundle the next version of an MLflow registered model (a pyfunc
that `mlflow models serve` serves), and `alias=champion` points the alias at it when its
evaluation met its target and parity passed.
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
from train.parity import (
    AGREEMENT,
    INT8_AGREEMENT,
    TOLERANCE,
    WHOLE_PARTS,
    calibration_images,
    check_parity,
    parity_images,
)
from train.quantize import escape_gate, quantize
from train.tiled import cut, of_part, tiled

log = logging.getLogger("train")


class Probabilities(nn.Module):
    """The exported function: preprocessed pixels (N, 3, S, S), uint8 or float 0..255 →
    probabilities, float32: (N, C), or (N, C, S, S) per pixel. Normalisation and softmax (or
    sigmoid) inside, so no runtime forgets them."""

    def __init__(self, net: Network):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.probabilities(images)


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
    if cfg.alias:  # before anything is written: a refused alias publishes nothing
        from train.registry import alias_refusal

        refusal = alias_refusal(meta, fmt, sys.platform)
        if refusal:
            raise UserError(f"alias={cfg.alias}: {refusal}")
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
    int8_onnx = precision == "int8" and fmt == "onnx"
    calibration = calibration_images(index, cfg.calibration, spec, task.eval_fit) if int8_onnx else None

    with published(out) as tmp:
        path = os.path.join(tmp, bundle.FILES[fmt])
        try:
            if int8_onnx:  # fp32 first, then quantized into the bundle's file
                checks = convert(model, fmt, f"{path}.fp32", example)
                checks["int8"] = quantize(f"{path}.fp32", path, calibration)
                os.remove(f"{path}.fp32")
            else:
                checks = convert(model, fmt, path, example, int8_weights=precision == "int8")
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
                "max_abs_diff": tolerance if precision != "int8" else None,  # int8: decisions only
                "top1_agreement": {
                    "fp32": AGREEMENT[task.name],
                    "fp16": "1.0 but for near-ties (top two within 2 x tolerance)",
                    "int8": INT8_AGREEMENT,
                }[precision],
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
        if int8_onnx and report["passed"]:  # decisions agree: does the line's escape rate hold?
            report["escape"] = escape_gate(tmp, meta, _evaluated_on(meta, index))
            report["passed"] = report["escape"] is None or report["escape"]["passed"]
        with open(os.path.join(tmp, "parity.json"), "w") as f:
            json.dump(report, f, indent=2)
        if cfg.triton and report["passed"]:  # published with the bundle, whole, or not at all
            from train.triton import write_repository

            write_repository(tmp, os.path.join(tmp, "triton"), str(cfg.triton), list(spec.classes))
            report["triton"] = os.path.join(out, "triton", str(cfg.triton))
        if report["passed"] is False:
            worst = ", ".join(
                f"batch {b}: top-1 agreement {r['top1_agreement']:.4f}, max |Δp| {r['max_abs_diff']:.2e}"
                for b, r in report["batches"].items()
            )
            allowed = {"fp32": AGREEMENT[task.name], "fp16": 1, "int8": INT8_AGREEMENT}[precision]
            escape = report.get("escape")
            if escape and not escape["passed"]:
                worst += (
                    f"; escape rate at the threshold {escape['threshold']:.4f} on split {escape['split']}: "
                    f"{escape['escape_rate_int8']:.4f}, above the checkpoint's 95% bound "
                    f"{escape['escape_rate_fp32_upper95']:.4f}"
                )
            raise UserError(
                f"the {fmt} {precision} export does not reproduce the checkpoint on {len(images)} images "
                f"({worst}; allowed: agreement {allowed}, max |Δp| {tolerance:.0e}), so it was not written"
                + (" (export in fp16 or fp32)" if precision == "int8" else "")
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

        register(out, str(cfg.register), cfg.mlflow.tracking_uri, meta, report, cfg.alias and str(cfg.alias))
    return report


def _evaluated_on(meta: dict, index: str) -> str:
    """The data set evaluation chose the threshold on (its escape figures are of that split)."""
    return ((meta.get("evaluation") or {}).get("dataset") or {}).get("index") or index


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
