"""The PNGs an evaluation writes: the confusion matrix, the defect ROC and precision-recall
curves with the operating point, and a gallery of the worst parts (the most confident mistakes;
for segmentation the image with its true and predicted masks). matplotlib
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


# Overlay colours per class index (0, the good class, is left clear): RGB
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
    ],
    dtype=np.uint8,
)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(S, S, 3) uint8 with the mask's classes (S, S) painted over, half transparent."""
    colours = PALETTE[np.asarray(mask) % len(PALETTE)]
    painted = np.where((np.asarray(mask) > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
    return painted.astype(np.uint8)


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8: an anomaly map (S, S) in [0, 1] over the image, clear at 0, red from
    0.5 (the calibrated strangeness of the 1% strangest good parts) up."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)[..., None]
    colour = np.concatenate([np.ones_like(h), 1 - h, np.zeros_like(h)], axis=-1) * 255  # yellow → red
    alpha = 0.7 * np.clip((h - 0.25) / 0.5, 0, 1)
    return ((1 - alpha) * image + alpha * colour).astype(np.uint8)


def gallery_png(items: Sequence[dict], path: str, columns: int = 8) -> None:
    """One cell per part, worst first: the image as the model saw it (uint8 (3, S, S)), its
    caption and key; a segmentation part shows three panels: the image, the true mask and the
    predicted mask over it (an anomaly part: its anomaly map, `heat`)."""
    panels = 3 if items and "mask" in items[0] else 1
    columns = max(1, columns // panels)
    cell = THUMB * panels
    rows = max(1, -(-len(items) // columns))
    width = min(columns, max(1, len(items))) * cell
    sheet = Image.new("RGB", (width, rows * (THUMB + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    if not items:
        draw.text((6, 6), "no mistakes", fill="black")
    for i, m in enumerate(items):
        x, y = (i % columns) * cell, (i // columns) * (THUMB + CAPTION)
        image = torch.as_tensor(m["image"]).permute(1, 2, 0).numpy()  # (S, S, 3) uint8
        shown = [image]
        if panels == 3:
            third = heat_overlay(image, m["heat"]) if "heat" in m else overlay(image, m["predicted_mask"])
            shown += [overlay(image, m["mask"]), third]
        for k, pixels in enumerate(shown):
            sheet.paste(Image.fromarray(pixels).resize((THUMB, THUMB), Image.NEAREST), (x + k * THUMB, y))
        draw.text((x + 3, y + THUMB + 2), m["caption"], fill="black")
        draw.text(
            (x + 3, y + THUMB + 17),
            str(m["key"])[-20:] + ("   true | predicted" if panels == 3 else ""),
            fill="gray",
        )
    sheet.save(path)
