"""Tiles of large images: the grid, stitching, the plan's slots, and training, evaluation,
predict and export on whole parts through the real entry points."""

from __future__ import annotations

import io
import itertools
import json
import signal
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from data import region
from data.errors import UserError
from data.plan import EpochPlan, consumed_per_worker
from data.sources import from_synthetic
from data.tile_stream import read_boxes
from data.tiles import Slots, Tiling, draw, expand_sizes, run_lengths, tiling_from
from data.write import write_dataset
from tests.test_resume import audit, train_cli
from train import load_model
from train.cli import compose as compose_config
from train.tiled import cut, stitch, strongest, tiled


@pytest.fixture(scope="module")
def parts_index(tmp_path_factory) -> str:
    """20 large parts of 320 x 240 (small defects, masks) in shards of 6."""
    out = tmp_path_factory.mktemp("parts")
    report = write_dataset(
        from_synthetic(20, seed=2, size=0, large=(320, 240)),
        str(out),
        val_fraction=0.2,
        shard_samples=6,
        workers=1,
    )
    return report.index.location


TILES = "data.tiles={size: 64, overlap: 8, per_image: 4, defect_bias: 0.5}"


# ---- the grid and stitching ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [16, 63, 64, 65, 120, 121, 500])
def test_grid_covers_every_pixel_and_ends_flush_with_the_edge(length):
    t = Tiling(64, 8)
    starts = t.starts(length)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if length > 64:
        assert starts[-1] == length - 64  # the last tile inside the image, flush with its end
        assert all(b - a <= 56 for a, b in itertools.pairwise(starts))  # neighbours share >= overlap
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + 64] = True
    assert covered.all()
    assert t.count(length, 10) == len(starts)


@pytest.mark.parametrize(
    ("h", "w", "size", "overlap"), [(240, 320, 64, 8), (97, 131, 32, 31), (20, 30, 64, 0)]
)
def test_a_map_cut_into_overlapping_tiles_stitches_back_unchanged(h, w, size, overlap):
    tiling = Tiling(size, overlap)
    x = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    boxes = tiling.grid(w, h)
    tiles = cut(x, boxes, size)
    assert tiles.shape == (len(boxes), 3, size, size)
    assert torch.equal(stitch(tiles, boxes, h, w, tiling), x)  # bit for bit, overlaps included


def test_tiled_inference_stitches_what_a_per_pixel_model_sees():
    """A per-pixel function of the tile's own pixels comes back as the same function of the image."""
    tiling = Tiling(48, 12)
    image = torch.randint(0, 256, (3, 100, 130), dtype=torch.uint8)
    out = tiled(lambda b: b.float().mean(dim=1, keepdim=True) / 255, image, tiling, 48, batch_size=5)
    assert out.shape == (1, 100, 130)
    assert torch.allclose(out[0], image.float().mean(dim=0) / 255, atol=1e-6)

    def two(b):
        return torch.stack([b.float().mean((1, 2, 3)), -b.float().mean((1, 2, 3))], 1)

    per_tile = tiled(two, image, tiling, 48)
    assert per_tile.shape == (tiling.count(130, 100), 2)


