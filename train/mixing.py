"""Mixup and CutMix on the device, on the batch as the loader hands it over (uint8), with the
labels mixed alike: `mixup.alpha`, `mixup.cutmix_alpha` (classify and multilabel; a mask or an
anomaly map has no mixed label to learn from, so the settings check refuses them there).

    images (B, 3, H, W) uint8 ──▶ λ ~ Beta(α, α), a permutation π of the batch
        mixup:  x = λ·x + (1 - λ)·x[π]                       (float, still on the 0..255 scale)
        cutmix: x[box] = x[π][box], a box of area ≈ (1 - λ)·H·W; λ becomes the uncut share
    targets ──▶ y = λ·y + (1 - λ)·y[π]   class indices become one-hot rows first, so each row
                                         sums to 1 (multi-hot rows stay in [0, 1])

Each draw comes from a generator seeded with (seed, global step, rank), not from the process's
RNG: a run resumed at a step mixes that step's batch exactly as the uninterrupted run did.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class Mixer:
    def __init__(
        self,
        alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        num_classes: int = 0,
        seed: int = 0,
    ):
        self.alpha, self.cutmix_alpha = float(alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.num_classes, self.seed = num_classes, seed

    @property
    def on(self) -> bool:
        return self.alpha > 0 or self.cutmix_alpha > 0

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, step: int, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mixed images (B, 3, H, W) float, mixed targets (B, C) float, λ); λ = 1: left as is."""
        rng = np.random.default_rng([self.seed, step, rank])
        soft = targets.float() if targets.dim() == 2 else _one_hot(targets, self.num_classes)
        if len(images) < 2 or rng.random() >= self.prob:
            return images.float(), soft, 1.0
        cut = self.cutmix_alpha > 0 and (self.alpha <= 0 or rng.random() < self.switch_prob)
        lam = float(rng.beta(*(2 * [self.cutmix_alpha if cut else self.alpha])))
        order = torch.from_numpy(rng.permutation(len(images))).to(images.device)
        mixed = images.float()
        if cut:
            h, w = images.shape[-2:]
            top, bottom, left, right = _box(rng, h, w, lam)
            mixed[..., top:bottom, left:right] = mixed[order][..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (h * w)  # the share the box left uncut
        else:
            mixed = lam * mixed + (1 - lam) * mixed[order]
        return mixed, lam * soft + (1 - lam) * soft[order], lam


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def _box(rng: np.random.Generator, h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area ≈ (1 - λ)·h·w centred at a uniform point, clipped to the image (CutMix)."""
    ratio = math.sqrt(1 - lam)
    bh, bw = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, left = max(cy - bh // 2, 0), max(cx - bw // 2, 0)
    return top, min(cy + bh - bh // 2, h), left, min(cx + bw - bw // 2, w)
