"""What a person reads: the end-of-run summary of training (final validation metrics, confusion
matrix, best checkpoint) and of an evaluation (its console lines, predictions.csv, tracker
metrics). Printed once (rank zero)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from train.decision import Decision
from train.module import ImageClassifier

log = logging.getLogger("train")


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


def write_predictions(path: str, r: dict, classes: Sequence[str], decision: Decision | None) -> None:
    """predictions.csv: one row per sample with its class probabilities (and defect score)."""
    predicted = r["probs"].argmax(axis=1)
    scores = decision.scores(r["probs"], classes) if decision else None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["key", "label", "predicted", "confidence"]
            + (["defect_score", "defect"] if decision else [])
            + [f"p_{c}" for c in classes]
        )
        for i, key in enumerate(r["keys"]):
            p = r["probs"][i]
            row = [key, classes[r["labels"][i]], classes[predicted[i]], f"{p[predicted[i]]:.6f}"]
            if decision:
                row += [f"{scores[i]:.6f}", int(scores[i] >= decision.threshold)]
            w.writerow(row + [f"{v:.6f}" for v in p])


def print_evaluation(report: dict, out: str) -> None:
    """The console summary of an evaluation, printed once."""
    bad = report["bad_samples"]["count"]
    log.info(
        "evaluated %d samples of split %s%s: top-1 %.4f, macro F1 %.4f",
        report["samples"],
        report["dataset"]["split"],
        f" ({bad} bad, skipped)" if bad else "",
        report["top1"],
        report["macro_f1"],
    )
    d = report.get("defect")
    if d and "threshold" in d:
        log.info(
            "defect threshold %.4f: escape rate %.2f%% (%d of %d defects; target %.2f%%, 95%% bound %.2f%%), "
            "false alarms %.2f%% (%d of %d good)",
            d["threshold"],
            100 * d["escape_rate"],
            d["escapes"],
            d["defect_samples"],
            100 * d["target_escape"],
            100 * d["escape_rate_upper95"],
            100 * d["false_alarm_rate"],
            d["false_alarms"],
            d["good_samples"],
        )
        for note in d["notes"]:
            log.warning("%s", note)
    log.info("report written to %s", out)


def flat_metrics(report: dict) -> dict[str, float]:
    """An evaluation report as tracker metrics: eval/SPLIT/top1, eval/SPLIT/defect/threshold, ..."""
    prefix = f"eval/{report['dataset']['split']}"
    metrics = {f"{prefix}/{k}": report[k] for k in ("top1", "top5", "macro_f1") if k in report}
    for name, m in report["per_class"].items():
        metrics |= {f"{prefix}/{k}/{name}": m[k] for k in ("precision", "recall")}
    d = report.get("defect")
    if d and "threshold" in d:
        keep = ("threshold", "escape_rate", "false_alarm_rate", "roc_auc", "average_precision")
        metrics |= {f"{prefix}/defect/{k}": d[k] for k in keep}
    return {k: float(v) for k, v in metrics.items()}
