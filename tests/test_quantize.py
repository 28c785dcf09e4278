"""precision=int8 (train/quantize.py): an int8 bundle is published only when the line's decisions
survive quantization."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.errors import UserError
from tests.test_export import export_cfg, model_ckpt, val_images  # noqa: F401 (fixtures)
from train import load_model
from train.export import export


def test_int8_onnx_keeps_the_decisions_and_the_escape_rate(model_ckpt, val_images, tmp_path):  # noqa: F811
    import onnx

    report = export(export_cfg(model_ckpt, tmp_path / "int8", "format=onnx", "precision=int8"))
    fp32 = export(export_cfg(model_ckpt, tmp_path / "fp32", "format=onnx"))
    assert report["passed"] is True and report["precision"] == "int8"
    q = report["checks"]["int8"]
    assert "Conv" in q["quantized_ops"] and q["calibration_images"] == 180  # the whole train split
    for batch in report["batches"].values():
        assert batch["top1_agreement"] >= 0.99
    escape = report["escape"]
    assert escape["split"] == "val" and escape["passed"] and escape["defect_parts"] > 0
    assert escape["escape_rate_int8"] <= escape["escape_rate_fp32_upper95"]
    graph = onnx.load(tmp_path / "int8" / "model.onnx").graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < (
        tmp_path / "fp32" / "model.onnx"
    ).stat().st_size
    assert fp32["passed"] is True
    info = json.loads((tmp_path / "int8" / "preprocess.json").read_text())
    assert info["model"]["precision"] == "int8" and info["decision"]["threshold"] > 0
    int8, checkpoint = load_model(str(tmp_path / "int8")), load_model(model_ckpt)
    ours, theirs = checkpoint.predict(val_images), int8.predict(val_images)
    agree = sum(a["label"] == b["label"] for a, b in zip(ours, theirs)) / len(ours)
    assert agree >= 0.95  # every val image, through predict: the parity images are 24 of them


def test_a_miscalibrated_int8_model_is_refused_and_nothing_is_written(model_ckpt, tmp_path, monkeypatch):  # noqa: F811
    """Calibrated on black images, every activation range is empty: the int8 model's decisions
    no longer follow the checkpoint's, and the gate refuses it."""
    from train import export as export_module

    def black(index, calibration, spec, fit):
        return torch.zeros(64, 3, spec.image_size, spec.image_size, dtype=torch.uint8)

    monkeypatch.setattr(export_module, "calibration_images", black)
    with pytest.raises(
        UserError, match=r"the onnx int8 export does not reproduce the checkpoint.*export in fp16 or fp32"
    ):
        export(export_cfg(model_ckpt, tmp_path / "bad", "format=onnx", "precision=int8"))
    assert not (tmp_path / "bad").exists()


