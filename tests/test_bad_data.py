"""Bad samples in real shards: skipped, counted per epoch as a metric, and past
data.max_bad_fraction the run stops naming the worst shard."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile

import pytest

from data.errors import UserError
from data.index import load_index
from train.run import train


def damage(shard, images: int = 0, labels: int = 0):
    """Garbage for the first `images` images and out-of-range labels for the first `labels`."""
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    done = {"jpg": 0, "cls": 0}
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            ext = name.rsplit(".", 1)[1]
            if ext == "jpg" and done["jpg"] < images:
                data, done["jpg"] = b"\xff\xd8 not a jpeg", done["jpg"] + 1
            if ext == "cls" and done["cls"] < labels:
                data, done["cls"] = b"77", done["cls"] + 1
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def damaged(tmp_path, tiny_index):
    out = tmp_path / "damaged"
    shutil.copytree(load_index(tiny_index).location.rsplit("/", 1)[0], out)
    damage(out / "train-000001.tar", images=6)
    damage(out / "train-000002.tar", labels=2)
    return out


def test_bad_samples_are_skipped_and_logged_per_epoch(make_cfg, damaged, tmp_path):
    # batch 15 divides the 180 training samples: every sample, bad or not, is read once
    result = train(
        make_cfg(
            f"data.index={damaged}", "data.batch_size=15", "data.max_bad_fraction=0.1", "trainer.max_epochs=2"
        )
    )
    assert "val/acc" in result["metrics"]
    assert result["global_step"] == 2 * 12  # the planned batch count, bad samples or not
    (metrics,) = (tmp_path / "outputs" / "run" / "csv").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("data/bad_samples")]
    assert [float(r["data/bad_samples"]) for r in rows] == [8.0, 8.0]  # per epoch, not cumulative
    assert float(rows[0]["data/bad_fraction"]) == pytest.approx(8 / 180)


def test_past_the_limit_the_run_stops_naming_the_worst_shard(make_cfg, damaged):
    with pytest.raises(
        UserError,
        match=r"4.4% .*6 undecodable image, 2 label out of range.* over "
        r"data.max_bad_fraction=0.01; worst shards: .*train-000001.tar \(6\)",
    ):
        train(make_cfg(f"data.index={damaged}", "data.batch_size=15"))


def test_missing_shard_fails_by_default_and_is_skipped_on_request(make_cfg, damaged, tmp_path):
    (damaged / "train-000003.tar").unlink()  # 30 of the 180 training samples
    with pytest.raises(UserError, match=r"train-000003.tar is listed in the index but missing"):
        train(make_cfg(f"data.index={damaged}", "data.batch_size=15"))
    with pytest.raises(
        UserError, match=r"over data.max_bad_fraction=0.1; worst shards: .*train-000003.tar \(30\)"
    ):
        train(
            make_cfg(
                f"data.index={damaged}",
                "data.batch_size=15",
                "data.missing_shards=skip",
                "data.max_bad_fraction=0.1",
            )
        )
    result = train(
        make_cfg(
            f"data.index={damaged}",
            "data.batch_size=15",
            "data.missing_shards=skip",
            "data.max_bad_fraction=0.3",
        )
    )
    assert result["global_step"] == 12  # the planned batch count: the missing samples leave batches short


def test_every_kind_of_bad_sample_in_a_real_shard_is_skipped_and_counted(tmp_path, monkeypatch):
    """One shard with a good sample after each bad kind; nothing in it is unpickled or run."""
    import pickle

    import numpy as np
    from PIL import Image

    from data import decode
    from data.plan import EpochPlan
    from data.samples import Labels
    from data.stream import BadSamples, decode_samples, read_planned
    from data.transforms import TrainTransform

    def jpeg(side: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    class Payload:  # unpickling this would leave a file behind
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    monkeypatch.setattr(decode, "MAX_PIXELS", 300 * 300)  # a 400 x 400 image plays the bomb
    kinds = {
        "corrupt": {"jpg": b"\xff\xd8\xff garbage"},
        "empty": {"jpg": b""},
        "nolabel": {"jpg": jpeg(40)},
        "textlabel": {"jpg": jpeg(40), "cls": b"three"},
        "range": {"jpg": jpeg(40), "cls": b"9"},
        "notimage": {"txt": b"hello", "cls": b"1"},
        "pickled": {"pickle": pickle.dumps(Payload()), "pth": pickle.dumps(Payload()), "cls": b"1"},
        "bomb": {"jpg": jpeg(400), "cls": b"1"},
    }
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for n, (name, damaged) in enumerate(kinds.items()):
            for key, files in ((f"{n:02d}{name}", damaged), (f"{n:02d}good", {"jpg": jpeg(40), "cls": b"2"})):
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    plan = EpochPlan((16,), batch_size=16, shuffle=False, drop_last=False)
    bad = BadSamples()
    samples = read_planned(plan.worker_samples(0), [str(shard)], bad)
    out = list(decode_samples(samples, TrainTransform(32), Labels(tuple("abc")), bad))
    assert [x[2] for x in out if x] == [f"{n:02d}good" for n in range(8)]
    assert bad.counts == {
        "undecodable image": 1,
        "empty image": 1,
        "missing or non-integer label": 2,
        "label out of range": 1,
        "no image": 2,
        "image over the 90000 pixel limit (decompression bomb)": 1,
    }
    assert not (tmp_path / "pwned").exists()


def test_an_index_naming_pipe_commands_is_refused(tiny_index, tmp_path):
    with open(tiny_index) as f:
        doc = json.load(f)
    doc["splits"]["train"]["shards"][0]["url"] = f"pipe:touch {tmp_path}/pwned"
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="shardtrain never runs commands"):
        load_index(str(tmp_path))
    assert not (tmp_path / "pwned").exists()