def test_a_part_is_its_strongest_tile():
    p = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.0, 0.4]])
    assert torch.equal(strongest(p, good=0), p[1])  # least likely good
    assert torch.equal(strongest(p, good=0, multilabel=True), torch.tensor([0.2, 0.7, 0.4]))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"size": 64, "overlap": 64}, "overlap=64: expected 0 <= overlap < size"),
        ({"size": 8}, "size=8"),
        ({"size": 64, "per_image": -1}, "per_image=-1"),
        ({"size": 64, "defect_bias": 2}, "defect_bias=2"),
        ({"size": 64, "stride": 3}, "unknown keys stride"),
    ],
)
def test_bad_tile_settings_get_one_message_each(value, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        tiling_from(value)


# ---- the plan's slots and the draws --------------------------------------------------------------


def test_sizes_run_length_encode_a_camera_in_one_entry():
    sizes = [(4000, 3000)] * 5 + [(640, 480)] * 2 + [(4000, 3000)]
    runs = run_lengths(sizes)
    assert runs == [[4000, 3000, 5], [640, 480, 2], [4000, 3000, 1]]
    assert [tuple(s) for s in expand_sizes(runs)] == sizes


def test_every_tile_of_every_image_is_one_slot():
    tiling = Tiling(64, 8)
    sizes = [[[320, 240, 2], [60, 50, 1]], [[64, 64, 3]]]  # images under a tile: one tile, padded
    slots = Slots(tiling, [3, 3], sizes)
    grid = tiling.count(320, 240)
    assert slots.per_shard == (2 * grid + 1, 3)
    seen = [(0, *slots.image_of(0, j)) for j in range(slots.per_shard[0])]
    seen += [(1, *slots.image_of(1, j)) for j in range(slots.per_shard[1])]
    assert seen == [(0, 0, t) for t in range(grid)] + [(0, 1, t) for t in range(grid)] + [(0, 2, 0)] + [
        (1, i, 0) for i in range(3)
    ]


def test_all_tiles_needs_the_image_sizes_and_says_how_to_get_them():
    with pytest.raises(UserError, match="python -m data index"):
        Slots(Tiling(64), [3], [()])
    assert Slots(Tiling(64, per_image=5), [3], [()]).per_shard == (15,)  # a fixed count needs none


def test_draws_are_deterministic_distinct_and_biased_toward_defects():
    tiling = Tiling(64, 8, per_image=12, defect_bias=0.5)
    size = (640, 480)
    grid = tiling.grid(*size)
    mask = np.zeros((480, 640), np.uint8)
    mask[300:310, 500:520] = 1  # one small defect

    def drawn(*key):
        return draw(tiling, grid, size, np.random.default_rng(key), mask)

    a = drawn(0, 1, 2, 3)
    assert a == drawn(0, 1, 2, 3) and a != drawn(0, 2, 2, 3)  # a pure function of (seed, epoch, ...)
    assert len(set(a)) == 12
    on_defect = [b for b in a if mask[b[1] : b[1] + 64, b[0] : b[0] + 64].any()]
    assert 3 <= len(on_defect) <= 10  # about half, by defect_bias (a grid tile may hold it too)
    assert all(0 <= x <= 640 - 64 and 0 <= y <= 480 - 64 for x, y in a)
    plain = draw(replace(tiling, defect_bias=0.0), grid, size, np.random.default_rng(0), mask)
    assert set(plain) <= set(grid)  # no bias: grid tiles only
    small = draw(
        Tiling(64, per_image=5), [(0, 0), (40, 0), (80, 0)], (144, 64), np.random.default_rng(0), None
    )
    assert sorted(small[:3]) == [(0, 0), (40, 0), (80, 0)]  # every grid tile, then again


@pytest.mark.parametrize("per_image", [0, 3])
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 2), (3, 1)])
def test_each_tile_trains_once_per_epoch_across_ranks_and_workers_and_on_resume(per_image, world, workers):
    tiling = Tiling(64, 8, per_image)
    sizes = [[[320, 240, 4]], [[200, 130, 3], [64, 64, 2]], [[320, 240, 1]]]
    slots = Slots(tiling, [4, 5, 1], sizes)
    plan = EpochPlan(slots.per_shard, 4, 1, 2, world, num_workers=workers, buffer_size=8)

    def tiles(rank: int, worker: int, consumed: int = 0) -> list[tuple[int, int, int]]:
        samples = replace(plan, rank=rank).worker_samples(worker, consumed)
        return [(s, *slots.image_of(s, j)) for s, j in samples]

    full = [t for r in range(world) for w in range(workers) for t in tiles(r, w)]
    assert len(full) == len(set(full))  # never twice
    assert len(full) > sum(slots.per_shard) - world * 4  # only the tail under world x batch dropped
    if per_image:
        assert {(s, i) for s, i, _ in full} <= {(s, i) for s, n in enumerate([4, 5, 1]) for i in range(n)}
    # A resume mid-epoch continues each worker exactly where the plan says.
    counts = replace(plan, rank=0).batches_per_worker()
    at = sum(counts) // 2
    done = consumed_per_worker(counts, at)
    for w in range(workers):
        assert tiles(0, w, at) == tiles(0, w)[done[w] * 4 :]


