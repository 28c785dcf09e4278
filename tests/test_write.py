"""The shard writer: folders and manifests in, plain WebDataset tars and dataset.json out."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data import sources
from data.errors import UserError
from data.index import load_index
from data.write import write_dataset


def make_folder(root, classes=("good", "bad"), per_class=12, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            fmt = "png" if i % 4 == 0 else "jpg"
            Image.fromarray(pixels).save(root / c / f"img{i:02d}.{fmt}")
    return root


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_folder_round_trip_through_plain_webdataset_and_tar(tmp_path):
    src = make_folder(tmp_path / "images")
    report = write_dataset(
        sources.from_folder(str(src)), str(tmp_path / "shards"), val_fraction=0.25, shard_samples=5, workers=2
    )
    index = load_index(str(tmp_path / "shards"))
    assert index.classes == ("bad", "good")
    assert index.split("train").num_samples == 18 and index.split("val").num_samples == 6
    assert all(s.num_samples <= 5 for s in index.split("train").shards)
    assert report.written == 24 and not report.skipped

    # Plain tar: every shard matches its listed size and sha256, members are KEY.ext.
    for split in index.splits.values():
        for shard in split.shards:
            with open(index.shard_url(shard), "rb") as f:
                raw = f.read()
            assert len(raw) == shard.num_bytes and hashlib.sha256(raw).hexdigest() == shard.sha256
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                names = tar.getnames()
            assert len({n.split(".")[0] for n in names}) == shard.num_samples

    # Plain webdataset reads our shards, and each image is the source file's own bytes.
    urls = [index.shard_url(s) for s in index.split("val").shards]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        ext = "png" if "png" in sample else "jpg"
        assert sample[ext] == (src / meta["source"]).read_bytes()
        assert index.classes[int(sample["cls"])] == meta["source"].split("/")[0]
        seen.append(sample["__key__"])
    assert len(seen) == 6 == len(set(seen))


def test_val_split_is_stratified(tmp_path):
    src = make_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=20)
    index = write_dataset(
        sources.from_folder(str(src)), str(tmp_path / "out"), val_fraction=0.2, workers=1
    ).index
    labels = []
    for shard in index.split("val").shards:
        for sample in wds.WebDataset(index.shard_url(shard), shardshuffle=False, empty_check=False):
            labels.append(int(sample["cls"]))
    assert sorted(np.bincount(labels).tolist()) == [4, 4, 4]


def test_same_input_gives_byte_identical_shards(tmp_path):
    src = make_folder(tmp_path / "images")
    a = write_dataset(sources.from_folder(str(src)), str(tmp_path / "a"), shard_samples=7, workers=2)
    b = write_dataset(sources.from_folder(str(src)), str(tmp_path / "b"), shard_samples=7, workers=1)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert a.index.sha256 == b.index.sha256
    write_dataset(sources.from_folder(str(src)), str(tmp_path / "c"), shard_samples=7, seed=1)
    assert shard_bytes(tmp_path / "c") != shard_bytes(tmp_path / "a")  # the seed matters


def test_synthetic_source_is_deterministic(tmp_path):
    a = write_dataset(sources.from_synthetic(30, 0, 32), str(tmp_path / "a"), workers=2)
    write_dataset(sources.from_synthetic(30, 0, 32), str(tmp_path / "b"), workers=1)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert a.index.classes[0] == "ok" and len(a.index.classes) == 5  # with masks: good first


def test_manifest_with_split_and_extra_columns(tmp_path):
    src = make_folder(tmp_path / "images", per_class=4)
    rows = ["path,label,split,station,lot"]
    for i, p in enumerate(sorted(src.rglob("*.*"))):
        rows.append(
            f"{p.relative_to(tmp_path)},{p.parent.name},{'val' if i % 4 == 0 else 'train'},S{i % 3},L{i}"
        )
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    index = write_dataset(
        sources.from_manifest(str(tmp_path / "labels.csv")), str(tmp_path / "out"), workers=1
    ).index
    assert index.split("val").num_samples == 2 and index.split("train").num_samples == 6
    sample = next(
        iter(
            wds.WebDataset(
                index.shard_url(index.split("val").shards[0]), shardshuffle=False, empty_check=False
            )
        )
    )
    meta = json.loads(sample["json"])
    assert meta["station"].startswith("S") and meta["lot"].startswith("L") and "path" in meta

    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps({"path": str(p), "label": p.parent.name, "camera": 2})
            for p in sorted(src.rglob("*.*"))
        )
    )
    index = write_dataset(
        sources.from_manifest(str(jsonl)), str(tmp_path / "out2"), workers=1, val_fraction=0.25
    ).index
    assert index.split("train").num_samples + index.split("val").num_samples == 8


def test_manifest_missing_column_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.jpg,ok\n")
    with pytest.raises(UserError, match=r"m.csv:2: missing path"):
        sources.from_manifest(str(tmp_path / "m.csv"))


def test_unreadable_files_are_skipped_counted_and_named(tmp_path):
    src = make_folder(tmp_path / "images", per_class=5)
    (src / "good" / "notes.txt").write_text("not an image")
    (src / "bad" / "empty.jpg").write_bytes(b"")
    good = (src / "good" / "img01.jpg").read_bytes()
    (src / "good" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    report = write_dataset(sources.from_folder(str(src)), str(tmp_path / "out"), workers=1)
    assert report.written == 10
    assert sum(report.skipped.values()) == 3
    assert any("notes.txt" in e for e in report.skipped_examples)
    assert any("truncated.jpg" in e for e in report.skipped_examples)


@pytest.mark.parametrize(
    ("classes", "message"),
    [((), "no images"), (("only",), "single class")],
)
def test_empty_or_single_class_source_is_refused(tmp_path, classes, message):
    src = make_folder(tmp_path / "images", classes=classes, per_class=3)
    src.mkdir(exist_ok=True)
    with pytest.raises(UserError, match=message):
        write_dataset(sources.from_folder(str(src)), str(tmp_path / "out"), workers=1)


def test_existing_data_set_is_kept_unless_overwrite(tmp_path):
    src = make_folder(tmp_path / "images")
    out = tmp_path / "out"
    write_dataset(sources.from_folder(str(src)), str(out), shard_samples=3, workers=1)
    before = shard_bytes(out)
    with pytest.raises(UserError, match="--overwrite"):
        write_dataset(sources.from_folder(str(src)), str(out), shard_samples=10, workers=1)
    assert shard_bytes(out) == before
    write_dataset(sources.from_folder(str(src)), str(out), shard_samples=10, workers=1, overwrite=True)
    index = load_index(str(out))
    listed = {s.url for split in index.splits.values() for s in split.shards}
    assert {p.name for p in out.glob("*.tar")} == listed  # the old, smaller shards are gone


def test_shard_size_limit_in_megabytes(tmp_path):
    src = make_folder(tmp_path / "images", per_class=10, size=(200, 200))
    index = write_dataset(
        sources.from_folder(str(src)), str(tmp_path / "out"), workers=1, shard_size_mb=0.2
    ).index
    shards = index.split("train").shards
    assert len(shards) > 1 and all(s.num_bytes <= 0.2 * 2**20 for s in shards)


def test_cli_write_and_errors(tmp_path):
    src = make_folder(tmp_path / "images", per_class=6)
    run = [sys.executable, "-m", "data", "write"]
    ok = subprocess.run(
        [
            *run,
            "--from-folder",
            str(src),
            str(tmp_path / "out"),
            "--shard-samples",
            "4",
            "--val-fraction",
            "0.5",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote 12 samples" in ok.stdout and "images/s" in ok.stdout
    assert load_index(str(tmp_path / "out")).split("val").num_samples == 6

    missing = subprocess.run(
        [*run, "--from-folder", str(tmp_path / "nope"), str(tmp_path / "o2")], capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: --from-folder {tmp_path / 'nope'}: not a directory (expected one subfolder per class)"
    ]


def test_unreadable_replacement_leaves_the_old_data_set_intact(tmp_path):
    src = make_folder(tmp_path / "images")
    out = tmp_path / "out"
    write_dataset(sources.from_folder(str(src)), str(out), workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    junk = tmp_path / "junk"
    for c in ("a", "b"):
        (junk / c).mkdir(parents=True)
        (junk / c / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="no readable images"):
        write_dataset(sources.from_folder(str(junk)), str(out), workers=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_ranks_starting_together_write_the_embedded_set_once(tmp_path):
    index = str(tmp_path / "cache" / "set" / "dataset.json")
    code = f"from data.embedded import ensure_synthetic; print(ensure_synthetic({index!r}, 60, 0, 32))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == index
    assert load_index(index).split("train").num_samples + load_index(index).split("val").num_samples == 60
