"""The LightningModule: loss, optimisation and metrics around a `Network`, for every task.

It takes built parts (the network, optimizer and scheduler factories) and never sees the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace

import lightning.pytorch as L
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from train.mixing import Mixer
from train.network import Network
from train.tiled import part_probs

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]


def cosine_with_warmup(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up over `warmup_steps` optimizer steps, then cosine decay to zero at
    `total_steps`; stepped once per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


class TaskModule(L.LightningModule):
    """One module for every task: the task (train/tasks) gives the loss and the validation
    metrics; targets are whatever the data layer read for it (class indices, multi-hot rows,
    masks). With `sources` (a data.mix), validation keys read NAME:KEY and each source's samples
    are also judged on their own, as val/NAME/acc and the like."""

    def __init__(
        self,
        net: Network,
        task,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        sources: tuple[str, ...] = (),
        mixer: Mixer | None = None,
    ):
        super().__init__()
        self.net, self.task = net, task
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss = task.loss(label_smoothing)
        self.channels_last = channels_last
        if channels_last:  # NHWC weights and inputs: the fast conv layout on GPUs with tensor cores
            self.net.to(memory_format=torch.channels_last)
        self.classes = net.spec.classes
        self.train_metric = task.train_metric(net.spec)  # classify: accuracy; None elsewhere
        self.val_metrics = task.metrics(net.spec)
        self.mixer = mixer if mixer is not None and mixer.on else None  # train/mixing.py: mixup, cutmix
        self.sources = tuple(sources)  # a list, not a dict: a source's name may hold dots
        self.source_metrics = nn.ModuleList(task.metrics(net.spec) for _ in self.sources)
        self.confusion: list[list[int]] | None = None  # classes or pixels; rows: true, columns: predicted
        # patchcore fills a memory bank: no loss, so no optimizer step to automate
        self.automatic_optimization = not getattr(task, "frozen", False)
        if not self.automatic_optimization:
            # DDP refuses a module with nothing to learn; one unused scalar (outside `net`, so in
            # no model file or export) lets a frozen task spread its pass over ranks as any other.
            self.ddp_anchor = nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]  # uint8 (B, 3, H, W), the task's targets; then keys, bad counts
        if hasattr(self.task, "train_step"):  # anomaly: synthetic defects, or a memory bank
            return self.task.train_step(self, images, targets, batch[2])
        if self.mixer is not None:  # on the device: soft targets (B, C), each row summing to 1
            images, soft, _ = self.mixer(images, targets, self.global_step, self.global_rank)
            logits = self(images)
            loss = self.loss(logits, soft)
            targets = soft.argmax(dim=1) if targets.dim() == 1 else targets  # accuracy: the larger share
        else:
            logits = self(images)
            loss = self.loss(logits, targets)
        self.log("train/loss", loss, prog_bar=True)
        if self.train_metric is not None:
            self.train_metric(logits, targets)
            self.log("train/acc", self.train_metric, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_start(self) -> None:
        if hasattr(self.task, "on_train_epoch_start"):  # patchcore: a new pass, a new bank
            self.task.on_train_epoch_start(self)

    def on_validation_epoch_start(self) -> None:
        if hasattr(self.task, "on_validation_start"):  # patchcore: the bank's final selection
            self.task.on_validation_start(self)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, targets, keys = batch[0], batch[1], batch[2]
        if self.net.spec.tiles:  # whole parts, tiled as in training and stitched: judged per part
            for image, target, key in zip(images, targets, keys):
                self._validate(part_probs(self.net, image)[None].to(self.device), target[None], [key])
            return
        if getattr(self.task, "scores_maps", False):  # anomaly: scored, not a loss on real defects
            self._update(self.net.probabilities(images), targets, keys)
            return
        logits = self(images)
        self.log("val/loss", self.loss(logits, targets), batch_size=len(images), sync_dist=True)
        self._update(logits, targets, keys)

    def _validate(self, probs: torch.Tensor, targets, keys: list[str]) -> None:
        """One whole part's stitched probabilities (1, C, H, W) or strongest tile's (1, C)."""
        if getattr(self.task, "scores_maps", False):
            self._update(probs, targets, keys)
            return
        # log-probabilities stand in for logits: the loss's and metrics' softmax gives them back
        logits = probs.clamp_min(1e-12).log() if self.net.spec.task != "multilabel" else probs.logit(1e-6)
        self.log("val/loss", self.loss(logits, targets), batch_size=1, sync_dist=True)
        self._update(logits, targets, keys)

    def _update(self, outputs: torch.Tensor, targets, keys: list[str]) -> None:
        """The metrics of the whole split, and of each source its samples came from."""
        self.val_metrics.update(outputs, targets)
        for name, metrics in zip(self.sources, self.source_metrics):
            mine = [i for i, key in enumerate(keys) if key.startswith(f"{name}:")]
            if mine:
                picked = targets[mine] if torch.is_tensor(targets) else [targets[i] for i in mine]
                metrics.update(outputs[mine], picked)

    def on_validation_epoch_end(self) -> None:
        # compute() syncs the metric states across ranks once per epoch: exact, whatever each
        # rank's batch count was.
        values = self.val_metrics.compute()
        calibration = getattr(self.val_metrics, "calibration", None)
        if calibration:  # anomaly: what defect_score 0.5 means, in every checkpoint from now on
            spec = self.net.spec
            self.net.spec = replace(spec, extra={**spec.extra, "calibration": calibration})
            for metrics in (self.val_metrics, *self.source_metrics):
                metrics.spec = self.net.spec
        shown = {"val/acc", "val/f1", "val/defect_iou", "val/miou", "val/image_auroc", "val/pixel_auroc"}
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown})
        self.confusion = self.val_metrics.confusion
        self.val_metrics.reset()
        for name, metrics in zip(self.sources, self.source_metrics):
            shown = metrics.compute()  # every rank: the states sync, whichever rank saw the source
            self.log_dict({f"val/{name}/{k.removeprefix('val/')}": v for k, v in shown.items()})
            metrics.reset()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
