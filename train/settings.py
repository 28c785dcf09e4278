"""What every setting of `python -m train`, `train.evaluate` and `train.export` accepts, checked
before any work starts (before shards are generated, processes launched or Ray contacted).

The YAML files under conf/ hold the defaults; this module holds what is allowed, one rule per
setting (data/checks.py is the vocabulary). Keys a group's constructor does not take are named
with the closest one it does. `check(cfg, "train")` raises one UserError, e.g.

    data.batch_size=0: must be a positive integer
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from data.cache import parse_bytes
from data.checks import (
    Relation,
    Rule,
    choice,
    each,
    either,
    existing_file,
    flag,
    integer,
    number,
    optional,
    span,
    target_keys,
    text,
    unknown_keys,
)
from data.checks import check as check_rules
from data.errors import UserError
from data.mix import entry_problem
from data.tiles import tiling_from
from train.network import backbone_problem

POSITIVE = integer(1)
SEED = integer(0, 2**32 - 1)  # what numpy and Lightning accept
FRACTION = number(0, 1)  # a probability or share, both ends allowed
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")
# Lightning's precision names (lightning.fabric.connector), plus the legacy short forms.
PRECISIONS = ("64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")
PRECISIONS += ("transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


def _batches(v: object) -> str | None:
    """Lightning's limit_*_batches: a share of the batches (0, 1], or a count."""
    return either(number(0, 1, open_low=True), integer(1))(v)


def _devices(v: object) -> str | None:
    if v == "auto" or (isinstance(v, list) and v and all(integer(0)(d) is None for d in v)):
        return None
    if isinstance(v, str) and v.replace(",", "").strip().isdigit():
        return None  # "0,1": device indices, as Lightning reads them
    return (
        None
        if integer(1, also=(-1,))(v) is None
        else "must be a positive integer, -1 (all), auto or a list of indices"
    )


def _strategy(v: object) -> str | None:
    from lightning.pytorch.strategies import StrategyRegistry

    known = ("auto", *StrategyRegistry.available_strategies())
    return None if v in known else choice(*known)(v)


def _resources(v: object) -> str | None:
    """Ray's resources per worker: {CPU: 8, GPU: 1, ...}."""
    ok = isinstance(v, Mapping) and all(isinstance(k, str) and number(0)(n) is None for k, n in v.items())
    return None if ok else "must be a mapping of resource names to amounts >= 0, e.g. {CPU: 8, GPU: 1}"


def _tiles(v: object) -> str | None:
    if not isinstance(v, Mapping):
        return "must be a mapping {size, overlap, per_image, defect_bias} (pixels, tiles)"
    try:
        tiling_from(v)
    except UserError as e:
        return str(e).removeprefix("data.tiles.").removeprefix("data.tiles: ")
    return None


def _mix(v: object) -> str | None:
    if not isinstance(v, list | tuple) or not v:
        return "must be a list of {index, weight} entries, e.g. [{index: ./a, weight: 0.7}, {index: ./b}]"
    for k, entry in enumerate(v):
        problem = entry_problem(entry)
        if problem:
            return f"entry {k}: {problem}"
    return None


def _bytes(v: object) -> str | None:
    try:
        ok = parse_bytes(v) > 0
    except (TypeError, ValueError):
        ok = False
    return None if ok else 'must be a size in bytes above 0: an integer, or text such as "20GB" or "512MiB"'


def _part_size(v: object) -> str | None:
    ok = isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int) and x >= 128 for x in v)
    return None if ok else "must be [width, height] in pixels, each at least 128, e.g. [4000, 3000]"


DATA: dict[str, Rule] = {
    "data.index": optional(text),
    "data.version": optional(POSITIVE),
    "data.batch_size": POSITIVE,
    "data.num_workers": integer(0),
    "data.persistent_workers": flag,
    "data.batch_slots": integer(0),
    "data.image_size": integer(8),
    "data.train_scale": span(number(0, 1, open_low=True)),
    "data.train_ratio": span(number(0, open_low=True)),
    "data.hflip": FRACTION,
    "data.crop_pct": number(0, 1, open_low=True),
    "data.shuffle_buffer": integer(0),
    "data.seed": SEED,
    "data.pin_memory": flag,
    "data.train_split": text,
    "data.val_split": text,
    "data.max_bad_fraction": FRACTION,
    "data.missing_shards": choice("fail", "skip"),
    "data.audit": flag,
    "data.audit_dir": text,
    "data.synthetic.num_samples": POSITIVE,
    "data.synthetic.seed": SEED,
    "data.synthetic.image_size": integer(8),
    "data.synthetic.cache_dir": text,
    "data.synthetic.multi": FRACTION,
    "data.synthetic.large": optional(_part_size),
    "data.tiles": optional(_tiles),
    "data.vflip": FRACTION,
    "data.rot90": FRACTION,
    "data.val_batch_size": optional(POSITIVE),
    "data.mix": optional(_mix),
    "data.epoch_samples": optional(POSITIVE),
    "data.shuffle_block": integer(0),
    "data.cache_dir": optional(text),
    "data.cache_limit": optional(_bytes),
    "data.prefetch": integer(0),
    "data.cache_verify": flag,
    "data.cache_policy": choice("plan", "lru"),
}

