"""`python -m train.export ... register=NAME`: the bundle as the next version of an MLflow
registered model. The bundle's files are a run's artifacts (under `bundle/`), the run carries
the evaluation's metrics and the parity figures, and the version's tags carry the decision
threshold, so a deployment tool finds the model, its threshold and its evidence in one place."""

from __future__ import annotations

import logging

from data.errors import UserError

log = logging.getLogger("train")


def register(bundle_dir: str, name: str, tracking_uri: str, meta: dict, parity: dict) -> str:
    """Register `bundle_dir` under `name`; returns the new version number."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

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
                client.log_artifacts(run.info.run_id, bundle_dir, "bundle")
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
                source=f"{run.info.artifact_uri}/bundle",
                run_id=run.info.run_id,
                tags=tags,
                description=_describe(decision, evaluation),
            )
    except (MlflowException, OSError) as e:  # OSError: the server, or the artifact store, unreachable
        raise UserError(
            f"registering {bundle_dir} as {name} at {tracking_uri} failed: {e} (the bundle itself is written)"
        ) from None
    log.info("registered %s as model %s version %s at %s", bundle_dir, name, version.version, tracking_uri)
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
