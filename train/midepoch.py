"""`last.ckpt` in the middle of an epoch: every N optimizer steps, and when the machine is about to
be taken away.

Kubernetes, spot instances and SLURM send SIGTERM before they kill a job (SLURM's `--signal`
sends SIGUSR1 earlier still), and Ctrl-C sends SIGINT. On such a signal every rank stops at the
next optimizer step, the exact position (data included) is written to `last.ckpt`, and the
process exits 128 + the signal's number (143 for SIGTERM), the status a scheduler reads as
"terminated by a signal", with a message saying how to continue:

    signal ──▶ flag (handler: nothing else)      step ends ──▶ ranks agree (all-reduce of the flag)
                                                            ──▶ every rank saves last.ckpt ──▶ Preempted

Lightning's own SIGTERM handling stops the run at a step without a checkpoint and exits 0 (a
scheduler reads that as success), so these handlers replace it for the fit. A second signal
exits at once; a watchdog exits `grace_s` after the first if no step boundary came (a long
validation, a stalled read), so the job never outlives the grace a scheduler gives it. A signal
during validation takes effect at the first step after it: a checkpoint taken inside the epoch's
validation does not resume exactly in Lightning, so none is taken there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence

import lightning.pytorch as L
import torch

from data.errors import Preempted

log = logging.getLogger("train")


class MidEpochCheckpoint(L.Callback):
    """Writes `last.ckpt` (with the data position, so `resume=auto` continues at the exact batch)
    every `every_n_steps` optimizer steps, and at the next step after one of `on_signal`."""

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int | None = None,
        on_signal: Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGINT"),
        grace_s: float = 30.0,
    ):
        self.dirpath, self.every_n_steps, self.grace_s = dirpath, every_n_steps, grace_s
        self.signals = [signal.Signals[name] for name in on_signal]
        self._saved = -1  # global step of the newest save
        self._step = -1  # global step at the previous batch end: a change means an optimizer step
        self._received = 0  # the signal's number, 0 for none

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, "last.ckpt")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here rather than at fit start: Lightning installs its handlers in between, and puts
        # back the ones from before the fit when it ends.
        self._step = trainer.global_step
        if threading.current_thread() is threading.main_thread():  # a Ray worker runs in a thread
            for s in self.signals:
                signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._received:  # the second one: stop now, as the signal would without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.request_stop(signum)
        watchdog = threading.Timer(self.grace_s, self._too_late, args=(signum,))
        watchdog.daemon = True
        watchdog.start()

    def request_stop(self, signum: int) -> None:
        """Stop at the next optimizer step as if this process had received `signum`: how a Ray
        worker learns that its driver was signalled."""
        self._received = self._received or signum

    def _too_late(self, signum: int) -> None:
        log.error(
            "error: no optimizer step ended within checkpoint.grace_s=%g s of %s, so no new checkpoint "
            "was written; resume=auto continues from the newest one",
            self.grace_s,
            signal.Signals(signum).name,
        )
        logging.shutdown()
        os._exit(128 + signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step
        if step == self._step:
            return  # inside gradient accumulation: no optimizer step, so no boundary to stop at
        self._step = step
        signum = self._agreed(trainer)
        if signum:
            self._stop(trainer, signum)
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._saved:
            self._save(trainer)

    def _agreed(self, trainer: L.Trainer) -> int:
        """The signal any rank received (0: none), the same on every rank: a scheduler may signal
        only the first process, and ranks that stopped apart would hang the others."""
        if trainer.world_size == 1:
            return self._received
        flag = torch.tensor(self._received, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op=torch.distributed.ReduceOp.MAX))

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        self._save(trainer)
        raise Preempted(
            f"stopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: the exact position is in {self.path}; run the same command with "
            "resume=auto to continue at this batch",
            code=128 + signum,
        )

    def _save(self, trainer: L.Trainer) -> None:
        self._saved = trainer.global_step
        # Every rank takes part (the data position and audit marks are per rank); rank zero
        # writes, beside the old file and renamed over it (train.checkpoint.AtomicCheckpointIO).
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable
