"""High-bit-depth camera images (12- and 16-bit mono and RGB in PNG and TIFF, and 8-bit BMP)
through the real entry points: `python -m data write --bit-depth`, the loader's transforms,
`data verify` and `data inspect`, training, predict and an exported bundle."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from data.__main__ import main
from data.datamodule import ShardDataModule
from data.decode import open_image
from data.index import load_index
from data.samples import BadSample, read_shard
from data.tile_stream import read_boxes
from tests.conftest import compose_cfg, tiny
from train import load_model
from train.cli import compose
from train.export import export
from train.network import ModelSpec, Network, build_backbone
from train.run import train

SIZE = (40, 32)  # (W, H) of the test images, pixels


def save_mono(path, pixels: np.ndarray, sbit: int | None = None) -> None:
    """uint16 (H, W) as a 16-bit PNG or TIFF (PIL mode I;16), a PNG with an sBIT chunk if given."""
    info = PngImagePlugin.PngInfo()
    if sbit:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(pixels).save(path, **({"pnginfo": info} if sbit else {}))


def save_rgb(path, pixels: np.ndarray) -> None:
    """uint16 (H, W, 3) RGB as a 16-bit PNG or TIFF: Pillow cannot write 16-bit colour, OpenCV can."""
    ok, data = cv2.imencode(path.suffix, np.ascontiguousarray(pixels[..., ::-1]))  # RGB → BGR
    assert ok
    path.write_bytes(data.tobytes())


def expected(value: int, bits: int) -> int:
    """The 8-bit value a `bits`-bit value should decode to: value * 255 / (2^bits - 1), rounded."""
    return round(value * 255 / ((1 << bits) - 1))


def flat(value) -> np.ndarray:
    """A uniform uint16 image: (H, W) of one value, or (H, W, 3) of an RGB triple."""
    return np.full((SIZE[1], SIZE[0]) + ((3,) if np.ndim(value) else ()), value, np.uint16)


def write(src, out, *options: str) -> int:
    return main(
        ["write", "--from-folder", str(src), str(out), "--workers", "1", "--val-fraction", "0", *options]
    )


def decoded(index: str, train: bool) -> dict[str, np.ndarray]:
    """Source file → its mean RGB through the loader's train (or eval) transform, uint8 scale."""
    dm = ShardDataModule(index, batch_size=1, num_workers=0, image_size=16, val_split="train")
    source = {s["__key__"]: json.loads(s["json"])["source"] for s in shards(index)}
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    return {source[k]: images[0].float().mean(dim=(1, 2)).numpy() for images, _, (k,), _ in loader}


def shards(index: str) -> list[dict]:
    idx = load_index(index)
    return [
        s for split in idx.splits.values() for shard in split.shards for s in read_shard(idx.shard_url(shard))
    ]


@pytest.fixture
def camera_folder(tmp_path):
    """12-bit values (0-4095) in 16-bit mono and RGB PNG and TIFF, plus an 8-bit BMP and PNG; the
    files' mean RGB at --bit-depth 12."""
    src = tmp_path / "images"
    (src / "dark").mkdir(parents=True)
    (src / "bright").mkdir()
    save_mono(src / "dark" / "mono.png", flat(2048))
    save_mono(src / "dark" / "mono.tif", flat(4095))
    save_rgb(src / "bright" / "rgb.png", flat((4095, 2048, 0)))
    save_rgb(src / "bright" / "rgb.tif", flat((1000, 3000, 4095)))
    Image.fromarray(flat((20, 40, 60)).astype(np.uint8)).save(src / "bright" / "plain.bmp")
    Image.fromarray(flat((200, 100, 50)).astype(np.uint8)).save(src / "dark" / "plain.png")
    truth = {
        "dark/mono.png": [expected(2048, 12)] * 3,
        "dark/mono.tif": [255] * 3,
        "bright/rgb.png": [255, expected(2048, 12), 0],
        "bright/rgb.tif": [expected(v, 12) for v in (1000, 3000, 4095)],
        "bright/plain.bmp": [20, 40, 60],  # 8-bit files decode as ever
        "dark/plain.png": [200, 100, 50],
    }
    return src, truth


