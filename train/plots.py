"""The PNGs an evaluation writes: the confusion matrix, the defect ROC and precision-recall
curves with the operating point, and a gallery of the most confident mistakes. matplotlib
(headless) is imported only here, when a report is drawn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

THUMB = 128  # gallery cell side, pixels
CAPTION = 34  # gallery caption height under each image, pixels


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str) -> None:
    """Counts, with each row coloured by its share of the true class (recall on the diagonal)."""
    plt = _pyplot()
    counts = np.asarray(confusion)
    share = counts / np.maximum(1, counts.sum(axis=1, keepdims=True))
    side = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def defect_png(curves: dict, point: dict, path: str) -> None:
    """ROC (detection against false alarms) and precision-recall, the chosen threshold marked."""
    plt = _pyplot()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=100)
    roc.plot(np.r_[0, curves["false_alarm_rate"]], np.r_[0, curves["detection_rate"]])
    roc.set_xlabel("false-alarm rate (good parts stopped)")
    roc.set_ylabel("detection rate (1 - escape rate)")
    roc.set_title("defect vs good: ROC")
    pr.plot(curves["detection_rate"], curves["precision"])
    pr.set_xlabel("recall (detection rate)")
    pr.set_ylabel("precision of a stop")
    pr.set_title("precision-recall")
    label = (
        f"threshold {point['threshold']:.4f}\nescape {point['escape_rate']:.2%}"
        f" (target {point['target_escape']:.2%})\nfalse alarms {point['false_alarm_rate']:.2%}"
    )
    roc.plot([point["false_alarm_rate"]], [1 - point["escape_rate"]], "o", color="C3", label=label)
    roc.legend(loc="lower right")
    for ax in (roc, pr):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gallery_png(mistakes: Sequence[dict], classes: Sequence[str], path: str, columns: int = 8) -> None:
    """One cell per mistake, most confident first: the image as the model saw it (uint8
    (3, S, S)), its key, and "true → predicted (confidence)"."""
    rows = max(1, -(-len(mistakes) // columns))
    width = min(columns, max(1, len(mistakes))) * THUMB
    sheet = Image.new("RGB", (width, rows * (THUMB + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    if not mistakes:
        draw.text((6, 6), "no mistakes", fill="black")
    for i, m in enumerate(mistakes):
        x, y = (i % columns) * THUMB, (i // columns) * (THUMB + CAPTION)
        image = torch.as_tensor(m["image"]).permute(1, 2, 0).numpy()  # (S, S, 3) uint8
        sheet.paste(Image.fromarray(image).resize((THUMB, THUMB), Image.BILINEAR), (x, y))
        truth, guess = classes[m["label"]], classes[m["predicted"]]
        draw.text((x + 3, y + THUMB + 2), f"{truth} -> {guess} ({m['confidence']:.2f})", fill="black")
        draw.text((x + 3, y + THUMB + 17), str(m["key"])[-20:], fill="gray")
    sheet.save(path)
