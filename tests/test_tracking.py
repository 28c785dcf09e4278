"""Secrets never reach a logged config or a checkpoint."""

from __future__ import annotations

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
