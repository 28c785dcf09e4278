"""Test-only fault injection: `SHARDTRAIN_KILL_AT_STEP=N` (and optionally
`SHARDTRAIN_KILL_RANK=R`, default 0) makes that rank SIGKILL itself as optimizer step N starts,
the way an out-of-memory kill or a lost node ends a process: no cleanup, no final checkpoint.
Unset, nothing is added to the trainer."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as L


class KillAtStep(L.Callback):
    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def from_env() -> list[L.Callback]:
    step = os.environ.get("SHARDTRAIN_KILL_AT_STEP")
    if not step:
        return []
    return [KillAtStep(int(step), int(os.environ.get("SHARDTRAIN_KILL_RANK", "0")))]