TRAINER: dict[str, Rule] = {
    "trainer.accelerator": choice(*ACCELERATORS),
    "trainer.devices": _devices,
    "trainer.num_nodes": POSITIVE,
    "trainer.strategy": _strategy,
    "trainer.precision": choice(*PRECISIONS, 64, 32, 16),
    "trainer.max_epochs": optional(integer(1, also=(-1,))),
    "trainer.min_epochs": optional(integer(0)),
    "trainer.max_steps": integer(1, also=(-1,)),
    "trainer.accumulate_grad_batches": POSITIVE,
    "trainer.gradient_clip_val": optional(number(0)),
    "trainer.gradient_clip_algorithm": optional(choice("norm", "value")),
    "trainer.limit_train_batches": optional(_batches),
    "trainer.limit_val_batches": optional(either(integer(0), number(0, 1))),
    "trainer.val_check_interval": optional(_batches),
    "trainer.log_every_n_steps": POSITIVE,
    "trainer.check_val_every_n_epoch": optional(POSITIVE),
    "trainer.num_sanity_val_steps": integer(0, also=(-1,)),
    "trainer.use_distributed_sampler": flag,
    "trainer.enable_model_summary": flag,
    "trainer.enable_progress_bar": flag,
    "trainer.sync_batchnorm": flag,
    "trainer.deterministic": optional(either(flag, choice("warn"))),
    "trainer.benchmark": optional(flag),
}


def _arch(v: object) -> str | None:
    """A segmentation_models_pytorch architecture name (smp.create_model's `arch`)."""
    archs = (
        "Unet",
        "UnetPlusPlus",
        "FPN",
        "PSPNet",
        "DeepLabV3",
        "DeepLabV3Plus",
        "Linknet",
        "MAnet",
        "PAN",
        "UPerNet",
        "Segformer",
    )
    return None if v in archs else f"must be one of {', '.join(archs)}"


TRAIN: dict[str, Rule] = {
    "name": text,
    "seed": SEED,
    "resume": optional(text),
    "checkpoint.every_n_steps": optional(POSITIVE),
    "checkpoint.on_signal": each(choice(*SIGNALS)),
    "checkpoint.grace_s": number(0, open_low=True),
    **DATA,
    "model.backbone": backbone_problem,
    "model.pretrained": optional(existing_file),
    "model.drop_rate": number(0, 1, open_high=True),
    "model.label_smoothing": number(0, 1, open_high=True),
    "model.channels_last": flag,
    "task.loss": choice("asl", "bce"),
    "task.threshold": number(0, 1, open_low=True, open_high=True),
    "task.arch": _arch,
    "task.min_area": integer(1),
    "task.dice": number(0),
    "task.decoder_channels": optional(each(POSITIVE)),
    "task.method": choice("draem", "patchcore"),
    "task.sigma": number(0),
    "task.quantile": number(0, 1, open_low=True, open_high=True),
    "task.defect_prob": number(0, 1, open_low=True),
    "task.layers": each(integer(1)),
    "task.pool": integer(1),
    "task.budget_mb": number(0, open_low=True),
    "task.budget_patches": optional(integer(1)),
    "optim.optimizer.lr": number(0, open_low=True),
    "optim.optimizer.weight_decay": number(0),
    "optim.optimizer.momentum": number(0, 1, open_high=True),
    "optim.optimizer.dampening": number(0, 1, open_high=True),
    "optim.optimizer.nesterov": flag,
    "optim.optimizer.eps": number(0, open_low=True),
    "optim.optimizer.betas": each(number(0, 1, open_high=True)),
    "optim.scheduler.warmup_steps": integer(0),
    "ema.decay": optional(number(0, 1, open_low=True, open_high=True)),
    "ema.start_step": integer(0),
    "mixup.alpha": number(0),
    "mixup.cutmix_alpha": number(0),
    "mixup.prob": number(0, 1),
    "mixup.switch_prob": number(0, 1),
    **TRAINER,
    "callbacks.checkpoint.save_top_k": integer(0, also=(-1,)),
    "callbacks.checkpoint.mode": choice("min", "max"),
    "callbacks.checkpoint.monitor": optional(text),
    "callbacks.checkpoint.save_last": optional(either(flag, choice("link"))),
    "logger.*._target_": text,
    "logger.mlflow.tracking_uri": optional(text),
    "logger.mlflow.log_model": either(flag, choice("all")),
    "logger.wandb.offline": optional(flag),
    "logger.wandb.log_model": either(flag, choice("all")),
    "launcher.kind": choice("local", "ray"),
    "launcher.num_workers": POSITIVE,
    "launcher.use_gpu": flag,
    "launcher.strategy": choice("ddp", "fsdp"),
    "launcher.max_failures": integer(0, also=(-1,)),
    "launcher.storage_path": optional(text),
    "launcher.resources_per_worker": optional(_resources),
    "launcher.address": optional(text),
    "paths.log_dir": text,
    "paths.output_dir": text,
    "paths.cache_dir": text,
}

