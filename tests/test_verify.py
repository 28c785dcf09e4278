"""`python -m data verify`: a good data set passes; each kind of damage is found and named."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile

import pytest

from data.index import load_index


@pytest.fixture
def dataset(tmp_path, tiny_index):
    """A private copy of the tiny data set, free to damage."""
    src = load_index(tiny_index)
    out = tmp_path / "ds"
    shutil.copytree(src.location.rsplit("/", 1)[0], out)
    return out


def verify(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data", "verify", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rewrite(shard, change):
    """Rewrite a shard member by member; `change(n, name, data)` returns new bytes or None to drop."""
    members = []
    with tarfile.open(shard) as tar:
        for n, m in enumerate(tar.getmembers()):
            data = change(n, m.name, tar.extractfile(m).read())
            if data is not None:
                members.append((m.name, data))
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_intact_data_set_passes(dataset):
    out = verify(dataset)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().startswith("ok: 6 shards, 240 samples match")


def test_every_kind_of_damage_is_listed(dataset):
    (dataset / "train-000001.tar").unlink()
    rewrite(dataset / "train-000000.tar", lambda n, name, data: b"garbage" if n == 0 else data)
    rewrite(
        dataset / "train-000002.tar", lambda n, name, data: b"9" if name.endswith(".cls") and n < 3 else data
    )
    # one sample fewer: its jpg, cls, json and mask.png
    rewrite(dataset / "val-000000.tar", lambda n, name, data: None if n < 4 else data)
    raw = (dataset / "train-000003.tar").read_bytes()
    (dataset / "train-000003.tar").write_bytes(raw[: len(raw) // 3])

    out = verify(dataset)
    assert out.returncode == 1
    text = out.stdout
    assert "train-000001.tar:\n  missing" in text
    assert "image does not decode" in text.split("train-000000.tar:")[1]
    assert "label out of range" in text.split("train-000002.tar:")[1]
    assert "49 samples, index says 50" in text.split("val-000000.tar:")[1]
    cut = text.split("train-000003.tar:")[1].split(".tar:")[0]
    assert "unreadable tar" in cut and "index says 30" in cut and "BytesIO" not in cut
    assert "sha256 differs" in text
    assert "5 of 6 shards have problems" in text


def test_missing_index_is_one_message(tmp_path):
    out = verify(tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: no dataset index at")
