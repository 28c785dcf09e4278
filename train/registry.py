"""`python -m train.export ... register=NAME [alias=champion]`: the bundle as the next version
of an MLflow registered model. The version is a pyfunc model wrapping the bundle (train/served.py:
`mlflow models serve -m models:/NAME@champion` serves it), logged as the artifacts (under
`model/`) of a run that carries the evaluation's metrics and the parity figures; the version's
tags carry the decision threshold, so a deployment tool finds the model, its threshold and its
evidence in one place. An alias (MLflow's replacement for stages) moves to the version only when
its evaluation met its target and parity passed (`alias_refusal`)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from data.errors import UserError

log = logging.getLogger("train")
RUNTIMES = {"onnx": ("onnxruntime",), "torchscript": ("torch",), "coreml": ("coremltools",)}


def alias_refusal(meta: dict, fmt: str, platform: str) -> str | None:
    """Why the checkpoint's bundle may not take an alias, or None: an alias is what a line's
    deployment follows, so it goes only to a model whose evaluation met its own target (the
    `model.ckpt` of `python -m train.evaluate`) and whose export parity can run here."""
    evaluation = meta.get("evaluation") or {}
    defect = evaluation.get("defect") or {}
    if not defect:
        return (
            "the checkpoint carries no evaluation with a defect decision: evaluate it first "
            "(python -m train.evaluate ckpt=... out=DIR) and export DIR/model.ckpt"
        )
    if "target_escape" in defect:
        rate, target, what = defect["escape_rate"], defect["target_escape"], "escape rate"
    else:  # a split of good parts only: the threshold followed the false-alarm target
        rate, target, what = defect["false_alarm_rate"], defect["target_false_alarm"], "false-alarm rate"
    if rate > target:
        split = (evaluation.get("dataset") or {}).get("split")
        return (
            f"its evaluation on split {split} missed the target: {what} {rate:.4f} above {target:.4f} at "
            f"threshold {defect['threshold']:.6f}; register it without an alias, or evaluate again"
        )
    if fmt == "coreml" and platform != "darwin":
        return "Core ML parity runs only on macOS, so it cannot pass here: export format=onnx for an alias"
    return None


def _requirements(fmt: str) -> list[str]:
    """The serving environment's packages, pinned to what wrote the model."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in ("shardtrain", "mlflow", *RUNTIMES[fmt]):
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned


def register(
    bundle_dir: str, name: str, tracking_uri: str, meta: dict, parity: dict, alias: str | None = None
) -> str:
    """Register `bundle_dir` under `name` (and point `alias` at it); returns the new version number."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from train import served
    from train.tracking import one_process_at_a_time

    evaluation = meta.get("evaluation") or {}
    decision = meta["model"].get("extra", {}).get("decision") or {}
    experiment_name = meta["lineage"]["config"].get("name") or "export"
    metrics = {k: evaluation[k] for k in ("top1", "macro_f1") if k in evaluation}
    metrics |= {f"defect/{k}": v for k, v in (evaluation.get("defect") or {}).items()}
    for batch, r in parity.get("batches", {}).items():
        metrics[f"parity/batch{batch}/max_abs_diff"] = r["max_abs_diff"]
        metrics[f"parity/batch{batch}/top1_agreement"] = r["top1_agreement"]
    tags = {
        "parity": {True: "passed", None: "not run (Core ML off macOS)"}[parity["passed"]],
        "format": parity["format"],
        "precision": parity["precision"],
        "classes": ",".join(meta["model"]["classes"]),
        "dataset_sha256": meta["lineage"]["dataset"]["sha256"],
        "code_version": meta["lineage"]["code_version"],
    }
    if decision:
        tags |= {
            "threshold": repr(decision["threshold"]),
            "good_class": decision["good"],
            "defect_classes": ",".join(decision["defect_classes"]),
        }
    try:
        with one_process_at_a_time(tracking_uri):  # a local SQLite store: one writer sets it up
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            experiment = client.get_experiment_by_name(experiment_name)
            experiment_id = (
                experiment.experiment_id if experiment else client.create_experiment(experiment_name)
            )
            run = client.create_run(experiment_id, run_name=f"export-{parity['format']}", tags=tags)
            status = "FAILED"
            try:
                with tempfile.TemporaryDirectory() as staging:
                    bundle = os.path.join(staging, served.BUNDLE)  # the folder's name is its artifact path
                    shutil.copytree(bundle_dir, bundle)
                    task = meta["model"].get("task") or "classify"
                    served.save(bundle, os.path.join(staging, "model"), task, _requirements(parity["format"]))
                    client.log_artifacts(run.info.run_id, os.path.join(staging, "model"), "model")
                for key, value in metrics.items():
                    client.log_metric(run.info.run_id, key, float(value))
                status = "FINISHED"
            finally:
                client.set_terminated(run.info.run_id, status)
            try:
                client.create_registered_model(name)
            except MlflowException as e:
                if "already exists" not in str(e).lower():
                    raise
            version = client.create_model_version(
                name,
                source=f"{run.info.artifact_uri}/model",
                run_id=run.info.run_id,
                tags=tags,
                description=_describe(decision, evaluation),
            )
            if alias:
                client.set_registered_model_alias(name, alias, version.version)
    except (MlflowException, OSError) as e:  # OSError: the server, or the artifact store, unreachable
        raise UserError(
            f"registering {bundle_dir} as {name} at {tracking_uri} failed: {e} (the bundle itself is written)"
        ) from None
    log.info(
        "registered %s as model %s version %s%s at %s",
        bundle_dir,
        name,
        version.version,
        f" (alias {alias})" if alias else "",
        tracking_uri,
    )
    return str(version.version)


def _describe(decision: dict, evaluation: dict) -> str:
    if not decision:
        return "no defect threshold (exported from a checkpoint that python -m train.evaluate did not write)"
    d, split = evaluation["defect"], evaluation["dataset"]["split"]
    rule = f"stop when P({' + '.join(decision['defect_classes'])}) >= {decision['threshold']:.6f}"
    return (
        f"{rule}; on split {split}: escape rate {d['escape_rate']:.4f} (target {d['target_escape']:.4f}), "
        f"false alarms {d['false_alarm_rate']:.4f}"
    )
