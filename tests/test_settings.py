"""Every setting is checked before work starts: one message naming the setting, its value and what
is allowed, and exit 2 from every command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data.errors import UserError
from train import settings
from train.cli import compose

CONF = Path(__file__).resolve().parent.parent / "conf"

# (override, the start of the message): bad values of every config group the train command has.
BAD_TRAIN = [
    ("data.batch_size=0", "data.batch_size=0: must be a positive integer"),
    ("data.batch_size=-4", "data.batch_size=-4: must be a positive integer"),
    ("data.batch_size=true", "data.batch_size=true: must be a positive integer"),
    ("data.batch_size=2.5", "data.batch_size=2.5: must be a positive integer"),
    ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("data.image_size=0", "data.image_size=0: must be an integer >= 8"),
    ("data.train_scale=[0.9,0.1]", "data.train_scale=[0.9,0.1]: the low end 0.9 is above the high end 0.1"),
    ("data.train_scale=[0,1]", "data.train_scale=[0,1]: each end must be a number in (0, 1]"),
    ("data.train_scale=0.5", "data.train_scale=0.5: must be a pair [low, high]"),
    ("data.train_ratio=[1.3,0.75]", "data.train_ratio=[1.3,0.75]: the low end 1.3 is above"),
    ("data.hflip=2", "data.hflip=2: must be a number in [0, 1]"),
    ("data.rot90=-1", "data.rot90=-1: must be a number in [0, 1]"),
    ("data.crop_pct=0", "data.crop_pct=0: must be a number in (0, 1]"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer=-5: must be an integer >= 0"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction=1.5: must be a number in [0, 1]"),
    ("data.missing_shards=ignore", "data.missing_shards=ignore: must be one of fail, skip"),
    ("data.audit=maybe", "data.audit=maybe: must be true or false"),
    ("data.synthetic.num_samples=0", "data.synthetic.num_samples=0: must be a positive integer"),
    ("+data.batchsize=8", "data.batchsize=8: not a setting (did you mean data.batch_size?)"),
    ("model.backbone=resnet1800", "model.backbone=resnet1800: no such model (did you mean"),
    ("model.pretrained=/no/such.safetensors", "model.pretrained=/no/such.safetensors: no such file"),
    ("model.drop_rate=1", "model.drop_rate=1: must be a number in [0, 1)"),
    ("model.label_smoothing=-0.1", "model.label_smoothing=-0.1: must be a number in [0, 1)"),
    ("+model.dropout=0.2", "model.dropout=0.2: not a setting"),
    ("optim.optimizer.lr=-1", "optim.optimizer.lr=-1: must be a number > 0"),
    ("optim.optimizer.lr=0", "optim.optimizer.lr=0: must be a number > 0"),
    ("optim.optimizer.lr=abc", "optim.optimizer.lr=abc: must be a number > 0"),
    ("optim.optimizer.weight_decay=-1", "optim.optimizer.weight_decay=-1: must be a number >= 0"),
    ("+optim.optimizer.learning_rate=1", "optim.optimizer.learning_rate=1: not a setting"),
    ("optim.scheduler.warmup_steps=-3", "optim.scheduler.warmup_steps=-3: must be an integer >= 0"),
    ("trainer.max_epochs=abc", "trainer.max_epochs=abc: must be a positive integer (or -1), or null"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: must be a positive integer"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1: with trainer.max_steps=-1 training never ends"),
    ("trainer.accelerator=tpux", "trainer.accelerator=tpux: must be one of auto, cpu, gpu"),
    ("trainer.devices=0", "trainer.devices=0: must be a positive integer, -1 (all), auto"),
    ("trainer.precision=8-bit", "trainer.precision=8-bit: must be one of"),
    ("trainer.strategy=dpp", "trainer.strategy=dpp: must be one of"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be a positive integer"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0: must be a number in (0, 1]"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: must be a positive integer"),
    ("+trainer.max_epoch=3", "trainer.max_epoch=3: not a setting (did you mean trainer.max_epochs?)"),
    ("callbacks.checkpoint.mode=maximum", "callbacks.checkpoint.mode=maximum: must be one of min, max"),
    ("callbacks.checkpoint.save_top_k=-2", "callbacks.checkpoint.save_top_k=-2: must be an integer >= 0"),
    ("logger=mlflow logger.mlflow.log_model=often", "logger.mlflow.log_model=often: must be true or false"),
    ("logger=wandb logger.wandb.offline=sometimes", "logger.wandb.offline=sometimes: must be true or false"),
    ("launcher=ray launcher.num_workers=0", "launcher.num_workers=0: must be a positive integer"),
    ("launcher=ray launcher.strategy=zero3", "launcher.strategy=zero3: must be one of ddp, fsdp"),
    ("launcher=ray launcher.strategy=fsdp", "launcher.strategy=fsdp: fsdp runs on GPUs only"),
    ("launcher=ray launcher.max_failures=-2", "launcher.max_failures=-2: must be an integer >= 0"),
    ("launcher=ray launcher.use_gpu=yes", "launcher.use_gpu=yes: must be true or false"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps=0: must be a positive integer"),
    ("checkpoint.on_signal=[SIGKILL]", "checkpoint.on_signal=[SIGKILL]: entry SIGKILL must be one of"),
    ("checkpoint.grace_s=0", "checkpoint.grace_s=0: must be a number > 0"),
    ("seed=1.5", "2 settings are wrong: seed=1.5: must be an integer from 0 to 4294967295; data.seed=1.5"),
    ("data.seed=-1", "data.seed=-1: must be an integer from 0 to 4294967295"),
    ("launcher=ray launcher.resources_per_worker=8", "launcher.resources_per_worker=8: must be a mapping"),
    ("name=''", "name=: must be a non-empty string"),
    ("data.cache_dir=/tmp/c", "data.cache_dir=/tmp/c: needs data.cache_limit, the cache's budget on disk"),
    ("data.cache_dir=/tmp/c data.cache_limit=0", "data.cache_limit=0: must be a size in bytes above 0"),
    ("data.cache_policy=fifo", "data.cache_policy=fifo: must be one of plan, lru"),
    ("data.prefetch=-1", "data.prefetch=-1: must be an integer >= 0"),
    ("data.shuffle_block=-1", "data.shuffle_block=-1: must be an integer >= 0"),
    ("data.epoch_samples=0", "data.epoch_samples=0: must be a positive integer"),
    ("data.mix=[{weight:1}]", "data.mix=[{'weight': 1}]: entry 0: expected {index: PATH_OR_URL, weight: W}"),
    ("data.mix=[{index:a,weight:-1}]", "data.mix=[{'index': 'a', 'weight': -1}]: entry 0: weight=-1: must"),
    ("data.mix=[{index:a,colour:red}]", "data.mix=[{'index': 'a', 'colour': 'red'}]: entry 0: unknown key"),
]


@pytest.mark.parametrize(("override", "message"), BAD_TRAIN, ids=[o for o, _ in BAD_TRAIN])
def test_a_bad_train_setting_is_named_with_what_is_allowed(override, message, tmp_path):
    cfg = compose("train", *override.split(), f"paths.output_dir={tmp_path}")
    with pytest.raises(UserError) as error:
        settings.check(cfg, "train")
    assert str(error.value).startswith(message), str(error.value)


def test_several_bad_settings_are_named_in_one_message(tmp_path):
    cfg = compose("train", "data.batch_size=0", "data.hflip=2", f"paths.output_dir={tmp_path}")
    with pytest.raises(UserError) as error:
        settings.check(cfg, "train")
    assert str(error.value) == (
        "2 settings are wrong: data.batch_size=0: must be a positive integer; "
        "data.hflip=2: must be a number in [0, 1]"
    )


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
OPTIONS = [
    (g, p.stem) for g in ("data", "optim", "trainer", "logger", "launcher") for p in (CONF / g).glob("*.yaml")
]


@pytest.mark.parametrize(
    "override", [f"+experiment={e}" for e in EXPERIMENTS] + [f"{g}={o}" for g, o in OPTIONS]
)
def test_every_shipped_config_passes(override, tmp_path):
    settings.check(compose("train", override, f"paths.output_dir={tmp_path}"), "train")


BAD_EVALUATE = [
    ("split=''", "split=: must be a non-empty string"),
    ("gallery=-1", "gallery=-1: must be an integer >= 0"),
    ("defect.target_escape=1.5", "defect.target_escape=1.5: must be a number in (0, 1)"),
    ("defect.target_escape=0", "defect.target_escape=0: must be a number in (0, 1)"),
    ("defect.threshold=1.2", "defect.threshold=1.2: must be one of auto, choose; or a number in [0, 1]"),
    ("defect.threshold=chose", "defect.threshold=chose: must be one of auto, choose (did you mean choose?)"),
    ("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed: evaluate in 32-true"),
    ("data.batch_size=0", "data.batch_size=0: must be a positive integer"),
    ("overwrite=please", "overwrite=please: must be true or false"),
    ("data.cache_dir=/tmp/c", "data.cache_dir=/tmp/c: needs data.cache_limit, the cache's budget on disk"),
]


@pytest.mark.parametrize(("override", "message"), BAD_EVALUATE, ids=[o for o, _ in BAD_EVALUATE])
def test_a_bad_evaluate_setting_is_named(override, message):
    with pytest.raises(UserError) as error:
        settings.check(compose("evaluate", "ckpt=a.ckpt", "out=o", override), "evaluate")
    assert str(error.value).startswith(message), str(error.value)


BAD_EXPORT = [
    ("format=tflite", "format=tflite: must be one of onnx, torchscript, coreml"),
    ("precision=int4", "precision=int4: must be one of fp32, fp16"),
    ("parity.samples=1", "parity.samples=1: must be an integer >= 2"),
    ("parity.tolerance=0", "parity.tolerance=0: must be a number > 0, or null"),
    ("data.num_workers=-2", "data.num_workers=-2: must be an integer >= 0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_EXPORT, ids=[o for o, _ in BAD_EXPORT])
def test_a_bad_export_setting_is_named(override, message):
    with pytest.raises(UserError) as error:
        settings.check(compose("export", "ckpt=a.ckpt", "out=o", override), "export")
    assert str(error.value).startswith(message), str(error.value)


def test_a_config_that_does_not_resolve_is_one_message(tmp_path):
    cfg = compose(
        "train", "paths.log_dir=${oc.env:SHARDTRAIN_NO_SUCH_VARIABLE}", f"paths.output_dir={tmp_path}"
    )
    with pytest.raises(UserError, match=r"the config does not resolve: .*SHARDTRAIN_NO_SUCH_VARIABLE"):
        settings.check(cfg, "train")


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_every_command_line_exits_2_with_one_line_before_any_work(tmp_path):
    # The embedded set would be generated into the cache first: the check comes before it.
    cache = tmp_path / "cache"
    runs = [  # started together: each spends its time importing
        (
            cli(
                "train",
                "+experiment=quickstart",
                "data.batch_size=0",
                f"paths.cache_dir={cache}",
                cwd=tmp_path,
            ),
            "data.batch_size=0: must be a positive integer",
        ),
        (
            cli("train.evaluate", "ckpt=x.ckpt", "out=eval", "gallery=-1", cwd=tmp_path),
            "gallery=-1: must be an integer >= 0",
        ),
        (
            cli("train.export", "ckpt=x.ckpt", "out=b", "format=tflite", cwd=tmp_path),
            "format=tflite: must be one of onnx, torchscript, coreml",
        ),
        (
            cli(
                "data", "write", "--synthetic", "10", str(tmp_path / "shards"), "--workers", "0", cwd=tmp_path
            ),
            "argument --workers: 0: must be a positive integer",
        ),
    ]
    for run, message in runs:
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 2, output[-2000:]
        assert "Traceback" not in output
        assert next(line for line in output.splitlines() if "error:" in line).endswith(message)
    assert not cache.exists() and not (tmp_path / "shards").exists()
    assert not (tmp_path / "eval").exists() and not (tmp_path / "b").exists()
