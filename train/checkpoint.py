"""What a checkpoint carries besides weights, how a run finds one to resume, and `load_model`.

Under the key "shardtrain" every checkpoint holds plain data only, so it loads with
`torch.load(..., weights_only=True)`:

    {"model": ModelSpec as a dict (backbone, classes, image size, normalisation),
     "run_ids": {"mlflow": "...", "wandb": "..."},
     "lineage": {"config": resolved config (secrets redacted), "dataset": {"index", "sha256"},
                 "code_version": "git describe or package version", "packages": {...}}}

The data position is Lightning's own datamodule entry (ShardDataModule.state_dict).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import subprocess
from importlib import metadata

import lightning.pytorch as L
import torch

from data.errors import UserError
from train.classifier import Classifier, ModelSpec, build_backbone
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


def lineage(config: dict, index_url: str, index_sha256: str) -> dict:
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "config": config,
        "dataset": {"index": index_url, "sha256": index_sha256},
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


class MidEpochCheckpoint(L.Callback):
    """Writes `last.ckpt` every `every_n_steps` optimizer steps, with the data position, so
    `resume=auto` continues at the exact batch. Written beside and renamed over, so a process
    killed while saving leaves the previous `last.ckpt` intact."""

    def __init__(self, dirpath: str, every_n_steps: int | None = None):
        self.dirpath, self.every_n_steps = dirpath, every_n_steps
        self._saved = -1  # with gradient accumulation several batches end on one step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step in (0, self._saved) or step % self.every_n_steps:
            return
        self._saved = step
        final = os.path.join(self.dirpath, "last.ckpt")
        trainer.save_checkpoint(final + ".partial", weights_only=False)  # full state: resumable
        if trainer.is_global_zero:
            os.replace(final + ".partial", final)
        trainer.strategy.barrier("mid_epoch_checkpoint")


def load_checkpoint(path: str) -> dict:
    """A checkpoint loaded safely: tensors and plain data only, never pickled code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if KEY not in ckpt:
        raise UserError(f"checkpoint {path} was not written by shardtrain (no '{KEY}' entry)")
    return ckpt


def find_resume(resume: str | None, runs_dir: str) -> str | None:
    """`resume`: null (fresh start), "auto" (newest `last.ckpt` under `runs_dir`, if any) or a path."""
    if not resume:
        return None
    if resume != "auto":
        if not os.path.isfile(resume):
            raise UserError(f"resume={resume}: no such checkpoint (use resume=auto or a .ckpt path)")
        return resume
    found = glob.glob(os.path.join(runs_dir, "**", "last.ckpt"), recursive=True)
    return max(found, key=os.path.getmtime) if found else None


def check_resumable(path: str, meta: dict, spec: ModelSpec) -> None:
    """A checkpoint continues only the same network on the same classes."""
    if meta.get("kind") == "model":
        raise UserError(
            f"cannot resume from {path}: it holds a model's weights only (written by evaluation), "
            "not a training state; resume from a run's last.ckpt"
        )
    saved = ModelSpec.from_dict(meta["model"])
    fields = ("backbone", "classes", "image_size")
    diff = [
        f"{f} {getattr(saved, f)} -> {getattr(spec, f)}"
        for f in fields
        if getattr(saved, f) != getattr(spec, f)
    ]
    if diff:
        raise UserError(
            f"cannot resume from {path}: {'; '.join(diff)} (resume=null starts fresh; or restore the "
            "settings that checkpoint was trained with)"
        )


def model_from_checkpoint(ckpt: dict) -> Classifier:
    """The eval-mode network of a loaded checkpoint (training, or an evaluated `model.ckpt`)."""
    spec = ModelSpec.from_dict(ckpt[KEY]["model"])
    net = Classifier(build_backbone(spec.backbone, len(spec.classes)), spec)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()


def save_model(path: str, net: Classifier, meta: dict) -> None:
    """A deployable checkpoint: the network's weights and `meta` (spec, lineage, evaluation), no
    optimizer or loop state. Loads with `load_model`; written beside and renamed over."""
    state = {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
    meta = {**meta, "model": net.spec.to_dict(), "kind": "model"}
    torch.save({"state_dict": state, KEY: meta}, path + ".partial")
    os.replace(path + ".partial", path)


def load_model(path: str, device: str | torch.device = "cpu"):
    """A model with `.predict(images)`, from a checkpoint (`.ckpt`: an eval-mode `Classifier`,
    weights loaded with `weights_only=True`) or an exported bundle directory (ONNX through
    onnxruntime, TorchScript); either way the model's own preprocessing and decision threshold
    come along, so the two compare directly."""
    if os.path.isdir(path) or os.path.basename(path) == "preprocess.json":
        from train.bundle import load_bundle

        return load_bundle(path, device)
    return model_from_checkpoint(load_checkpoint(path)).to(device)
