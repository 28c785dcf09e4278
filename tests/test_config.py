"""Every config composes and instantiates; bad overrides and inputs give one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from data.errors import UserError
from train.run import build
from train.tracking import build_loggers

CONF = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, compose, tmp_path, tiny_index):
    cfg = compose(
        f"+experiment={experiment}",
        f"paths.output_dir={tmp_path}",
        f"paths.log_dir={tmp_path}",
        f"data.index={tiny_index}",
        "data.synthetic=null",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
    )
    datamodule, module = build(cfg)
    assert module.classes == datamodule.classes
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert trainer.max_epochs >= 1


@pytest.mark.parametrize("group", ["optim", "trainer", "logger", "data", "task"])
def test_every_option_of_a_group_composes(group, compose, tmp_path):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = compose(f"{group}={option}", f"paths.output_dir={tmp_path}")
        assert cfg[group] is not None
        if group == "optim":
            instantiate(cfg.optim.optimizer)
        if group == "logger":
            assert len(build_loggers(cfg.logger, {})) == (0 if option == "none" else 1)


def test_several_loggers_at_once(compose, tmp_path):
    cfg = compose("logger=[csv,tensorboard]", f"paths.output_dir={tmp_path}")
    assert [type(x).__name__ for x in build_loggers(cfg.logger, {})] == ["CSVLogger", "TensorBoardLogger"]


def test_unknown_backbone_names_close_matches(make_cfg):
    with pytest.raises(UserError, match=r"model.backbone=resnet1800: no such model \(did you mean"):
        build(make_cfg("model.backbone=resnet1800"))


def test_missing_index_says_how_to_make_one(make_cfg, tmp_path):
    with pytest.raises(UserError, match=r"no dataset index at .*nowhere/dataset.json .*python -m data write"):
        build(make_cfg(f"data.index={tmp_path}/nowhere"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_bad_override_and_missing_index_exit_non_zero(tmp_path):
    bad = run_cli("trainer.max_epoch=3", cwd=tmp_path)
    assert bad.returncode != 0
    assert "Could not override 'trainer.max_epoch'" in bad.stderr

    missing = run_cli("data=shards", f"data.index={tmp_path}/none", cwd=tmp_path)
    assert missing.returncode == 2
    errors = [line for line in (missing.stdout + missing.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and "no dataset index at" in errors[0]
    assert "Traceback" not in missing.stderr


def test_cli_multirun_sweeps_a_parameter(tmp_path, tiny_index):
    out = run_cli(
        "-m",
        "data=shards",
        f"data.index={tiny_index}",
        "data.image_size=32",
        "data.batch_size=32",
        "data.num_workers=0",
        "model.backbone=test_resnet",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "optim.optimizer.lr=1e-3,3e-3",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted((tmp_path / "outputs" / "default").glob("multirun-*/*/checkpoints/last.ckpt"))
    assert len(runs) == 2


def test_startup_does_not_import_optional_backends():
    code = (
        "import sys, train.run, data.datamodule\n"
        "print(sorted(m for m in ('wandb', 'mlflow', 'ray', 'onnx', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_data_index_alone_trains_on_the_users_shards(compose, tmp_path, tiny_index):
    # `python -m train data.index=...` keeps the default data group but must never generate.
    cfg = compose(f"data.index={tiny_index}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/c")
    datamodule, _ = build(cfg)
    assert datamodule.synthetic is None and datamodule.index.location == tiny_index
    missing = compose(f"data.index={tmp_path}/typo/dataset.json", f"paths.output_dir={tmp_path}")
    with pytest.raises(UserError, match="no dataset index at"):
        build(missing)
    assert not (tmp_path / "typo").exists()  # nothing was written at the user's path


def test_shards_without_an_index_says_what_to_set(compose, tmp_path):
    with pytest.raises(UserError, match=r"data.index is not set: give your data set"):
        build(compose("data=shards", f"paths.output_dir={tmp_path}"))


def test_ray_launcher_composes_and_a_bad_strategy_stops_before_ray_starts(compose, tmp_path):
    cfg = compose("launcher=ray", "launcher.num_workers=4", "launcher.use_gpu=true")
    assert (cfg.launcher.kind, cfg.launcher.num_workers, cfg.launcher.strategy) == ("ray", 4, "ddp")
    bad = run_cli("launcher=ray", "launcher.strategy=zero3", cwd=tmp_path)
    assert (
        bad.returncode == 2 and "launcher.strategy=zero3: must be one of ddp, fsdp" in bad.stdout + bad.stderr
    )