def test_too_few_images_and_a_graph_without_compute_ops_are_refused(tmp_path):
    from train.quantize import quantize

    class Scale(torch.nn.Module):  # uint8 in, float out, nothing onnxruntime quantizes
        def forward(self, x):
            return torch.relu(x.float() / 255 - 0.5)

    path = str(tmp_path / "scale.onnx")
    example = (torch.zeros(2, 3, 8, 8, dtype=torch.uint8),)
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    torch.onnx.export(Scale(), example, path, dynamo=True, input_names=["images"], dynamic_shapes=batch)
    images = torch.randint(0, 255, (40, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(UserError, match="calibrates on 20 images, fewer than 32"):
        quantize(path, str(tmp_path / "q.onnx"), images[:20])
    with pytest.raises(
        UserError, match=r"quantizes none of this model's compute ops \(its ops: .*Relu.*precision=fp32"
    ):
        quantize(path, str(tmp_path / "q.onnx"), images)
    assert not (tmp_path / "q.onnx").exists()


def test_int8_settings_are_checked_before_anything_runs(tmp_path):
    from train import settings

    with pytest.raises(UserError, match=r"precision=int8: int8 is for format=onnx"):
        settings.check(export_cfg("a.ckpt", tmp_path / "b", "format=torchscript", "precision=int8"), "export")
    with pytest.raises(UserError, match=r"calibration\.samples=8: must be an integer >= 32"):
        settings.check(
            export_cfg("a.ckpt", tmp_path / "b", "precision=int8", "calibration.samples=8"), "export"
        )


def _evaluated(tmp_path, index: str, *overrides: str) -> str:
    from tests.test_tasks import _train
    from train.cli import compose
    from train.evaluate import evaluate

    ckpt = _train(tmp_path, index, *overrides)
    base = ["trainer=cpu", "trainer.enable_progress_bar=false", "data.batch_size=16", "data.num_workers=0"]
    evaluate(compose("evaluate", f"ckpt={ckpt}", f"out={tmp_path}/eval", *base))
    return f"{tmp_path}/eval/model.ckpt"


def test_int8_multilabel_is_judged_on_each_label_and_predicts_as_the_checkpoint(tmp_path):
    from data.sources import from_synthetic
    from data.write import write_dataset
    from tests.test_tasks import _val_images

    items = from_synthetic(240, seed=3, size=48, multi=0.5)
    index = write_dataset(items, str(tmp_path / "multi"), val_fraction=0.25, shard_samples=50, workers=1)
    index = index.index.location
    evaluated = _evaluated(tmp_path, index, "task=multilabel")
    report = export(export_cfg(evaluated, tmp_path / "int8", "precision=int8"))
    assert report["passed"] is True and "Conv" in report["checks"]["int8"]["quantized_ops"]
    for batch in report["batches"].values():  # each of 5 labels of 24 images
        assert batch["top1_agreement"] >= 0.99
    images = _val_images(index, 12)
    ours = load_model(evaluated).predict(images)
    theirs = load_model(str(tmp_path / "int8")).predict(images)
    assert np.mean([a["labels"] == b["labels"] for a, b in zip(ours, theirs)]) >= 0.9


def test_int8_segmentation_is_judged_on_every_pixel(tmp_path, tiny_index):
    """A segmenter is judged on each pixel's class. This one trained 2 epochs and is unsure of
    most of its pixels (about 30% have their top two classes within 0.05). About 3% of its
    pixels flip in int8, all of them near-ties, so the gate refuses it and writes nothing."""
    evaluated = _evaluated(tmp_path, tiny_index, "task=segment", "task.decoder_channels=[16,16,16,8,8]")
    with pytest.raises(UserError, match=r"int8 export does not reproduce .* top-1 agreement 0\.9[0-8]\d\d"):
        export(export_cfg(evaluated, tmp_path / "int8", "precision=int8"))
    assert not (tmp_path / "int8").exists()


def test_coreml_int8_stores_int8_weights_and_validates(model_ckpt, tmp_path):  # noqa: F811
    import coremltools as ct

    report = export(
        export_cfg(model_ckpt, tmp_path / "ml8", "format=coreml", "precision=int8", "parity.samples=8")
    )
    assert report["checks"]["coreml_spec"].startswith("valid mlprogram") and report["precision"] == "int8"
    spec = ct.models.MLModel(str(tmp_path / "ml8" / "model.mlpackage"), skip_model_load=True).get_spec()
    ops = [
        op.type
        for f in spec.mlProgram.functions.values()
        for b in f.block_specializations.values()
        for op in b.operations
    ]
    assert ops.count("constexpr_affine_dequantize") >= 5  # each large conv's weights: int8 and a scale
    weights = tmp_path / "ml8" / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    fp32 = export(export_cfg(model_ckpt, tmp_path / "ml32", "format=coreml", "parity.samples=8"))
    assert fp32["precision"] == "fp32"
    full = tmp_path / "ml32" / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    assert weights.stat().st_size < 0.6 * full.stat().st_size
