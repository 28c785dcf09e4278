"""Data sets that grow: `python -m data write --append` adds a day's images as a new version,
old shards untouched, images already held skipped; `data.version=N` trains on an earlier one."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data.__main__ import main
from data.datamodule import ShardDataModule
from data.index import load_index
from data.scan import build_index
from data.versions import at_version, current


def day(root, seed: int, per_class: int = 10, classes=("good", "scratch")):
    """One day's images: a folder per class of 32 px JPEGs, different for each seed."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"d{seed}-{i:02d}.jpg")
    return root


def write(src, out, *extra: str) -> int:
    return main(
        ["write", "--from-folder", str(src), str(out), "--shard-samples", "6", "--workers", "1", *extra]
    )


def files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "dataset.json"}


def test_append_twice_adds_a_version_once_and_never_touches_old_shards(tmp_path, capsys):
    out = tmp_path / "ds"
    assert write(day(tmp_path / "day1", 1), out) == 0
    first = files(out)
    v1 = load_index(str(out))
    assert [v["version"] for v in v1.extra["versions"]] == [1]

    assert write(day(tmp_path / "day2", 2), out, "--append") == 0
    assert "version 2: 20 new samples" in capsys.readouterr().out
    v2 = load_index(str(out))
    assert {k: files(out)[k] for k in first} == first  # byte for byte
    added = v2.extra["versions"][1]
    assert added["samples"] == 20 and added["duplicates"] == 0 and added["keys"] == [20, 40]
    new_urls = [u for urls in added["shards"].values() for u in urls]
    assert new_urls and not set(new_urls) & set(first)
    assert v2.split("train").num_samples + v2.split("val").num_samples == 40

    # The same day again adds nothing: every image is already held, and nothing changes.
    index_bytes = (out / "dataset.json").read_bytes()
    before = files(out)
    assert write(tmp_path / "day2", out, "--append") == 0
    said = capsys.readouterr().out
    assert "skipped 20 images the data set already holds" in said and "nothing new" in said
    assert (out / "dataset.json").read_bytes() == index_bytes and files(out) == before

    # A day mixing new images and old ones: only the new are added.
    mixed = day(tmp_path / "day3", 3, per_class=3)
    shutil.copy(tmp_path / "day1" / "good" / "d1-00.jpg", mixed / "good" / "again.jpg")
    assert write(mixed, out, "--append") == 0
    v3 = load_index(str(out)).extra["versions"][2]
    assert v3["samples"] == 6 and v3["duplicates"] == 1


def test_versions_list_their_images_and_name_their_content(tmp_path):
    out = tmp_path / "ds"
    write(day(tmp_path / "day1", 1), out)
    write(day(tmp_path / "day2", 2), out, "--append")
    index = load_index(str(out))
    for v in index.extra["versions"]:
        raw = (out / v["images"]).read_bytes()
        assert len(raw) == 32 * v["samples"] and hashlib.sha256(raw).hexdigest() == v["images_sha256"]
    # Version 1's image list is the sha256 of every image its shards hold.
    from data.versions import scan_images

    assert (out / index.extra["versions"][0]["images"]).read_bytes() == scan_images(
        at_version(index, 1)
    ).tobytes()
    assert current(index) == (2, index.extra["versions"][1]["sha256"])
    assert current(at_version(index, 1)) == (1, index.extra["versions"][0]["sha256"])


def test_data_version_trains_on_an_earlier_version_and_lineage_names_it(tmp_path, compose):
    from train.run import train

    out = tmp_path / "ds"
    write(day(tmp_path / "day1", 1, per_class=16), out)
    write(day(tmp_path / "day2", 2, per_class=16), out, "--append")
    one = ShardDataModule(str(out), num_workers=0, version=1).index
    assert one.split("train").num_samples + one.split("val").num_samples == 32
    cfg = compose(
        "data=shards", f"data.index={out}", "data.version=1", "data.image_size=32", "data.batch_size=8",
        "data.num_workers=0", "model.backbone=test_resnet", "trainer=cpu", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "logger=none", f"paths.output_dir={tmp_path}/run",
        f"paths.log_dir={tmp_path}/logs", "data.audit=true",
    )  # fmt: skip
    result = train(cfg)
    meta = torch.load(result["last_checkpoint"], weights_only=True)["shardtrain"]["lineage"]["dataset"]
    index = load_index(str(out))
    assert meta["version"] == 1 and meta["sha256"] == index.sha256
    assert meta["version_sha256"] == index.extra["versions"][0]["sha256"]
    trained = (tmp_path / "run" / "audit" / "epoch000-rank000.txt").read_text().split()
    assert len(trained) == 24 and all(int(k) < 32 for k in trained)  # version 1's keys only


def test_bad_appends_are_refused_with_nothing_written(tmp_path, capsys):
    out = tmp_path / "ds"
    write(day(tmp_path / "day1", 1), out)
    before = {**files(out), "dataset.json": (out / "dataset.json").read_bytes()}
    other = day(tmp_path / "other", 4, classes=("good", "dent"))
    assert write(other, out, "--append") == 2
    err = capsys.readouterr().err
    assert "classes the data set lacks: dent" in err and err.count("error:") == 1
    assert write(day(tmp_path / "day2", 2), out, "--append", "--overwrite") == 2
    assert {**files(out), "dataset.json": (out / "dataset.json").read_bytes()} == before
    # Without --append an existing data set is refused, and the message names both ways on.
    assert write(tmp_path / "day2", out) == 2
    assert "--append" in capsys.readouterr().err


def test_data_version_of_an_index_without_versions_is_refused(tmp_path):
    out = tmp_path / "ds"
    write(day(tmp_path / "day1", 1), out)
    doc = json.loads((out / "dataset.json").read_text())
    del doc["versions"]
    (out / "dataset.json").write_text(json.dumps(doc))
    from data.errors import UserError

    with pytest.raises(UserError, match="has no versions"):
        _ = ShardDataModule(str(out), num_workers=0, version=1).index


def test_append_to_shards_another_tool_wrote(tmp_path):
    """An index without versions (another tool's shards) becomes version 1 as it is."""
    import webdataset as wds

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with wds.ShardWriter(str(foreign / "train-%06d.tar"), maxcount=10) as sink:
        for i, path in enumerate(sorted(day(tmp_path / "day1", 1).rglob("*.jpg"))):
            sink.write(
                {"__key__": f"x{i:04d}", "jpg": path.read_bytes(), "cls": 0 if "good" in str(path) else 1}
            )
    build_index(str(foreign), classes=["good", "scratch"])
    old = files(foreign)
    assert write(day(tmp_path / "day2", 2), foreign, "--append") == 0
    assert write(tmp_path / "day1", foreign, "--append") == 0  # every image already there
    index = load_index(str(foreign))
    assert [v["version"] for v in index.extra["versions"]] == [1, 2]
    assert index.extra["versions"][0]["samples"] == 20 and index.extra["versions"][1]["samples"] == 20
    assert {k: files(foreign)[k] for k in old} == old
