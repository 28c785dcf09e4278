"""The composition root: the config becomes a datamodule, a module, loggers, callbacks and a
trainer, and training runs. The only place that instantiates from config; tests call `train`."""

from __future__ import annotations

import os
from collections.abc import Callable

import lightning.pytorch as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from data import memory
from data.datamodule import ShardDataModule
from data.errors import Preempted
from data.index import parent_url
from data.quality import BadDataMonitor
from data.targets import find_good
from train import faults, settings
from train.checkpoint import KEY, AtomicCheckpointIO, Lineage, lineage, load_checkpoint
from train.mixing import Mixer
from train.module import TaskModule
from train.network import Network, spec_for
from train.report import summarize
from train.resume import check_resumable, find_resume, shared_with_ranks
from train.tracking import build_loggers, finish, log_config, redact


def build(cfg: DictConfig) -> tuple[ShardDataModule, TaskModule]:
    """The data and the model, as every launcher (local, Ray) builds them."""
    task = instantiate(cfg.task)
    datamodule: ShardDataModule = instantiate(
        cfg.data, target=task.target, eval_fit=task.eval_fit, augment=getattr(task, "augments", True)
    )
    classes = datamodule.classes  # reads the index (writing the embedded set the first time)
    m = cfg.model
    backbone = task.build(m.backbone, len(classes), m.pretrained, m.drop_rate)
    spec = spec_for(
        backbone,
        m.backbone,
        classes,
        cfg.data.image_size,
        cfg.data.crop_pct,
        task=task.name,
        good=find_good(classes),
        options=task.options(),
        tiles=datamodule.tiling.geometry() if datamodule.tiling else {},
        bit_depth=datamodule.index.extra.get("bit_depth"),  # 16-bit camera images: predict scales alike
    )
    module = TaskModule(
        Network(backbone, spec),
        task,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        label_smoothing=m.label_smoothing,
        channels_last=m.channels_last,
        sources=datamodule.val_sources,
        mixer=Mixer(**(cfg.get("mixup") or {}), num_classes=len(classes), seed=cfg.seed),
    )
    return datamodule, module


def without_validation(cfg: DictConfig, split: str, where: str, trainer_args: dict) -> DictConfig:
    """Shards from another tool often have no val split: train on, with a warning that names the
    fix, rather than refuse. No validation loop runs, and checkpoints keep the latest epoch (no
    metric to rank them by)."""
    rank_zero_warn(
        f"{where} has no {split!r} split: training without validation, so no validation metrics and "
        "no best checkpoint by score (last.ckpt is the latest epoch). To validate, move whole shards to "
        f"val with: python -m data index {parent_url(where)} --val-fraction 0.1 --overwrite"
    )
    trainer_args.update(limit_val_batches=0, num_sanity_val_steps=0)
    cfg = cfg.copy()
    with open_dict(cfg):
        for callback in (cfg.get("callbacks") or {}).values():
            if callback.get("monitor"):
                callback.monitor, callback.save_top_k = None, 1  # Lightning: top-k needs a monitor
    return cfg


def train(
    cfg: DictConfig,
    ckpt_path: str | None = None,
    trainer_args: dict | None = None,
    callbacks: list[L.Callback] | None = None,
    prepare: Callable[[L.Trainer], L.Trainer] | None = None,
) -> dict:
    """Fit, and return the final validation metrics and the best checkpoint.

    A launcher adapts the trainer here rather than copying this function: Ray's passes the
    checkpoint it restored (`ckpt_path`, instead of `cfg.resume`), its strategy and cluster
    environment (`trainer_args`), a callback reporting checkpoints, and `prepare_trainer`.
    """
    settings.check(cfg, "train")  # before any shard is generated or process started
    memory.for_model_on(OmegaConf.select(cfg, "trainer.accelerator"))  # before the workers fork
    if ckpt_path:
        meta = load_checkpoint(ckpt_path)[KEY]
    else:
        own = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath") or f"{cfg.paths.output_dir}/checkpoints"
        ckpt_path, meta = find_resume(cfg.resume, own, os.path.join(cfg.paths.log_dir, cfg.name))
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    if ckpt_path:
        check_resumable(ckpt_path, meta, module.net.spec)
    run_ids = meta.get("run_ids", {})
    config = redact(OmegaConf.to_container(cfg, resolve=True))
    loggers = build_loggers(cfg.get("logger"), run_ids)
    log_config(loggers, config, run_ids)

    index = datamodule.index
    args = dict(trainer_args or {})
    if datamodule.val_split not in index.splits:
        cfg = without_validation(cfg, datamodule.val_split, index.location, args)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(callbacks or [])
    sources = redact(index.extra.get("mix"))
    callbacks.append(
        Lineage(lineage(config, redact(index.location), index.sha256, *datamodule.data_version, sources))
    )
    callbacks.append(BadDataMonitor(datamodule.max_bad_fraction))
    if OmegaConf.select(cfg, "ema.decay"):  # validated, checkpointed, evaluated and exported
        from lightning.pytorch.callbacks import EMAWeightAveraging

        # First: a step's average is updated before train.midepoch checkpoints that step, so a
        # resumed run's average has every step the raw weights have.
        ema = EMAWeightAveraging(decay=cfg.ema.decay, update_starting_at_step=cfg.ema.get("start_step", 0))
        callbacks.insert(0, ema)
    callbacks += faults.from_env()  # test-only; empty unless SHARDTRAIN_KILL_AT_STEP is set
    args["plugins"] = [AtomicCheckpointIO(), *args.get("plugins", [])]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **args)
    if prepare:
        trainer = prepare(trainer)
    try:
        with shared_with_ranks(ckpt_path):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # in the moment before train.midepoch takes the signal over
        if "SIGTERM" not in cfg.checkpoint.on_signal:
            raise  # left to Lightning, as asked: it exits 0
        raise Preempted("stopped by SIGTERM before the first step: resume=auto continues", code=143) from None
    finally:
        finish(loggers)
    return summarize(trainer, module, resumed_from=ckpt_path)
