"""task=anomaly end to end on real shards in the MVTec AD layout: trained on good parts only,
scored on good and defect parts with masks, through train, evaluate, export and load_model;
the memory bank's bound and its sameness over ranks; both threshold rules; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.samples import LEFT_OUT, BadSample
from data.sources import from_mvtec
from data.write import write_dataset
from tests.conftest import compose_cfg
from train import load_model
from train.cli import compose
from train.evaluate import evaluate
from train.export import export
from train.run import train

SIDE = 64


def _surface(rng: np.random.Generator) -> np.ndarray:
    """A good part: a brushed, evenly lit surface of a random grey, (SIDE, SIDE, 3) uint8."""
    base = rng.uniform(110, 170)
    grain = rng.normal(0, 6, (SIDE, 1)).repeat(SIDE, axis=1)  # brushed along x
    light = np.linspace(-10, 10, SIDE)[None, :] * rng.uniform(-1, 1)
    px = base + grain + light + rng.normal(0, 3, (SIDE, SIDE))
    return np.clip(px, 0, 255).astype(np.uint8)[..., None].repeat(3, axis=2)


def _defect(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A part with a dark pit (radius 4 to 7 px) and its mask (0 / 255, as MVTec stores it)."""
    image = _surface(rng).astype(np.float32)
    cy, cx = rng.uniform(12, SIDE - 12, 2)
    r = rng.uniform(4, 7)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image[mask] *= rng.uniform(0.3, 0.55)
    return image.astype(np.uint8), (mask * 255).astype(np.uint8)


