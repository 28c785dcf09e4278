"""The shard cache (data/cache.py) and object-storage reads (data/remote.py), against a real
S3-compatible server on 127.0.0.1 seen through a counting, slowing proxy (scripts/s3_proxy.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data import remote
from data.cache import CacheConfig, ShardCache, ShardRef, parse_bytes
from data.cache_dir import owner
from data.errors import UserError
from data.index import load_index
from tests.test_resume import audit

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("s3_proxy", SCRIPTS / "s3_proxy.py")
s3_proxy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(s3_proxy)


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    """Every S3 request of this test (and of its loader workers) goes through the proxy."""
    with s3_proxy.S3Proxy(s3_endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


@pytest.fixture
def s3_data(bucket, tiny_index) -> str:
    """tiny_index uploaded as it is: 4 train and 2 val shards."""
    import s3fs

    s3fs.S3FileSystem().put(os.path.dirname(tiny_index), f"{bucket}/tiny", recursive=True)
    return f"s3://{bucket}/tiny/dataset.json"


def shard_refs(index_url: str) -> list[ShardRef]:
    index = load_index(index_url)
    return [ShardRef.of(index, s) for split in index.splits.values() for s in split.shards]


def on_disk(directory: Path) -> int:
    """Bytes of the cache's shards and downloads under way, as a look at the directory finds them."""
    total = 0
    for sub in ("shards", "partial"):
        for entry in os.scandir(directory / sub) if (directory / sub).exists() else ():
            with contextlib.suppress(FileNotFoundError):  # renamed or evicted since the listing
                total += entry.stat().st_size
    return total


# -- the eviction rule, on a directory made by hand ----------------------------------------------


def fake_cache(tmp_path: Path, policy: str) -> tuple[ShardCache, dict[str, ShardRef]]:
    refs = {n: ShardRef(f"s3://b/{n}.tar", 100, n * 64) for n in "abcx"}
    for sub in ("shards", "partial", "readers"):
        (tmp_path / sub).mkdir()
    for age, n in enumerate("abc"):
        path = tmp_path / "shards" / f"{refs[n].name}.tar"
        path.write_bytes(b"\0" * 100)
        os.utime(path, (1000 + age, 1000 + age))  # a opened longest ago
    # Another live reader (this process, another reader number) is reading b.
    other = {"at": 0, "reading": [refs["b"].name], "next": {}}
    (tmp_path / "readers" / f"{owner()}-999999.json").write_text(json.dumps(other))
    cache = ShardCache(CacheConfig(str(tmp_path), 300, prefetch=0, policy=policy))
    # We next need c at position 5 and a at 50; b only after that.
    cache.follow([(refs["c"], 5), (refs["a"], 50), (refs["b"], 90)])
    return cache, refs


def cached(tmp_path: Path, refs: dict[str, ShardRef]) -> set[str]:
    names = {r.name: n for n, r in refs.items()}
    return {names[p.stem] for p in (tmp_path / "shards").glob("*.tar")}


def test_plan_eviction_drops_the_shard_needed_furthest_ahead_never_a_pinned_one(tmp_path):
    cache, refs = fake_cache(tmp_path, "plan")
    with cache.store.locked():
        reserved = cache._reserve(refs["x"], 10)  # x is needed at 10: a (50) may go, c (5) may not
    assert reserved and cached(tmp_path, refs) == {"b", "c"}
    assert os.path.basename(reserved).startswith(refs["x"].name)
    with cache.store.locked():  # full again; y at 1 would evict c (5), but b is pinned and a is gone
        assert cache._reserve(ShardRef("s3://b/y.tar", 100, "y" * 64), 1) is not None
    assert cached(tmp_path, refs) == {"b"}


def test_plan_eviction_keeps_what_is_needed_sooner_than_the_shard_it_would_fetch(tmp_path):
    cache, refs = fake_cache(tmp_path, "plan")
    with cache.store.locked():
        assert cache._reserve(refs["x"], 60) is None  # c (5) and a (50) are needed before x
    assert cached(tmp_path, refs) == {"a", "b", "c"}


def test_a_shard_fetched_ahead_is_kept_until_it_is_read(tmp_path):
    """a is needed last, but it was fetched ahead and nobody has opened it yet: evicting it would
    waste that fetch, so c goes, though it is needed sooner."""
    cache, refs = fake_cache(tmp_path, "plan")
    os.utime(tmp_path / "shards" / f"{refs['a'].name}.tar", (0, 0))  # fetched, never opened
    with cache.store.locked():
        assert cache._reserve(refs["x"], 1)
    assert cached(tmp_path, refs) == {"a", "b"}


