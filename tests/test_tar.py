"""The tar reader against Python's tarfile, on archives in every format tarfile writes."""

from __future__ import annotations

import io
import tarfile

import pytest

from data.samples import tar_samples
from data.tar import TarError, tar_files

LONG = "line-07/station-3/" + "camera-left-" * 12 + "000042.jpg"  # over 100 bytes: needs a record


def archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in [("a.jpg", b"\xff\xd8jpeg"), ("a.cls", b"3"), (LONG, b"x" * 700), ("b.cls", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("dir")  # not files: passed over
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("a.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    return buf.getvalue()


def expected(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_reads_what_tarfile_reads(fmt):
    if fmt == tarfile.USTAR_FORMAT:
        global LONG
        saved, LONG = LONG, "line-07/station-3/" + "c" * 80 + ".jpg"  # ustar: prefix + name, no records
        try:
            raw = archive(fmt)
        finally:
            LONG = saved
    else:
        raw = archive(fmt)
    got = list(tar_files(io.BytesIO(raw)))
    assert got == expected(raw)
    assert len(got) == 4


def test_groups_files_into_samples_by_key():
    samples = list(tar_samples(io.BytesIO(archive(tarfile.PAX_FORMAT)), "mem"))
    assert [s["__key__"] for s in samples] == ["a", LONG[:-4], "b"]
    assert samples[0] == {"__key__": "a", "__url__": "mem", "jpg": b"\xff\xd8jpeg", "cls": b"3"}


def test_truncated_or_corrupt_archives_raise():
    raw = archive(tarfile.GNU_FORMAT)
    inside = raw.index(b"x" * 700) + 300
    with pytest.raises(TarError, match="cut short"):
        list(tar_files(io.BytesIO(raw[:inside])))
    with pytest.raises(TarError, match="truncated header"):
        list(tar_files(io.BytesIO(raw[: 1024 + 100])))
    bad = bytearray(raw)
    bad[10] ^= 0xFF  # inside the first header's name: its checksum no longer holds
    with pytest.raises(TarError, match="checksum"):
        list(tar_files(io.BytesIO(bytes(bad))))


def test_two_files_of_one_kind_in_a_sample_are_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("k.cls", "k.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(TarError, match="two 'cls' files"):
        list(tar_samples(io.BytesIO(buf.getvalue()), "mem"))
