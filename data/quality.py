"""Bad samples, counted where training sees them: a metric per epoch and a limit.

Loader workers skip what cannot train (undecodable images, bad labels, truncated tars) and
send the counts along with their batches. This callback sums them over the epoch and over
ranks, logs `data/bad_samples` and `data/bad_fraction`, and stops the run when the fraction
passes `max_bad_fraction`, naming the shards that lost the most.
"""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from data.distributed import all_gather_objects
from data.errors import UserError
from data.samples import is_left_out


class BadDataMonitor(L.Callback):
    def __init__(self, max_bad_fraction: float = 0.01):
        self.max_bad_fraction = max_bad_fraction
        self.good = 0
        self.reasons: Counter = Counter()
        self.shards: Counter = Counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if len(batch) > 3:  # (images, labels, keys, skipped) from the shard stream
            self.good += len(batch[2])
            self.reasons.update(batch[3]["reasons"])
            self.shards.update(batch[3]["shards"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Samples a task leaves out on purpose (task=anomaly: the defects of the train split) are
        # counted apart: they are no bad data, and the bad fraction is of the samples it trains on.
        left = sum(n for r, n in self.reasons.items() if is_left_out(r))
        local = torch.tensor([self.good, sum(self.reasons.values()) - left, left], dtype=torch.float64)
        reduced = trainer.strategy.reduce(local.to(pl_module.device), reduce_op="sum")
        good, bad, left = (int(x) for x in reduced)
        fraction = bad / max(1, good + bad)
        logged = {"data/bad_samples": float(bad), "data/bad_fraction": fraction}
        if left:
            logged["data/left_out"] = float(left)
        pl_module.log_dict(logged, sync_dist=False)
        if bad:
            rank_zero_info(f"epoch {trainer.current_epoch}: skipped {bad} bad samples ({fraction:.2%})")
        if left and trainer.current_epoch == 0:
            rank_zero_info(
                f"left out {left} defect samples of the train split this epoch: task=anomaly learns from "
                f"the {good} good ones (defects belong in val and test, where they are scored)"
            )
        shards, reasons = self._gather(trainer)
        self.good, self.reasons, self.shards = 0, Counter(), Counter()
        if good == 0 and left:
            raise UserError(
                f"the train split has no good samples (all {left} were defects): task=anomaly learns from "
                "good parts only; write good images into the train split"
            )
        if good == 0:
            raise UserError(
                "no training sample could be read this epoch (run python -m data verify on the data set)"
            )
        if fraction > self.max_bad_fraction:
            worst = ", ".join(f"{url} ({n})" for url, n in shards.most_common(3))
            why = ", ".join(f"{n} {r}" for r, n in reasons.most_common() if not is_left_out(r))
            raise UserError(
                f"{fraction:.1%} of this epoch's training samples were bad ({why}), over "
                f"data.max_bad_fraction={self.max_bad_fraction}; worst shards: {worst} "
                "(check them with python -m data verify, or raise the limit)"
            )

    def _gather(self, trainer: L.Trainer) -> tuple[Counter, Counter]:
        """Every rank's per-shard and per-reason counts (strings travel as objects)."""
        shards, reasons = Counter(), Counter()
        for s, r in all_gather_objects((self.shards, self.reasons)):
            shards.update(s)
            reasons.update(r)
        return shards, reasons