def test_lru_eviction_drops_the_least_recently_opened(tmp_path):
    cache, refs = fake_cache(tmp_path, "lru")
    with cache.store.locked():
        assert cache._reserve(refs["x"], 60)
    assert cached(tmp_path, refs) == {"b", "c"}  # a: opened longest ago, though needed at 50


def test_a_download_left_by_a_reused_pid_or_another_host_is_a_leftover(tmp_path):
    """A restarted container reuses PIDs: the owner's start time tells a new process from the dead
    one, so its leftover download neither blocks readers nor holds budget; another host's entries
    in this machine's directory are leftovers too."""
    from data.cache_dir import HOST, CacheDir

    store = CacheDir(str(tmp_path), 1000)
    me = owner()
    host, pid, start = me.rsplit("-", 2)
    reused = tmp_path / "partial" / f"{'a' * 64}.{host}-{pid}-{int(start) + 1}.400"
    other = tmp_path / "partial" / f"{'b' * 64}.elsewhere-{pid}-{start}.400"
    live = tmp_path / "partial" / f"{'c' * 64}.{me}.400"
    for path in (reused, other, live):
        path.write_bytes(b"")
    assert HOST != "elsewhere"
    with store.locked():
        assert not store.fetching("a" * 64) and not store.fetching("b" * 64) and store.fetching("c" * 64)
        assert store._scan() == ({}, {live.name: 400})
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == [live.name]


