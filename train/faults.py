"""Test-only fault injection, documented for fault tests (Ray's recovery included):

    SHARDTRAIN_KILL_AT_STEP=N    that rank SIGKILLs itself as optimizer step N starts, the way an
                                 out-of-memory kill or a lost node ends a process: no cleanup,
                                 no final checkpoint
    SHARDTRAIN_RAISE_AT_STEP=N   that rank raises RuntimeError there instead (a crash in code)
    SHARDTRAIN_KILL_RANK=R       which rank (default 0)
    SHARDTRAIN_FAULT_ALWAYS=1    also in a run resumed from a checkpoint (by default a fault
                                 fires once: a restarted run that resumed goes on, so recovery
                                 can be tested; always, retries run out)

Unset, nothing is added to the trainer."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as L


class FaultAtStep(L.Callback):
    def __init__(self, step: int, rank: int = 0, kill: bool = True, always: bool = False):
        self.step, self.rank, self.kill, self.always = step, rank, kill, always

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        if trainer.ckpt_path and not self.always:
            return  # this run resumed after the fault: let it finish
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {self.step} on rank {self.rank} (test-only fault)")


def from_env() -> list[L.Callback]:
    kill, fail = os.environ.get("SHARDTRAIN_KILL_AT_STEP"), os.environ.get("SHARDTRAIN_RAISE_AT_STEP")
    if not (kill or fail):
        return []
    rank = int(os.environ.get("SHARDTRAIN_KILL_RANK", "0"))
    always = os.environ.get("SHARDTRAIN_FAULT_ALWAYS") == "1"
    return [FaultAtStep(int(kill or fail), rank, kill=bool(kill), always=always)]
