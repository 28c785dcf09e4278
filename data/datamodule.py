"""LightningDataModule over a `dataset.json`: planned, streamed, decoded uint8 batches per rank."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, replace
from functools import cached_property
from typing import Literal

import lightning.pytorch as L

from data import targets
from data.audit import Audit, continue_audit
from data.batch_pool import SLOTS
from data.cache import CacheConfig, check_cache
from data.embedded import ensure_synthetic, synthetic_index
from data.errors import UserError
from data.index import DatasetIndex, load_index
from data.loader import PlannedLoader
from data.mix import Source, epoch_mix, open_mix, targets_of
from data.plan import EpochPlan, Part
from data.position import ORDER, continue_epoch
from data.stream import ShardSet, ShardStream
from data.tile_stream import TileCutter, TileTransform
from data.tiles import Slots, tiling_from
from data.transforms import EvalTransform, TrainTransform
from data.versions import at_version, current

# The data position lives in this module's state_dict, so a mid-epoch checkpoint resumes
# exactly; Lightning only knows to look on the loader and would warn on every such resume.
warnings.filterwarnings(
    "ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended"
)


class ShardDataModule(L.LightningDataModule):
    """Streams the `train` and `val` splits of a shard data set.

    `batch_size` is per device; every rank gets the same number of training batches (the epoch's
    tail under world × batch samples is dropped) and validation reads every sample exactly once.
    `index` is the data set's dataset.json; left None, the embedded inspection set described by
    `synthetic` (num_samples, seed, image_size, cache_dir) is used, and `prepare_data` writes it
    on first use. A given index is never generated over. `target` and `eval_fit` come from the
    task: what each sample's target is, and how evaluation fits an image to the input size;
    `augment` too (False: training reads images through the eval transform). `mix` trains on several
    data sets by weight instead of `index` (data/mix.py); `cache_dir` reads shards on object storage
    through the machine's shard cache (data/cache.py).
    """

    def __init__(
        self,
        index: str | None,
        batch_size: int = 64,
        num_workers: int = 4,
        image_size: int = 224,
        train_scale: tuple[float, float] = (0.08, 1.0),
        train_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        crop_pct: float = 0.875,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        pin_memory: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        synthetic: dict | None = None,
        audit: bool = False,
        audit_dir: str = "audit",
        max_bad_fraction: float = 0.01,
        missing_shards: Literal["fail", "skip"] = "fail",
        persistent_workers: bool = True,
        target: Literal["class", "labels", "mask", "anomaly"] = "class",
        eval_fit: Literal["crop", "stretch"] = "crop",
        augment: bool = True,
        tiles: dict | None = None,
        vflip: float = 0.0,
        rot90: float = 0.0,
        val_batch_size: int | None = None,
        version: int | None = None,
        mix: list[dict] | None = None,
        epoch_samples: int | None = None,
        shuffle_block: int = 0,
        cache_dir: str | None = None,
        cache_limit: int | str | None = None,
        prefetch: int = 2,
        cache_verify: bool = False,
        cache_policy: Literal["plan", "lru"] = "plan",
        batch_slots: int = SLOTS,
    ):
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle_buffer, self.pin_memory = shuffle_buffer, pin_memory
        self.train_split, self.val_split = train_split, val_split
        self.eval_transform = EvalTransform(image_size, crop_pct, eval_fit)
        # augment=False (a memory bank of good patches): training sees images as evaluation does
        self.train_transform = (
            TrainTransform(image_size, tuple(train_scale), tuple(train_ratio), hflip)
            if augment
            else self.eval_transform
        )
        self.tiling = tiling_from(tiles)
        if self.tiling:  # train on tiles; validate on whole parts, which the model tiles itself
            self.eval_transform = EvalTransform(image_size, crop_pct, "none")
            turns = (hflip, vflip, rot90) if augment else (0.0, 0.0, 0.0)  # flips and a quarter turn
            self.train_transform = TileTransform(image_size, *turns)
        # Whole parts of 5-50 MP are 15-150 MB each once decoded: validated a few at a time.
        self.val_batch_size = val_batch_size or (1 if self.tiling else batch_size)
        self.target = target  # what the task learns: set by the task (train/tasks), not by config
        self.synthetic = dict(synthetic) if index is None and synthetic and not mix else None
        self.mix = [dict(e) for e in mix] if mix else None  # train/settings.py: not with data.index
        self.sources: list[Source] = []  # the mix's data sets, once the index is read
        self.epoch_samples, self.shuffle_block = epoch_samples, shuffle_block
        self.cache = CacheConfig.of(cache_dir, cache_limit, prefetch, cache_verify, cache_policy)
        self._index_url = None if index is None else str(index)
        self.version = version  # of a data set that grew (data/versions.py); None: the latest
        self._resume: dict | None = None  # a checkpoint's position, until its epoch starts
        self._part: tuple[int, tuple[Part, ...], int] = (-1, (), 0)  # (epoch, parts before, offset)
        self.audit_dir = os.path.abspath(audit_dir) if audit else None
        self.max_bad_fraction = max_bad_fraction  # enforced by data.quality.BadDataMonitor
        self.missing_shards = missing_shards
        self.persistent_workers = persistent_workers
        self.batch_slots = batch_slots  # reused batch memory per loader worker (data/batch_pool.py)
        self._audit: Audit | None = None

    def prepare_data(self) -> None:
        if self.synthetic:
            s = self.synthetic
            n, seed, size = s["num_samples"], s["seed"], s["image_size"]
            ensure_synthetic(self.index_url, n, seed, size, s.get("multi", 0.0), s.get("large"))

    @property
    def index_url(self) -> str:
        if self._index_url:
            return self._index_url
        if not self.synthetic:  # raised here, not in __init__, so Hydra does not wrap it
            raise UserError(
                "data.index is not set: give your data set (data.index=./shards/dataset.json), or "
                "use the embedded one (data=synthetic)"
            )
        return synthetic_index(**self.synthetic)

    @cached_property
    def index(self) -> DatasetIndex:
        if self.mix:
            self.sources, index = open_mix(self.mix, self.target)
        else:
            self.prepare_data()
            index = at_version(load_index(self.index_url), self.version)
            targets.check_index(index, self.target)
        if self.cache:
            check_cache(self.cache, index)
        return index

    @property
    def data_version(self) -> tuple[int | None, str]:
        """(version, sha256 naming its shards): what lineage records, and what a mid-epoch resume
        must find unchanged (an append since, to a run pinned to its version, changes nothing)."""
        return current(self.index)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    @property
    def val_sources(self) -> tuple[str, ...]:
        """The mix's sources that validation reads (those with the val split), by name."""
        self.index  # noqa: B018 (the sources are known once the index is read)
        return tuple(s.name for s in self.sources if self.val_split in s.index.splits)

    def _plan(self, split: str, train: bool) -> tuple[ShardSet, EpochPlan, Slots | None]:
        shards = self.index.split(split).shards
        trainer = self.trainer
        sizes = tuple(s.num_samples for s in shards)
        slots = None
        if train and self.tiling:  # the plan's samples are tiles
            slots = Slots(self.tiling, sizes, [s.sizes for s in shards])
            sizes = slots.per_shard
        mixed = epoch_mix(self.sources, split, sizes, self.epoch_samples) if train else None
        plan = EpochPlan(
            shard_sizes=sizes,
            batch_size=self.batch_size if train else self.val_batch_size,
            seed=self.seed,
            world_size=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            num_workers=self.num_workers,
            shuffle=train,
            drop_last=train,
            buffer_size=self.shuffle_buffer if train else 0,
            mix=mixed,
            block=self.shuffle_block if train else 0,
        )
        if train and len(plan) == 0:
            raise UserError(
                f"data.batch_size={self.batch_size} × {plan.world_size} ranks is more than the "
                f"{plan.length} samples of split {split!r}: lower data.batch_size"
            )
        return ShardSet.of(self.index, split, self.sources), plan, slots

    def _loader(self, split: str, train: bool) -> PlannedLoader:
        shard_set, plan, slots = self._plan(split, train)
        depth = self.index.extra.get("bit_depth")  # 16-bit images' depth, from dataset.json (None: own)
        transform = self.train_transform if train else self.eval_transform
        if isinstance(transform, TrainTransform | EvalTransform):  # tiles: the cutter decodes
            transform = replace(transform, bit_depth=depth)
        reader = targets_of(self.sources, self.index, self.target, train)
        cut = slots and TileCutter(
            self.tiling, transform, reader, self.target, self.classes, self.seed, depth
        )
        if train:
            settle, length = self._settle, lambda: self._length(plan)
        else:
            settle, length = (lambda p: (p, 0, 0)), (lambda: len(plan))
        return PlannedLoader(
            ShardStream(
                shard_set,
                plan,
                transform,
                reader,
                self.missing_shards,
                (slots, cut) if slots else None,
                self.cache,
                self.batch_slots,
            ),
            settle,
            length,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Kept across epochs: restarting them costs a pipeline refill (a batch per worker)
            # every epoch, a third of the time of a 5,000-image epoch on a 16-core GPU host.
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> PlannedLoader:
        return self._loader(self.train_split, train=True)

    def val_dataloader(self) -> PlannedLoader:
        return self._loader(self.val_split, train=False)

    def _settle(self, plan: EpochPlan) -> tuple[EpochPlan, int, int]:
        """The current epoch's plan, at the restored position on the first pass after a resume."""
        epoch = self.trainer.current_epoch if self.trainer else 0
        plan, offset, consumed = self._position(replace(plan, epoch=epoch, before=()), epoch)
        self._resume = None  # the position holds for the first pass only
        self._part = (epoch, plan.before, offset)
        if plan.before and self.trainer:
            # An elastic part counts other batches than a full epoch does, and Lightning fixes
            # an epoch's length when it loads the loader: have it load again for the next epoch.
            self.trainer.reload_dataloaders_every_n_epochs = 1
        return plan, offset, consumed

    def _length(self, plan: EpochPlan) -> int:
        """Batches Lightning counts in the coming pass: a resumed pass counts on from the offset."""
        plan, offset, _ = self._position(plan)
        return offset + len(plan)

    def _position(self, plan: EpochPlan, epoch: int | None = None) -> tuple[EpochPlan, int, int]:
        """(plan, offset, consumed) where a saved mid-epoch position continues `plan`'s epoch
        (data/position.py)."""
        now = {k: v for k, v in self._plan_inputs().items() if k in ORDER}
        return continue_epoch(plan, self._resume, now, epoch)

    @property
    def audit(self) -> Audit | None:
        if self.audit_dir and self._audit is None:
            self._audit = Audit(self.audit_dir, self.trainer.global_rank if self.trainer else 0)
        return self._audit

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Lightning calls this for every batch just before its step, in the main process.
        if self.audit and self.trainer and self.trainer.training:
            self.audit.record(self.trainer.current_epoch, batch[2])
        return batch

    def state_dict(self) -> dict:
        """The data position, saved in every checkpoint: batches this rank consumed this epoch
        (Lightning's count), and the layouts that trained them."""
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch, before, offset = self._part
        if epoch != trainer.current_epoch:
            before, offset = (), 0
        if self.audit:  # every rank writes its own mark; the checkpoint holds rank 0's state
            self.audit.mark(trainer.global_step, trainer.current_epoch)
        now = (done - offset) * self.batch_size * trainer.world_size
        return {
            "epoch": trainer.current_epoch,
            "batches": done,
            "offset": offset,
            "parts": [asdict(p) for p in before],
            "samples": now + sum(p.batches * p.batch_size * p.world_size for p in before),  # global
            "global_step": trainer.global_step,
            "audit_dir": self.audit_dir,
            **self._plan_inputs(),
        }

    def _plan_inputs(self) -> dict:
        """What besides the epoch fixes the training plan: a mid-epoch position continues the
        same plan if these are unchanged, and an elastic part of the epoch if not."""
        return {
            "world_size": self.trainer.world_size if self.trainer else 1,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "index_sha256": self.data_version[1],
            "tiles": self._tiles(),
            # the sources and weights are in the mixed index's sha256; the epoch's length is not
            "mix": {"epoch_samples": self.epoch_samples} if self.sources or self.epoch_samples else None,
            "shuffle_block": self.shuffle_block,
        }

    def _tiles(self) -> dict | None:
        return self.tiling.to_dict() if self.tiling else None

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume = dict(state)
            if self.audit:
                continue_audit(
                    self.audit_dir, self.audit.rank, self.trainer.world_size if self.trainer else 1, state
                )