def test_a_fetched_shard_appears_under_the_lock(tmp_path, monkeypatch):
    """A reader asks "is it complete?" then "is someone fetching it?" in one hold of the lock; a
    fetch that renamed its partial file into place between the two would be fetched again (seen
    in CI: one shard of six fetched twice). So the rename happens only while the lock is held."""
    import fcntl

    data = os.urandom(1000)
    ref = ShardRef("s3://b/s.tar", len(data), "s" * 64)
    monkeypatch.setattr(remote, "download", lambda url, size, fd: os.write(fd, data))
    cache = ShardCache(CacheConfig(str(tmp_path), 10**6, prefetch=0))
    held, real_replace = [], os.replace

    def replace(src, dst):
        if not str(dst).endswith(".tar"):  # the readers' state files
            return real_replace(src, dst)
        with open(tmp_path / ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with cache.open(ref, 0) as f:
        assert f.read() == data
    assert held == [True]


def test_what_is_worth_another_try():
    import http.client

    from data.remote import retryable

    assert retryable(OSError("[Errno 16] Please reduce your request rate.")) and retryable(TimeoutError())
    assert retryable(http.client.IncompleteRead(b"x", 10))  # a body cut short: no OSError
    assert not retryable(FileNotFoundError()) and not retryable(PermissionError("AccessDenied"))


def test_sizes_read_as_bytes():
    assert parse_bytes("20GB") == 20 * 10**9 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes(1000) == parse_bytes("1000") == parse_bytes("1e3") == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")


# -- against the S3-compatible server --------------------------------------------------------------


def test_throttled_reads_are_retried_and_logged_and_a_missing_object_is_not(s3_endpoint, bucket, caplog):
    import s3fs

    s3fs.S3FileSystem().pipe(f"{bucket}/x.bin", b"x" * 5000)
    with s3_proxy.S3Proxy(s3_endpoint, throttle=2) as p:
        os.environ["AWS_ENDPOINT_URL"] = p.url
        try:
            with caplog.at_level(logging.WARNING, logger="data.remote"):
                assert remote.get_range(f"s3://{bucket}/x.bin", 10, 4010) == b"x" * 4000
            with pytest.raises(FileNotFoundError):
                remote.get_range(f"s3://{bucket}/gone.bin", 0, 10)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    retries = [r.getMessage() for r in caplog.records if "x.bin" in r.getMessage()]
    assert len(retries) == 2 and all(f"s3://{bucket}/x.bin bytes 10-4010: " in m for m in retries)
    assert "attempt 1 of 6" in retries[0] and "attempt 2 of 6" in retries[1]
    assert "reduce your request rate" in retries[0]  # S3's SlowDown
    # the missing object: throttled twice as well, then not found, and not retried after that
    assert p.gets(f"{bucket}/x.bin") == 3 and p.gets(f"{bucket}/gone.bin") == 3


def test_a_large_shard_arrives_in_parallel_ranges(s3_endpoint, bucket, tmp_path, proxy, monkeypatch):
    import s3fs

    data = os.urandom(300_000)
    s3fs.S3FileSystem().pipe(f"{bucket}/big.tar", data)
    monkeypatch.setattr(remote, "CHUNK", 64 << 10)
    fd = os.open(tmp_path / "big.tar", os.O_CREAT | os.O_WRONLY)
    remote.download(f"s3://{bucket}/big.tar", len(data), fd)
    os.close(fd)
    assert (tmp_path / "big.tar").read_bytes() == data
    assert proxy.gets(f"{bucket}/big.tar") == 5  # 4 ranges of 64 KiB and the rest
    with remote.open_shard(f"s3://{bucket}/big.tar", len(data)) as f:  # streamed the same way
        assert f.read() == data


def test_a_cache_as_large_as_the_data_set_fetches_each_shard_once(
    tmp_path, s3_data, proxy, make_cfg, tiny_index
):
    """Two epochs with 2 loader workers: every shard is fetched once, and the run trains on
    exactly the samples, in exactly the order, of the same run on the local copy."""
    from train.run import train

    local = make_cfg("trainer.max_epochs=2", "data.num_workers=2", "data.audit=true", "logger=none")
    train(local)
    cache = tmp_path / "cache"
    remote_cfg = make_cfg(
        f"data.index={s3_data}",
        f"paths.output_dir={tmp_path}/remote",
        *("trainer.max_epochs=2", "data.num_workers=2", "data.audit=true", "logger=none"),
        *(f"data.cache_dir={cache}", "data.cache_limit=1GB"),
    )
    train(remote_cfg)
    refs = shard_refs(s3_data)
    assert [proxy.gets(r.url.removeprefix("s3://")) for r in refs] == [1] * len(refs)
    assert {p.stem for p in (cache / "shards").glob("*.tar")} == {r.sha256 for r in refs}
    assert not list((cache / "partial").iterdir())
    assert audit(tmp_path / "remote") == audit(tmp_path / "outputs" / "run")


def test_a_small_cache_never_exceeds_its_budget_and_each_epoch_stays_exact(
    tmp_path, s3_data, proxy, make_cfg
):
    """A budget of 2.5 shards for 2 workers that each want 3 (the one read and 2 ahead): the
    directory, looked at every few milliseconds while training, never holds more than the budget;
    what does not fit is streamed, and the audit is the uncached run's."""
    from train.run import train

    refs = shard_refs(s3_data)
    limit = int(2.5 * max(r.num_bytes for r in refs))
    cache = tmp_path / "cache"
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], on_disk(cache))
            time.sleep(0.002)

    common = ("trainer.max_epochs=2", "data.num_workers=2", "data.audit=true", "logger=none")
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        train(
            make_cfg(f"data.index={s3_data}", *common, f"data.cache_dir={cache}", f"data.cache_limit={limit}")
        )
    finally:
        done.set()
        watcher.join()
    assert 0 < peak[0] <= limit
    fetched = sum(proxy.gets(r.url.removeprefix("s3://")) for r in refs)
    assert fetched > len(refs)  # too small to keep them all: some are read again in epoch 2
    train(make_cfg(f"data.index={s3_data}", *common, f"paths.output_dir={tmp_path}/plain"))
    assert audit(tmp_path / "outputs" / "run") == audit(tmp_path / "plain")


def test_a_killed_download_leaves_no_readable_partial_file(tmp_path, s3_endpoint, bucket):
    """A download killed half way (SIGKILL: no clean-up of its own) leaves only its partial file,
    which no reader opens; the next reader removes it and fetches the shard whole."""
    import s3fs

    data = os.urandom(200_000)
    s3fs.S3FileSystem().pipe(f"{bucket}/s.tar", data)
    ref = ShardRef(f"s3://{bucket}/s.tar", len(data), "5" * 64)
    cache = tmp_path / "cache"
    code = (
        "from data import remote; remote.CHUNK = 8192\n"
        "from data.cache import CacheConfig, ShardCache, ShardRef\n"
        f"c = ShardCache(CacheConfig({str(cache)!r}, 10**9, prefetch=0))\n"
        f"with c.open(ShardRef({ref.url!r}, {len(data)}, {ref.sha256!r}), 0) as f:\n"
        "    f.read()\n"
    )
    (cache / "shards").mkdir(parents=True)
    (cache / "partial").mkdir()
    (cache / "readers").mkdir()
    with s3_proxy.S3Proxy(s3_endpoint, delay_s=(0.2, 0.2)) as slow:
        env = {**os.environ, "AWS_ENDPOINT_URL": slow.url}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        deadline = time.time() + 60
        while time.time() < deadline and not any(p.stat().st_size for p in (cache / "partial").iterdir()):
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (left,) = (cache / "partial").iterdir()
    assert 0 < left.stat().st_size < len(data) or left.stat().st_size == len(data)
    assert not list((cache / "shards").iterdir())  # nothing complete to read

    reader = ShardCache(CacheConfig(str(cache), 10**9, prefetch=0))
    with reader.open(ref, 0) as f:
        assert f.read() == data
    assert not list((cache / "partial").iterdir())
    assert (cache / "shards" / f"{ref.sha256}.tar").read_bytes() == data


