"""The LightningModule: loss, optimisation and metrics around a `Classifier`.

It takes built parts (the network, optimizer and scheduler factories) and never sees the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning.pytorch as L
import torch
import torchmetrics as tm
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from train.classifier import Classifier

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


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        net: Classifier,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ):
        super().__init__()
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.channels_last = channels_last
        if channels_last:  # NHWC weights and inputs: the fast conv layout on GPUs with tensor cores
            self.net.to(memory_format=torch.channels_last)
        self.classes = net.spec.classes
        n = len(self.classes)
        task = {"task": "multiclass", "num_classes": n}
        self.train_acc = tm.Accuracy(**task)
        val = {"acc": tm.Accuracy(**task), "f1": tm.F1Score(**task, average="macro")}
        if n > 5:
            val["acc5"] = tm.Accuracy(**task, top_k=5)
        self.val_metrics = tm.MetricCollection(val, prefix="val/")
        self.val_recall = tm.Recall(**task, average="none")
        self.val_confusion = tm.ConfusionMatrix(**task)
        self.confusion: list[list[int]] | None = None  # rows: true class, columns: predicted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]  # uint8 (B, 3, H, W), int64 (B,); then keys, bad counts
        logits = self(images)
        loss = self.loss(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        logits = self(images)
        self.log("val/loss", self.loss(logits, labels), batch_size=len(labels), sync_dist=True)
        self.val_metrics.update(logits, labels)
        self.val_recall.update(logits, labels)
        self.val_confusion.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        # compute() syncs the metric states across ranks once per epoch: exact, whatever each
        # rank's batch count was.
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        for name, recall in zip(self.classes, self.val_recall.compute()):
            self.log(f"val/recall/{name}", recall)
        self.confusion = self.val_confusion.compute().tolist()
        for metric in (self.val_metrics, self.val_recall, self.val_confusion):
            metric.reset()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
