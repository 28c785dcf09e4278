"""Bad samples in real shards: skipped, counted per epoch as a metric, and past
data.max_bad_fraction the run stops naming the worst shard."""

from __future__ import annotations

import csv
import io
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
