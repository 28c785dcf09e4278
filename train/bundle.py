"""An export bundle: a model file plus `preprocess.json`, everything an edge box needs to score
images as the checkpoint did, and `load_bundle`, which runs one with the same `predict` API.

    out/model.onnx | model.pt | model.mlpackage
    out/preprocess.json    how to turn an image into the model's input, what the output means,
                           the classes and the defect decision (below)
    out/parity.json        how closely the export reproduced the checkpoint, on real images

The model takes the preprocessed image itself: uint8 RGB pixels (N, 3, S, S), or an RGB image
for Core ML; normalisation and softmax (a sigmoid per class for multi-label) run inside, so the
output is probabilities: (N, C), or per pixel (N, C, S, S) for segmentation (for anomaly the
raw anomaly map (N, 1, S, S), calibrated outside the graph with preprocess.json's
`calibration`). The threshold travels as data in preprocess.json, never inside the graph.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from data import jpeg
from data.errors import UserError
from train import tasks
from train.network import ModelSpec
from train.predict import predict

FORMAT = "shardtrain.bundle"
FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "coreml": "model.mlpackage"}
PREPROCESS = "preprocess.json"


def describe(spec: ModelSpec, fmt: str, precision: str, source: dict) -> dict:
    """preprocess.json: enough for someone with only this file and an image library to feed
    the model exactly as training evaluated."""
    resize = int(spec.image_size / spec.crop_pct)  # math.floor, as data.transforms.EvalTransform
    task = tasks.of(spec)
    if spec.tiles:
        geometry = [tile_op(spec)]
    elif task.eval_fit == "stretch":
        geometry = [
            {
                "op": "resize",
                "size": [spec.image_size, spec.image_size],
                "interpolation": "bilinear",
                "antialias": True,
                "note": "the whole image, aspect ratio not kept: the output maps back onto every pixel",
            }
        ]
    else:
        geometry = [
            {
                "op": "resize_short_side",
                "size": resize,
                "long_side": "floor(size * long / short)",
                "interpolation": "bilinear",
                "antialias": True,
            },
            {
                "op": "center_crop",
                "size": [spec.image_size, spec.image_size],
                "offset": "round((side - size) / 2)",
            },
        ]
    return {
        "format": FORMAT,
        "version": 1,
        "model": {"file": FILES[fmt], "format": fmt, "precision": precision, "backbone": spec.backbone},
        "input": {
            "name": "images",
            "type": "image (RGB)" if fmt == "coreml" else "uint8",
            "layout": "NCHW",
            "shape": ["batch", 3, spec.image_size, spec.image_size],
            "channel_order": "RGB",
            "range": [0, 255],
        },
        "preprocess": [
            {
                "op": "decode",
                "to": "RGB, 8 bits per channel (grey and palette images converted); EXIF orientation is "
                "not applied, as in training",
                "decoder": f"JPEG: {jpeg.DECODER}; Pillow, OpenCV and torchvision decode to the same "
                "pixels with their defaults. Other formats, and CMYK JPEGs: Pillow",
                "jpeg_scale": "a JPEG whose short side is at least 2 x the resize size is decoded at the "
                "smallest DCT scale (1/2, 1/4, 1/8) that keeps the short side >= that size (libjpeg "
                "scale_denom, PIL Image.draft, OpenCV IMREAD_REDUCED_COLOR_N), as training did",
                "high_bit_depth": "a 16-bit PNG or TIFF (mono or RGB; alpha dropped) is read at full depth "
                "(OpenCV IMREAD_UNCHANGED; PIL drops 16-bit RGB's low byte) and scaled to 8 bits as "
                "floor((value * 510 + M) / (2 * M)), M = 2^bit_depth - 1 (value * 255 / M rounded half up); "
                "bit_depth: this file's key, else the image's own (a PNG's sBIT chunk, else 16)",
            },
            *geometry,
        ],
        "image_size": spec.image_size,
        "crop_pct": spec.crop_pct,
        **({"tiles": spec.tiles} if spec.tiles else {}),
        **({"bit_depth": spec.bit_depth} if spec.bit_depth else {}),
        "normalize": {
            "mean": list(spec.mean),
            "std": list(spec.std),
            "scale": "pixel / 255",
            "where": "inside the model: feed raw pixels",
        },
        "output": OUTPUTS[task.name](spec),
        "task": {"name": task.name, "good": spec.good, "options": spec.options},
        "classes": list(spec.classes),
        "decision": spec.extra.get("decision"),
        **({"calibration": spec.extra["calibration"]} if "calibration" in spec.extra else {}),
        "decision_rule": RULES[task.name],
        "source": source,
    }


def tile_op(spec: ModelSpec) -> dict:
    """How a model trained on tiles sees a whole image (train/tiled.py), for a reader without us."""
    t, o = spec.tiles["size"], spec.tiles["overlap"]
    return {
        "op": "tile",
        "size": [t, t],
        "overlap": o,
        "grid": f"per axis of length L: starts k * {t - o} for k = 0 .. ceil((L - {o}) / {t - o}) - 1, each "
        f"clamped to L - {t} (the last tile flush with the far edge); L <= {t}: one tile at 0, zero-padded",
        "then": f"each tile resized (bilinear, antialiased) to {spec.image_size} x {spec.image_size}"
        if t != spec.image_size
        else "each tile is the model's input",
        "stitch": "per-pixel outputs resized back to the tile (bilinear), overlaps averaged; per-image "
        "outputs: the part takes its strongest tile (the one least likely good)",
    }


OUTPUTS = {
    "classify": lambda s: {
        "name": "probs",
        "shape": ["batch", len(s.classes)],
        "meaning": "softmax probabilities",
    },
    "multilabel": lambda s: {
        "name": "probs",
        "shape": ["batch", len(s.classes)],
        "meaning": "a sigmoid probability per class, independently",
    },
    "segment": lambda s: {
        "name": "probs",
        "shape": ["batch", len(s.classes), s.image_size, s.image_size],
        "meaning": "softmax probabilities per pixel; resize them (bilinear) to the image's own size, then "
        "the mask is their argmax (class indices, 0 the good class)",
    },
    "anomaly": lambda s: {
        "name": "probs",
        "shape": ["batch", 1, s.image_size, s.image_size],
        "meaning": "the raw anomaly map, on the method's own scale (task.options.method): calibrate it with "
        "calibration.q as raw / (raw + q), then resize it (bilinear) to the image's own size",
    },
}
RULES = {
    "classify": "defect_score = the sum of the probabilities of decision.defect_classes; stop the part when "
    "defect_score >= decision.threshold (0.5 without a decision)",
    "multilabel": "defect_score = the largest probability of decision.defect_classes; stop the part when "
    "defect_score >= decision.threshold (0.5 without a decision); a label is on at or above "
    "decision.labels[label] (task.options.threshold without a decision)",
    "segment": "defect_map = the per-pixel sum of the probabilities of decision.defect_classes, at the "
    "image's own size; defect_score = the largest t such that {defect_map >= t} has an 8-connected region of "
    "at least task.options.min_area pixels; stop the part when defect_score >= decision.threshold (0.5 "
    "without a decision)",
    "anomaly": "raw_score = the maximum of the raw map at the model's input size; defect_score = raw_score / "
    "(raw_score + calibration.q) (q: the calibration quantile of good validation parts' raw scores, so 0.5 "
    "is "
    "that quantile); stop the part when defect_score >= decision.threshold (0.5 without a decision); the "
    "anomaly map is raw / (raw + q) per pixel",
}


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch >= 2.10 warns at every TorchScript call that it is deprecated; export says it once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def spec_of(info: dict) -> ModelSpec:
    n = info["normalize"]
    extra = {k: info[k] for k in ("decision", "calibration") if info.get(k)}
    task = info.get("task") or {"name": "classify"}  # bundles written before tasks classify
    return ModelSpec(
        info["model"]["backbone"],
        tuple(info["classes"]),
        info["image_size"],
        info["crop_pct"],
        tuple(n["mean"]),
        tuple(n["std"]),
        extra,
        task["name"],
        task.get("good"),
        task.get("options") or {},
        info.get("tiles") or {},
        info.get("bit_depth"),  # bundles written before it: each image's own depth
    )


class BundleModel:
    """An exported bundle with the `predict` of a checkpoint's `Network`; calling it on a
    uint8 batch (N, 3, S, S) gives probabilities (N, C) (or (N, C, S, S)) as a numpy array."""

    def __init__(self, directory: str, info: dict, run: Callable[[torch.Tensor], np.ndarray]):
        self.directory, self.info, self._run = directory, info, run
        self.spec = spec_of(info)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self._run(images)

    def predict(self, images, batch_size: int = 32) -> list[dict] | dict:
        """See `train.predict.predict`: paths, bytes, PIL images, arrays (uint16 too) or uint8 tensors in."""
        return predict(images, self.spec, self._run, batch_size)

    def __repr__(self) -> str:
        return f"BundleModel({self.directory!r}, {self.info['model']['format']})"


def load_bundle(path: str, device: str | torch.device = "cpu") -> BundleModel:
    directory = os.path.dirname(path) if os.path.basename(path) == PREPROCESS else path
    registered = os.path.isfile(os.path.join(directory, "MLmodel"))  # a registry's pyfunc (train/served.py)
    if registered and not os.path.isfile(os.path.join(directory, PREPROCESS)):
        directory = os.path.join(directory, "artifacts", "bundle")
    described = os.path.join(directory, PREPROCESS)
    if not os.path.isfile(described):
        raise UserError(
            f"{directory}: no {PREPROCESS}, so not an export bundle (make one with python -m train.export)"
        )
    with open(described) as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise UserError(f"{described}: not a shardtrain bundle description (format {info.get('format')!r})")
    fmt = info["model"]["format"]
    model_file = os.path.join(directory, info["model"]["file"])
    if fmt == "onnx":
        return BundleModel(directory, info, _onnx_runner(model_file, str(device)))
    if fmt == "torchscript":
        with quiet_torchscript():
            module = torch.jit.load(model_file, map_location=device).eval()

        def run(images: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return module(images.to(device)).float().cpu().numpy()

        return BundleModel(directory, info, run)
    if fmt == "coreml":
        return BundleModel(directory, info, _coreml_runner(model_file))
    raise UserError(f"{described}: unknown model format {fmt!r}")


def _onnx_runner(model_file: str, device: str) -> Callable[[torch.Tensor], np.ndarray]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("an ONNX bundle runs with onnxruntime: pip install onnxruntime") from None
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(model_file, providers=providers)

    def run(images: torch.Tensor) -> np.ndarray:
        return session.run(["probs"], {"images": images.cpu().numpy()})[0]

    return run


def _coreml_runner(model_file: str) -> Callable[[torch.Tensor], np.ndarray]:
    if sys.platform != "darwin":
        raise UserError(
            f"{model_file}: Core ML runs models only on macOS (and iOS); on Linux a Core ML bundle can be "
            "converted and validated, not run"
        )
    import coremltools as ct
    from PIL import Image

    model = ct.models.MLModel(model_file)

    def run(images: torch.Tensor) -> np.ndarray:
        # The model takes one RGB image at a time, as Vision feeds it on a device.
        rows = []
        for image in images:
            pixels = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
            rows.append(np.asarray(model.predict({"images": pixels})["probs"]).reshape(-1))
        return np.stack(rows)

    return run
