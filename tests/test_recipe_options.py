"""ema.* and mixup.*: the weights' moving average (validated, checkpointed, exported) and mixup /
cutmix on the device with mixed labels, both exact under resume."""

from __future__ import annotations

import pytest
import torch

from data.errors import UserError
from train.mixing import Mixer


def test_mixup_rows_sum_to_one_and_each_step_draws_the_same_way_again():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 5, (16,))
    mixer = Mixer(alpha=0.4, cutmix_alpha=1.0, num_classes=5, seed=7)
    draws = [mixer(images, labels, step) for step in range(20)]
    for mixed, soft, lam in draws:
        assert mixed.dtype == torch.float32 and mixed.shape == images.shape
        assert torch.allclose(soft.sum(dim=1), torch.ones(16)) and 0 <= lam <= 1
        assert soft.max(dim=1).values.min() >= 0.5 - 1e-6  # max(λ, 1 - λ), or 1 where both labels agree
    again = mixer(images, labels, 3)
    assert torch.equal(again[0], draws[3][0]) and torch.equal(again[1], draws[3][1])  # a resumed step 3
    assert not torch.equal(draws[3][0], draws[4][0])
    assert not torch.equal(mixer(images, labels, 3, rank=1)[0], draws[3][0])  # each rank its own draw
    assert len({round(lam, 6) for _, _, lam in draws}) > 10


def test_cutmix_pastes_a_box_and_each_label_keeps_its_share_of_the_pixels():
    images = torch.stack([torch.full((3, 32, 32), 40 * i, dtype=torch.uint8) for i in range(4)])
    labels = torch.arange(4)  # image i, class i: a pixel's value says whose it is
    mixer = Mixer(cutmix_alpha=1.0, num_classes=4, seed=1)
    cut = 0
    for step in range(10):
        mixed, soft, _ = mixer(images, labels, step)
        for i in range(4):
            own = (mixed[i] == 40 * i).float().mean().item()
            assert soft[i, i].item() == pytest.approx(own, abs=1e-6)  # λ: the share left uncut
            cut += own < 1
        assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    assert cut > 10


def test_multi_hot_rows_mix_within_zero_and_one():
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.float32)
    _, soft, lam = Mixer(alpha=0.4, seed=0)(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), targets, 5)
    assert soft.min() >= 0 and soft.max() <= 1 and soft.shape == targets.shape and 0 < lam < 1


def test_off_by_prob_leaves_the_batch_as_it_is():
    images, labels = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8), torch.arange(8) % 3
    mixed, soft, lam = Mixer(alpha=1.0, prob=0.0, num_classes=3)(images, labels, 0)
    assert lam == 1.0 and torch.equal(mixed, images.float()) and torch.equal(soft.argmax(1), labels)


def _weights(path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt


def test_a_resumed_run_carries_the_average_and_the_raw_weights_on_exactly(make_cfg, tmp_path, monkeypatch):
    """Stopped mid-epoch (a crash as step 14 starts; last.ckpt is step 12's) and resumed: as the
    first step after resuming begins, the module holds the checkpoint's raw weights and the
    average holds the checkpoint's average, with its count of averaged steps."""
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from train.run import train

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            (ema,) = [c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging)]
            self.raw = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.average = {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}
            self.count = int(ema._average_model.n_averaged)

    run = ("ema.decay=0.9", "trainer.max_epochs=2", "checkpoint.every_n_steps=4", "mixup.alpha=0.4")
    monkeypatch.setenv("SHARDTRAIN_RAISE_AT_STEP", "14")
    with pytest.raises(RuntimeError):
        train(make_cfg(*run))
    monkeypatch.delenv("SHARDTRAIN_RAISE_AT_STEP")
    cfg = make_cfg(*run, "resume=auto")
    last = _weights(f"{cfg.paths.output_dir}/checkpoints/last.ckpt")
    assert last["global_step"] == 12 and int(last["averaging_state"]["n_averaged"]) == 12
    probe = Probe()
    result = train(cfg, callbacks=[probe])
    assert result["global_step"] == 22 and probe.count == 12
    for k, v in last["current_model_state"].items():
        assert torch.equal(probe.raw[k], v), k
    for k, v in last["state_dict"].items():
        assert torch.equal(probe.average[k], v), k
    assert any(not torch.equal(probe.raw[k], probe.average[k]) for k in probe.raw)


def test_ema_weights_are_validated_checkpointed_and_what_load_model_gives(make_cfg, tmp_path):
    from train import load_model
    from train.run import train

    result = train(make_cfg("ema.decay=0.9", "trainer.max_epochs=2"))
    ckpt = _weights(result["best_checkpoint"])
    average, raw = ckpt["state_dict"], ckpt["current_model_state"]
    differ = [k for k in average if average[k].is_floating_point() and not torch.equal(average[k], raw[k])]
    assert len(differ) > 10  # the average is not the last step's weights
    model = load_model(result["best_checkpoint"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, average[f"net.{name}"])  # load_model, evaluate and export: the average


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["task=segment", "mixup.alpha=0.2"],
            "mixup.alpha=0.2: mixup and cutmix are for classify and multilabel",
        ),
        (["task=anomaly", "mixup.cutmix_alpha=1.0"], "task=anomaly learns from masks or good parts"),
        (["ema.decay=1.5"], "ema.decay=1.5"),
        (["mixup.prob=2"], "mixup.prob=2"),
    ],
)
def test_recipe_settings_are_checked_before_anything_runs(compose, overrides, message):
    from train import settings

    with pytest.raises(UserError, match=message):
        settings.check(compose(*overrides), "train")


def test_mixup_trains_a_multi_label_model_on_mixed_multi_hot_rows(tmp_path):
    from data.sources import from_synthetic
    from data.write import write_dataset
    from tests.test_tasks import _train

    items = from_synthetic(240, seed=3, size=48, multi=0.5)
    index = write_dataset(items, str(tmp_path / "multi"), val_fraction=0.25, shard_samples=50, workers=1)
    ckpt = _train(
        tmp_path, index.index.location, "task=multilabel", "mixup.alpha=0.4", "mixup.cutmix_alpha=1.0"
    )
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] > 0
