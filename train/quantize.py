"""`precision=int8`: post-training static quantization of an ONNX bundle with onnxruntime, and the
gate it must pass, on the decisions the line makes rather than on probabilities.

    model.onnx (fp32, as exported) ──quant_pre_process──▶ shapes inferred, graph folded
        ──quantize_static(QDQ, int8 weights per output channel, uint8 activations)──▶ model.onnx
    calibration: `calibration.samples` images of the train split through the model's own
                 preprocessing (its tiles, for a tiled model); activation ranges by MinMax
    the gate:    each decision agrees with the fp32 checkpoint's on >= 99% of the parity images
                 (the top class, each label, each pixel's class, each part's stop), and, where
                 the model carries a defect threshold, its escape rate at that threshold, on the
                 split evaluation chose it on, stays within the 95% upper bound of the
                 checkpoint's own (train/decision.py's Wilson bound)

An int8 bundle that fails the gate is not published (exit 2, with the figures).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import torch

from data.errors import UserError
from data.index import load_index
from data.samples import image_bytes, read_shard
from train.decision import wilson_upper

log = logging.getLogger("train")

MIN_CALIBRATION = 32  # images: fewer give activation ranges from too few samples to trust
AGREEMENT = 0.99  # share of decisions an int8 bundle must share with the fp32 checkpoint
# Ops whose int8 kernels carry a model's arithmetic; a graph with none of them quantized is fp32
# with extra conversions.
COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def quantize(fp32_path: str, out_path: str, calibration: torch.Tensor) -> dict:
    """Write the int8 model of `fp32_path` to `out_path`, calibrated on uint8 images (N, 3, S, S);
    returns which ops were quantized. Raises UserError when too few images are given or none of
    the model's compute ops could be."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) < MIN_CALIBRATION:
        raise UserError(
            f"precision=int8 calibrates on {len(calibration)} images, fewer than {MIN_CALIBRATION}: give a "
            "split with more (calibration.split=..., calibration.samples=256), or export in fp16 or fp32"
        )
    batches = [calibration[i : i + 16].numpy() for i in range(0, len(calibration), 16)]

    class Images(CalibrationDataReader):
        def __init__(self):
            self.left = iter(batches)

        def get_next(self):
            batch = next(self.left, None)
            return None if batch is None else {"images": batch}

    prepared = f"{out_path}.prepared.onnx"
    try:
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        quantize_static(
            prepared,
            out_path,
            Images(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)
    done, ops = _quantized_ops(onnx.load(out_path))
    if not done & COMPUTE:
        os.remove(out_path)
        raise UserError(
            "onnxruntime quantizes none of this model's compute ops (its ops: "
            f"{', '.join(sorted(ops))}): export it with precision=fp32 (or fp16)"
        )
    return {
        "method": "onnxruntime static, QDQ, per-channel int8 weights, uint8 activations, MinMax",
        "calibration_images": len(calibration),
        "quantized_ops": sorted(done),
        "left_in_float": sorted((ops & COMPUTE) - done),
    }


def _quantized_ops(model) -> tuple[set[str], set[str]]:
    """(op types fed by a DequantizeLinear, i.e. run on int8 values; every op type of the graph)."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    ops = Counter(
        n.op_type for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
    )
    done = {
        n.op_type for n in model.graph.node if n.op_type in ops and any(i in dequantized for i in n.input)
    }
    return done, set(ops)


def escape_gate(bundle_dir: str, meta: dict, index_url: str) -> dict | None:
    """The escape rate of the int8 bundle at the model's stored threshold, on the defect parts
    of the split evaluation chose it on, against the 95% upper bound of the checkpoint's rate
    there (from the evaluation the model carries); None when the model carries no threshold."""
    from train.bundle import load_bundle

    decision = meta["model"].get("extra", {}).get("decision")
    evaluation = meta.get("evaluation") or {}
    fp32 = evaluation.get("defect") or {}
    if not decision or "escape_rate_upper95" not in fp32:
        return None
    split = evaluation["dataset"]["split"]
    index = load_index(index_url)
    defects = set(decision["defect_classes"])
    model = load_bundle(bundle_dir)
    scores: list[float] = []
    batch: list[bytes] = []
    for shard in index.split(split).shards:
        for sample in read_shard(index.shard_url(shard)):
            if index.classes[index.labels(sample)] in defects:
                batch.append(image_bytes(sample))
            if len(batch) == 64:
                scores += [r["defect_score"] for r in model.predict(batch)]
                batch = []
    scores += [r["defect_score"] for r in model.predict(batch)] if batch else []
    threshold = float(decision["threshold"])
    escapes = int((np.asarray(scores) < threshold).sum())
    rate = escapes / max(1, len(scores))
    bound = float(fp32["escape_rate_upper95"])
    return {
        "split": split,
        "defect_parts": len(scores),
        "threshold": threshold,
        "escape_rate_int8": rate,
        "escape_rate_int8_upper95": wilson_upper(escapes, len(scores)),
        "escape_rate_fp32": fp32.get("escape_rate"),
        "escape_rate_fp32_upper95": bound,
        "passed": bool(rate <= bound),
    }
