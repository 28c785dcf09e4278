"""`launcher=ray`: the same `train.run.train` inside Ray Train's TorchTrainer, one process per worker.

    driver (python -m train ... launcher=ray, or a `ray job submit` entrypoint)
      │  composes and resolves the config once; workers get it as a plain dict
      └─ TorchTrainer(num_workers, use_gpu, resources_per_worker,
         │            storage_path, max_failures)
         └─ each worker: train(cfg) with RayDDPStrategy, RayLightningEnvironment and
            prepare_trainer; ReportCheckpoints hands every checkpoint to Ray, which keeps it
            under storage_path/NAME. A restarted worker group (after a worker died) resumes
            from the newest one, at its exact data position.

Ray is imported here only, so local runs never pay for it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time

import lightning.pytorch as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from data.errors import Preempted, UserError
from train.midepoch import MidEpochCheckpoint

log = logging.getLogger("train")
CHECKPOINT = "checkpoint.ckpt"
# Settings a worker needs from the driver's environment: object-storage credentials, tracker
# settings and the test-only fault switches. Values travel in Ray's runtime environment, never
# in the logged config.
PASSED_ON = ("SHARDTRAIN_", "AWS_", "MLFLOW_", "WANDB_", "GOOGLE_APPLICATION_CREDENTIALS")


class ReportCheckpoints(Checkpoint):
    """Reports a checkpoint (with the data position) to Ray Train every `every_n_steps` optimizer
    steps and at every epoch end; Ray copies it to `storage_path`. Every rank takes part (a
    report is a collective); rank zero's directory holds the file. A `Checkpoint` callback, so
    Lightning runs it after ModelCheckpoint, whose best path the report carries."""

    def __init__(self, every_n_steps: int | None):
        self.every_n_steps, self._reported = every_n_steps, -1

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._reported:
            self._report(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, Preempted):  # every rank stopped at the same step: report it
            self._report(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._reported:  # stopped mid-epoch (max_steps): report the end
            self._report(trainer)

    def _report(self, trainer: L.Trainer) -> None:
        import ray.train

        self._reported = trainer.global_step
        directory = tempfile.mkdtemp(prefix="shardtrain-ckpt-")
        trainer.save_checkpoint(os.path.join(directory, CHECKPOINT), weights_only=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best = next((c.best_model_path for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), "")
        metrics |= {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        metrics["best_checkpoint"] = best  # the driver prints the last report's metrics
        checkpoint = ray.train.Checkpoint.from_directory(directory) if trainer.global_rank == 0 else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _worker(config: dict) -> None:
    """One Ray Train worker: the local training path, adapted at its edges."""
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayFSDPStrategy, RayLightningEnvironment, prepare_trainer

    from train.console import one_log_stream
    from train.run import train

    one_log_stream()
    cfg = OmegaConf.create(config["cfg"])
    restored = ray.train.get_checkpoint()
    trainer_args = {
        # FSDP shards parameters, gradients and optimizer state across workers: for backbones
        # whose training state does not fit one GPU. GPU only; DDP otherwise.
        "strategy": RayFSDPStrategy() if cfg.launcher.strategy == "fsdp" else RayDDPStrategy(),
        "plugins": [RayLightningEnvironment()],
        "devices": "auto",
        "accelerator": "gpu" if cfg.launcher.use_gpu else "cpu",
    }
    callbacks = [
        ReportCheckpoints(cfg.checkpoint.every_n_steps),
        StopWhenTheDriverIsSignalled(config["stop"]),
    ]
    run = {"trainer_args": trainer_args, "callbacks": callbacks, "prepare": prepare_trainer}
    try:
        if restored is None:
            train(cfg, **run)
        else:
            with restored.as_directory() as directory:  # a restart: continue at the saved position
                train(cfg, ckpt_path=os.path.join(directory, CHECKPOINT), **run)
    except Preempted:
        return  # the position is reported to Ray; the driver exits with the signal's status


class StopWhenTheDriverIsSignalled(L.Callback):
    """Preemption under Ray: the scheduler signals the driver (`ray job stop`, a pod's SIGTERM),
    which sets a flag in a small actor. Rank zero reads it about once a second and tells its
    MidEpochCheckpoint, whose all-reduce stops every rank at the same step; the position is
    reported to Ray and the workers end cleanly, so Ray does not restart them."""

    def __init__(self, flag, every_s: float = 1.0):
        self.flag, self.every_s, self._next = flag, every_s, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank != 0 or time.monotonic() < self._next:
            return
        import ray

        self._next = time.monotonic() + self.every_s
        signum = ray.get(self.flag.get.remote(), timeout=30)
        if signum:
            for callback in trainer.callbacks:
                if isinstance(callback, MidEpochCheckpoint):
                    callback.request_stop(signum)


def _stop_flag():
    """An actor holding the number of the signal the driver received (0: none)."""
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        def __init__(self):
            self.signum = 0

        def set(self, signum: int) -> None:
            self.signum = self.signum or signum

        def get(self) -> int:
            return self.signum

    return StopFlag.remote()


def _forward_signals(names: list[str], flag, grace_s: float) -> tuple[list[int], dict]:
    """Handlers for the driver: the first signal sets the flag (from a thread: no Ray call inside
    a signal handler), a second stops the driver at once, and `grace_s` after the first it exits
    whatever the workers do. Returns a list that holds the signal's number once one came, and
    the handlers they replaced."""
    received: list[int] = []
    came = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        came.set()

    def forward() -> None:
        came.wait()
        flag.set.remote(received[0])
        time.sleep(grace_s)  # the workers stop at their next step; past the grace the driver goes
        log.error("error: the Ray workers did not stop within checkpoint.grace_s=%g s", grace_s)
        logging.shutdown()
        os._exit(128 + received[0])

    threading.Thread(target=forward, daemon=True).start()
    return received, {signal.Signals[n]: signal.signal(signal.Signals[n], handler) for n in names}


def launch(cfg: DictConfig) -> dict:
    """Run `cfg` on Ray and return the final metrics and best checkpoint, as `train` does."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from train import settings

    settings.check(cfg, "train")  # here, before Ray is contacted; workers check again, in ms
    ray_cfg = cfg.launcher
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}
    if not ray.is_initialized():
        # address null: the cluster this job runs in (RAY_ADDRESS, or one started on this
        # machine with `ray start`), else a local one just for this run.
        ray.init(address=ray_cfg.address, runtime_env={"env_vars": env}, log_to_driver=True)
    storage = ray_cfg.storage_path or os.path.join(os.path.abspath(cfg.paths.log_dir), "ray")
    flag = _stop_flag()
    received, previous = _forward_signals(list(cfg.checkpoint.on_signal), flag, cfg.checkpoint.grace_s)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "stop": flag},
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.use_gpu,
            resources_per_worker=dict(ray_cfg.resources_per_worker or {}) or None,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # retries exhausted: the worker's own error is inside
        raise UserError(f"training on Ray failed after {ray_cfg.max_failures} restart(s): {e}") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    metrics = dict(result.metrics or {})
    if received:
        name = signal.Signals(received[0]).name
        raise Preempted(
            f"stopped by {name} at step {metrics.get('global_step')}: Ray keeps the exact position under "
            f"{result.path}; run the same command to continue at that batch",
            code=128 + received[0],
        )
    log.info(
        "ray: %d workers finished at step %s; best checkpoint %s; checkpoints kept under %s",
        ray_cfg.num_workers,
        metrics.get("global_step"),
        metrics.get("best_checkpoint"),
        result.path,
    )
    return {"metrics": {k: v for k, v in metrics.items() if k.startswith("val/")}, **metrics}
