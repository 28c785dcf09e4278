"""register=NAME alias=champion: a registered version that MLflow's own `mlflow models serve`
serves (train/served.py), and an alias that goes only to a model whose evaluation and parity passed."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from data.errors import UserError
from tests.conftest import free_port
from tests.test_export import export_cfg, model_ckpt, val_images  # noqa: F401 (fixtures)
from train import load_model
from train.export import export
from train.registry import alias_refusal


def invoke(url: str, images: list[bytes]) -> list[dict]:
    """MLflow's scoring protocol: a dataframe_split whose binary column travels as base64."""
    body = {
        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]}
    }
    request = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)["predictions"]


@pytest.fixture
def served(model_ckpt, mlflow_server, tmp_path):  # noqa: F811
    """The model exported as ONNX, registered with alias champion on a real MLflow server, and
    `mlflow models serve -m models:/NAME@champion --env-manager local` answering on 127.0.0.1."""
    name = f"served-{tmp_path.name}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    export = [sys.executable, "-m", "train.export", f"ckpt={model_ckpt}", "format=onnx"]
    run = subprocess.run(
        [*export, f"out={tmp_path}/bundle", "parity.samples=24", f"register={name}", "alias=champion"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    port = free_port()
    mlflow = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow, "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local"]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (the server writes it until the test ends)
    server = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the server's workers go down with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # it imports torch and onnxruntime: ~20 s on 2 busy cores
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                alive = server.poll() is None and time.monotonic() < deadline
                assert alive, (
                    "mlflow models serve did not answer:\n" + (tmp_path / "serve.log").read_text()[-3000:]
                )
                time.sleep(0.5)
        yield url, name
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_mlflow_models_serve_answers_with_the_checkpoints_decisions(
    served,
    model_ckpt,  # noqa: F811
    val_images,  # noqa: F811
    mlflow_server,
    monkeypatch,
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

    url, name = served
    images = val_images[:12]
    answers = invoke(url, images)
    ours = load_model(model_ckpt).predict([Image.open(io.BytesIO(b)) for b in images])
    assert [a["label"] for a in answers] == [r["label"] for r in ours]
    assert np.allclose([a["defect_score"] for a in answers], [r["defect_score"] for r in ours], atol=1e-5)
    threshold = load_model(model_ckpt).spec.extra["decision"]["threshold"]
    for a, r in zip(answers, ours):
        assert set(a) == {"label", "score", "defect_score", "defect", "probs"}
        assert a["score"] == pytest.approx(r["score"], abs=1e-5)
        assert json.loads(a["probs"]).keys() == r["probs"].keys()
        if abs(r["defect_score"] - threshold) > 1e-5:  # a part on the threshold is a float-bit tie
            assert a["defect"] == r["defect"]
    with pytest.raises(urllib.error.HTTPError) as refused:  # not an image: one clear 400, no crash
        invoke(url, [b"not an image at all"])
    assert refused.value.code == 400 and "column image:" in refused.value.read().decode()
    assert invoke(url, images[:1])[0]["label"] == ours[0]["label"]  # and the server still answers
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version_by_alias(name, "champion")
    signature = mlflow.models.get_model_info(f"models:/{name}@champion").signature
    assert signature.inputs.input_names() == ["image"] and "defect_score" in signature.outputs.input_names()
    assert version.tags["format"] == "onnx" and float(version.tags["threshold"]) == threshold


def test_an_alias_goes_only_to_an_evaluated_model_that_met_its_target(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/registry.db")
    with pytest.raises(
        UserError, match=r"alias=champion: the checkpoint carries no evaluation.*train\.evaluate"
    ):
        export(export_cfg(trained, tmp_path / "b", "format=onnx", "register=m", "alias=champion"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "registry.db").exists()
    missed = {
        "dataset": {"split": "val"},
        "defect": {
            "escape_rate": 0.05,
            "target_escape": 0.005,
            "threshold": 0.3,
        },
    }
    assert "missed the target: escape rate 0.0500 above 0.0050" in alias_refusal(
        {"evaluation": missed}, "onnx", "linux"
    )
    good_only = {"dataset": {"split": "val"}, "defect": {"false_alarm_rate": 0.004}}
    good_only["defect"] |= {"target_false_alarm": 0.01, "threshold": 0.7}
    assert alias_refusal({"evaluation": good_only}, "onnx", "linux") is None
    assert "only on macOS" in alias_refusal({"evaluation": good_only}, "coreml", "linux")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["alias=champion"],
            "alias=champion: an alias names a registered model's version: give register=NAME too",
        ),
        (
            ["register=m", "alias=latest"],
            "alias=latest: letters, digits, _ and - only; not latest or v<number>",
        ),
        (["register=m", "alias=v3"], "not latest or v<number>"),
    ],
)
def test_alias_settings_are_checked_first(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        export(export_cfg("nowhere.ckpt", tmp_path / "b", *overrides))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("task", "result"),
    [
        ("multilabel", {"labels": ["crack", "spot"], "probs": {"ok": 0.1, "crack": 0.8, "spot": 0.6}}),
        (
            "segment",
            {
                "label": "crack",
                "mask": np.array([[0, 1], [1, 2]], np.uint8),
                "areas": {"crack": 2, "spot": 1},
                "probs": {"ok": 0.9, "crack": 0.7, "spot": 0.2},
                "defect_score": 0.7,
                "defect": True,
            },
        ),
        (
            "anomaly",
            {
                "label": "good",
                "defect_score": 0.25,
                "defect": False,
                "raw_score": 3.5,
                "anomaly_map": np.array([[0.0, 0.25], [0.5, 1.0]], np.float32),
            },
        ),
    ],
)
def test_each_task_answers_the_signature_columns(task, result):
    from train.served import columns, row

    out = row(result, task, "ok")
    assert set(out) == {n for n, _ in columns(task)}
    if task == "multilabel":
        assert (
            out["label"] == "crack,spot"
            and out["score"] == 0.8
            and json.loads(out["labels"]) == ["crack", "spot"]
        )
        assert out["defect_score"] is None  # no good class known to the decision: no decision
    if task == "segment":
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask"]))))
        assert (mask == result["mask"]).all() and out["score"] == 0.7 and out["defect"] is True
    if task == "anomaly":
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["anomaly_map"])))) / 65535
        assert np.allclose(heat, result["anomaly_map"], atol=1e-5) and out["score"] == 0.25
        assert out["label"] == "good" and "probs" not in out
