"""Several data sets trained as one, drawn by weight: `data.mix`.

    data.mix: [{index: s3://b/line1, weight: 0.7}, {index: ./line2, weight: 0.3, name: line2, version: 2}]

    each entry's dataset.json ──▶ Source (name: the entry's, or the directory the index sits in)
    classes ──joined by name──▶ one class list: the first source's order, then names new in later
                                 ones; each source's targets are renumbered into it
    train splits ──▶ one shard list, source by source ──▶ Mix(bounds, counts) in the epoch plan
                                 (counts: the epoch's samples shared out by weight, data/plan.py)
    val splits   ──▶ one shard list: every sample once, keys "NAME:KEY", metrics per source

The mixed index stands in for a single data set everywhere downstream (the plan, resume, lineage):
its sha256 names the sources' contents, versions and weights, so a mid-epoch resume refuses a
changed mix as it refuses a changed data set.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from data import targets
from data.errors import UserError
from data.index import DatasetIndex, Split, load_index, parent_url
from data.plan import Mix
from data.targets import GOOD_NAMES, UNKNOWN
from data.versions import at_version, current

ENTRY_KEYS = ("index", "weight", "name", "version")
NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # a source's name prefixes keys as NAME:KEY


@dataclass(frozen=True)
class Source:
    name: str
    index: DatasetIndex  # at the entry's version
    weight: float


def load_sources(entries: Sequence[Mapping]) -> list[Source]:
    """`data.mix` as sources, every entry checked before any index is read."""
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise UserError(
            "data.mix: expected a list of {index, weight} entries, e.g. [{index: ./a, weight: 0.7}]"
        )
    for k, e in enumerate(entries):
        problem = entry_problem(e)
        if problem:
            raise UserError(f"data.mix[{k}]: {problem}")
    sources = []
    for e in entries:
        index = at_version(load_index(str(e["index"])), e.get("version"))
        name = str(e.get("name") or default_name(index.location))
        sources.append(Source(name, index, float(e.get("weight", 1.0))))
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(
            f"data.mix: two sources are named {twice[0]!r} (the directory their index sits in): "
            "give each entry its own name (name: line1)"
        )
    bad = [n for n in names if not NAME.match(n)]
    if bad:
        raise UserError(
            f"data.mix: source name {bad[0]!r}: use letters, digits, '.', '_' and '-' (name: line1)"
        )
    return sources


def entry_problem(entry: object) -> str | None:
    """What is wrong with one `data.mix` entry (shared with the settings check), or None."""
    if not isinstance(entry, Mapping) or "index" not in entry:
        return "expected {index: PATH_OR_URL, weight: W} (name and version optional)"
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        return f"unknown key {unknown[0]!r} (an entry takes {', '.join(ENTRY_KEYS)})"
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        return (
            f"weight={weight}: must be a number above 0 (a source to leave out is one to drop from the mix)"
        )
    version = entry.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        return f"version={version}: must be a positive integer, or left out for the latest"
    return None


def open_mix(entries: Sequence[Mapping], target: str) -> tuple[list[Source], DatasetIndex]:
    """(the sources, their mixed index), each source checked for the task's `target`."""
    sources = load_sources(entries)
    for source in sources:
        targets.check_index(source.index, target)
    return sources, mixed_index(sources, join_classes(sources))


def default_name(location: str) -> str:
    """The directory the index sits in: s3://b/lines/line1/dataset.json → line1."""
    return parent_url(location).rstrip("/").rsplit("/", 1)[-1] or "data"


def join_classes(sources: Sequence[Source]) -> tuple[str, ...]:
    """The first source's classes in its order, then each name new in a later one. Names that
    differ only in case or separators (Scratch, scratch, s-cratch) and two different good classes
    are conflicts: they would silently train as different classes."""
    joined: list[str] = []
    where: dict[str, str] = {}
    for s in sources:
        for c in s.index.classes:
            if c not in joined:
                joined.append(c)
                where[c] = s.name
    spelled: dict[str, str] = {}
    for c in joined:
        key = re.sub(r"[\s_\-]+", "", c.lower())
        if key in spelled:
            a = spelled[key]
            raise UserError(
                f"data.mix: class {a!r} of {where[a]} and {c!r} of {where[c]} differ only in spelling, so "
                "they would train as two classes: name them alike in the data sets (or, if they differ, "
                "apart)"
            )
        spelled[key] = c
    goods = [c for c in joined if c.lower() in GOOD_NAMES]
    if len(goods) > 1:
        named = ", ".join(f"{g!r} in {where[g]}" for g in goods)
        raise UserError(
            f"data.mix: the sources name the good class differently ({named}): a part cannot pass under "
            "two names; name it alike in every data set"
        )
    return tuple(joined)


