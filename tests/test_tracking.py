"""Secrets never reach a logged config or a checkpoint."""

from __future__ import annotations

import subprocess

import pytest

from train.tracking import REDACTED, redact


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    monkeypatch.setenv("HOME_DIRECTORY_NAME", "not-a-secret-at-all")


def test_values_under_secret_keys_are_removed(env):
    out = redact({"api_key": "x", "aws_secret_access_key": "y", "db": {"password": 123}, "auth": "t"})
    assert out == {
        "api_key": REDACTED,
        "aws_secret_access_key": REDACTED,
        "db": {"password": REDACTED},
        "auth": REDACTED,
    }


def test_ordinary_keys_that_merely_contain_key_words_stay(env):
    config = {"author": "ada", "monkey": 1, "max_keys": 5, "keyframe": "a", "tokenizer": "bpe"}
    assert redact(config) == config


def test_secrets_inside_values_are_removed(env):
    out = redact(
        {
            "tracking_uri": "https://bob:hunter2hunter2@mlflow.example:5000",
            "index": "https://bucket.s3.amazonaws.com/ds/dataset.json?X-Amz-Signature=abc123&X-Amz-Date=1",
            "note": "key is 0123456789abcdef here",
            "home": "not-a-secret-at-all",
            "urls": ["s3://b/ds?token=zzz"],
        }
    )
    text = repr(out)
    for secret in ("hunter2hunter2", "bob", "abc123", "0123456789abcdef", "zzz"):
        assert secret not in text
    assert out["index"].endswith("X-Amz-Signature=<redacted>&X-Amz-Date=1")
    assert out["home"] == "not-a-secret-at-all"  # the variable's name is not secret-like


@pytest.mark.slow
def test_two_runs_started_together_share_the_default_mlflow_store(tmp_path, train_command):
    """Two shells, one outputs/: MLflow's SQLite store is created by whichever comes first."""
    import mlflow

    args = train_command(
        "data.batch_size=32",
        "trainer.limit_train_batches=2",
        "logger=mlflow",
        "logger.mlflow.log_model=false",
        "name=together",
    )
    runs = [
        subprocess.Popen(
            [*args, f"hydra.run.dir={tmp_path}/run{i}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, out in zip(runs, outputs):
        assert run.returncode == 0, out[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "together"]
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 2 and all("val/acc" in r.data.metrics for r in found)


def test_mlflow_tracking_uri_in_the_environment_is_where_training_logs(make_cfg, tmp_path, monkeypatch):
    """MLflow's convention, as a cluster's environment sets it: training logs there, not to the
    local SQLite default; logger.mlflow.tracking_uri, when given, wins over both."""
    import mlflow

    from train.run import train

    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    cfg = make_cfg("logger=mlflow", "name=from_env")
    assert cfg.logger.mlflow.tracking_uri == elsewhere
    train(cfg)
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    client = mlflow.MlflowClient(elsewhere)
    assert len(client.search_runs([client.get_experiment_by_name("from_env").experiment_id])) == 1
    explicit = make_cfg("logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{tmp_path}/explicit.db")
    assert explicit.logger.mlflow.tracking_uri == f"sqlite:///{tmp_path}/explicit.db"
