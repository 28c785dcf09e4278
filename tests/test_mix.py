"""data.mix: several data sets trained as one, drawn by weight, classes joined by name."""

from __future__ import annotations

import csv
import json
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data import sources
from data.errors import UserError
from data.index import load_index
from data.samples import read_shard
from data.write import write_dataset
from tests.test_resume import audit, train_cli
from tests.test_write import make_folder


def folder_set(root: Path, classes: tuple[str, ...], per_class: int, shard_samples: int = 10) -> str:
    """Shards and dataset.json in `root` (its name is the source's default name in a mix)."""
    src = make_folder(
        root.with_name(f"{root.name}-images"), classes=classes, per_class=per_class, size=(40, 40)
    )
    report = write_dataset(
        sources.from_folder(str(src)),
        str(root),
        val_fraction=0.25,
        shard_samples=shard_samples,
        workers=1,
    )
    return report.index.location


@pytest.fixture(scope="module")
def two_lines(tmp_path_factory) -> tuple[str, str]:
    """Line A (classes ok, scratch, spot; 90 images) and line B (crack, ok, scratch; 24 images)."""
    root = tmp_path_factory.mktemp("lines")
    a = folder_set(root / "lineA", ("ok", "scratch", "spot"), 30)
    b = folder_set(root / "lineB", ("crack", "ok", "scratch"), 8)
    return a, b


def mix_override(*entries: tuple[str, float]) -> str:
    return "data.mix=[" + ",".join(f"{{index:'{i}',weight:{w}}}" for i, w in entries) + "]"


def test_classes_join_by_name_and_each_sources_labels_are_renumbered(two_lines, make_cfg):
    from train.run import build

    a, b = two_lines
    datamodule, module = build(make_cfg("data.index=null", mix_override((a, 1), (b, 1))))
    assert datamodule.classes == ("ok", "scratch", "spot", "crack") == module.classes
    assert module.sources == ("lineA", "lineB")
    truth = {}  # NAME:KEY → the class name the sample was written with
    for name, url in (("lineA", a), ("lineB", b)):
        index = load_index(url)
        for shard in index.split("train").shards:
            for sample in read_shard(index.shard_url(shard)):
                truth[f"{name}:{sample['__key__']}"] = index.classes[int(sample["cls"])]
    seen = Counter()
    for _, labels, keys, _ in datamodule.train_dataloader():
        for label, key in zip(labels.tolist(), keys):
            assert datamodule.classes[label] == truth[key], key
            seen[key.split(":")[0]] += 1
    assert set(seen) == {"lineA", "lineB"}


def test_a_masks_class_values_are_renumbered_for_per_tile_classes(two_lines):
    """Tiles with per-tile classes read a part's mask itself (data/tile_stream.py): in a mix its
    values are the source's class numbers, renumbered like every other target."""
    from data import targets
    from data.mix import load_sources, source_targets
    from data.tile_stream import TileCutter, TileTransform
    from data.tiles import Tiling

    a, b = two_lines
    sources = load_sources([{"index": a}, {"index": b}])
    joined = ("ok", "scratch", "spot", "crack")
    reader = source_targets(sources, joined, "class", lambda labels: targets.reader("class", labels))
    cutter = TileCutter(Tiling(16), TileTransform(16), reader, "class", joined)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, :2], mask[1, :2] = 2, 0  # line B's 2 is scratch: joined 1
    mask[2, :2] = 0
    mask[3, 0] = 1  # B's 1 is ok (good): joined 0
    sample = {"__source__": 1, "mask.png": targets.encode_mask(mask), "cls": b"2"}
    got = cutter._mask(sample, reader.tables[1][2])
    assert got[0, 0] == joined.index("scratch") and got[3, 0] == joined.index("ok")


def test_each_epoch_draws_the_sources_by_weight_and_validates_each(two_lines, make_cfg, tmp_path):
    """A holds 66 training images, B 18; at equal weights over 84 a epoch, B is read 42/18 = 2.3
    times and A about 0.6: the audit names each sample's source, and the shares hold per epoch."""
    from train.evaluate import evaluate
    from train.run import train

    a, b = two_lines
    result = train(
        make_cfg(
            "data.index=null",
            mix_override((a, 0.5), (b, 0.5)),
            *("data.batch_size=4", "trainer.max_epochs=3", "data.audit=true", "logger=none"),
        )
    )
    files = audit(tmp_path / "outputs" / "run")
    for epoch in range(3):
        keys = files[f"epoch{epoch:03d}-rank000.txt"]
        share = Counter(k.split(":")[0] for k in keys)
        assert len(keys) == 84 and abs(share["lineA"] / 84 - 0.5) <= 0.05, share
        assert max(Counter(k for k in keys if k.startswith("lineB:")).values()) == 3  # read 2 or 3 times
        assert len(set(k for k in keys if k.startswith("lineA:"))) == share["lineA"]  # A: each once at most
    assert files["epoch000-rank000.txt"] != files["epoch001-rank000.txt"]
    for metric in ("val/lineA/acc", "val/lineB/acc", "val/lineA/f1", "val/acc"):
        assert 0 <= result["metrics"][metric] <= 1, metric

    ckpt = torch.load(result["best_checkpoint"], weights_only=True)["shardtrain"]
    dataset = ckpt["lineage"]["dataset"]
    assert [s["name"] for s in dataset["sources"]] == ["lineA", "lineB"]
    assert [s["weight"] for s in dataset["sources"]] == [0.5, 0.5]
    assert dataset["sources"][1]["sha256"] == load_index(b).sha256
    # Evaluated without naming a data set: the mix it trained on, every val sample once, by source.
    from train.cli import compose

    report = evaluate(
        compose("evaluate", f"ckpt={result['best_checkpoint']}", f"out={tmp_path}/eval", "trainer=cpu")
    )
    assert report["split_samples"] == 24 + 6
    with open(tmp_path / "eval" / "predictions.csv") as f:
        keys = [row["key"] for row in csv.DictReader(f)]
    assert Counter(k.split(":")[0] for k in keys) == {"lineA": 24, "lineB": 6}


