"""The end-of-run summary a person reads: final validation metrics, confusion matrix, best
checkpoint. Printed once (rank zero) and returned as plain data."""

from __future__ import annotations

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from train.module import ImageClassifier


def confusion_table(classes: tuple[str, ...], matrix: list[list[int]]) -> str:
    width = max(6, *(len(c) for c in classes))
    head = " " * width + "".join(f"{c[:width]:>{width + 1}}" for c in classes)
    rows = [f"{c:<{width}}" + "".join(f"{n:>{width + 1}}" for n in row) for c, row in zip(classes, matrix)]
    return "\n".join([head, *rows])


def summarize(trainer: L.Trainer, module: ImageClassifier, resumed_from: str | None = None) -> dict:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    best = ckpt.best_model_path if ckpt else ""
    result = {
        "metrics": metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_checkpoint": best,
        "best_score": float(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None,
        "last_checkpoint": ckpt.last_model_path if ckpt else "",
        "confusion": module.confusion,
        "resumed_from": resumed_from,
    }
    if "val/acc" in metrics:
        chance = 1 / len(module.classes)
        rank_zero_info(
            f"final validation accuracy: {metrics['val/acc']:.4f} "
            f"({metrics['val/acc'] / chance:.1f}x chance), macro F1 {metrics.get('val/f1', 0):.4f}"
        )
    if module.confusion:
        rank_zero_info(
            "confusion matrix (rows: true class, columns: predicted):\n"
            + confusion_table(module.classes, module.confusion)
        )
    if best:
        score = result["best_score"]
        rank_zero_info(f"best checkpoint: {best}" + (f" (val/acc {score:.4f})" if score is not None else ""))
    return result