# ---- decoding only what the tiles need ----------------------------------------------------------


def _jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    "boxes", [[(0, 0)], [(8, 40), (200, 100)], [(0, 0), (56, 0), (112, 0), (168, 0)], [(260, 180)]]
)
def test_tiles_read_from_regions_equal_a_full_decode_then_crop(boxes):
    data = _jpeg(320, 240)
    im = Image.open(io.BytesIO(data))
    full = np.asarray(im.convert("RGB"))
    got = read_boxes(data, Image.open(io.BytesIO(data)), boxes, 64)
    for (x, y), tile in zip(boxes, got):
        want = np.zeros((64, 64, 3), np.uint8)
        part = full[y : y + 64, x : x + 64]
        want[: part.shape[0], : part.shape[1]] = part
        assert np.array_equal(tile, want)


def test_flips_and_quarter_turns_move_the_mask_with_its_tile_through_all_8_orientations():
    from data.tile_stream import TileTransform

    # A tile with no symmetry: every pixel's value is its own index, and the mask marks one corner
    # pixel, so each orientation lands the mark on the pixel that carries the same value.
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 1] = 1
    turned, turned_mask = TileTransform(4, rot90=1.0)(pixels, mask)
    assert torch.equal(turned, torch.from_numpy(pixels).permute(2, 0, 1).rot90(1, (-2, -1)))
    assert turned_mask.tolist() == np.rot90(mask).tolist()  # counter-clockwise, as numpy's

    torch.manual_seed(0)
    transform, seen = TileTransform(4, hflip=0.5, vflip=0.5, rot90=0.5), set()
    for _ in range(200):
        out, m = transform(pixels, mask)
        assert out[0][m.bool()].tolist() == [pixels[0, 1, 0]]  # the mark stays on its pixel
        seen.add(tuple(out[0].flatten().tolist()))
    assert len(seen) == 8  # the dihedral group of the square: 4 turns, each mirrored or not


def test_region_decode_is_available_here():
    assert region.available(), "the turbojpeg wheel (libjpeg-turbo 3) is a dependency: it must load"


# ---- through the real entry points -------------------------------------------------------------


def test_training_on_tiles_audits_each_tile_once_and_resumes_exactly(tmp_path, parts_index):
    train_cli(tmp_path, parts_index, "name=reference", "trainer.max_epochs=2", TILES, "data.batch_size=8")
    (ref_dir,) = (tmp_path / "outputs" / "reference").iterdir()
    expected = audit(ref_dir)
    keys = expected["epoch000-rank000.txt"]
    assert len(keys) == len(set(keys)) == 64  # 16 train parts x 4 tiles, 8 batches of 8
    assert Counter(k.split("@")[0] for k in keys) == Counter({k.split("@")[0]: 4 for k in keys})
    assert keys != expected["epoch001-rank000.txt"]  # other draws, another order, each epoch

    crashy = ("name=crashy", "trainer.max_epochs=2", "checkpoint.every_n_steps=3", TILES, "data.batch_size=8")
    victim = train_cli(tmp_path, parts_index, *crashy, wait=False, env={"SHARDTRAIN_KILL_AT_STEP": "12"})
    out, _ = victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL, out[-2000:]
    train_cli(tmp_path, parts_index, *crashy, "resume=auto")
    runs = sorted((tmp_path / "outputs" / "crashy").iterdir())
    assert audit(runs[-1]) == expected


