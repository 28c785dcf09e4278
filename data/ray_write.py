"""`python -m data write ... --ray ADDRESS`: one Ray task per group of a split's items.

A group is `--shard-samples` consecutive items of a split; its task reads, checks and writes them
as one shard (more where `--shard-size-mb` closes one early), exactly as the local writer cuts
them (data/write.py `write_shards`), so the two writers give the same bytes. Tasks write into a
staging directory inside the output (shared or object storage, which every node reaches):

    OUT/.writing-ray-<fingerprint>/train-g000003-000.tar   a part, written whole before its record
    OUT/.writing-ray-<fingerprint>/train-g000003.json      the record: parts (size, sha256), images' sha256

The fingerprint hashes the items and the options, so a rerun of the same write after the driver
died finds the same directory: a group whose record is there and whose parts still match it (size
and sha256, checked by tasks in parallel) is kept, and only the rest is written. A worker that dies
mid-task is retried by Ray (`max_retries`); its part files are simply written again. When every
group is done, the driver publishes: parts are renamed to `train-000000.tar ...` in order, the
index is written last (data/write.py), and the staging directory is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import fsspec
from fsspec.implementations.local import LocalFileSystem

from data.errors import UserError
from data.index import Shard, shard_from_json
from data.sources import Item
from data.write import Tally, write_group

log = logging.getLogger(__name__)

# Passed on to the tasks, as train/ray_launch.py does: object storage endpoints and credentials
# (the cluster's own, where it has them, still apply), and our test-only settings.
PASSED_ON = ("SHARDTRAIN_", "AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "FSSPEC_")
MAX_RETRIES = 4  # per task, for a dead worker or node (an error in the data is not retried)


class BadInput(UserError):
    """A task found the input unfit (a refused mask, a bit depth the values contradict)."""


def fingerprint(groups: list[tuple], options: dict) -> str:
    """The write's identity: every group's items (source, label, split, meta, mask, key) and the
    options that shape the bytes. Two runs with the same fingerprint write the same shards."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for name, number, items, keys, _ in groups:
        for item, key in zip(items, keys, strict=True):
            row = [name, number, key, item.source, item.label, item.split, item.mask, item.meta]
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _connect(address: str) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}
    try:
        # "auto": the cluster this machine belongs to (RAY_ADDRESS, or one `ray start` began),
        # else a local one just for this write.
        ray.init(
            address=None if address == "auto" else address,
            runtime_env={"env_vars": env},
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except ConnectionError as e:
        raise UserError(
            f"--ray {address}: cannot reach the Ray cluster ({e}); start one with ray start --head"
        ) from None


def _record_name(split: str, number: int) -> str:
    return f"{split}-g{number:06d}.json"


def _part_name(split: str, number: int, part: int) -> str:
    return f"{split}-g{number:06d}-{part:03d}.tar"


def _group_task(split, number, items, keys, classes, jobs, staging, shard_bytes, seen) -> dict:
    """Write one group's shards into `staging` and its record last; returns the record."""
    fs, root = fsspec.core.url_to_fs(staging)
    local = isinstance(fs, LocalFileSystem)
    work = root if local else tempfile.mkdtemp(prefix="shardtrain-group-")
    try:
        parts, tally = write_group(
            items, keys, classes, jobs, work, lambda p: _part_name(split, number, p), shard_bytes, seen
        )
        if not local:  # an object appears whole: an upload that dies leaves no part behind
            for shard, _ in parts:
                fs.put_file(os.path.join(work, shard.url), f"{root}/{shard.url}")
        # Test-only: a pause between the parts and the record, for fault tests to kill a task in.
        time.sleep(float(os.environ.get("SHARDTRAIN_TEST_WRITE_PAUSE_S", "0")))
        record = {
            "split": split,
            "group": number,
            "parts": [shard.to_json() for shard, _ in parts],
            "images": [[d.hex() for d in digests] for _, digests in parts],
            "skipped": dict(tally.skipped),
            "examples": tally.examples,
            "duplicates": tally.duplicates,
            "deep_bits": tally.deep_bits,
        }
        _put(fs, f"{root}/{_record_name(split, number)}", json.dumps(record).encode(), local)
        return record
    finally:
        if not local:
            shutil.rmtree(work, ignore_errors=True)


def _put(fs, path: str, data: bytes, local: bool) -> None:
    if local:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _still_whole(staging: str, record: dict) -> bool:
    """A record from an earlier run, and whether every part it names is there, unchanged."""
    fs, root = fsspec.core.url_to_fs(staging)
    for part in record["parts"]:
        path = f"{root}/{part['url']}"
        try:
            if fs.size(path) != part["num_bytes"]:
                return False
            with fs.open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            return False
        if digest != part["sha256"]:
            return False
    return True


def _earlier_records(fs, root: str, groups: list[tuple]) -> dict[tuple[str, int], dict]:
    found = {}
    for name, number, *_ in groups:
        path = f"{root}/{_record_name(name, number)}"
        try:
            with fs.open(path, "rb") as f:
                found[(name, number)] = json.loads(f.read())
        except (FileNotFoundError, ValueError):  # none yet, or cut short: written again
            continue
    return found


def write_on_ray(
    address: str,
    groups: list[tuple[str, int, list[Item], list[str], list]],
    classes: tuple[str, ...],
    staging: str,
    shard_bytes: int,
    seen,
) -> tuple[dict[str, list[tuple[Shard, list[bytes]]]], Tally, list[tuple[str, str]], int]:
    """Every group's shards, in order per split: (split → [(shard named as staged, its images'
    sha256s)], what was left out, the staged part paths, how many groups an earlier run had
    already written)."""
    import ray
    from tqdm import tqdm

    _connect(address)
    fs, root = fsspec.core.url_to_fs(staging)
    parent = root.rsplit("/", 1)[0]
    for other in fs.glob(f"{parent}/.writing-ray-*"):  # a write of other items or options: not ours
        if other.rstrip("/") != root.rstrip("/"):
            fs.rm(other, recursive=True)
    fs.makedirs(root, exist_ok=True)
    task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(_group_task)
    check = ray.remote(max_retries=MAX_RETRIES)(_still_whole)
    earlier = _earlier_records(fs, root, groups)
    checks = {key: check.remote(staging, record) for key, record in earlier.items()}
    records = {key: earlier[key] for key, ok in zip(checks, ray.get(list(checks.values()))) if ok}
    kept = len(records)
    if kept:
        log.info(
            "kept %d of %d groups an earlier run wrote (their parts match their records)", kept, len(groups)
        )
    seen_ref = ray.put(seen)
    pending = {
        task.remote(name, number, items, keys, classes, jobs, staging, shard_bytes, seen_ref): (name, number)
        for name, number, items, keys, jobs in groups
        if (name, number) not in records
    }
    bar = tqdm(total=len(groups), initial=kept, unit="shard", desc="writing", file=sys.stderr, mininterval=1)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            try:
                records[key] = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
                if isinstance(cause, UserError):  # in the data: a rerun needs other input
                    raise BadInput(str(cause)) from None
                raise UserError(f"--ray: the task writing {key[0]} group {key[1]} failed: {cause}") from None
            except ray.exceptions.RayError as e:  # retries ran out: a worker or node kept dying
                raise UserError(
                    f"--ray: the task writing {key[0]} group {key[1]} failed {MAX_RETRIES + 1} times ({e}); "
                    "rerun the same command: the groups already written are kept"
                ) from None
            bar.update(1)
    except BaseException as e:
        for ref in pending:
            ray.cancel(ref, force=True)
        if isinstance(e, BadInput):  # the groups written are of input that must change: gone
            ray.wait(list(pending), num_returns=len(pending), timeout=30)
            fs.rm(root, recursive=True)
            raise UserError(str(e)) from None
        raise
    finally:
        bar.close()
    return _assemble(groups, records, root, kept)


def _assemble(groups, records, root, kept):
    written: dict[str, list[tuple[Shard, list[bytes]]]] = {}
    tally, moves = Tally(), []
    for name, number, *_ in groups:
        record = records[(name, number)]
        part_tally = Tally(
            Counter(record["skipped"]), list(record["examples"]), record["duplicates"], record["deep_bits"]
        )
        tally.add(part_tally)
        for part, digests in zip(record["parts"], record["images"], strict=True):
            shard = shard_from_json(part)
            written.setdefault(name, []).append((shard, [bytes.fromhex(d) for d in digests]))
            moves.append(f"{root}/{shard.url}")
    return written, tally, moves, kept