def test_12_bit_images_keep_their_bytes_and_decode_scaled_not_clipped(camera_folder, tmp_path, capsys):
    src, truth = camera_folder
    out = tmp_path / "shards"
    assert write(src, out, "--bit-depth", "12") == 0
    index = str(out / "dataset.json")
    assert json.loads((out / "dataset.json").read_text())["bit_depth"] == 12
    for sample in shards(index):  # each image is its source file, as it was
        source = json.loads(sample["json"])["source"]
        assert sample[source.rsplit(".", 1)[1]] == (src / source).read_bytes()
    for training in (True, False):  # RandomResizedCrop and the eval resize of uniform images
        got = decoded(index, training)
        assert set(got) == set(truth)
        for source, rgb in truth.items():
            assert np.abs(got[source] - rgb).max() <= 1, (source, got[source], rgb)
    assert expected(2048, 12) == 128 and expected(4095, 12) == 255

    # data verify decodes them, data inspect shows them as the loader does, and so do tiles.
    assert main(["verify", str(out), "--workers", "1"]) == 0
    grid = tmp_path / "grid.png"
    assert main(["inspect", str(out), "--split", "train", "--out", str(grid)]) == 0
    pixels = np.asarray(Image.open(grid).convert("RGB"))
    assert (pixels == (255, 128, 0)).all(axis=-1).any() and (pixels == 128).all(axis=-1).any()
    data = (src / "dark" / "mono.png").read_bytes()
    (tile,) = read_boxes(data, open_image(data), [(0, 0)], 16, 12)
    assert tile.dtype == np.uint8 and (tile == 128).all()


def test_without_bit_depth_each_file_decodes_at_its_own_depth_with_a_hint(tmp_path, caplog):
    src = tmp_path / "images"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    save_mono(src / "a" / "plain.png", flat(4095))  # 16 bits per sample, nothing declared
    save_mono(src / "a" / "declared.png", flat(4095), sbit=12)  # sBIT: 12 significant bits
    save_rgb(src / "b" / "full.tif", flat((65535, 32768, 0)))
    with caplog.at_level(logging.INFO):
        assert write(src, tmp_path / "shards") == 0
    assert "bit_depth" not in json.loads((tmp_path / "shards" / "dataset.json").read_text())
    got = decoded(str(tmp_path / "shards" / "dataset.json"), train=False)
    assert np.abs(got["a/plain.png"] - expected(4095, 16)).max() <= 1  # 16
    assert np.abs(got["a/declared.png"] - 255).max() <= 1
    assert np.abs(got["b/full.tif"] - [255, 128, 0]).max() <= 1
    # full.tif uses 16 bits, so no hint: only with it gone do 12 bits fit every undeclared file
    assert "pass --bit-depth" not in caplog.text
    (src / "b" / "full.tif").unlink()
    save_mono(src / "b" / "other.tif", flat(100))
    with caplog.at_level(logging.INFO):
        assert write(src, tmp_path / "again") == 0
    assert (
        "fit in 12 bits (at most 4095)" in caplog.text
        and "pass --bit-depth 12 if the camera is 12-bit" in caplog.text
    )


def test_a_value_over_the_bit_depth_stops_the_write_with_one_message(camera_folder, tmp_path, capsys):
    src, _ = camera_folder
    save_mono(src / "dark" / "hot.png", flat(5000))
    out = tmp_path / "shards"
    capsys.readouterr()
    assert write(src, out, "--bit-depth", "12") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dark/hot.png" in err and "5000" in err and "--bit-depth 13" in err
    assert not (out / "dataset.json").exists() and not list(out.glob("*.tar"))


def test_8_bit_data_sets_index_as_before(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "images"
    for c in ("good", "bad"):
        (src / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
                src / c / f"{i}.{'png' if i % 2 else 'jpg'}"
            )
    assert write(src, tmp_path / "shards") == 0
    doc = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert "bit_depth" not in doc
    for sample in shards(str(tmp_path / "shards" / "dataset.json")):
        source = json.loads(sample["json"])["source"]
        assert sample[source.rsplit(".", 1)[1]] == (src / source).read_bytes()


def scaled_8bit(values: np.ndarray, bits: int) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / ((1 << bits) - 1)).astype(np.uint8)