def test_a_tiled_model_judges_whole_parts_from_checkpoint_and_bundle_alike(tmp_path, parts_index, compose):
    from train.evaluate import evaluate
    from train.export import export
    from train.run import train

    cfg = compose(
        "data=shards",
        f"data.index={parts_index}",
        "data.image_size=64",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.backbone=test_resnet",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "task=segment",
        "task.decoder_channels=[8,8,8,8,8]",
        TILES,
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.output_dir={tmp_path}/outputs/run",
    )
    ckpt = train(cfg)["best_checkpoint"]
    report = evaluate(
        compose_config("evaluate", f"ckpt={ckpt}", f"out={tmp_path}/eval", "data.num_workers=0")
    )
    assert report["samples"] == 4 and report["pixels"] == 4 * 320 * 240  # whole parts, full size
    assert set(report["localisation"]) >= {"caught", "localised", "localised_share"}
    model_ckpt = f"{tmp_path}/eval/model.ckpt"
    parity = export(compose_config("export", f"ckpt={model_ckpt}", "format=onnx", f"out={tmp_path}/bundle"))
    assert parity["passed"] is True and parity["images"] == 4
    info = json.loads((tmp_path / "bundle" / "preprocess.json").read_text())
    assert info["tiles"] == {"size": 64, "overlap": 8} and info["preprocess"][1]["op"] == "tile"
    image = Image.new("RGB", (333, 201), (128, 128, 128))  # not a multiple of anything
    a = load_model(f"{tmp_path}/eval/model.ckpt").predict(image)
    b = load_model(f"{tmp_path}/bundle").predict(image)
    assert a["mask"].shape == b["mask"].shape == (201, 333)
    assert (a["mask"] == b["mask"]).mean() >= 0.999 and a["defect"] == b["defect"]
    assert a["defect_score"] == pytest.approx(b["defect_score"], abs=1e-4)


def test_a_bad_part_is_skipped_and_counted_per_tile_never_a_crash():
    from data.samples import Labels
    from data.stream import BadSamples
    from data.targets import Mask, encode_mask
    from data.tile_stream import TileCutter, TileTransform, tile_items

    tiling = Tiling(32, 0, per_image=2)
    cut_tiles = TileCutter(tiling, TileTransform(32), Mask(Labels(("ok", "spot"))), "mask", ("ok", "spot"))
    image = _jpeg(64, 48)

    def part(key: str, mask: np.ndarray) -> dict:
        return {"__key__": key, "__url__": "x.tar", "jpg": image, "cls": b"1", "mask.png": encode_mask(mask)}

    right = np.zeros((48, 64), np.uint8)
    right[5:9, 40:44] = 1
    raw = iter(
        [part("wrong", np.ones((40, 64), np.uint8)), part("right", right), {"__key__": "empty", "cls": b"0"}]
    )
    slots = Slots(tiling, [3], None)
    bad = BadSamples()
    out = list(tile_items([(0, j) for j in range(6)], slots, raw, cut_tiles, 0, bad))
    assert [o is None for o in out] == [True, True, False, False, True, True]
    assert bad.counts == {"mask size differs from its image": 2, "no image": 2}
    assert all(o[2].startswith("right@") for o in out if o) and out[2][0].shape == (3, 32, 32)