def write_mvtec(root, good_train: int, good_test: int = 16, pits: int = 16, seed: int = 0) -> str:
    """An MVTec AD folder: train/good, test/good, test/pit, ground_truth/pit/*_mask.png."""
    rng = np.random.default_rng(seed)
    for d in ("train/good", "test/good", "test/pit", "ground_truth/pit"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(good_train):
        Image.fromarray(_surface(rng)).save(os.path.join(root, "train/good", f"{i:03d}.png"))
    for i in range(good_test):
        Image.fromarray(_surface(rng)).save(os.path.join(root, "test/good", f"{i:03d}.png"))
    for i in range(pits):
        image, mask = _defect(rng)
        Image.fromarray(image).save(os.path.join(root, "test/pit", f"{i:03d}.png"))
        Image.fromarray(mask).save(os.path.join(root, "ground_truth/pit", f"{i:03d}_mask.png"))
    return str(root)


def _shards(root, *args, **kw) -> str:
    folder = write_mvtec(root / "folder", *args, **kw)
    return write_dataset(from_mvtec(folder), str(root / "shards"), val_fraction=0.5, workers=1).index.location


def _run(root, index: str, *overrides: str) -> str:
    cfg = compose_cfg(
        "data=shards",
        f"data.index={index}",
        f"data.image_size={SIDE}",
        "data.batch_size=16",
        "data.num_workers=0",
        "model.backbone=test_resnet",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"paths.log_dir={root}/outputs",
        f"paths.output_dir={root}/outputs/run",
        "task=anomaly",
        *overrides,
    )
    return train(cfg)["best_checkpoint"]


def _images(index: str, split: str, n: int) -> list[Image.Image]:
    import io

    from data.index import load_index
    from data.samples import read_shard

    index_ = load_index(index)
    out = []
    for shard in index_.split(split).shards:
        out += [Image.open(io.BytesIO(s["png"])) for s in read_shard(index_.shard_url(shard))]
    return out[:n]


EVAL = ("trainer=cpu", "trainer.enable_progress_bar=false", "data.batch_size=16", "data.num_workers=0")


@pytest.fixture(scope="module")
def pits(tmp_path_factory) -> str:
    return _shards(tmp_path_factory.mktemp("pits"), good_train=64)


@pytest.fixture(scope="module")
def draem(tmp_path_factory, pits) -> str:
    root = tmp_path_factory.mktemp("draem")
    return _run(
        root, pits, "trainer.max_epochs=15", "task.decoder_channels=[32,16,16,8,8]", "optim.optimizer.lr=3e-3"
    )


def test_draem_learns_good_parts_from_scratch_and_round_trips(tmp_path, pits, draem):
    report = evaluate(compose("evaluate", f"ckpt={draem}", f"out={tmp_path}/eval", "split=test", *EVAL))
    assert report["task"] == "anomaly" and report["samples"] == 16  # 8 good + 8 pits of test
    # Trained on 64 good images with pasted defects only, it finds pits it never saw.
    assert report["image_auroc"] >= 0.8, report
    assert report["pixel_auroc"] >= 0.8 and 0 < report["aupro"] <= 1
    assert report["calibration"]["learned_on"].startswith("the validation")
    assert report["defect"]["chosen_by"] == "target_escape"  # the split has defects
    assert set(report["raw_scores"]) == {"good", "defect", "note"}
    assert (tmp_path / "eval" / "mistakes.png").is_file()

    model_ckpt = f"{tmp_path}/eval/model.ckpt"
    parity = export(compose("export", f"ckpt={model_ckpt}", "format=onnx", f"out={tmp_path}/bundle"))
    assert parity["passed"] is True and parity["batches"]["16"]["max_abs_score_diff"] <= 1e-4
    info = json.loads((tmp_path / "bundle" / "preprocess.json").read_text())
    assert info["calibration"]["q"] > 0 and info["decision"]["threshold"] == report["defect"]["threshold"]

    images = [*_images(pits, "test", 6), Image.new("RGB", (70, 50), (140, 140, 140))]
    from_ckpt, from_bundle = (
        load_model(model_ckpt).predict(images),
        load_model(f"{tmp_path}/bundle").predict(images),
    )
    # The threshold is one of these test parts' own scores: a part that sits on it is a tie that the
    # last bit of float arithmetic decides (it went either way on a fresh install in CI).
    ties = 0
    for a, b, image in zip(from_ckpt, from_bundle, images):
        assert set(a) == {"label", "defect_score", "defect", "anomaly_map", "raw_score"}
        assert a["anomaly_map"].shape == (image.height, image.width) and a["anomaly_map"].dtype == np.float32
        assert a["label"] == ("defect" if a["defect"] else "good")
        assert a["defect_score"] == pytest.approx(b["defect_score"], abs=1e-4)
        assert np.abs(a["anomaly_map"] - b["anomaly_map"]).max() <= 1e-4
        if abs(a["defect_score"] - info["decision"]["threshold"]) <= 1e-4:
            ties += 1
        else:
            assert a["label"] == b["label"]
    assert ties <= 1


def test_a_split_of_good_parts_only_sets_the_threshold_by_false_alarms(tmp_path, pits, draem):
    """The train split of the MVTec layout holds good parts only: no escape can be measured, so
    the threshold stops at most target_false_alarm of them, never every part (anomalib 2433)."""
    report = evaluate(
        compose(
            "evaluate",
            f"ckpt={draem}",
            f"out={tmp_path}/eval",
            "split=train",
            "defect.target_false_alarm=0.05",
            *EVAL,
        )
    )
    d = report["defect"]
    assert d["chosen_by"] == "target_false_alarm" and d["defect_samples"] == 0
    assert d["false_alarms"] <= int(0.05 * d["good_samples"]) and d["false_alarm_rate"] <= 0.05
    scores = np.loadtxt(tmp_path / "eval" / "predictions.csv", delimiter=",", skiprows=1, usecols=3)
    assert d["threshold"] > scores.min()
    assert (tmp_path / "eval" / "model.ckpt").is_file()  # the threshold travels with the model


def test_false_alarm_threshold_exhaustively():
    from train.decision import choose_for_false_alarm

    rng = np.random.default_rng(0)
    for _ in range(300):
        m = int(rng.integers(1, 60))
        goods = rng.choice(np.linspace(0, 1, 11), m) if rng.random() < 0.5 else rng.random(m)
        target = float(rng.choice([0.001, 0.01, 0.05, 0.1, 0.3]))
        t = choose_for_false_alarm(goods, target)
        allowed = int(np.floor(target * m + 1e-9))
        assert (goods >= t).sum() <= allowed
        below = goods[goods < t].max(initial=-1.0)  # the next lower threshold that changes anything
        assert below < 0 or (goods >= below).sum() > allowed


def test_pixel_auroc_and_aupro_by_hand():
    from train.metrics import pixel_counts, pixel_report

    truth = np.zeros((20, 20), np.uint8)
    truth[2:5, 2:5] = 1  # two regions: 9 and 16 pixels
    truth[10:14, 10:14] = 1
    perfect = pixel_report(pixel_counts(truth * 0.9, truth))
    assert perfect["pixel_auroc"] == pytest.approx(1.0) and perfect["aupro"] == pytest.approx(1.0)
    assert perfect["defect_regions"] == 2 and perfect["defect_pixels"] == 25
    inverted = pixel_report(pixel_counts(1 - truth * 0.9, truth))
    assert inverted["pixel_auroc"] == pytest.approx(0.0) and inverted["aupro"] == pytest.approx(0.0)
    # One region found, the other missed: AUPRO counts regions, not pixels. The overlap is 0.5 up
    # to the lowest threshold, where every pixel is flagged (1 at a false-positive rate of 1): the
    # trapezoid between them reaches 0.65 at 0.3, so the area is (0.5 + 0.65) / 2.
    half = truth.astype(np.float64) * 0.9
    half[10:14, 10:14] = 0
    assert pixel_report(pixel_counts(half, truth))["aupro"] == pytest.approx(0.575)


def test_defects_in_the_train_split_are_left_out_not_bad():
    from data.samples import Labels
    from data.targets import UNKNOWN, AnomalyMap, encode_mask

    labels = Labels(("good", "pit"), "cls")
    image = Image.new("RGB", (8, 6))
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    sample = {"png": buf.getvalue(), "cls": b"1"}
    with pytest.raises(BadSample, match="left out"):
        AnomalyMap(labels, train=True)(sample)
    assert (AnomalyMap(labels, train=False)(sample) == UNKNOWN).all()  # a defect, place unknown
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 1:3] = 255
    got = AnomalyMap(labels, train=False)({**sample, "mask.png": encode_mask(mask)})
    assert got.sum() == 4 and got.max() == 1
    assert AnomalyMap(labels, train=True)({**sample, "cls": b"0"}).shape == (6, 8)

    from data.batching import batched
    from data.stream import BadSamples

    bad = BadSamples()
    items = [None if i % 4 else (torch.zeros(3, 2, 2), np.zeros((2, 2)), f"k{i}") for i in range(12)]
    for i in range(12):
        if i % 4:
            bad(LEFT_OUT, "u", f"k{i}")
    # 12 positions in batches of 2: 6 batches from 3 good samples, the last paid again
    got = list(batched(iter(items[:8] + [None] * 4), 2, bad))
    assert len(got) == 6


