"""`task=anomaly task.method=patchcore`: a memory bank of good patches, scored by the nearest
one (Roth et al., "Towards total recall in industrial anomaly detection", CVPR 2022).

    image (B, 3, S, S) ─▶ frozen backbone (model.pretrained) ─▶ levels `layers` (strides 8, 16)
        ─▶ each averaged over `pool` x `pool` neighbours, upsampled to the first level, stacked
        ─▶ patch features (B, D, h, w) ─▶ distance to the nearest bank row ─▶ map (B, 1, h, w)
        ─▶ upsampled to (S, S), smoothed (sigma): the raw anomaly map; its maximum, the score

Memory is bounded by the budget whatever the number of training images: each rank streams its
patches into a buffer and, whenever the buffer passes twice the budget, cuts it to the budget
by greedy coreset selection (farthest point first, on a fixed random projection to 128
dimensions). At the end of the pass (before validation) every rank's buffer is gathered, put in
one order (by sample key and patch), and a final selection cuts the whole to the budget. When
no rank had to cut on the way (the pass fits twice the budget per rank) the bank is exactly the
one a single rank builds; otherwise each rank's cuts are approximations of one global cut.

The bank is a buffer of the network, so it travels in checkpoints and inside exported graphs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.errors import UserError
from train.tasks.draem import gaussian_kernel, smooth

PROJECTION = 128  # dimensions the coreset selection measures distances in
BANK_BLOCK = 1024  # bank rows per distance block: 32 images of 28 x 28 patches take 100 MB


def greedy_coreset(x: torch.Tensor, k: int, projection: torch.Tensor) -> torch.Tensor:
    """Indices (k,) of k rows of x (N, D) chosen farthest point first, starting from row 0:
    every row of x ends up near a chosen one. Deterministic for a given row order."""
    if k >= len(x):
        return torch.arange(len(x))
    z = x @ projection  # (N, 128)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = 0
    nearest = ((z - z[0]) ** 2).sum(dim=1)
    for i in range(1, k):
        j = int(nearest.argmax())
        chosen[i] = j
        nearest = torch.minimum(nearest, ((z - z[j]) ** 2).sum(dim=1))
    return chosen


def key_ids(keys: list[str], per_image: int) -> torch.Tensor:
    """(len(keys) * per_image, 2) int64: (a hash of the sample key, patch index) per patch, an
    order of the patches that is the same whichever rank read them."""
    h = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=7).digest(), "big") for k in keys]
    hashes = torch.tensor(h, dtype=torch.long).repeat_interleave(per_image)
    return torch.stack([hashes, torch.arange(per_image).repeat(len(keys))], dim=1)


class PatchCoreNet(nn.Module):
    """normalised images (B, 3, S, S) → the raw anomaly map (B, 1, S, S): distances to the
    nearest bank patch, in feature units. `bank` (M, D) fills during training."""

    def __init__(self, features: nn.Module, pool: int, sigma: float):
        super().__init__()
        self.features, self.pool = features, pool
        dim = sum(features.feature_info.channels())
        self.register_buffer("bank", torch.zeros(0, dim))
        gen = torch.Generator().manual_seed(0)
        self.register_buffer(
            "projection",
            torch.randn(dim, PROJECTION, generator=gen) / math.sqrt(PROJECTION),
            persistent=False,
        )
        self.register_buffer(
            "kernel", gaussian_kernel(sigma) if sigma > 0 else torch.ones(1), persistent=False
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "bank")
        if saved is not None:  # a trained bank has its own size: take it as it is
            self.bank = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features (B, D, h, w) at the first level's resolution (stride 8)."""
        levels = self.features(x)
        size = levels[0].shape[-2:]
        pooled = [F.avg_pool2d(f, self.pool, stride=1, padding=self.pool // 2) for f in levels]
        pooled = [
            p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            for p in pooled
        ]
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.anomaly_map(x)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x).float()
        h, w = e.shape[-2:]
        patches = e.flatten(2).transpose(1, 2)  # (B, h*w, D); the batch stays symbolic in exports
        # Squared distances |p|^2 - 2 p.b + |b|^2 to BANK_BLOCK bank rows at a time, keeping each
        # patch's minimum: memory B x h*w x BANK_BLOCK whatever the bank's size.
        bank = self.bank.float()
        p2 = (patches**2).sum(dim=2, keepdim=True)
        best = None
        for i in range(0, len(bank), BANK_BLOCK):
            part = bank[i : i + BANK_BLOCK]
            d2 = p2 - 2 * patches @ part.T + (part**2).sum(dim=1)
            low = d2.amin(dim=2)
            best = low if best is None else torch.minimum(best, low)
        dist = best.clamp_min(0).sqrt().unflatten(1, (h, w)).unsqueeze(1)  # (B, 1, h, w)
        up = F.interpolate(dist, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return smooth(up, self.kernel)


class PatchCore:
    """The method's part of the anomaly task: the frozen network, and the bank built in one pass
    over the good training images (no loss, no optimizer step)."""

    frozen = True  # nothing to learn by gradient: the module steps no optimizer
    augments = False  # the bank keeps good patches as evaluation sees them: eval transform in training

    def __init__(
        self, sigma: float, layers=(2, 3), pool: int = 3, budget_mb: float = 64.0, budget_patches=None
    ):
        self.sigma, self.layers, self.pool = sigma, [int(v) for v in layers], int(pool)
        self.budget_mb = float(budget_mb)
        self.budget_patches = int(budget_patches) if budget_patches else None
        self._buffer: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._pending = False
        self.peak_patches = 0  # the most patches this rank held at once: the memory bound, tested

    def options(self) -> dict:
        return {
            "layers": self.layers,
            "pool": self.pool,
            "budget_mb": self.budget_mb,
            "budget_patches": self.budget_patches,
        }

    def build(self, backbone: str, pretrained: str | None) -> PatchCoreNet:
        import timm

        from train.network import backbone_problem

        problem = "a torchvision model has no features_only form" if backbone.startswith("tv/") else None
        problem = problem or backbone_problem(backbone)
        if problem:
            raise UserError(
                f"model.backbone={backbone}: task.method=patchcore takes a timm backbone: {problem}"
            )
        try:
            features = timm.create_model(
                backbone, features_only=True, out_indices=tuple(self.layers), pretrained=False
            )
        except (RuntimeError, ValueError, IndexError, AssertionError) as e:
            raise UserError(f"task.layers={self.layers} with model.backbone={backbone}: {e}") from None
        if pretrained:
            _load_all(features, pretrained, backbone)
        features.eval().requires_grad_(False)
        return PatchCoreNet(features, self.pool, self.sigma)

    def loss(self) -> None:
        return None

    def budget(self, dim: int) -> int:
        """Bank rows: budget_patches, else budget_mb of float32 rows of `dim` features."""
        return self.budget_patches or int(self.budget_mb * 2**20 // (4 * dim))

    # ---- the pass over the training images ------------------------------------------------

    def on_train_epoch_start(self, module) -> None:
        done = module.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done:  # a mid-epoch checkpoint: the patches of those batches are in no checkpoint
            raise UserError(
                f"task.method=patchcore builds its bank in one pass, and this run resumes {done} batches "
                "into one, whose patches no checkpoint holds: resume from a checkpoint at the end of the "
                "pass "
                "(epoch000.ckpt, last.ckpt), or start afresh"
            )
        self._buffer, self._ids, self._pending, self.peak_patches = [], [], True, 0

    @torch.no_grad()
    def train_step(self, module, images: torch.Tensor, keys: list[str]) -> None:
        net = module.net.backbone
        net.eval()  # frozen: batch norm keeps its pretrained statistics
        e = net.embed(module.net.normalize(images)).float()
        b, d, h, w = e.shape
        budget = self.budget(d)
        if budget < h * w:
            raise UserError(
                f"the memory bank's budget ({budget} patches of {d} features: "
                f"task.budget_mb={self.budget_mb}, "
                f"task.budget_patches={self.budget_patches}) is smaller than one image's {h * w} patches: "
                f"raise task.budget_mb to at least {math.ceil(h * w * d * 4 / 2**20 * 10) / 10}"
            )
        self._buffer.append(e.permute(0, 2, 3, 1).reshape(-1, d).cpu())
        self._ids.append(key_ids(keys, h * w))
        held = sum(len(x) for x in self._buffer)
        self.peak_patches = max(self.peak_patches, held)
        if held > 2 * budget:
            x, ids = _ordered(torch.cat(self._buffer), torch.cat(self._ids))
            keep = greedy_coreset(x, budget, net.projection.cpu())
            self._buffer, self._ids = [x[keep]], [ids[keep]]
        module.log("train/bank_patches", float(held), prog_bar=True, batch_size=b)
        # An optimizer step over no gradient changes nothing, but counts the step: global_step,
        # logging and step-based checkpoints then run as in any training.
        module.optimizers().step()

    def on_validation_start(self, module) -> None:
        """The final selection, once per pass, on every rank together (before validation)."""
        if not self._pending:
            return
        from data.distributed import all_gather_objects

        self._pending = False
        net = module.net.backbone
        mine = (torch.cat(self._buffer), torch.cat(self._ids)) if self._buffer else None
        parts = [p for p in all_gather_objects(mine) if p is not None]
        self._buffer, self._ids = [], []
        if not parts:
            raise UserError("the memory bank is empty: no good training image reached task.method=patchcore")
        x, _ = _ordered(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        budget = self.budget(x.shape[1])
        keep = greedy_coreset(x, budget, net.projection.cpu())
        net.bank = x[keep].to(net.bank.device)
        peaks = all_gather_objects(self.peak_patches)
        spec = module.net.spec
        bank = {
            "patches": len(keep),
            "budget_patches": budget,
            "features": int(x.shape[1]),
            "mb": round(len(keep) * x.shape[1] * 4 / 2**20, 3),
            "gathered_patches": len(x),
            "peak_patches_per_rank": max(peaks),  # the most any rank held while streaming
        }
        module.net.spec = replace(spec, extra={**spec.extra, "bank": bank})


def _ordered(x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by (key hash, patch): one order for any split of the samples over ranks."""
    order = torch.from_numpy(np.lexsort((ids[:, 1].numpy(), ids[:, 0].numpy())))
    return x[order], ids[order]


def _load_all(features: nn.Module, path: str, backbone: str) -> None:
    """Every tensor of the feature levels from `path`, or one message saying which do not fit:
    a frozen backbone with some random layers would score noise."""
    from train.network import read_weights

    state = read_weights(path)
    own = features.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fits]
    if missing:
        raise UserError(
            f"model.pretrained={path} does not fit model.backbone={backbone}: {len(missing)} of its "
            f"{len(own)} "
            f"feature tensors are missing or shaped otherwise (e.g. {missing[0]}); give the weights of "
            f"{backbone} itself (a timm or torchvision state dict, .safetensors or .pth)"
        )
    features.load_state_dict(fits)
