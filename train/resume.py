"""Which checkpoint a run continues, and what it carries over from the run it continues.

`resume=auto` looks, in order, at:

    1. this run's own checkpoint directory: a requeued job whose hydra.run.dir is fixed
    2. the other runs under paths.log_dir/NAME, newest first: for a single run the single runs,
       for a multirun job the earlier jobs at its point of the sweep (never another point)

In each run it takes `last.ckpt`, else the newest other checkpoint. A file that does not load
(truncated by a crash, corrupt) is passed over with a warning for the next one; it says which
checkpoint it resumed from, or that there is none and the run starts fresh.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
from collections.abc import Iterator

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from data.errors import UserError
from train.checkpoint import KEY, load_checkpoint
from train.network import ModelSpec

log = logging.getLogger("train")
# Rank zero's choice, for the DDP ranks Lightning starts as new processes during the fit: searching
# again could choose otherwise (a multirun job's ranks run as plain runs).
CHOSEN = "SHARDTRAIN_RESUMING"


def find_resume(resume: str | None, ckpt_dir: str, runs_dir: str) -> tuple[str | None, dict]:
    """(checkpoint to continue or None, its shardtrain metadata). `resume`: null (fresh), "auto",
    or a checkpoint path, which must load (no other file is put in its place)."""
    if CHOSEN in os.environ:
        path = os.environ[CHOSEN] or None
        return path, load_checkpoint(path)[KEY] if path else {}
    if not resume:
        return None, {}
    if resume != "auto":
        if not os.path.isfile(resume):
            raise UserError(f"resume={resume}: no such checkpoint (use resume=auto or a .ckpt path)")
        return resume, load_checkpoint(resume)[KEY]
    unreadable = []
    for path in _candidates(ckpt_dir, runs_dir):
        try:
            meta = load_checkpoint(path)[KEY]
        except UserError as e:
            unreadable.append(path)
            _say(logging.WARNING, "resume=auto: passing over %s: %s", path, e)
            continue
        _say(logging.INFO, "resume=auto: continuing from %s", path)
        return path, meta
    if unreadable:
        raise UserError(
            f"resume=auto: no checkpoint of this run loads ({', '.join(unreadable)}); move them aside "
            "and start fresh (resume=null), or give one with resume=PATH"
        )
    _say(logging.INFO, "resume=auto: no checkpoint in %s or under %s: starting fresh", ckpt_dir, runs_dir)
    return None, {}


@contextlib.contextmanager
def shared_with_ranks(path: str | None) -> Iterator[None]:
    """While it lasts, the processes this one starts (Lightning's DDP ranks) resume from `path`."""
    os.environ[CHOSEN] = path or ""
    try:
        yield
    finally:
        os.environ.pop(CHOSEN, None)


def _say(level: int, text: str, *args: object) -> None:
    if rank_zero_only.rank == 0:  # DDP's other ranks resolve the same path; one line is enough
        log.log(level, text, *args)


def _candidates(ckpt_dir: str, runs_dir: str) -> list[str]:
    own = _in_order(ckpt_dir)
    job = _job()
    runs = []
    for checkpoints in glob.glob(os.path.join(glob.escape(runs_dir), "**", "checkpoints"), recursive=True):
        if os.path.abspath(checkpoints) == os.path.abspath(ckpt_dir) or not _same_job(checkpoints, job):
            continue
        found = _in_order(checkpoints)
        if found:
            runs.append((os.path.getmtime(found[0]), found))
    return own + [path for _, found in sorted(runs, reverse=True) for path in found]


def _in_order(checkpoints: str) -> list[str]:
    """A run's checkpoints as resume tries them: last.ckpt, then the others newest first."""
    files = glob.glob(os.path.join(glob.escape(os.path.abspath(checkpoints)), "*.ckpt"))
    newest_first = sorted(files, key=os.path.getmtime, reverse=True)
    return sorted(newest_first, key=lambda p: os.path.basename(p) != "last.ckpt")


def _job() -> dict[str, str] | None:
    """This run's overrides as {key: value} when it is a job of a multirun sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return _as_dict(HydraConfig.get().overrides.task)


def _as_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o and not o.startswith("resume="))


def _record(run_dir: str) -> tuple[str | None, dict[str, str]]:
    """(Hydra's mode, the overrides) a run directory's .hydra/ records; (None, {}) without one."""
    hydra_dir = os.path.join(run_dir, ".hydra")
    try:
        with open(os.path.join(hydra_dir, "hydra.yaml")) as f:
            mode = yaml.safe_load(f)["hydra"]["mode"]
        with open(os.path.join(hydra_dir, "overrides.yaml")) as f:
            return mode, _as_dict(yaml.safe_load(f) or [])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None, {}  # no Hydra record (a run from Python): a single run


def _same_job(checkpoints: str, job: dict[str, str] | None) -> bool:
    """Whether the run owning `checkpoints` is one this run may continue. A single run continues
    single runs (whose settings may differ: an elastic resume). A multirun job continues a job of
    an earlier sweep at the same point: the same values of the settings that earlier sweep
    varied (found from its jobs' .hydra/overrides.yaml), whatever else changed since (one more
    epoch, say) and whatever job number the point has now."""
    run_dir = os.path.dirname(checkpoints)
    mode, overrides = _record(run_dir)
    if job is None:
        return mode != "MULTIRUN"
    if mode != "MULTIRUN":
        return False
    sweep = os.path.dirname(run_dir)
    records = [_record(os.path.join(sweep, d)) for d in os.listdir(sweep)]  # multirun.yaml is there too
    points = [o for m, o in records if m == "MULTIRUN"]
    varied = {k for p in points for k in p if len({q.get(k) for q in points}) > 1}
    return all(overrides.get(k) == job.get(k) for k in varied)


def check_resumable(path: str, meta: dict, spec: ModelSpec) -> None:
    """A checkpoint continues only the same network on the same classes."""
    if meta.get("kind") == "model":
        raise UserError(
            f"cannot resume from {path}: it holds a model's weights only (written by evaluation), "
            "not a training state; resume from a run's last.ckpt"
        )
    saved = ModelSpec.from_dict(meta["model"])
    fields = ("backbone", "classes", "image_size")
    diff = [
        f"{f} {getattr(saved, f)} -> {getattr(spec, f)}"
        for f in fields
        if getattr(saved, f) != getattr(spec, f)
    ]
    if diff:
        raise UserError(
            f"cannot resume from {path}: {'; '.join(diff)} (resume=null starts fresh; or restore the "
            "settings that checkpoint was trained with)"
        )


class BestCheckpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint, which also keeps the best-k of the run it continues. A resumed
    run writes into a new run directory, and Lightning forgets checkpoints kept in another one:
    the new epochs would then compete only with each other. Here the continued run's best-k are
    linked (or copied) into the new directory and keep competing, so the run's best checkpoint
    is the best of all its epochs."""

    def _save_last_checkpoint(self, trainer, monitor_candidates: dict) -> None:
        # last.ckpt is shared with MidEpochCheckpoint (train/midepoch.py), which writes it every N
        # steps. Lightning would take that file for someone else's and write last-v1.ckpt beside
        # it, leaving the last.ckpt resume=auto takes a few steps behind the epoch's end: here it
        # is this callback's own, overwritten and never versioned.
        if self.save_last:
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.abspath(old) != os.path.abspath(self.dirpath):
            state_dict = self._carried_over(state_dict)
        super().load_state_dict(state_dict)

    def _carried_over(self, state: dict) -> dict:
        kept = {}
        for path, score in state.get("best_k_models", {}).items():
            new = os.path.join(self.dirpath, os.path.basename(path))
            if rank_zero_only.rank == 0 and os.path.isfile(path) and not os.path.exists(new):
                os.makedirs(self.dirpath, exist_ok=True)
                try:
                    os.link(path, new)  # same file system: no second copy of the bytes
                except OSError:
                    shutil.copy2(path, new)
            if os.path.isfile(new) or rank_zero_only.rank != 0:
                kept[new] = score
        if not kept:
            return {**state, "dirpath": self.dirpath, "best_k_models": {}, "best_model_path": ""}
        pick = max if self.mode == "max" else min
        best = pick(kept, key=lambda p: float(kept[p]))
        worst = (min if self.mode == "max" else max)(kept, key=lambda p: float(kept[p]))
        return {
            **state,
            "dirpath": self.dirpath,
            "best_k_models": kept,
            "best_model_path": best,
            "best_model_score": kept[best],
            "kth_best_model_path": worst,
            "kth_value": kept[worst],
            "last_model_path": "",  # the old run's last.ckpt is not this run's to delete
        }
