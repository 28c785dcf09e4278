"""Every sample's prediction over an evaluation split, collected on each rank and merged: the
input of `python -m train.evaluate`'s report."""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as L
import numpy as np
import torch

from data.distributed import all_gather_objects
from train.classifier import Classifier


class Predictions(L.LightningModule):
    """Predicts the eval plan's samples (run it with `trainer.validate`), keeping this rank's
    keys, labels and probabilities, and its `gallery` most confident mistakes with their pixels."""

    def __init__(self, net: Classifier, gallery: int):
        super().__init__()
        self.net, self.gallery = net, gallery
        # A split smaller than the world leaves some ranks nothing to predict; they still take
        # part in the gather, which runs after the pass, outside Lightning's hooks.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.keys: list[str] = []
        self.labels: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self.mistakes: list[dict] = []
        self.bad: Counter = Counter()

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, labels, keys = batch[0], batch[1], batch[2]  # uint8 (B, 3, S, S), (B,), B keys
        if len(batch) > 3:
            self.bad.update(batch[3]["reasons"])
        probs = self.net.probabilities(images)  # (B, C)
        confidence, predicted = probs.max(dim=1)
        self.keys += keys
        self.labels.append(labels.cpu().numpy())
        self.probs.append(probs.cpu().numpy())
        for i in torch.nonzero(predicted != labels).flatten().tolist():
            self.mistakes.append(
                {
                    "key": keys[i],
                    "label": int(labels[i]),
                    "predicted": int(predicted[i]),
                    "confidence": float(confidence[i]),
                    "image": images[i].cpu().clone(),  # the batch lives in reused shared memory
                }
            )
        self.mistakes = most_confident(self.mistakes, self.gallery)

    def gathered(self) -> dict:
        """Every rank's predictions, sorted by key (the same order for any number of ranks).
        Called by every rank after the pass (also one that had no batch to predict)."""
        c = len(self.net.spec.classes)
        part = {
            "keys": self.keys,
            "labels": np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64),
            "probs": np.concatenate(self.probs) if self.probs else np.zeros((0, c), np.float32),
            "mistakes": self.mistakes,
            "bad": self.bad,
        }
        parts = all_gather_objects(part)
        keys = [k for p in parts for k in p["keys"]]
        order = np.argsort(np.array(keys, dtype=object), kind="stable")
        return {
            "keys": [keys[i] for i in order],
            "labels": np.concatenate([p["labels"] for p in parts])[order],
            "probs": np.concatenate([p["probs"] for p in parts])[order],
            "mistakes": most_confident([m for p in parts for m in p["mistakes"]], self.gallery),
            "bad": sum((p["bad"] for p in parts), Counter()),
        }


def most_confident(mistakes: list[dict], n: int) -> list[dict]:
    return sorted(mistakes, key=lambda m: (-m["confidence"], m["key"]))[:n]