EVALUATE: dict[str, Rule] = {  # ckpt and out: the commands say how to set them
    "overwrite": flag,
    "split": text,
    "name": optional(text),
    "seed": SEED,
    "gallery": integer(0),
    "defect.good": optional(text),
    "defect.classes": optional(each(text)),
    "defect.target_escape": number(0, 1, open_low=True, open_high=True),
    "defect.target_false_alarm": number(0, 1, open_low=True, open_high=True),
    "defect.threshold": either(choice("auto", "choose"), FRACTION),
    **DATA,
    **TRAINER,
}

EXPORT: dict[str, Rule] = {
    "overwrite": flag,
    "format": choice("onnx", "torchscript", "coreml"),
    "precision": choice("fp32", "fp16", "int8"),
    "calibration.split": text,
    "calibration.samples": integer(32),
    "parity.split": text,
    "parity.samples": integer(2),
    "parity.tolerance": optional(number(0, open_low=True)),
    "register": optional(text),
    "alias": optional(text),
    "triton": optional(text),
    "mlflow.tracking_uri": text,
    "seed": SEED,
    **DATA,
}


def _ranges(cfg: Mapping) -> list[tuple[str, str]]:
    """Relations between settings of one run."""
    problems = []
    trainer, optimizer = cfg.get("trainer") or {}, (cfg.get("optim") or {}).get("optimizer") or {}
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) == -1 and "optim" in cfg:
        problems.append(("trainer.max_epochs", "with trainer.max_steps=-1 training never ends: limit one"))
    if optimizer.get("nesterov") and not optimizer.get("momentum"):
        problems.append(("optim.optimizer.nesterov", "needs optim.optimizer.momentum above 0"))
    launcher = cfg.get("launcher") or {}
    task, size = str((cfg.get("task") or {}).get("_target_", "")), (cfg.get("data") or {}).get("image_size")
    method = (cfg.get("task") or {}).get("method")
    segments = task.endswith("Segment") or (task.endswith("Anomaly") and method == "draem")
    if segments and isinstance(size, int) and size % 32:
        name = "segment" if task.endswith("Segment") else "anomaly task.method=draem"
        problems.append(
            ("data.image_size", f"{size}: task={name} needs a multiple of 32 (the encoder's stride)")
        )
    if task.endswith("Anomaly") and method == "patchcore" and trainer.get("max_epochs") not in (1, None):
        problems.append(
            (
                "trainer.max_epochs",
                f"{trainer.get('max_epochs')}: task.method=patchcore builds its memory bank in one pass over "
                "the good images; set trainer.max_epochs=1",
            )
        )
    if task.endswith("Anomaly") and method == "patchcore" and not (cfg.get("model") or {}).get("pretrained"):
        problems.append(
            (
                "model.pretrained",
                "task.method=patchcore scores with a frozen backbone's features, so it needs its weights: "
                "model.pretrained=PATH (a local file for model.backbone); or task.method=draem, which learns "
                "from scratch",
            )
        )
    data = cfg.get("data") or {}
    if data.get("mix") and data.get("index"):
        problems.append(
            ("data.index", "is set with data.mix: train on one data set or on a mix (data.index=null)")
        )
    mixup = cfg.get("mixup") or {}
    mixed = (mixup.get("alpha") or 0) > 0 or (mixup.get("cutmix_alpha") or 0) > 0
    if mixed and (task.endswith("Segment") or task.endswith("Anomaly")):
        name = "segment" if task.endswith("Segment") else "anomaly"
        key = "mixup.alpha" if (mixup.get("alpha") or 0) > 0 else "mixup.cutmix_alpha"
        problems.append(
            (
                key,
                f"mixup and cutmix are for classify and multilabel: task={name} learns from masks or good "
                "parts, which have no mixed label; set mixup.alpha=0 mixup.cutmix_alpha=0",
            )
        )
    if (cfg.get("ema") or {}).get("decay") and task.endswith("Anomaly") and method == "patchcore":
        problems.append(
            ("ema.decay", "task.method=patchcore learns no weights to average: set ema.decay=null")
        )
    if launcher.get("kind") == "ray" and launcher.get("strategy") == "fsdp" and not launcher.get("use_gpu"):
        problems.append(
            ("launcher.strategy", "fsdp runs on GPUs only: set launcher.use_gpu=true, or use ddp")
        )
    return problems