def mixed_index(sources: Sequence[Source], classes: Sequence[str]) -> DatasetIndex:
    """One index over every source: each split's shards source by source (URLs made absolute),
    `extra["mix"]` naming the sources. Bit depths must agree: a model scales every input by one."""
    depths = {s.name: s.index.extra.get("bit_depth") for s in sources}
    if len(set(depths.values())) > 1:
        listed = ", ".join(f"{n}: {d or 'each file its own'}" for n, d in depths.items())
        raise UserError(
            f"data.mix: the sources have different bit depths ({listed}); a model scales every input by "
            "one depth: rewrite the shards of one with python -m data write --bit-depth N"
        )
    names = {name for s in sources for name in s.index.splits}
    splits = {
        name: Split(
            tuple(
                replace(shard, url=s.index.shard_url(shard))
                for s in sources
                if name in s.index.splits
                for shard in s.index.splits[name].shards
            )
        )
        for name in sorted(names)
    }
    described = [
        {
            "name": s.name,
            "index": s.index.location,
            "sha256": s.index.sha256,
            "version": current(s.index)[0],
            "version_sha256": current(s.index)[1],
            "weight": s.weight,
        }
        for s in sources
    ]
    sha = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    location = "mix(" + ", ".join(f"{s.name}={s.index.location}" for s in sources) + ")"
    depth = next(iter(depths.values()))
    extra = {"mix": described, **({"bit_depth": depth} if depth else {})}
    return DatasetIndex(tuple(classes), splits, location, sha, extra)


def shard_sources(sources: Sequence[Source], split: str) -> list[int]:
    """The source of each shard of `split` in the mixed index's order."""
    return [k for k, s in enumerate(sources) if split in s.index.splits for _ in s.index.splits[split].shards]


def epoch_mix(
    sources: Sequence[Source], split: str, sizes: Sequence[int], epoch_samples: int | None
) -> Mix | None:
    """The training plan's mix: each source's share of the epoch (in tiles, with tiles). One data
    set with `epoch_samples` is a mix of one, its epoch drawn up or down to that length."""
    if not sources:
        return Mix((0, len(sizes)), (epoch_samples,)) if epoch_samples else None
    return plan_mix([s.weight for s in sources], shard_sources(sources, split), sizes, epoch_samples)


def plan_mix(
    weights: Sequence[float], source_of: Sequence[int], sizes: Sequence[int], epoch_samples: int | None
) -> Mix:
    """The epoch's samples (`epoch_samples`, or all sources' samples added up) shared out by
    weight, rounded so they add up exactly (largest remainders first). `source_of` gives each
    shard's source (sources contiguous), `sizes` its samples (tiles, with tiles)."""
    have = np.bincount(np.asarray(source_of, dtype=np.int64), weights=sizes, minlength=len(weights))
    if not have.all():
        k = int(np.flatnonzero(have == 0)[0])
        raise UserError(
            f"data.mix[{k}] has no training samples, so it cannot give its share: drop it from the mix, "
            "or write its train split"
        )
    total = epoch_samples or int(have.sum())
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    bounds = np.searchsorted(np.asarray(source_of), np.arange(len(weights) + 1))
    return Mix(tuple(int(b) for b in bounds), tuple(int(c) for c in counts))


@dataclass(frozen=True)
class SourceTargets:
    """Each source's target reader, its targets renumbered into the joined class list: a class
    index through a table, a multi-hot row spread onto the joined columns, a mask's class values
    through the same table (anomaly maps are good/defect already). Samples carry `__source__`."""

    readers: tuple[Callable, ...]
    tables: tuple[np.ndarray, ...]  # per source: its class index → the joined one
    kind: str  # "class", "labels", "mask" or "anomaly"
    size: int  # joined classes

    @property
    def spatial(self) -> bool:
        return getattr(self.readers[0], "spatial", False)

    def __call__(self, sample: dict):
        k = sample["__source__"]
        target, table = self.readers[k](sample), self.tables[k]
        if self.kind == "class":
            return int(table[target])
        if self.kind == "labels":
            out = np.zeros(self.size, np.float32)
            out[table] = target
            return out
        if self.kind == "mask":
            return self.mask_table(sample)[target]
        return target

    def mask_table(self, sample: dict) -> np.ndarray:
        """The sample's source's class values → the joined ones, for all 256 values of a mask
        (255, a defect of unknown place, stays)."""
        table = self.tables[sample["__source__"]]
        lut = np.arange(256, dtype=np.uint8)
        lut[: len(table)] = table
        return lut


def targets_of(sources: Sequence[Source], index: DatasetIndex, kind: str, train: bool):
    """The task's target reader (data/targets.py): the data set's own, or with `sources` each
    source's, renumbered into the mixed index's classes."""
    if not sources:
        return targets.reader(kind, index.labels, train)
    return source_targets(sources, index.classes, kind, lambda labels: targets.reader(kind, labels, train))


def source_targets(sources: Sequence[Source], classes: Sequence[str], kind: str, reader) -> SourceTargets:
    """`reader(labels)` builds one source's reader (data.targets.reader for the task)."""
    tables = tuple(np.array([classes.index(c) for c in s.index.classes], dtype=np.int64) for s in sources)
    if kind == "mask" and len(classes) > UNKNOWN:
        raise UserError(
            f"data.mix: {len(classes)} joined classes do not fit a mask's values (at most {UNKNOWN})"
        )
    return SourceTargets(tuple(reader(s.index.labels) for s in sources), tables, kind, len(classes))


def tag_sources(samples: Iterable[dict | None], source_of: Sequence[int], names: Sequence[str]) -> Iterator:
    """Each raw sample of a mixed stream tagged with its source: `__source__` (its number, for
    the target reader) and the key NAME:KEY (keys of two data sets may collide; the audit, the
    validation metrics per source and predictions name it so)."""
    for sample in samples:
        if sample is not None:
            k = source_of[sample["__shard__"]]
            sample["__source__"] = k
            sample["__key__"] = f"{names[k]}:{sample.get('__key__', '?')}"
        yield sample
