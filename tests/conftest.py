"""Shared fixtures: real shards written by our writer into tmp dirs, the real Hydra config
composed and shrunk (tiny timm model, 32 px, one CPU epoch) the way a user would override it, and
the real servers tests talk to on 127.0.0.1 (a Ray head, an S3-compatible server)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from data.sources import from_synthetic
from data.write import write_dataset
from train.cli import compose as compose_config

BIN = os.path.dirname(sys.executable)  # this venv's ray, for a head that runs this python

# Tests never touch the user's cache or a tracker server unless they say so.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory) -> str:
    """240 synthetic inspection images (48 px JPEGs) in train/val shards of 50 samples."""
    out = tmp_path_factory.mktemp("shards")
    report = write_dataset(
        from_synthetic(240, seed=3, size=48), str(out), val_fraction=0.25, shard_samples=50, workers=1
    )
    return report.index.location


def compose_cfg(*overrides: str):
    return compose_config("train", *overrides)


@pytest.fixture
def compose():
    """Compose the real config with overrides, as `python -m train ...` would."""
    return compose_cfg


def tiny(index: str) -> tuple[str, ...]:
    """Overrides that shrink a run to one CPU epoch of test_resnet at 32 px on `index`; overrides
    given after them win."""
    return (
        "data=shards",
        f"data.index={index}",
        "data.image_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "model.backbone=test_resnet",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    )


@pytest.fixture
def make_cfg(tmp_path, tiny_index):
    """The real config, shrunk for a CPU test; extra overrides win."""

    def make(*overrides: str):
        return compose_cfg(
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.output_dir={tmp_path}/outputs/run",
            f"paths.cache_dir={tmp_path}/cache",
            *tiny(tiny_index),
            "data.shuffle_buffer=16",
            "optim.scheduler.warmup_steps=2",
            *overrides,
        )

    return make


@pytest.fixture
def train_command(tiny_index):
    """`python -m train` on `tiny_index`, shrunk like make_cfg (overrides given later win), for
    tests that need a process of its own: signals, DDP, two runs at once."""

    def command(*overrides: str) -> list[str]:
        return [sys.executable, "-m", "train", *tiny(tiny_index), *overrides]

    return command


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_index) -> str:
    """A checkpoint of 2 epochs of test_resnet at 32 px on `tiny_index` (its best.ckpt path)."""
    from train.run import train

    root = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(
        f"paths.log_dir={root}/outputs",
        f"paths.output_dir={root}/outputs/run",
        *tiny(tiny_index),
        "trainer.max_epochs=2",
        "logger=none",
        "name=trained",
    )
    return train(cfg)["best_checkpoint"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking and registry server on 127.0.0.1 (artifacts proxied through it):
    the one .ci/run started (SHARDTRAIN_TEST_MLFLOW_URI), or one started here."""
    uri = os.environ.get("SHARDTRAIN_TEST_MLFLOW_URI")
    if uri:
        yield uri
        return
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # it takes about 10 s on 2 busy cores
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited at start"
                time.sleep(0.25)
        else:
            raise AssertionError("mlflow server did not answer within 60 s")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(autouse=True)
def _no_mlflow_uri_between_tests():
    """Lightning's MLFlowLogger calls mlflow.set_tracking_uri, which is process-wide (and sets
    $MLFLOW_TRACKING_URI): unset it around each test, so no test finds another's store."""
    mlflow = sys.modules.get("mlflow")
    if mlflow:
        mlflow.set_tracking_uri(None)
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow:
        mlflow.set_tracking_uri(None)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """(GCS address, dashboard URL) of a Ray head on 127.0.0.1, with token auth as Ray 2.60 sets it."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    address, dashboard = (
        os.environ.get("SHARDTRAIN_TEST_RAY_ADDRESS"),
        os.environ.get("SHARDTRAIN_TEST_RAY_DASHBOARD"),
    )
    started = not address
    if started:
        port, dport = free_port(), free_port()
        if not os.path.exists(os.path.expanduser("~/.ray/auth_token")):  # a fresh machine: make one
            subprocess.run(
                [f"{BIN}/ray", "get-auth-token", "--generate"], check=True, env=env, capture_output=True
            )
        subprocess.run(
            [f"{BIN}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dport}", "--num-cpus=4",
             "--disable-usage-stats"],
            check=True, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dport}"
    for _ in range(60):  # the job API answers (401 without the token) once the dashboard is up
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(1)
    yield address, dashboard, env
    if started:
        subprocess.run([f"{BIN}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def s3_endpoint():
    endpoint = os.environ.get("SHARDTRAIN_TEST_S3_ENDPOINT")
    server = None
    if not endpoint:
        port = free_port()
        moto = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
        server = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if server:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    import s3fs

    name = f"shardtrain-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name