# ---- patchcore ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory, trained) -> str:
    """The backbone of a classifier our own run trained (conftest's `trained`), as a .pth."""
    state = torch.load(trained, map_location="cpu", weights_only=True)["state_dict"]
    path = str(tmp_path_factory.mktemp("weights") / "test_resnet.pth")
    torch.save(
        {k.removeprefix("net.backbone."): v for k, v in state.items() if k.startswith("net.backbone.")}, path
    )
    return path


def _bank(ckpt: str) -> tuple[torch.Tensor, dict]:
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    return c["state_dict"]["net.backbone.bank"], c["shardtrain"]["model"]["extra"]["bank"]


def _patchcore(weights: str, budget: int) -> tuple[str, ...]:
    return (
        "task.method=patchcore",
        f"model.pretrained={weights}",
        f"task.budget_patches={budget}",
        "task.sigma=1",
    )


def test_patchcore_bank_stays_within_its_budget_from_1x_to_4x_images(tmp_path, weights):
    """64 px images give 8 x 8 patches; a 300-patch budget holds under 5 images' worth."""
    found = {}
    for times in (1, 4):
        index = _shards(tmp_path / f"x{times}", good_train=24 * times, seed=times)
        ckpt = _run(tmp_path / f"run{times}", index, *_patchcore(weights, 300), "trainer.max_epochs=1")
        bank, info = _bank(ckpt)
        found[times] = info
        assert bank.shape == (300, info["features"]) and info["patches"] == 300
        # streamed in batches of 16 images (1,024 patches): cut whenever past 2 x the budget
        assert info["peak_patches_per_rank"] <= 2 * 300 + 16 * 64
    assert found[1]["mb"] == found[4]["mb"]
    assert found[4]["gathered_patches"] <= 2 * 300 + 16 * 64

    parity = export(compose("export", f"ckpt={ckpt}", "format=onnx", f"out={tmp_path}/bundle"))
    assert parity["passed"] is True  # the bank rides inside the graph


