"""`python -m train.export`: bundles that score real images as the checkpoint does."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.errors import UserError
from data.index import load_index
from data.samples import read_shard
from data.transforms import EvalTransform
from train import evaluate_checkpoint, export_bundle, load_model
from train.cli import compose
from train.export import check_parity, export


@pytest.fixture(scope="module")
def model_ckpt(trained, tmp_path_factory) -> str:
    """The evaluated model.ckpt (weights + defect threshold) of the session's trained checkpoint."""
    out = tmp_path_factory.mktemp("evaluated") / "report"
    evaluate_checkpoint(trained, str(out), "trainer=cpu", "data.num_workers=0")  # the notebook call
    return str(out / "model.ckpt")


@pytest.fixture(scope="module")
def val_images(tiny_index) -> list[bytes]:
    index = load_index(tiny_index)
    return [s["jpg"] for shard in index.split("val").shards for s in read_shard(index.shard_url(shard))]


def export_cfg(ckpt: str, out, *overrides: str):
    return compose("export", f"ckpt={ckpt}", f"out={out}", "parity.samples=24", *overrides)


@pytest.fixture(scope="module")
def onnx_bundle(model_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "bundle"
    cmd = [sys.executable, "-m", "train.export", f"ckpt={model_ckpt}", "format=onnx", f"out={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "parity at batch 16 on 60 images: top-1 agreement 1.0000" in run.stdout
    return out


def test_onnx_bundle_has_dynamic_batch_and_passes_parity(onnx_bundle):
    import onnx

    assert sorted(p.name for p in onnx_bundle.iterdir()) == ["model.onnx", "parity.json", "preprocess.json"]
    parity = json.loads((onnx_bundle / "parity.json").read_text())
    assert (
        parity["passed"] and parity["images"] == 60 and parity["checks"]["onnx_checker"].startswith("passed")
    )
    for batch in ("1", "16"):
        assert parity["batches"][batch]["top1_agreement"] == 1.0
        assert parity["batches"][batch]["max_abs_diff"] <= 1e-4 == parity["tolerance"]["max_abs_diff"]
    (graph_input,) = onnx.load(onnx_bundle / "model.onnx").graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_bundle_predicts_like_the_checkpoint_with_its_threshold(onnx_bundle, model_ckpt, val_images):
    bundle, checkpoint = load_model(str(onnx_bundle)), load_model(model_ckpt)
    images = [Image.open(io.BytesIO(b)) for b in val_images]
    ours, theirs = checkpoint.predict(images), bundle.predict(images)
    assert [r["label"] for r in theirs] == [r["label"] for r in ours]
    assert max(abs(a["defect_score"] - b["defect_score"]) for a, b in zip(ours, theirs)) < 1e-5
    # The threshold is one of these very images' scores: a part that sits on it is a tie that the
    # last bit of float arithmetic decides, and may go either way; every other decision agrees.
    threshold = checkpoint.spec.extra["decision"]["threshold"]
    decided = [
        (a["defect"], b["defect"]) for a, b in zip(ours, theirs) if abs(a["defect_score"] - threshold) > 1e-5
    ]
    assert len(decided) >= len(ours) - 1 and all(a == b for a, b in decided)
    info = json.loads((onnx_bundle / "preprocess.json").read_text())
    assert info["decision"] == checkpoint.spec.extra["decision"] and info["classes"] == list(
        checkpoint.spec.classes
    )
    assert bundle.spec == checkpoint.spec  # so the bundle's preprocessing is the checkpoint's
    assert info["source"]["evaluation"]["defect"]["threshold"] == info["decision"]["threshold"]


def follow_preprocess_json(data: bytes, steps: list[dict]) -> torch.Tensor:
    """What an edge engineer writes from preprocess.json with PIL alone."""
    _, resize, crop = steps
    im = Image.open(io.BytesIO(data))
    short = min(im.size)
    if im.format == "JPEG" and short >= 2 * resize["size"]:  # decode["jpeg_scale"]
        spare = short / resize["size"]
        im.draft("RGB", (math.ceil(im.width / spare), math.ceil(im.height / spare)))
    im = im.convert("RGB")
    scale = resize["size"] / min(im.size)
    w, h = (
        (resize["size"], int(im.height * scale))
        if im.width <= im.height
        else (int(im.width * scale), resize["size"])
    )
    im = im.resize((w, h), Image.BILINEAR)  # PIL's bilinear is antialiased when it shrinks
    side = crop["size"][0]
    left, top = round((w - side) / 2), round((h - side) / 2)
    return torch.from_numpy(np.asarray(im.crop((left, top, left + side, top + side)))).permute(2, 0, 1)


def test_preprocess_json_alone_reproduces_the_preprocessing(onnx_bundle, model_ckpt, val_images):
    info = json.loads((onnx_bundle / "preprocess.json").read_text())
    assert info["preprocess"][0]["decoder"].startswith("JPEG: simplejpeg")  # which decoder trained it
    spec = load_model(model_ckpt).spec
    ours = EvalTransform(spec.image_size, spec.crop_pct)
    rng = np.random.default_rng(0)
    images = list(val_images[:5])  # 48 px JPEGs: no DCT scaling
    for size, fmt in [((400, 300), "JPEG"), ((130, 97), "JPEG"), ((300, 400), "JPEG"), ((200, 150), "PNG")]:
        smooth = rng.integers(0, 256, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(smooth).resize(size, Image.BICUBIC).save(buffer, fmt)
        images.append(buffer.getvalue())
    for data in images:
        theirs = follow_preprocess_json(data, info["preprocess"])
        assert theirs.shape == (3, spec.image_size, spec.image_size)
        diff = (ours(data).int() - theirs.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.5  # rounding, not a different image


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torchscript_parity(model_ckpt, tmp_path, precision, val_images):
    report = export(export_cfg(model_ckpt, tmp_path / "ts", "format=torchscript", f"precision={precision}"))
    assert report["passed"] and report["precision"] == precision
    tolerance = {"fp32": 1e-4, "fp16": 1e-2}[precision]
    assert report["tolerance"]["max_abs_diff"] == tolerance
    assert all(b["max_abs_diff"] <= tolerance for b in report["batches"].values())
    scripted = torch.jit.load(tmp_path / "ts" / "model.pt")
    x = torch.stack([EvalTransform(32)(b) for b in val_images[:3]])
    probs = scripted(x)
    assert probs.shape == (3, 5) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-3)


def test_coreml_converts_and_validates_and_parity_waits_for_a_mac(model_ckpt, tmp_path):
    pytest.importorskip("coremltools")
    report = export_bundle(model_ckpt, "coreml", str(tmp_path / "ml"), "parity.samples=8")  # from a notebook
    assert report["checks"]["coreml_spec"].startswith("valid mlprogram")
    assert (tmp_path / "ml" / "model.mlpackage" / "Manifest.json").is_file()
    if sys.platform != "darwin":
        assert "only on macOS" in report["skipped"] and not report["batches"]
        assert report["passed"] is None  # not checked is not passed
        with pytest.raises(UserError, match="Core ML runs models only on macOS"):
            load_model(str(tmp_path / "ml"))
    else:
        assert report["passed"]


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_registry_round_trip(model_ckpt, tmp_path, val_images, monkeypatch, request, store):
    import mlflow

    # A local database, or a real MLflow server over HTTP with artifacts proxied through it.
    uri = f"sqlite:///{tmp_path}/registry.db"
    if store == "server":
        uri = request.getfixturevalue("mlflow_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as a deployment job finds the registry
    name = f"surface-inspection-{tmp_path.name}"  # a server outlives the test: a name of its own
    for n in range(2):
        export(export_cfg(model_ckpt, tmp_path / f"b{n}", "format=torchscript", f"register={name}"))
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    v = client.get_model_version(name, "2")
    threshold = load_model(model_ckpt).spec.extra["decision"]["threshold"]
    assert float(v.tags["threshold"]) == threshold and v.tags["format"] == "torchscript"
    metrics = client.get_run(v.run_id).data.metrics
    assert metrics["parity/batch1/top1_agreement"] == 1.0 and "defect/escape_rate" in metrics
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/2", dst_path=str(tmp_path / "dl")
    )
    images = [Image.open(io.BytesIO(b)) for b in val_images[:8]]
    fetched = load_model(local).predict(images)
    assert [r["label"] for r in fetched] == [r["label"] for r in load_model(model_ckpt).predict(images)]


def test_fp32_parity_excuses_no_disagreement_and_fp16_only_near_ties():
    reference = np.array([[0.50005, 0.49995], [0.9, 0.1]])
    flipped = np.array([[0.49995, 0.50005], [0.9, 0.1]])  # within 1e-4, but the top-1 changed
    fp32 = check_parity(reference, flipped, 1e-4, "fp32")
    assert not fp32["passed"] and fp32["top1_agreement"] == 0.5
    fp16 = check_parity(reference, flipped, 1e-2, "fp16")
    assert fp16["passed"] and fp16["near_ties_excused"] == 1
    decided = np.array([[0.7, 0.3]])
    assert not check_parity(decided, decided[:, ::-1], 1e-2, "fp16")["passed"]  # no tie: a real flip


def test_a_failed_parity_publishes_nothing(model_ckpt, tmp_path):
    with pytest.raises(UserError, match=r"does not reproduce the checkpoint on 24 images \(batch 1: top-1"):
        export(export_cfg(model_ckpt, tmp_path / "b", "format=torchscript", "parity.tolerance=1e-30"))
    assert list(tmp_path.iterdir()) == []


def test_a_converter_failure_names_the_versions_and_publishes_nothing(model_ckpt, tmp_path, monkeypatch):
    # What a torch upgrade does to a converter, which cannot be installed here to happen for real.
    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::_new_op")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with pytest.raises(
        UserError,
        match=re.escape(f"conversion failed with torch {torch.__version__}: RuntimeError: Unsupported"),
    ):
        export(export_cfg(model_ckpt, tmp_path / "b", "format=torchscript"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("format=tflite", "format=tflite: must be one of onnx, torchscript, coreml"),
        ("precision=int4", "precision=int4: must be one of fp32, fp16, int8"),
        ("data.index=/nowhere", "/nowhere"),
    ],
)
def test_bad_input_gets_one_message(model_ckpt, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        export(export_cfg(model_ckpt, tmp_path / "b", override))
    assert not (tmp_path / "b").exists()


def test_a_triton_repository_matches_its_onnx_graph(model_ckpt, tmp_path):
    """triton=NAME: config.pbtxt names the graph's own input and output, with their types and
    dims after a dynamic batch, and a label file for the classes; the repository holds the same
    model file as the bundle."""
    import onnx

    report = export(export_cfg(model_ckpt, tmp_path / "b", "format=onnx", "triton=inspect"))
    repo = tmp_path / "b" / "triton" / "inspect"
    assert report["triton"] == str(repo)
    assert (repo / "1" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    graph = onnx.load(repo / "1" / "model.onnx").graph
    text = (repo / "config.pbtxt").read_text()
    kinds = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}
    blocks = dict(re.findall(r"(input|output) \[\s*\{(.*?)\}\s*\]", text, re.S))
    for kind, tensor in (("input", graph.input[0]), ("output", graph.output[0])):
        block = blocks[kind]
        dims = [d.dim_value for d in tensor.type.tensor_type.shape.dim]
        assert tensor.type.tensor_type.shape.dim[0].dim_param  # the batch: dynamic in the graph
        assert (
            f'name: "{tensor.name}"' in block
            and f"data_type: {kinds[tensor.type.tensor_type.elem_type]}" in block
        )
        assert f"dims: [ {', '.join(map(str, dims[1:]))} ]" in block
    assert 'platform: "onnxruntime_onnx"' in text and re.search(r"max_batch_size: [1-9]", text)
    assert "dynamic_batching" in text and 'label_filename: "labels.txt"' in blocks["output"]
    classes = json.loads((tmp_path / "b" / "preprocess.json").read_text())["classes"]
    assert (repo / "labels.txt").read_text().splitlines() == classes