def test_a_mixed_run_killed_mid_epoch_resumes_exactly(two_lines, tmp_path):
    """SIGKILL at step 30 (epoch 1), then the same command with resume=auto: the audit is the
    uninterrupted run's, up-sampled repeats and all."""
    a, b = two_lines
    mix = ("data.index=null", mix_override((a, 0.6), (b, 0.4)), "data.batch_size=4", "trainer.max_epochs=2")
    train_cli(tmp_path, a, "name=whole", *mix)
    (whole,) = (tmp_path / "outputs" / "whole").iterdir()
    crashed = train_cli(
        tmp_path,
        a,
        "name=crashy",
        *mix,
        "checkpoint.every_n_steps=5",
        wait=False,
        env={"SHARDTRAIN_KILL_AT_STEP": "28"},
    )
    out, _ = crashed.communicate(timeout=300)
    assert crashed.returncode == -signal.SIGKILL, out[-2000:]
    train_cli(tmp_path, a, "name=crashy", *mix, "checkpoint.every_n_steps=5", "resume=auto")
    runs = sorted((tmp_path / "outputs" / "crashy").iterdir())
    assert len(runs) == 2 and audit(runs[1]) == audit(whole)


def first_epoch(make_cfg, run_dir: Path, *overrides: str) -> list[str]:
    """The keys epoch 0 trained on, from the audit of a run of the tiny config with `overrides`."""
    from train.run import train

    train(
        make_cfg(
            *overrides, "data.batch_size=4", "data.audit=true", "logger=none", f"paths.output_dir={run_dir}"
        )
    )
    return audit(run_dir)["epoch000-rank000.txt"]


def test_epoch_samples_draws_one_data_set_up_or_down(two_lines, make_cfg, tmp_path):
    keys = first_epoch(make_cfg, tmp_path / "run", f"data.index={two_lines[0]}", "data.epoch_samples=40")
    assert len(keys) == len(set(keys)) == 40 and not any(":" in k for k in keys)


def test_mix_conflicts_and_bad_entries_are_one_message_each(tmp_path, two_lines, make_cfg):
    from train import settings
    from train.run import build

    a, b = two_lines
    cased = folder_set(tmp_path / "cased", ("Scratch", "ok"), 4)
    good = folder_set(tmp_path / "good", ("good", "scratch"), 4)
    deep = tmp_path / "deep"
    deep.mkdir()
    doc = json.loads(Path(b).read_text())
    doc["bit_depth"] = 12
    for split in doc["splits"].values():
        for shard in split["shards"]:
            shard["url"] = str(Path(b).parent / shard["url"])
    (deep / "dataset.json").write_text(json.dumps(doc))

    def refused(*overrides: str) -> str:
        with pytest.raises(UserError) as e:
            cfg = make_cfg("data.index=null", *overrides)
            settings.check(cfg, "train")
            build(cfg)
        return str(e.value)

    assert "class 'scratch' of lineA and 'Scratch' of cased differ only in spelling" in refused(
        mix_override((a, 1), (cased, 1))
    )
    assert "name the good class differently ('ok' in lineA, 'good' in good)" in refused(
        mix_override((a, 1), (good, 1))
    )
    assert "different bit depths (lineA: each file its own, deep: 12)" in refused(
        mix_override((a, 1), (deep, 1))
    )
    assert "data.mix=[{'index': " in refused(mix_override((a, 0), (b, 1)))
    assert "weight=0: must be a number above 0" in refused(mix_override((a, 0), (b, 1)))
    assert "two sources are named 'lineA'" in refused(mix_override((a, 1), (a, 1)))
    with pytest.raises(UserError, match=r"data\.index=.*/dataset\.json: is set with data\.mix"):
        settings.check(make_cfg(mix_override((a, 1), (b, 1))), "train")


def test_block_shuffle_trains_every_sample_once_per_epoch(two_lines, make_cfg, tmp_path):
    a = f"data.index={two_lines[0]}"
    keys = first_epoch(make_cfg, tmp_path / "blocks", a, "data.shuffle_block=32")
    plain = first_epoch(make_cfg, tmp_path / "plain", a)
    assert len(keys) == len(set(keys)) == 64  # 66 training images, the tail under one batch dropped
    assert keys != plain and len(set(keys) & set(plain)) >= 62  # the same epoch, another order
