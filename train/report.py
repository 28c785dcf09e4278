"""What a person reads: the end-of-run summary of training (final validation metrics, confusion
matrix, best checkpoint) and of an evaluation (its console lines, predictions.csv, tracker
metrics). Printed once (rank zero)."""

from __future__ import annotations

import csv
import logging

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from train.module import TaskModule

log = logging.getLogger("train")


def confusion_table(classes: tuple[str, ...], matrix: list[list[int]]) -> str:
    width = max(6, *(len(c) for c in classes))
    head = " " * width + "".join(f"{c[:width]:>{width + 1}}" for c in classes)
    rows = [f"{c:<{width}}" + "".join(f"{n:>{width + 1}}" for n in row) for c, row in zip(classes, matrix)]
    return "\n".join([head, *rows])


SHOWN = ("val/acc", "val/f1", "val/defect_iou", "val/image_auroc")  # each task's headline metric


def summarize(trainer: L.Trainer, module: TaskModule, resumed_from: str | None = None) -> dict:
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
    if "val/defect_iou" in metrics:
        rank_zero_info(
            f"final validation defect-pixel IoU: {metrics['val/defect_iou']:.4f}, "
            f"mean IoU {metrics['val/miou']:.4f}"
        )
    if "val/image_auroc" in metrics:
        rank_zero_info(
            f"final validation image AUROC: {metrics['val/image_auroc']:.4f}, pixel AUROC "
            f"{metrics.get('val/pixel_auroc', float('nan')):.4f}, "
            f"AUPRO {metrics.get('val/aupro', float('nan')):.4f}"
        )
    if "val/f1" in metrics and "val/acc" not in metrics:
        rank_zero_info(
            f"final validation macro F1: {metrics['val/f1']:.4f}, mAP {metrics.get('val/map', 0):.4f}"
        )
    if "val/acc" in metrics:
        chance = 1 / len(module.classes)
        rank_zero_info(
            f"final validation accuracy: {metrics['val/acc']:.4f} "
            f"({metrics['val/acc'] / chance:.1f}x chance), macro F1 {metrics.get('val/f1', 0):.4f}"
        )
    headline = next((k for k in SHOWN if k in metrics), None)
    if module.sources and headline:  # a data.mix: each source judged on its own validation samples
        name = headline.removeprefix("val/")
        each = ", ".join(
            f"{s} {metrics[f'val/{s}/{name}']:.4f}" for s in module.sources if f"val/{s}/{name}" in metrics
        )
        rank_zero_info(f"final validation {name} per source: {each}")
    if module.confusion:
        what = "pixels" if module.task.name == "segment" else "parts"
        rank_zero_info(
            f"confusion matrix of {what} (rows: true class, columns: predicted):\n"
            + confusion_table(module.classes, module.confusion)
        )
    if best:
        score = result["best_score"]
        shown = f" ({ckpt.monitor} {score:.4f})" if score is not None else ""
        rank_zero_info(f"best checkpoint: {best}{shown}")
    return result


def write_predictions(path: str, rows) -> None:
    """predictions.csv: the task's header and one row per sample (train/tasks: `rows`)."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


# The headline figures of each task's report: (what the console calls it, its key)
HEADLINE = (
    ("top-1", "top1"),
    ("exact-set accuracy", "exact_set_accuracy"),
    ("macro AP", "macro_ap"),
    ("macro F1", "macro_f1"),
    ("defect-pixel IoU", "defect_iou"),
    ("mean IoU", "miou"),
    ("image AUROC", "image_auroc"),
    ("pixel AUROC", "pixel_auroc"),
    ("AUPRO", "aupro"),
)


def print_evaluation(report: dict, out: str) -> None:
    """The console summary of an evaluation, printed once."""
    bad = report["bad_samples"]["count"]
    shown = [(n, k) for n, k in HEADLINE if k in report]
    log.info(
        "evaluated %d samples of split %s%s: %s",
        report["samples"],
        report["dataset"]["split"],
        f" ({bad} bad, skipped)" if bad else "",
        ", ".join(f"{n} {report[k]:.4f}" for n, k in shown),
    )
    d = report.get("defect")
    if d and d.get("chosen_by") == "target_false_alarm":
        log.info(
            "defect threshold %.4f: false alarms %.2f%% (%d of %d good; target %.2f%%, 95%% bound %.2f%%)",
            d["threshold"],
            100 * d["false_alarm_rate"],
            d["false_alarms"],
            d["good_samples"],
            100 * d["target_false_alarm"],
            100 * d["false_alarm_rate_upper95"],
        )
        for note in d["notes"]:
            log.warning("%s", note)
    elif d and "threshold" in d:
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
    loc = report.get("localisation")
    if loc and loc["caught"]:
        log.info(
            "localisation: %d of %d defective parts caught were stopped for the right place (%.1f%%)",
            loc["localised"],
            loc["caught"],
            100 * loc["localised_share"],
        )
    log.info("report written to %s", out)


def flat_metrics(report: dict) -> dict[str, float]:
    """An evaluation report as tracker metrics: eval/SPLIT/top1, eval/SPLIT/defect/threshold, ..."""
    prefix = f"eval/{report['dataset']['split']}"
    keys = ("top1", "top5", "macro_f1", "macro_ap", "exact_set_accuracy", "defect_iou", "miou", "mdice")
    keys += ("image_auroc", "image_ap", "f1_max", "pixel_auroc", "aupro")
    metrics = {f"{prefix}/{k}": report[k] for k in keys if k in report}
    per = report.get("per_class") or report.get("per_label") or {}
    for name, m in per.items():
        metrics |= {
            f"{prefix}/{k}/{name}": m[k] for k in ("precision", "recall", "ap", "f1", "iou") if k in m
        }
    d = report.get("defect")
    if d and "threshold" in d:
        keep = ("threshold", "escape_rate", "false_alarm_rate", "roc_auc", "average_precision")
        metrics |= {f"{prefix}/defect/{k}": d[k] for k in keep if k in d}
    if (report.get("localisation") or {}).get("localised_share") is not None:
        metrics[f"{prefix}/defect/localised_share"] = report["localisation"]["localised_share"]
    return {k: float(v) for k, v in metrics.items()}