def test_the_writer_makes_large_parts_and_the_index_knows_their_sizes(tmp_path):
    import subprocess
    import sys

    from data.index import load_index

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "data",
            "write",
            "--synthetic",
            "4",
            "--part-size",
            "300x200",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    index = load_index(str(tmp_path / "d"))
    assert index.classes == ("ok", "scratch", "spot")
    assert all(
        s.sizes == ((300, 200, s.num_samples),) for split in index.splits.values() for s in split.shards
    )
    (tmp_path / "d" / "dataset.json").unlink()  # shards without an index, as another tool leaves them
    run = subprocess.run(
        [sys.executable, "-m", "data", "index", str(tmp_path / "d")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert load_index(str(tmp_path / "d")).splits == index.splits  # scanned: the same sizes
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "data",
            "write",
            "--synthetic",
            "4",
            "--part-size",
            "300",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "expected WIDTHxHEIGHT" in bad.stderr and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_ddp_ranks_train_every_tile_of_every_part_once(tmp_path, parts_index):
    """2 CPU ranks, every tile of every part (per_image 0): equal shares, each tile once."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "train", "data=shards", f"data.index={parts_index}", "data.image_size=64",
           "data.batch_size=16", "data.num_workers=1", "model.backbone=test_resnet", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
           "trainer.enable_progress_bar=false", "task=segment", "task.decoder_channels=[8,8,8,8,8]",
           "data.audit=true", "logger=none", "data.tiles={size: 64, overlap: 8, per_image: 0}",
           f"paths.log_dir={tmp_path}", "name=ddp"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (run_dir,) = (tmp_path / "ddp").iterdir()
    files = {p.name: p.read_text().splitlines() for p in sorted((run_dir / "audit").glob("epoch*.txt"))}
    ranks = files["epoch000-rank000.txt"], files["epoch000-rank001.txt"]
    grid = Tiling(64, 8).grid(320, 240)
    every = {f"{k}@{x},{y}" for k in {key.split("@")[0] for r in ranks for key in r} for x, y in grid}
    assert len(ranks[0]) == len(ranks[1]) == 16 * 30 // 2  # 16 train parts x 30 tiles, halved
    assert sorted(ranks[0] + ranks[1]) == sorted(every)  # each tile of each part exactly once


@pytest.mark.parametrize("task", ["anomaly", "classify"])
def test_anomaly_and_per_tile_classes_train_on_tiles_and_judge_whole_parts(
    tmp_path, parts_index, compose, task
):
    from train.run import train

    cfg = compose(
        "data=shards", f"data.index={parts_index}", "data.image_size=64", "data.batch_size=8",
        "data.num_workers=0", "model.backbone=test_resnet", "trainer=cpu", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "logger=none", f"task={task}", TILES,
        f"paths.log_dir={tmp_path}/outputs", f"paths.output_dir={tmp_path}/outputs/run",
    )  # fmt: skip
    model = load_model(train(cfg)["best_checkpoint"])
    assert model.spec.tiles == {"size": 64, "overlap": 8}
    out = model.predict(Image.new("RGB", (200, 90), (90, 90, 90)))
    if task == "anomaly":
        assert out["anomaly_map"].shape == (90, 200) and 0 <= out["defect_score"] <= 1
    else:  # the part's class is its strongest tile's
        assert out["label"] in model.spec.classes and set(out["probs"]) == set(model.spec.classes)


def test_an_image_smaller_than_a_tile_is_padded_with_a_note(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        slots = Slots(Tiling(128, 16), [2], [[[100, 60, 1], [300, 200, 1]]])
    assert slots.per_shard == (1 + Tiling(128, 16).count(300, 200),)
    assert "1 images are smaller than a 128 px tile" in caplog.text


def test_int8_calibration_of_a_tiled_model_sees_tiles_of_whole_parts(parts_index):
    """precision=int8 calibrates a tiled model on what it sees: tiles of the train split's whole
    parts with its training grid, resized to its input, spread over each part."""
    from omegaconf import OmegaConf

    from train.network import ModelSpec
    from train.parity import calibration_images

    spec = ModelSpec("test_resnet", ("ok", "defect"), 32, tiles={"size": 64, "overlap": 8})
    images = calibration_images(
        parts_index, OmegaConf.create({"split": "train", "samples": 64}), spec, "stretch"
    )
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert len({bytes(t.numpy()) for t in images}) == 64  # 16 different tiles from each of 4 parts