def _cli(cwd, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train", "data=shards", f"data.image_size={SIDE}", "data.batch_size=16",
           "data.num_workers=0", "model.backbone=test_resnet", "trainer=cpu",
           "trainer.enable_progress_bar=false",
           "logger=none", f"paths.log_dir={cwd}/outputs", "task=anomaly", *overrides]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow
def test_two_ranks_build_the_same_bank_as_one(tmp_path, weights):
    """Each rank streams its share and the final selection runs over the gathered pieces in one
    order: while no rank had to cut on the way, the bank is exactly a single rank's."""
    index = _shards(tmp_path, good_train=16)  # 1,024 patches: under 2 x the budget on one rank
    banks = []
    for devices in (1, 2):
        run = _cli(tmp_path, f"data.index={index}", *_patchcore(weights, 600), "trainer.max_epochs=1",
                   f"name=r{devices}", "data.batch_size=4", "trainer=ddp", "trainer.accelerator=cpu",
                   f"trainer.devices={devices}")  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        (ckpt,) = (tmp_path / "outputs" / f"r{devices}").glob("*/checkpoints/epoch000.ckpt")
        banks.append(_bank(str(ckpt))[0])
    assert torch.equal(banks[0], banks[1])


def test_bad_anomaly_settings_get_one_message_and_exit_2(tmp_path, weights, tiny_index):
    index = _shards(tmp_path, good_train=16, good_test=4, pits=4)
    misfit = tmp_path / "resnet18.pth"
    import timm

    torch.save(timm.create_model("resnet18").state_dict(), misfit)
    cases = [
        ((f"model.pretrained={misfit}", "task.method=patchcore"), "does not fit model.backbone=test_resnet"),
        (_patchcore(weights, 10), "smaller than one image's 64 patches"),
        (("task.method=patchcore",), "needs its weights: model.pretrained=PATH"),
        ((*_patchcore(weights, 300), "trainer.max_epochs=3"), "builds its memory bank in one pass"),
    ]
    for overrides, message in cases:
        run = _cli(tmp_path, f"data.index={index}", "trainer.max_epochs=1", *overrides)
        assert run.returncode == 2 and message in run.stderr + run.stdout, run.stderr[-2000:]
        assert not list((tmp_path / "outputs").glob("**/*.ckpt"))

    # a train split of defects only: nothing to learn good parts from
    from dataclasses import replace

    from data.sources import from_synthetic

    items = [replace(i, split="val") if i.label == "ok" else i for i in from_synthetic(40, seed=1, size=SIDE)]
    written = write_dataset(items, str(tmp_path / "nogood"), val_fraction=0.0, workers=1)
    run = _cli(tmp_path, f"data.index={written.index.location}", "trainer.max_epochs=1")
    assert run.returncode == 2 and "needs good samples there" in run.stderr + run.stdout, run.stderr[-2000:]
    assert not list((tmp_path / "outputs").glob("**/*.ckpt"))
