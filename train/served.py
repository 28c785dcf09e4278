"""A bundle as an MLflow pyfunc model, so MLflow's own server serves it:

    python -m train.export ckpt=eval/qs/model.ckpt format=onnx register=inspection alias=champion
    MLFLOW_TRACKING_URI=... mlflow models serve -m models:/inspection@champion --env-manager local

The registered model's directory (MLflow's layout):

    MLmodel                    flavor python_function, the signature below
    served_model.py            the model as source (MLflow's "models from code"): loading runs
                               this readable file, and nothing is unpickled
    artifacts/bundle/          the export bundle itself (model file, preprocess.json, parity.json)

Signature. In: a column `image` of encoded image bytes (JPEG, PNG, TIFF; base64 in a JSON request,
as MLflow's scoring protocol carries binary columns). Out, one row per image:

    label          str     the predicted class (multilabel: the labels on, comma-joined; anomaly:
                           good or defect)
    score          float   the probability of `label` (multilabel: the highest; anomaly: defect_score)
    defect_score   float   the part's defect score, when the model knows its good class
    defect         bool    stop the part? (defect_score >= the threshold evaluation chose)
    probs          str     JSON: each class's probability (segment: its strongest region)
    labels         str     multilabel: JSON list of the labels on
    areas          str     segment: JSON, pixels of each defect class
    mask           str     segment: base64 PNG, one class index per pixel, at the image's size
    raw_score      float   anomaly: the uncalibrated map's maximum
    anomaly_map    str     anomaly: base64 16-bit PNG, the calibrated map × 65535, at the image's size
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np

BUNDLE = "bundle"  # the artifact key, and its folder under artifacts/
TASK_COLUMNS = {
    "classify": [],
    "multilabel": [("labels", "string")],
    "segment": [("areas", "string"), ("mask", "string")],
    "anomaly": [("raw_score", "double"), ("anomaly_map", "string")],
}
COMMON = [("label", "string"), ("score", "double"), ("defect_score", "double"), ("defect", "boolean")]


def columns(task: str) -> list[tuple[str, str]]:
    """The output columns of a task's model, (name, MLflow type)."""
    probs = [] if task == "anomaly" else [("probs", "string")]
    return COMMON + probs + TASK_COLUMNS[task]


def signature(task: str):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    optional = {"defect_score", "defect"}  # a model without a good class has no decision
    outputs = [ColSpec(kind, name, required=name not in optional) for name, kind in columns(task)]
    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema(outputs))


def row(result: dict, task: str, good: str | None) -> dict:
    """One `predict` result as the signature's row."""
    out: dict = {"defect_score": result.get("defect_score"), "defect": result.get("defect")}
    probs = result.get("probs") or {}
    if task == "multilabel":
        on = result["labels"]
        out |= {"label": ",".join(on) if on else (good or ""), "score": max(probs.values())}
        out["labels"] = json.dumps(on)
    elif task == "anomaly":
        out |= {"label": result["label"], "score": result["defect_score"], "raw_score": result["raw_score"]}
        heat = np.clip(np.rint(result["anomaly_map"] * 65535), 0, 65535).astype(np.uint16)
        out["anomaly_map"] = _png(heat)
    else:
        out |= {"label": result["label"], "score": probs[result["label"]]}
    if task == "segment":
        out |= {"areas": json.dumps(result["areas"]), "mask": _png(result["mask"])}
    if task != "anomaly":
        out["probs"] = json.dumps(probs)
    return out


def _png(array: np.ndarray) -> str:
    """base64 PNG of a (H, W) uint8 or uint16 array, lossless."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def save(bundle_dir: str, path: str, task: str, requirements: list[str]) -> None:
    """Write the pyfunc model of `bundle_dir` (a folder named `bundle`) to `path`."""
    import mlflow

    mlflow.pyfunc.save_model(
        path,
        python_model=os.path.join(os.path.dirname(__file__), "served_model.py"),
        artifacts={BUNDLE: bundle_dir},
        signature=signature(task),
        pip_requirements=requirements,  # given, so MLflow does not load the model to infer them
    )
