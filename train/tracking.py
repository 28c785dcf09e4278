"""Tracking backends: build the chosen Lightning loggers, continue a resumed run's tracker run, and
log the config with secrets removed.

Each backend is imported only when its config is chosen (wandb and mlflow cost seconds at start).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator, Mapping

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger

# A key names a secret when one of its words (split on _ - .) is one of these: `api_key`,
# `aws_secret_access_key` and `password` match; `author`, `monkey` and `max_keys` do not.
SECRET = re.compile(r"(^|[_.-])(key|token|secret|password|passwd|credentials?|auth)($|[_.-])", re.I)
# Secrets inside values: URL userinfo (https://user:pass@host) and signed-URL query parameters.
USERINFO = re.compile(r"(://)[^/@\s]+@")
SIGNED_QUERY = re.compile(
    r"([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|sig|signature|token|access_token"
    r"|api_key|key)=)[^&\s]+",
    re.I,
)
REDACTED = "<redacted>"


def build_loggers(
    configs: Mapping | None, run_ids: Mapping[str, str], run_name: str | None = None
) -> list[Logger]:
    """One logger per entry of `logger:` (`logger=[csv,mlflow]` chooses several). `run_ids` are
    the tracker run ids a checkpoint recorded; a resumed run logs into the same runs. `run_name`
    names a new MLflow or wandb run (an evaluation's, say)."""
    loggers = []
    for cfg in (configs or {}).values():
        kwargs = {}
        target = cfg["_target_"].rsplit(".", 1)[-1]
        if target == "MLFlowLogger" and run_ids.get("mlflow"):
            kwargs["run_id"] = run_ids["mlflow"]
        if run_name and target in ("MLFlowLogger", "WandbLogger"):
            kwargs["run_name" if target == "MLFlowLogger" else "name"] = run_name
        if target == "WandbLogger":
            if run_ids.get("wandb"):
                kwargs.update(id=run_ids["wandb"], resume="allow")
            if cfg.get("offline") is None:
                # Offline unless the user can and wants to reach a server: never a login prompt.
                online = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online"
                kwargs["offline"] = not online
        if target == "MLFlowLogger":
            with one_process_at_a_time(cfg.get("tracking_uri")):
                logger = instantiate(cfg, **kwargs)
                logger.experiment  # noqa: B018 (creates the store's tables, the experiment and the run)
            loggers.append(logger)
        else:
            loggers.append(instantiate(cfg, **kwargs))
    return loggers


@contextlib.contextmanager
def one_process_at_a_time(tracking_uri: str | None) -> Iterator[None]:
    """MLflow creates a SQLite store's tables and an experiment on first use; two processes that
    start together (two shells, a parallel sweep) race there and one fails ("table experiments
    already exists"). For a local SQLite store they take turns, by a lock file beside it."""
    if not tracking_uri or not str(tracking_uri).startswith("sqlite:///"):
        yield
        return
    path = str(tracking_uri).removeprefix("sqlite:///")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def log_config(loggers: list[Logger], config: dict, resumed_ids: Mapping[str, str]) -> None:
    """The resolved config as hyperparameters. An MLflow run that is being continued keeps the
    params it has (MLflow refuses changed values); the new config is in every checkpoint."""
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger" and resumed_ids.get("mlflow"):
            continue
        logger.log_hyperparams(config)


def finish(loggers: list[Logger]) -> None:
    """Close runs that outlive `trainer.fit`: an open wandb run would swallow the next training
    started in the same process (a notebook, a test) and holds unflushed history."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()


def log_report(
    loggers: list[Logger], metrics: dict[str, float], files: list[str], tags: dict[str, str]
) -> None:
    """An evaluation's metrics to every tracker, and its files (metrics.json, plots) as MLflow
    artifacts under `evaluation/` or wandb files and images; then the runs are closed."""
    for logger in loggers:
        logger.log_metrics(metrics)
        kind = type(logger).__name__
        if kind == "MLFlowLogger":
            client, run = logger.experiment, logger.run_id
            for key, value in tags.items():
                client.set_tag(run, key, value)
            for path in files:
                client.log_artifact(run, path, "evaluation")
        elif kind == "WandbLogger":
            import wandb

            run = logger.experiment
            run.summary.update(tags)
            run.log(
                {
                    os.path.basename(p).removesuffix(".png"): wandb.Image(p)
                    for p in files
                    if p.endswith(".png")
                }
            )
            for path in files:  # copied into the run's own files: a link would dangle once moved
                shutil.copy(path, run.dir)
                run.save(os.path.join(run.dir, os.path.basename(path)), base_path=run.dir, policy="now")
        logger.save()
        logger.finalize("success")
    finish(loggers)


def run_ids(loggers: list[Logger]) -> dict[str, str]:
    """The tracker runs this training writes to, for the checkpoint (rank zero knows them)."""
    ids = {}
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "MLFlowLogger" and logger.run_id:
            ids["mlflow"] = logger.run_id
        elif kind == "WandbLogger" and logger.experiment is not None:
            ids["wandb"] = logger.experiment.id
    return ids


def redact(config: object) -> object:
    """The config (or any value) with secrets removed: whole values under secret-looking keys,
    and inside strings any secret environment variable's value, URL passwords and signed-URL
    parameters (an `${oc.env:...}` interpolation or a pasted URL carries them into values)."""
    secrets = sorted(
        (v for k, v in os.environ.items() if SECRET.search(k) and len(v) >= 8), key=len, reverse=True
    )

    def clean(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, REDACTED)
        text = USERINFO.sub(rf"\1{REDACTED}@", text)
        return SIGNED_QUERY.sub(rf"\1{REDACTED}", text)

    def walk(node: object, key: str = "") -> object:
        if isinstance(node, Mapping):
            return {k: walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, key) for v in node]
        if node is not None and SECRET.search(key):
            return REDACTED
        return clean(node) if isinstance(node, str) else node

    return walk(config)
