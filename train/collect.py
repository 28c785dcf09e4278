"""Every sample's prediction over an evaluation split, collected on each rank and merged: the
input of `python -m train.evaluate`'s report. What is kept per sample is the task's
(train/tasks: `collect`); this module gathers it the same way for every task."""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as L
import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data.distributed import all_gather_objects
from train.network import Network
from train.tiled import part_probs

SUMMED = ("counts", "pixel_counts")  # per-batch arrays that add up (pixel confusion, histograms)


class Predictions(L.LightningModule):
    """Predicts the eval plan's samples (run it with `trainer.validate`), keeping this rank's
    keys and what the task keeps per sample, and its `gallery` worst parts with their pixels."""

    def __init__(self, net: Network, task, defects: list[int], gallery: int):
        super().__init__()
        self.net, self.task, self.defects, self.gallery = net, task, defects, gallery
        # A split smaller than the world leaves some ranks nothing to predict; they still take
        # part in the gather, which runs after the pass, outside Lightning's hooks.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.keys: list[str] = []
        self.parts: list[dict] = []
        self.worst: list[dict] = []
        self.bad: Counter = Counter()

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, targets, keys = batch[0], batch[1], batch[2]  # uint8 (B, 3, S, S), the task's, B keys
        if len(batch) > 3:
            self.bad.update(batch[3]["reasons"])
        if not self.net.spec.tiles:
            self._collect(self.net.probabilities(images), targets, keys, images)
            return
        for k, image in enumerate(images):  # whole parts, tiled and stitched: (3, H, W) each
            target = targets[k : k + 1] if isinstance(targets, torch.Tensor) else [targets[k]]
            self._collect(part_probs(self.net, image)[None], target, keys[k : k + 1], image[None])

    def _collect(self, probs: torch.Tensor, targets, keys: list[str], images: torch.Tensor) -> None:
        part = self.task.collect(probs, targets, self.net.spec, self.defects)
        for item in part.pop("gallery"):
            # the batch lives in reused shared memory: keep a copy of the pixels
            item = {**item, "key": keys[item["index"]], "image": images[item["index"]].cpu().clone()}
            self.worst.append(shrunk(item) if self.net.spec.tiles else item)
        self.worst = worst(self.worst, self.gallery)
        self.keys += keys
        self.parts.append(part)

    def gathered(self) -> dict:
        """Every rank's predictions, sorted by key (the same order for any number of ranks).
        Called by every rank after the pass (also one that had no batch to predict)."""
        parts = all_gather_objects(
            {"keys": self.keys, "parts": self.parts, "worst": self.worst, "bad": self.bad}
        )
        keys = [k for p in parts for k in p["keys"]]
        order = np.argsort(np.array(keys, dtype=object), kind="stable")
        batches = [b for p in parts for b in p["parts"]]
        out: dict = {"keys": [keys[i] for i in order]}
        for name in batches[0] if batches else ():
            if name in SUMMED:
                out[name] = sum(b[name] for b in batches)
            else:
                out[name] = np.concatenate([b[name] for b in batches])[order]
        out["gallery"] = worst([m for p in parts for m in p["worst"]], self.gallery)
        out["bad"] = sum((p["bad"] for p in parts), Counter())
        return out


def shrunk(item: dict, side: int = 768) -> dict:
    """A gallery entry of a whole large part at most `side` px on its long side: 32 parts of
    20 MP kept at full size would hold 2 GB until the report is drawn."""
    h, w = item["image"].shape[-2:]
    if max(h, w) <= side:
        return item
    size = [round(h * side / max(h, w)), round(w * side / max(h, w))]
    out = dict(item)
    out["image"] = TF.resize(item["image"], size, InterpolationMode.BILINEAR, antialias=True)
    for name in ("mask", "predicted_mask"):
        if name in item:
            out[name] = TF.resize(torch.as_tensor(item[name])[None], size, InterpolationMode.NEAREST)[0]
    if "heat" in item:
        heat = torch.as_tensor(item["heat"])[None]
        out["heat"] = TF.resize(heat, size, InterpolationMode.BILINEAR, antialias=True)[0].numpy()
    return out


def worst(items: list[dict], n: int) -> list[dict]:
    return sorted(items, key=lambda m: (-m["badness"], m["key"]))[:n]
