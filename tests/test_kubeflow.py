"""scripts/deploy/kubeflow_pipeline.py: the Kubeflow Pipelines v2 pipeline compiles, and runs end
to end on tiny data with kfp's local runner (each component a subprocess calling our CLIs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # five CLI steps, each importing torch: about 2 minutes


def pipeline_module():
    spec = importlib.util.spec_from_file_location(
        "kubeflow_pipeline", ROOT / "scripts/deploy/kubeflow_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pipeline_compiles_to_five_steps_that_call_our_clis(tmp_path):
    from kfp import compiler

    module = pipeline_module()
    compiler.Compiler().compile(module.inspection_pipeline, str(tmp_path / "p.yaml"))
    spec = yaml.safe_load((tmp_path / "p.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"write-shards", "train", "evaluate", "export", "register"}
    assert set(tasks["register"]["dependentTasks"]) == {"evaluate", "write-shards"}
    assert set(tasks["evaluate"]["dependentTasks"]) == {"train", "write-shards"}
    executors = spec["deploymentSpec"]["executors"]
    for name in ("write-shards", "train", "evaluate", "export", "register"):
        container = executors[f"exec-{name}"]["container"]
        assert container["image"] == module.IMAGE
        program = " ".join(container["command"])
        assert "pip install" not in program  # the image carries everything: nothing at run time
    code = {name: " ".join(executors[f"exec-{name}"]["container"]["command"]) for name in tasks}
    assert '"-m", "data", "write"' in code["write-shards"] and '"-m", "train.evaluate"' in code["evaluate"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["alias"]["defaultValue"] == "champion" and params["tracking_uri"]["defaultValue"] == ""


def test_the_pipeline_runs_end_to_end_with_the_local_runner(tmp_path, monkeypatch):
    import mlflow
    from kfp import local

    from train import load_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    tiny = "model.backbone=test_resnet data.image_size=32 trainer=cpu trainer.max_epochs=2 data.batch_size=32"
    pipeline_module().inspection_pipeline(  # raises when a step fails (local.init's raise_on_error)
        write_args="--synthetic 300 --image-size 48 --val-fraction 0.3",
        train_overrides=f"{tiny} data.num_workers=0 logger=csv name=kfp",
        evaluate_overrides="data.num_workers=0 trainer=cpu",
        model_name="kfp-inspection",
        tracking_uri=uri,
    )
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("kfp-inspection", "champion")
    assert version.tags["format"] == "onnx" and float(version.tags["threshold"]) > 0
    bundles = list((tmp_path / "kfp").rglob("bundle/preprocess.json"))
    assert len(bundles) == 1
    info = json.loads(bundles[0].read_text())
    assert info["decision"]["threshold"] == float(version.tags["threshold"])
    evaluated = list((tmp_path / "kfp").rglob("evaluated/metrics.json"))
    assert len(evaluated) == 1 and json.loads(evaluated[0].read_text())["dataset"]["split"] == "val"
    model = load_model(str(bundles[0].parent))
    assert model.spec.classes == tuple(info["classes"])


def manifests() -> tuple[dict, dict]:
    deploy = ROOT / "scripts" / "deploy"
    trainjob = yaml.safe_load((deploy / "kubeflow_trainjob.yaml").read_text())
    pytorchjob = yaml.safe_load((deploy / "kubeflow_pytorchjob.yaml").read_text())
    return trainjob, pytorchjob


def test_the_trainjob_and_the_pytorchjob_run_the_same_ddp_command_their_sizes_ask_for():
    trainjob, pytorchjob = manifests()
    assert (trainjob["apiVersion"], trainjob["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert (pytorchjob["apiVersion"], pytorchjob["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    trainer = trainjob["spec"]["trainer"]
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    (container,) = replicas["Master"]["template"]["spec"]["containers"]
    assert replicas["Worker"]["template"] == replicas["Master"]["template"]
    assert container["command"] == trainer["command"] == ["torchrun"]
    assert container["args"] == trainer["args"]
    args = dict(a.split("=", 1) for a in trainer["args"] if "=" in a)
    assert trainer["args"][:2] == ["-m", "train"] and args["trainer"] == "ddp" and args["resume"] == "auto"
    nodes = replicas["Master"]["replicas"] + replicas["Worker"]["replicas"]
    assert int(args["trainer.num_nodes"]) == trainer["numNodes"] == nodes
    assert (
        int(args["trainer.devices"]) == trainer["numProcPerNode"] == int(pytorchjob["spec"]["nprocPerNode"])
    )
    assert (
        "$" not in args["hydra.run.dir"] and "now:" not in args["hydra.run.dir"]
    )  # one directory, every rank
    for env in (trainer["env"], container["env"]):  # credentials only by reference to a Secret
        assert all("valueFrom" in e for e in env if "KEY" in e["name"])


def test_the_trainjob_args_run_under_torchrun_as_the_runtime_starts_them_and_resume(tmp_path, tiny_index):
    """What the torch-distributed runtime does in each pod, on one machine: PET_* set, torchrun
    starting 2 processes with the manifest's own args (sizes, data and paths made local). A second
    start (a restarted job) continues from the first one's last.ckpt."""
    import torch

    from tests.conftest import free_port, tiny

    trainjob, _ = manifests()
    local = {
        "trainer.num_nodes": "1",
        "trainer.devices": "2",
        "paths.log_dir": str(tmp_path / "outputs"),
        "hydra.run.dir": str(tmp_path / "outputs" / "inspection" / "job"),
        "checkpoint.every_n_steps": "2",
    }
    args = []
    for a in trainjob["spec"]["trainer"]["args"]:
        key = a.split("=", 1)[0]
        if key in ("+experiment", "data.index", "data.num_workers"):
            continue  # a ResNet-50 on the bucket's data: tiny data here instead
        args.append(f"{key}={local[key]}" if key in local else a)
    shrink = [o for o in tiny(tiny_index) if o != "trainer=cpu"] + ["trainer.accelerator=cpu"]

    def start(*more: str) -> subprocess.CompletedProcess:
        port = free_port()
        pet = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0"}
        pet |= {"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
        torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` entry point
        return subprocess.run(
            [*torchrun, *args[:2], *shrink, *args[2:], *more],
            env={**os.environ, **pet},
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
        )

    first = start()
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    last = tmp_path / "outputs" / "inspection" / "job" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["ShardDataModule"]["world_size"] == 2 and ckpt["global_step"] == 180 // (2 * 16)
    second = start("trainer.max_epochs=2")  # the restarted job, asked for one more epoch
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "resum" in (second.stdout + second.stderr).lower()
    again = torch.load(last, map_location="cpu", weights_only=True)
    assert again["global_step"] == 2 * ckpt["global_step"] and again["epoch"] == 1  # 0-based: the second
