"""What a checkpoint carries besides weights, how it is written and read, and `load_model`.

Under the key "shardtrain" every checkpoint holds plain data only, so it loads with
`torch.load(..., weights_only=True)`:

    {"model": ModelSpec as a dict (backbone, classes, image size, normalisation),
     "run_ids": {"mlflow": "...", "wandb": "..."},
     "lineage": {"config": resolved config (secrets redacted),
                 "dataset": {"index", "sha256", and for a data set that grew "version", "version_sha256"},
                 "code_version": "git describe or package version", "packages": {...}}}

The data position is Lightning's own datamodule entry (ShardDataModule.state_dict).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import subprocess
from importlib import metadata

import lightning.pytorch as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from data.errors import UserError
from train.network import ModelSpec, Network
from train.tracking import run_ids

KEY = "shardtrain"
PACKAGES = ("shardtrain", "torch", "torchvision", "lightning", "timm", "webdataset", "torchmetrics")


def code_version() -> str:
    """`git describe` of the source tree when running from a checkout, else the package version."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"shardtrain=={metadata.version('shardtrain')}"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lineage(
    config: dict,
    index_url: str,
    index_sha256: str,
    version: int | None = None,
    version_sha256: str = "",
    sources: list[dict] | None = None,
) -> dict:
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "config": config,
        "dataset": {
            "index": index_url,
            "sha256": index_sha256,
            # a data set that grows: which version trained, and the sha256 of its shards' listing
            **({"version": version, "version_sha256": version_sha256} if version else {}),
            # a data.mix: each data set's name, index, sha256, version and weight
            **({"sources": sources} if sources else {}),
        },
        "code_version": code_version(),
        "packages": versions,
    }


class Lineage(L.Callback):
    """Writes the model spec, tracker run ids and lineage into every checkpoint."""

    def __init__(self, lineage: dict):
        self.lineage = lineage

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[KEY] = {
            "model": pl_module.net.spec.to_dict(),
            "run_ids": run_ids(trainer.loggers),
            "lineage": self.lineage,
        }


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside the old file, synced and renamed over it, so a process killed or
    a disk filled while saving leaves the previous checkpoint whole (Lightning's own local save
    stages the file in /tmp and, across devices, copies it over the target in place). A save that
    fails stops the run with one message naming the path."""

    def save_checkpoint(self, checkpoint: dict, path: str, storage_options: object = None) -> None:
        path = str(path)
        if "://" in path:  # object storage writes whole objects anyway
            return super().save_checkpoint(checkpoint, path, storage_options)
        partial = path + ".partial"
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a node lost now keeps one whole file
            os.replace(partial, path)
        except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError
            with contextlib.suppress(OSError):
                os.remove(partial)
            # torch's writer reports the OSError of the file it writes as its context
            cause = e if isinstance(e, OSError) else e.__context__
            reason = (
                cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e).splitlines()[0]
            )
            previous = "the previous one there is intact" if os.path.exists(path) else "nothing was written"
            raise UserError(
                f"could not write the checkpoint {path}: {reason}; {previous}. Free space there (or set "
                "paths.log_dir elsewhere), then continue with resume=auto"
            ) from None


def load_checkpoint(path: str) -> dict:
    """A checkpoint loaded safely: tensors and plain data only, never pickled code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something that is no tensor or plain data
        reason = str(e).splitlines()[0]
        raise UserError(
            f"checkpoint {path} holds more than tensors and plain data, so it is not loaded ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(
            f"checkpoint {path} is unreadable, truncated or corrupt ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(ckpt, dict) or KEY not in ckpt:
        raise UserError(f"checkpoint {path} was not written by shardtrain (no '{KEY}' entry)")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> Network:
    """The eval-mode network of a loaded checkpoint (training, or an evaluated `model.ckpt`)."""
    from train import tasks

    spec = ModelSpec.from_dict(ckpt[KEY]["model"])  # a spec written before tasks: classify
    net = Network(tasks.of(spec).build(spec.backbone, len(spec.classes)), spec)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()


def save_model(path: str, net: Network, meta: dict) -> None:
    """A deployable checkpoint: the network's weights and `meta` (spec, lineage, evaluation), no
    optimizer or loop state. Loads with `load_model`; written beside and renamed over."""
    state = {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
    meta = {**meta, "model": net.spec.to_dict(), "kind": "model"}
    torch.save({"state_dict": state, KEY: meta}, path + ".partial")
    os.replace(path + ".partial", path)


def load_model(path: str, device: str | torch.device = "cpu"):
    """A model with `.predict(images)`, from a checkpoint (`.ckpt`: an eval-mode `Network`,
    weights loaded with `weights_only=True`) or an exported bundle directory (ONNX through
    onnxruntime, TorchScript); either way the model's own preprocessing and decision threshold
    come along, so the two compare directly."""
    if os.path.isdir(path) or os.path.basename(path) == "preprocess.json":
        from train.bundle import load_bundle

        return load_bundle(path, device)
    return model_from_checkpoint(load_checkpoint(path)).to(device)


def trained_on(meta: dict) -> dict:
    """The data a checkpoint trained on, as `data` settings: {"index": ...}, or {"mix": [...]}
    for a mixed run (what evaluate and export read when no data set is given)."""
    dataset = meta["lineage"]["dataset"]
    if dataset.get("sources"):
        keys = ("index", "weight", "name", "version")
        return {"mix": [{k: s[k] for k in keys if s.get(k) is not None} for s in dataset["sources"]]}
    return {"index": dataset["index"]}