def _export_options(cfg: Mapping) -> list[tuple[str, str]]:
    if cfg.get("alias") and not cfg.get("register"):
        return [("alias", "an alias names a registered model's version: give register=NAME too")]
    alias = str(cfg.get("alias") or "")
    if alias and (not re.fullmatch(r"[A-Za-z0-9_-]+", alias) or re.fullmatch(r"latest|v\d+", alias, re.I)):
        return [("alias", "letters, digits, _ and - only; not latest or v<number> (MLflow reserves them)")]
    if cfg.get("triton") and cfg.get("format") != "onnx":
        return [("triton", "a Triton repository serves the ONNX model: export with format=onnx")]
    if cfg.get("precision") == "int8" and cfg.get("format") == "torchscript":
        return [
            (
                "precision",
                "int8 is for format=onnx (onnxruntime's static quantization) or coreml (int8 weights); "
                "TorchScript exports fp32 or fp16",
            )
        ]
    return []


def _cache(cfg: Mapping) -> list[tuple[str, str]]:
    """Every command that reads data: a cache needs its budget."""
    data = cfg.get("data") or {}
    if data.get("cache_dir") and data.get("cache_limit") is None:
        return [("data.cache_dir", "needs data.cache_limit, the cache's budget on disk (e.g. 20GB)")]
    return []


def _keys(cfg: Mapping) -> list[tuple[str, str]]:
    """Settings that no part takes: a typo added with `+` would fail deep inside a constructor."""
    problems = target_keys(cfg, "data") + target_keys(cfg, "trainer") + target_keys(cfg, "callbacks.*")
    problems += (
        target_keys(cfg, "optim.optimizer") + target_keys(cfg, "optim.scheduler") + target_keys(cfg, "task")
    )
    problems += unknown_keys(
        cfg, "model", ["backbone", "pretrained", "drop_rate", "label_smoothing", "channels_last"]
    )
    return problems + unknown_keys(cfg, "checkpoint", ["every_n_steps", "on_signal", "grace_s"])


def _evaluation_precision(cfg: Mapping) -> list[tuple[str, str]]:
    if str((cfg.get("trainer") or {}).get("precision")) in ("32-true", "32"):
        return []
    return [
        (
            "trainer.precision",
            "evaluate in 32-true (trainer.precision=32-true), the precision of predict and of the "
            "reference for export, so the chosen threshold holds there",
        )
    ]


TABLES: dict[str, tuple[dict[str, Rule], tuple[Relation, ...]]] = {
    "train": (TRAIN, (_ranges, _keys, _cache)),
    "evaluate": (EVALUATE, (_evaluation_precision, lambda c: target_keys(c, "data"), _cache)),
    "export": (EXPORT, (lambda c: target_keys(c, "data"), _cache, _export_options)),
}


def check(cfg: DictConfig | Mapping, command: str) -> None:
    """Raise one UserError naming every setting of `cfg` that `command` cannot run with."""
    unresolved: list[str] = []
    config = _plain(cfg, "", unresolved) if isinstance(cfg, DictConfig) else cfg
    if unresolved:
        raise UserError(f"the config does not resolve: {'; '.join(unresolved)}")
    rules, relations = TABLES[command]
    check_rules(config, rules, relations)


def _plain(node: DictConfig | ListConfig, where: str, unresolved: list[str]) -> dict | list:
    """The config as plain data, each interpolation resolved. A value that needs the Hydra run
    (`${hydra:runtime.output_dir}`) is left out when there is none (a notebook's compose); any
    other that cannot resolve is reported with its setting."""
    keys = range(len(node)) if isinstance(node, ListConfig) else node.keys()
    out = {}
    for key in keys:
        path = f"{where}.{key}" if where else str(key)
        try:
            value = node[key]
        except OmegaConfBaseException as e:
            if "HydraConfig was not set" not in str(e):
                unresolved.append(f"{path}: {str(e).splitlines()[0]}")
            continue
        out[key] = _plain(value, path, unresolved) if isinstance(value, DictConfig | ListConfig) else value
    return list(out.values()) if isinstance(node, ListConfig) else out