def test_predict_scales_16_bit_inputs_like_the_loader(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("test_resnet", ("a", "b", "c"), 32, bit_depth=12)
    net = Network(build_backbone("test_resnet", 3), spec).eval()
    rng = np.random.default_rng(1)
    smooth = rng.integers(0, 4096, (5, 6, 3)).astype(np.float32)
    rgb = cv2.resize(smooth, SIZE, interpolation=cv2.INTER_CUBIC).clip(0, 4095).astype(np.uint16)
    assert rgb.shape == (SIZE[1], SIZE[0], 3)
    mono = rgb[..., 1].copy()
    save_rgb(tmp_path / "rgb.png", rgb)
    save_rgb(tmp_path / "rgb.tif", rgb)
    save_mono(tmp_path / "mono.tif", mono)

    def probs(image) -> np.ndarray:
        return np.array(list(net.predict(image)["probs"].values()))

    reference = probs(Image.fromarray(scaled_8bit(rgb, 12)))
    for image in (
        rgb,
        tmp_path / "rgb.png",
        (tmp_path / "rgb.tif").read_bytes(),
        Image.open(tmp_path / "rgb.png"),
    ):
        assert np.abs(probs(image) - reference).max() < 1e-6, type(image)
    reference = probs(Image.fromarray(scaled_8bit(mono, 12)))
    assert Image.fromarray(mono).mode == "I;16"
    for image in (mono, Image.fromarray(mono), tmp_path / "mono.tif"):
        assert np.abs(probs(image) - reference).max() < 1e-6, type(image)
    with pytest.raises(BadSample, match="over 4095"):
        net.predict(np.full((8, 8), 4096, np.uint16))
    # A model from before bit depths (or of a data set without one) takes each file's own: 16 bits.
    old = Network(net.backbone, ModelSpec("test_resnet", ("a", "b", "c"), 32)).eval()
    assert np.allclose(
        list(old.predict(mono)["probs"].values()),
        list(old.predict(Image.fromarray(scaled_8bit(mono, 16)))["probs"].values()),
        atol=1e-6,
    )


@pytest.fixture(scope="module")
def brightness_index(tmp_path_factory) -> str:
    """Two classes of 12-bit mono images (16-bit PNG and TIFF) that differ only in brightness:
    dim levels 600-1500, bright 2600-3500 of 0-4095, with noise; 160 of each, 48 px."""
    src = tmp_path_factory.mktemp("brightness") / "images"
    rng = np.random.default_rng(0)
    for label, (low, high) in {"dim": (600, 1500), "bright": (2600, 3500)}.items():
        (src / label).mkdir(parents=True)
        for i in range(160):
            level = rng.uniform(low, high)
            pixels = (level + rng.normal(0, 150, (48, 48))).clip(0, 4095).astype(np.uint16)
            save_mono(src / label / f"{i:03d}.{'png' if i % 2 else 'tif'}", pixels)
    out = src.parent / "shards"
    assert (
        main(
            [
                "write",
                "--from-folder",
                str(src),
                str(out),
                "--bit-depth",
                "12",
                "--workers",
                "1",
                "--val-fraction",
                "0.25",
            ]
        )
        == 0
    )
    return str(out / "dataset.json")


@pytest.fixture(scope="module")
def brightness_model(brightness_index, tmp_path_factory) -> tuple[dict, str]:
    root = tmp_path_factory.mktemp("brightness-run")
    cfg = compose_cfg(
        f"paths.log_dir={root}/outputs",
        f"paths.output_dir={root}/outputs/run",
        *tiny(brightness_index),
        "logger=none",
        "trainer.max_epochs=3",
        "data.train_scale=[0.5,1.0]",
        "optim.scheduler.warmup_steps=2",
    )
    return train(cfg), str(root)


def test_12_bit_classes_that_differ_only_in_brightness_train_to_high_accuracy(brightness_model):
    result, _ = brightness_model
    assert result["metrics"]["val/acc"] >= 0.95
    assert load_model(result["best_checkpoint"]).spec.bit_depth == 12


def test_the_bundle_carries_the_bit_depth_and_predicts_16_bit_images_alike(brightness_model, tmp_path):
    result, _ = brightness_model
    ckpt = result["best_checkpoint"]
    report = export(
        compose("export", f"ckpt={ckpt}", "format=onnx", f"out={tmp_path}/bundle", "parity.samples=8")
    )
    assert report["passed"] is True
    info = json.loads((tmp_path / "bundle" / "preprocess.json").read_text())
    assert info["bit_depth"] == 12 and "high_bit_depth" in info["preprocess"][0]
    bundle, model = load_model(f"{tmp_path}/bundle"), load_model(ckpt)
    assert bundle.spec.bit_depth == 12
    images = [np.full((48, 48), 1000, np.uint16), np.full((48, 48), 3000, np.uint16)]
    ours, theirs = model.predict(images), bundle.predict(images)
    assert [r["label"] for r in ours] == [r["label"] for r in theirs] == ["dim", "bright"]


def test_an_append_writes_at_the_data_sets_bit_depth(camera_folder, tmp_path, capsys):
    src, _ = camera_folder
    out = tmp_path / "shards"
    assert write(src, out, "--bit-depth", "12") == 0
    more = tmp_path / "more"
    (more / "dark").mkdir(parents=True)
    save_mono(more / "dark" / "hot.png", flat(5000))
    capsys.readouterr()
    assert write(more, out, "--append", "--bit-depth", "14") == 2  # another depth than the set's
    assert "was written with --bit-depth 12" in capsys.readouterr().err
    assert write(more, out, "--append") == 2  # the set's 12 bits, which 5000 does not fit
    assert "--bit-depth 13" in capsys.readouterr().err
    save_mono(more / "dark" / "hot.png", flat(3000))
    assert write(more, out, "--append") == 0
    assert load_index(str(out)).extra["bit_depth"] == 12
