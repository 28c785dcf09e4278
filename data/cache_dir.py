"""The shard cache's directory, shared by every reader of a machine, and the rules of its budget.

    cache_dir/
      .lock                          every decision (reserve, evict, pin) is taken under this flock
      shards/NAME.tar                complete shards, renamed into place once whole (NAME: the
                                     shard's sha256 from the index, so a rewritten shard is a new
                                     file); mtime 0 until a reader first opens one, atime when it
                                     was last fetched or opened
      partial/NAME.OWNER.BYTES       a download under way, BYTES reserved against the budget; never
                                     read, and removed once its owner is gone (a killed download)
      readers/OWNER-N.json           each reader's future: {"at": its position, "reading": [NAME],
                                     "next": {NAME: the position it next needs NAME at}}

OWNER is HOST-PID-START (START: the process's start time), so a process that reuses a dead one's
PID, as a restarted container does, is not taken for it. The directory is one machine's: entries
of another host are leftovers (a renamed host, a disk moved) and are removed like a dead owner's.

Positions count a loader worker's planned samples (this epoch's, then the next's), so readers on
every rank and worker compare alike: they step together. Making room evicts the complete shards
that no reader is reading, the one needed furthest in the future first (Belady's rule: the fewest
fetches of any rule, possible only because the plan is known), and only shards needed later than
the one being fetched; a shard fetched ahead is kept until it has been read. If that frees too
little, the caller waits or streams: the budget is never exceeded. `policy="lru"` evicts the least
recently fetched or opened instead (a baseline for scripts/bench_cache.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator

log = logging.getLogger(__name__)

HOST = socket.gethostname()
_owners: dict[int, str] = {}


def owner() -> str:
    """HOST-PID-START of this process (a forked loader worker has its own)."""
    pid = os.getpid()
    if pid not in _owners:
        _owners[pid] = f"{HOST}-{pid}-{_start_time(pid)}"
    return _owners[pid]


def _start_time(pid: int) -> str:
    """When the process started, in clock ticks since boot (Linux /proc; "0" elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


class CacheDir:
    """The directory of `limit` bytes; every method but `locked` runs under the lock."""

    def __init__(self, directory: str, limit: int, policy: str = "plan"):
        self.dir, self.limit, self.policy = directory, limit, policy
        for sub in ("shards", "partial", "readers"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        # A fresh open file per acquisition: flock excludes other open files, so the prefetch
        # thread and the reader of one process exclude each other too.
        with open(os.path.join(self.dir, ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def reserve(self, name: str, size: int, distance: int, me: tuple[str, dict]) -> str | None:
        """A partial file holding `size` bytes for shard `name` against the budget, evicting what
        the policy allows; None if that is not enough. `distance`: positions until the caller
        needs it; `me`: the caller's reader id and state (newer than its file)."""
        complete, partial = self._scan()
        need = sum(complete.values()) + sum(partial.values()) + size - self.limit
        if need > 0:
            victims = self._victims(complete, distance, me)
            if sum(complete[v] for v in victims) < need:
                return None
            for victim in victims:
                os.remove(self.shard_path(victim))
                need -= complete[victim]
                if need <= 0:
                    break
        path = os.path.join(self.dir, "partial", f"{name}.{owner()}.{size}")
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        return path

    def _victims(self, complete: dict[str, int], distance: int, me: tuple[str, dict]) -> list[str]:
        """Complete shards that may go, the first to go first."""
        readers = self.readers(me)
        pinned = {n for r in readers for n in r.get("reading", ())}
        stats = {}
        for n in complete:
            if n not in pinned:
                with contextlib.suppress(FileNotFoundError):  # removed since the scan (a bad copy)
                    stats[n] = os.stat(self.shard_path(n))
        free = list(stats)
        opened = {n: st.st_mtime for n, st in stats.items()}  # 0: fetched, never opened
        if self.policy == "lru":
            return sorted(free, key=lambda n: stats[n].st_atime)  # fetched or opened longest ago
        far = float("inf")
        nxt = {n: min((r["next"][n] - r["at"] for r in readers if n in r["next"]), default=far) for n in free}
        # A shard fetched ahead is kept until it is read, unless no reader needs it any more: a
        # fetch is never wasted, even when the budget is too small for every worker's window.
        keep = {n for n in free if not opened[n] and nxt[n] < far}
        return sorted((n for n in free if nxt[n] > distance and n not in keep), key=lambda n: -nxt[n])

    def _scan(self) -> tuple[dict[str, int], dict[str, int]]:
        """(complete shards' sizes, live downloads' reserved bytes); dead downloads removed."""
        complete = {}
        for entry in os.scandir(os.path.join(self.dir, "shards")):
            if entry.name.endswith(".tar"):
                complete[entry.name[:-4]] = entry.stat().st_size
        partial = {}
        for entry in os.scandir(os.path.join(self.dir, "partial")):
            _, owner, size = _partial_parts(entry.name)
            if owner is None:
                continue
            if not _alive(owner):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)  # a download whose process died: never read
                continue
            partial[entry.name] = size
        return complete, partial

    def complete(self, name: str, size: int, url: str) -> str | None:
        """The cached shard's path if it is there with the index's size (else it is removed)."""
        path = self.shard_path(name)
        try:
            found = os.path.getsize(path)
        except FileNotFoundError:
            return None
        if found != size:  # not the shard the index names (or damaged): fetched again
            log.warning("cached %s has %d bytes, the index says %d: fetching it again", url, found, size)
            os.remove(path)
            return None
        return path

    def fetching(self, name: str) -> bool:
        """Is a live process (the caller's own prefetch included) downloading shard `name`?"""
        for entry in os.scandir(os.path.join(self.dir, "partial")):
            found, owner, _ = _partial_parts(entry.name)
            if found == name and owner and _alive(owner):
                return True
        return False

    def readers(self, me: tuple[str, dict]) -> list[dict]:
        """Every live reader's state (`me`, the caller's, as it is now); dead readers' files go."""
        out = []
        for entry in os.scandir(os.path.join(self.dir, "readers")):
            if entry.name == f"{me[0]}.json":
                out.append(me[1])
                continue
            who = entry.name.removesuffix(".json").rsplit("-", 1)[0]
            if not entry.name.endswith(".json") or not _alive(who):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                continue
            with contextlib.suppress(OSError, ValueError), open(entry.path) as f:
                state = json.load(f)
                out.append({"at": state["at"], "reading": state["reading"], "next": state["next"]})
        return out

    def publish(self, reader: str, state: dict) -> None:
        path = self._reader_path(reader)
        with open(f"{path}.tmp", "w") as f:
            json.dump(state, f)
        os.replace(f"{path}.tmp", path)

    def forget(self, reader: str) -> None:
        with contextlib.suppress(OSError):
            os.remove(self._reader_path(reader))

    def shard_path(self, name: str) -> str:
        return os.path.join(self.dir, "shards", f"{name}.tar")

    def _reader_path(self, reader: str) -> str:
        return os.path.join(self.dir, "readers", f"{reader}.json")


def _partial_parts(file: str) -> tuple[str, str | None, int]:
    """NAME.OWNER.BYTES → (NAME, OWNER, BYTES) (NAME is hex; a host name may hold dots);
    anything else → (file, None, 0)."""
    name, _, rest = file.partition(".")
    who, _, size = rest.rpartition(".")
    if not who or not size.isdigit():
        return file, None, 0
    return name, who, int(size)


def _alive(who: str) -> bool:
    """Is the process HOST-PID-START still running on this host?"""
    host, pid, start = [*who.rsplit("-", 2), "", ""][:3]
    if host != HOST or not pid.isdigit():
        return False  # another host's entry in this machine's directory: a leftover
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return _start_time(int(pid)) == start