def test_a_damaged_cached_copy_is_fetched_again_when_asked_to_check(tmp_path, bucket, proxy):
    import hashlib

    import s3fs

    data = os.urandom(10_000)
    s3fs.S3FileSystem().pipe(f"{bucket}/s.tar", data)
    ref = ShardRef(f"s3://{bucket}/s.tar", len(data), hashlib.sha256(data).hexdigest())
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / f"{ref.name}.tar").write_bytes(b"\0" * len(data))  # right size, wrong bytes
    trusting = ShardCache(CacheConfig(str(tmp_path), 10**9, prefetch=0))
    with trusting.open(ref, 0) as f:  # by size alone, the damage goes unseen
        assert f.read() == b"\0" * len(data)
    checking = ShardCache(CacheConfig(str(tmp_path), 10**9, prefetch=0, verify=True))
    with checking.open(ref, 0) as f:
        assert f.read() == data
    assert proxy.gets(f"{bucket}/s.tar") == 1


def test_bad_cache_settings_stop_before_training_with_one_message(tmp_path, s3_data, make_cfg, train_command):
    from train.run import build

    (tmp_path / "file").write_text("not a directory")
    unwritable = make_cfg(
        f"data.index={s3_data}", f"data.cache_dir={tmp_path}/file/cache", "data.cache_limit=1GB"
    )
    with pytest.raises(UserError, match=r"data.cache_dir=.*/file/cache cannot be written"):
        build(unwritable)
    largest = max(r.num_bytes for r in shard_refs(s3_data))
    small = make_cfg(f"data.index={s3_data}", f"data.cache_dir={tmp_path}/c", "data.cache_limit=1000")
    with pytest.raises(
        UserError, match=rf"below twice the largest shard \({largest} bytes\).*={2 * largest}"
    ):
        build(small)
    out = subprocess.run(
        [
            *train_command(f"data.cache_dir={tmp_path}/c", "data.cache_limit=lots"),
            f"hydra.run.dir={tmp_path}/r",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = out.stdout + out.stderr
    assert out.returncode == 2, said[-2000:]
    assert (
        'data.cache_limit=lots: must be a size in bytes above 0: an integer, or text such as "20GB"' in said
    )
    assert not (tmp_path / "c").exists() and "Traceback" not in said


@pytest.mark.slow
def test_two_ddp_ranks_share_one_budget_and_fetch_each_shard_once(tmp_path, s3_data, proxy, train_command):
    """Two ranks of one machine, one cache directory: with room for everything, every shard
    arrives once although both ranks read some of the same shards; with room for 2.5 shards, the
    directory never holds more."""
    refs = shard_refs(s3_data)
    ddp = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2")
    big = train_command(
        f"data.index={s3_data}", *ddp, f"data.cache_dir={tmp_path}/big", "data.cache_limit=1GB"
    )
    out = subprocess.run(
        [*big, f"hydra.run.dir={tmp_path}/a", "logger=none"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert [proxy.gets(r.url.removeprefix("s3://")) for r in refs] == [1] * len(refs)

    limit = int(2.5 * max(r.num_bytes for r in refs))
    small = train_command(
        f"data.index={s3_data}",
        *ddp,
        "data.num_workers=2",
        f"data.cache_dir={tmp_path}/small",
        f"data.cache_limit={limit}",
    )
    proc = subprocess.Popen(
        [*small, f"hydra.run.dir={tmp_path}/b", "logger=none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, on_disk(tmp_path / "small"))
        time.sleep(0.002)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    assert 0 < peak <= limit
