"""Targets in shards: masks and multi-label names, written, read, verified and moved with the
image by the transforms (nearest-neighbour, at every JPEG reduction scale)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.errors import UserError
from data.index import load_index
from data.samples import BadSample, Labels, read_shard
from data.sources import from_folder, from_manifest
from data.stream import BadSamples, decode_samples
from data.targets import Mask, MultiHot, encode_mask, find_good, good_first, mask_classes
from data.transforms import EvalTransform, TrainTransform
from data.verify import verify
from data.write import write_dataset


def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _square(h: int = 640, w: int = 800) -> tuple[bytes, np.ndarray]:
    """A white rectangle at a known place on black, and its mask (class 1)."""
    image, mask = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)
    image[200:360, 500:700] = 255
    mask[200:360, 500:700] = 1
    return _jpeg(image), mask


@pytest.mark.parametrize("size", [256, 128, 64, 24])  # 800 x 640 → decoded at 1, 1/2, 1/4, 1/8
@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_a_mask_stays_on_its_defect_through_crop_flip_and_jpeg_scale(size, hflip):
    data, mask = _square()
    torch.manual_seed(size)
    transform = TrainTransform(size, scale=(0.3, 1.0), hflip=hflip)
    for _ in range(8):
        image, m = transform(data, mask)
        assert image.shape == (3, size, size) and m.shape == (size, size) and m.dtype == torch.uint8
        bright = image.float().mean(0) > 127
        if m.sum() < 4:  # the crop missed the rectangle
            assert bright.sum() <= 4 + size // 8
            continue
        inter, union = (bright & (m > 0)).sum().item(), (bright | (m > 0)).sum().item()
        assert inter / union > 0.85  # bilinear edges blur one pixel ring


def test_eval_stretch_keeps_the_mask_at_the_images_size():
    data, mask = _square()
    image, m = EvalTransform(64, fit="stretch")(data, mask)
    assert image.shape == (3, 64, 64) and tuple(m.shape) == (640, 800)
    bright = torch.nn.functional.interpolate(image.float().mean(0)[None, None], size=(640, 800))[0, 0] > 127
    assert (bright == (m > 0)).float().mean() > 0.97


def test_mask_values_binary_and_class_index():
    binary = np.array([[0, 255], [0, 255]], np.uint8)
    assert mask_classes(binary, 3, 5).tolist() == [[0, 3], [0, 3]]
    loco = np.array([[0, 236, 255, 250]], np.uint8)  # MVTec LOCO's soft edges
    assert mask_classes(loco, 2, 5).tolist() == [[0, 2, 2, 2]]
    indices = np.array([[0, 1, 2, 4]], np.uint8)
    assert mask_classes(indices, 1, 5).tolist() == [[0, 1, 2, 4]]
    with pytest.raises(BadSample, match="mask values out of range"):
        mask_classes(np.array([[0, 1, 7]], np.uint8), 1, 5)


def test_readers_give_each_bad_target_a_reason():
    labels = Labels(("ok", "crack", "spot"))
    image = _jpeg(np.zeros((8, 8, 3), np.uint8))

    def sample(**files):
        return {"__key__": "k", "jpg": image, **files}

    mask = Mask(labels)
    assert mask(sample(cls=b"0")).shape == (8, 8) and not mask(sample(cls=b"0")).any()  # good: all good
    with pytest.raises(BadSample, match="no mask for a defect sample"):
        mask(sample(cls=b"1"))
    rgb = _png(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(BadSample, match="not single-channel"):
        mask(sample(cls=b"1", **{"mask.png": rgb}))
    with pytest.raises(BadSample, match="not PNG"):
        mask(sample(cls=b"1", **{"mask.png": _jpeg(np.zeros((8, 8), np.uint8))}))
    multi = MultiHot(labels)
    assert multi(sample(cls=b"1", json=b'{"labels": "crack;spot"}')).tolist() == [0, 1, 1]
    assert multi(sample(cls=b"0", json=b'{"labels": ""}')).tolist() == [1, 0, 0]
    assert multi(sample(cls=b"2")).tolist() == [0, 0, 1]  # no labels: the sample's class
    with pytest.raises(BadSample, match="unknown label name"):
        multi(sample(cls=b"1", json=b'{"labels": "dent"}'))
    # In the loader each is counted under its reason, never a crash.
    bad = BadSamples()
    other_size = _png(np.zeros((9, 8), np.uint8))
    good = encode_mask(np.eye(8, dtype=np.uint8))
    stream = [sample(cls=b"1", **{"mask.png": other_size}), sample(cls=b"1", **{"mask.png": good})]
    out = list(decode_samples(stream, TrainTransform(8, scale=(1, 1), hflip=0), mask, bad))
    assert out[0] is None and out[1] is not None
    assert bad.counts == {"mask size differs from its image": 1}


def test_good_class_found_by_name():
    assert find_good(["dent", "good", "rust"]) == "good" and find_good(["0", "1"]) is None
    assert good_first(["scratch", "OK", "dent"]) == ("OK", "dent", "scratch")


def _mvtec(root, masks: bool = True):
    rng = np.random.default_rng(0)
    for rel in ["train/good/000.png", "train/good/001.png", "test/good/000.png", "test/good/001.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    for cls in ("crack", "hole"):
        for name in ("000", "001", "002", "003"):
            (root / "test" / cls).mkdir(parents=True, exist_ok=True)
            (root / "test" / cls / f"{name}.png").write_bytes(
                _png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            )
            m = np.zeros((32, 32), np.uint8)
            m[4:12, 4:12] = 255
            if masks:
                (root / "ground_truth" / cls).mkdir(parents=True, exist_ok=True)
                (root / "ground_truth" / cls / f"{name}_mask.png").write_bytes(_png(m))


def test_the_mvtec_layout_is_read_as_it_is(tmp_path):
    _mvtec(tmp_path / "bottle")
    report = write_dataset(
        from_folder(str(tmp_path / "bottle")), str(tmp_path / "shards"), val_fraction=0.5, workers=1
    )
    index = report.index
    assert index.classes == ("good", "crack", "hole") and index.extra["masks"] is True
    counts = {name: s.num_samples for name, s in index.splits.items()}
    assert counts == {"train": 2, "val": 5, "test": 5}  # val: half of each test class, rounded
    classes = []
    for shard in index.split("train").shards:
        classes += [int(s["cls"]) for s in read_shard(index.shard_url(shard))]
    assert classes == [0, 0]  # train: good parts only
    masks = [
        Mask(index.labels)(s) for sh in index.split("test").shards for s in read_shard(index.shard_url(sh))
    ]
    assert {int(m.max()) for m in masks} == {0, 1, 2}  # 255 became each row's class index
    assert all(c.problems == () for c in verify(index, workers=1))


def test_write_names_every_missing_mask_first(tmp_path):
    _mvtec(tmp_path / "bottle", masks=False)
    with pytest.raises(UserError, match=r"8 mask file\(s\) missing, nothing written") as e:
        from_folder(str(tmp_path / "bottle"))
    assert "ground_truth/hole/003_mask.png" in str(e.value)


def _manifest(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "labels", "mask"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _parts(tmp_path, n: int = 6):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)))
        m = np.zeros((24, 24), np.uint8)
        m[2:6, 2:6] = 1 + i % 2
        (tmp_path / f"{i}_mask.png").write_bytes(_png(m))
        label = ["ok", "scratch", "spot"][i % 3]
        rows.append({"path": f"{i}.jpg", "label": label, "labels": "" if label == "ok" else f"{label};dent",
                     "mask": "" if label == "ok" else f"{i}_mask.png"})  # fmt: skip
    return rows


def test_manifest_labels_and_masks_become_shard_files(tmp_path):
    rows = _parts(tmp_path)
    index = write_dataset(
        from_manifest(_manifest(tmp_path, rows)), str(tmp_path / "shards"), val_fraction=0, workers=1
    ).index
    assert index.classes == ("ok", "dent", "scratch", "spot")  # good first, names from labels too
    samples = [s for sh in index.split("train").shards for s in read_shard(index.shard_url(sh))]
    assert sum("mask.png" in s for s in samples) == 4
    hot = [MultiHot(index.labels)(s) for s in samples]
    assert sorted(h.tolist() for h in hot).count([1, 0, 0, 0]) == 2  # the two good parts


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (lambda: _png(np.zeros((24, 24, 3), np.uint8)), "not single-channel"),
        (lambda: _jpeg(np.zeros((24, 24), np.uint8)), "not PNG"),
    ],
)
def test_a_colour_or_lossy_mask_is_refused_with_the_file_named(tmp_path, mask, message):
    rows = _parts(tmp_path)
    (tmp_path / "1_mask.png").write_bytes(mask())
    with pytest.raises(UserError, match=message) as e:
        write_dataset(from_manifest(_manifest(tmp_path, rows)), str(tmp_path / "shards"), workers=1)
    assert "1_mask.png" in str(e.value) and not (tmp_path / "shards" / "dataset.json").exists()


def test_a_mask_of_another_size_or_out_of_range_is_skipped_and_counted(tmp_path):
    rows = _parts(tmp_path)
    (tmp_path / "1_mask.png").write_bytes(_png(np.zeros((20, 24), np.uint8) + np.eye(20, 24, dtype=np.uint8)))
    m = np.zeros((24, 24), np.uint8)
    m[0, :3] = [1, 2, 9]
    (tmp_path / "2_mask.png").write_bytes(_png(m))
    report = write_dataset(from_manifest(_manifest(tmp_path, rows)), str(tmp_path / "shards"), workers=1)
    assert report.written == 4
    assert set(report.skipped) == {"mask size differs", "mask values out of range"}


def test_the_embedded_set_writes_masks_where_it_drew(tmp_path):
    from data.sources import from_synthetic

    index = write_dataset(from_synthetic(20, seed=0, size=48), str(tmp_path), val_fraction=0, workers=1).index
    assert index.classes[0] == "ok"
    for s in read_shard(index.shard_url(index.split("train").shards[0])):
        m = Mask(index.labels)(s)
        label = int(s["cls"])
        assert set(np.unique(m)) <= {0, label} and (m.any() == (label != 0))
    assert load_index(index.location).extra["masks"] is True
