"""A Kubeflow Pipelines v2 pipeline: write shards, train, evaluate, export, register. Each
component calls one of our CLIs, so a step does on the cluster exactly what it does on a laptop.

    python scripts/deploy/kubeflow_pipeline.py --out inspection_pipeline.yaml   # compile
    # upload inspection_pipeline.yaml in the Kubeflow Pipelines UI, or:
    #   kfp.Client(host=...).create_run_from_pipeline_package("inspection_pipeline.yaml", arguments={...})

    write_shards ──▶ train ──▶ evaluate ──▶ export    (the edge bundle: fp32, fp16, int8; parity-gated)
      (Dataset)      (Model)    (Model:         └────▶ register (an fp32 ONNX pyfunc in MLflow,
                                 model.ckpt with          alias only when evaluation and parity passed)
                                 its threshold)

- **Where the shards live.** `shards_uri` empty: `python -m data write` writes into the step's
  output artifact, and KFP carries it to the next steps (fine for thousands of images). For a
  line's millions, give `shards_uri=s3://bucket/ds`: the shards are written there once, the
  artifact holds only the index's location, and training streams from the bucket.
- **The image.** Every step runs in `SHARDTRAIN_IMAGE` (default below), built from
  scripts/deploy/Dockerfile, which installs shardtrain with its `kubeflow` extra; components
  install nothing at run time (`install_kfp_package=False`).
- **Secrets** (S3 keys, the MLflow server's credentials) come from Kubernetes Secrets mounted as
  environment variables (kfp-kubernetes' `use_secret_as_env`), never from pipeline parameters,
  which the pipeline spec and the UI show to anyone. `tracking_uri` empty: the pod's own
  `MLFLOW_TRACKING_URI`.
- **GPUs.** `train` asks for none here; on a cluster add `.set_accelerator_type("nvidia.com/gpu")
  .set_accelerator_limit(1)` to its task, or run multi-node DDP with scripts/deploy/
  kubeflow_trainjob.yaml instead.

The test (tests/test_kubeflow.py) compiles this pipeline and runs it end to end with kfp's local
runner (`kfp.local.SubprocessRunner(use_venv=False)`: each step a subprocess here).
"""

# No `from __future__ import annotations`: kfp reads the components' annotations as types.
import argparse
import os

from kfp import compiler, dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

IMAGE = os.environ.get("SHARDTRAIN_IMAGE", "ghcr.io/shardtrain/shardtrain:latest")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def write_shards(write_args: str, shards_uri: str, shards: Output[Dataset]):
    """`python -m data write WRITE_ARGS DEST`: DEST is shards_uri, or this step's artifact."""
    import shlex
    import subprocess
    import sys

    dest = shards_uri or shards.path
    subprocess.run([sys.executable, "-m", "data", "write", *shlex.split(write_args), dest], check=True)
    shards.metadata["index"] = f"{dest.rstrip('/')}/dataset.json"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(shards: Input[Dataset], overrides: str, checkpoint: Output[Model], metrics: Output[Metrics]):
    """`python -m train data=shards data.index=... OVERRIDES`; the best checkpoint out."""
    import json
    import os
    import shlex
    import shutil
    import subprocess
    import sys
    import tempfile

    run_dir = tempfile.mkdtemp(prefix="train-")
    cmd = [sys.executable, "-m", "train", "data=shards", f"data.index={shards.metadata['index']}"]
    cmd += [*shlex.split(overrides), f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, check=True)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    shutil.copyfile(summary["best_checkpoint"] or summary["last_checkpoint"], checkpoint.path)
    for name, value in summary["metrics"].items():
        metrics.log_metric(name.replace("/", "_"), value)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    checkpoint: Input[Model],
    shards: Input[Dataset],
    split: str,
    overrides: str,
    evaluated: Output[Model],
    metrics: Output[Metrics],
):
    """`python -m train.evaluate`: the report, and model.ckpt carrying the chosen threshold."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "train.evaluate", f"ckpt={checkpoint.path}", f"out={evaluated.path}"]
    cmd += [f"split={split}", f"data.index={shards.metadata['index']}", *shlex.split(overrides)]
    subprocess.run(cmd, check=True)
    with open(os.path.join(evaluated.path, "metrics.json")) as f:
        report = json.load(f)
    for key in ("top1", "macro_f1", "defect_iou", "image_auroc"):
        if isinstance(report.get(key), int | float):
            metrics.log_metric(key, report[key])
    for key in ("threshold", "escape_rate", "escape_rate_upper95", "false_alarm_rate"):
        if isinstance((report.get("defect") or {}).get(key), int | float):
            metrics.log_metric(f"defect_{key}", report["defect"][key])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(
    evaluated: Input[Model], shards: Input[Dataset], format: str, precision: str, bundle: Output[Model]
):
    """`python -m train.export`: the edge bundle, published only when parity passes."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "train.export", f"ckpt={evaluated.path}/model.ckpt", f"out={bundle.path}"]
    cmd += [f"format={format}", f"precision={precision}", f"data.index={shards.metadata['index']}"]
    subprocess.run(cmd, check=True)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    evaluated: Input[Model],
    shards: Input[Dataset],
    name: str,
    alias: str,
    tracking_uri: str,
    served: Output[Model],
) -> str:
    """`python -m train.export format=onnx register=NAME [alias=ALIAS]`: the served model's
    version in MLflow; returns the version's models:/ URI."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})}
    cmd = [sys.executable, "-m", "train.export", f"ckpt={evaluated.path}/model.ckpt", f"out={served.path}"]
    cmd += ["format=onnx", f"register={name}", f"data.index={shards.metadata['index']}"]
    cmd += [f"alias={alias}"] if alias else []
    subprocess.run(cmd, check=True, env=env)
    return f"models:/{name}@{alias}" if alias else f"models:/{name}/latest"


@dsl.pipeline(name="shardtrain-inspection", description="write shards, train, evaluate, export, register")
def inspection_pipeline(
    write_args: str = "--synthetic 2000",
    shards_uri: str = "",
    train_overrides: str = "model.backbone=resnet18 trainer.max_epochs=10",
    evaluate_split: str = "val",
    evaluate_overrides: str = "",
    export_format: str = "onnx",
    export_precision: str = "fp32",
    model_name: str = "inspection",
    alias: str = "champion",
    tracking_uri: str = "",
):
    shards = write_shards(write_args=write_args, shards_uri=shards_uri).set_display_name("write shards")
    trained = train(shards=shards.outputs["shards"], overrides=train_overrides)
    evaluated = evaluate(
        checkpoint=trained.outputs["checkpoint"],
        shards=shards.outputs["shards"],
        split=evaluate_split,
        overrides=evaluate_overrides,
    )
    export(
        evaluated=evaluated.outputs["evaluated"],
        shards=shards.outputs["shards"],
        format=export_format,
        precision=export_precision,
    )
    register(
        evaluated=evaluated.outputs["evaluated"],
        shards=shards.outputs["shards"],
        name=model_name,
        alias=alias,
        tracking_uri=tracking_uri,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="inspection_pipeline.yaml", help="the compiled pipeline spec")
    args = p.parse_args()
    compiler.Compiler().compile(inspection_pipeline, args.out)
    print(f"compiled to {args.out} (image {IMAGE})")


if __name__ == "__main__":
    main()
