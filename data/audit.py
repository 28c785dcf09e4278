"""The per-sample audit: which training samples each rank consumed, epoch by epoch, in order.

    <run dir>/audit/epoch000-rank000.txt    one sample key per line, appended as batches train
    <run dir>/audit/marks-rank000.txt       "global_step epoch lines" at every checkpoint

A checkpoint's updates contain exactly the keys up to its mark. Resuming from it copies (or, in
the same directory, cuts) each epoch file back to that mark, so after any crash and resume the
audit lists exactly the samples whose updates are in the model. Keys only: cheap to write, and
each file is flushed per batch so a killed process loses nothing it trained on.
"""

from __future__ import annotations

import os
from typing import TextIO

from data.errors import UserError


class Audit:
    def __init__(self, directory: str, rank: int):
        self.directory, self.rank = directory, rank
        self._file: TextIO | None = None
        self._epoch = -1
        self._lines = 0

    def path(self, epoch: int, directory: str | None = None) -> str:
        return os.path.join(directory or self.directory, f"epoch{epoch:03d}-rank{self.rank:03d}.txt")

    def _marks(self, directory: str | None = None) -> str:
        return os.path.join(directory or self.directory, f"marks-rank{self.rank:03d}.txt")

    def record(self, epoch: int, keys: list[str]) -> None:
        if epoch != self._epoch:
            self.close()
            os.makedirs(self.directory, exist_ok=True)
            self._file = open(self.path(epoch), "a")  # noqa: SIM115 (kept open across batches)
            self._epoch, self._lines = epoch, _count_lines(self.path(epoch))
        self._file.write("".join(f"{k}\n" for k in keys))
        self._file.flush()
        self._lines += len(keys)

    def mark(self, step: int, epoch: int) -> None:
        """Called as a checkpoint is written: how far this rank's audit goes for it."""
        lines = self._lines if epoch == self._epoch else _count_lines(self.path(epoch))
        os.makedirs(self.directory, exist_ok=True)
        with open(self._marks(), "a") as f:
            f.write(f"{step} {epoch} {lines}\n")

    def restore(self, previous: str, step: int) -> None:
        """Continue the audit of the run in `previous` from its checkpoint at `step`."""
        marks = _read_marks(self._marks(previous))
        if step not in marks:
            raise ValueError(f"{self._marks(previous)} has no mark for step {step}")
        epoch, lines = marks[step]
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # epochs after the mark, left by the crashed run
            later = name.startswith("epoch") and name.endswith(f"-rank{self.rank:03d}.txt")
            if later and int(name[5:8]) > epoch:
                os.remove(os.path.join(self.directory, name))
        for e in range(epoch + 1):
            src = self.path(e, previous)
            keep = _read_lines(src)[:lines] if e == epoch else _read_lines(src)
            _write_lines(self.path(e), keep)
        kept = [f"{s} {e} {n}\n" for s, (e, n) in sorted(marks.items()) if s <= step]
        _write_lines(self._marks(), [line.rstrip("\n") for line in kept])
        self.close()

    def close(self) -> None:
        if self._file:
            self._file.close()
        self._file, self._epoch = None, -1


def continue_audit(audit_dir: str, rank: int, world: int, state: dict) -> None:
    """Continue the audit of the run that saved the data position `state`, on this rank."""
    if not state.get("audit_dir"):
        raise UserError(
            "data.audit=true, but the run being resumed kept no audit, so it could not list "
            "the samples already trained: resume without data.audit, or start fresh"
        )
    # Each rank continues its own file; rank 0 also carries over the files of ranks that
    # this (smaller) world no longer has, so the audit still lists everything trained.
    ranks = [rank] if rank < state["world_size"] else []
    if rank == 0:
        ranks += range(world, state["world_size"])
    try:
        for r in ranks:
            Audit(audit_dir, r).restore(state["audit_dir"], state["global_step"])
    except (OSError, ValueError) as e:
        raise UserError(f"cannot continue the audit of {state['audit_dir']}: {e}") from None


def _count_lines(path: str) -> int:
    return len(_read_lines(path))


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def _read_marks(path: str) -> dict[int, tuple[int, int]]:
    marks = {}
    for line in _read_lines(path):
        step, epoch, lines = map(int, line.split())
        marks[step] = (epoch, lines)  # a later mark for the same step wins
    return marks


def _write_lines(path: str, lines: list[str]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)
