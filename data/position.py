"""Where a saved mid-epoch position continues: the arithmetic of exact and elastic resume, apart
from the DataModule that saves and restores it.

A checkpoint's data position (ShardDataModule.state_dict) records the epoch, the batches this rank
consumed, and what fixed the plan they came from (world size, workers, batch size, shuffle buffer,
and what orders the epoch itself: seed, data set, tiles, mix, block shuffle). Resuming under the same
layout skips those batches of the same plan; under another layout, the part already trained is taken
out of the epoch (data/plan.py's `Part`) and the rest is cut afresh.
"""

from __future__ import annotations

from dataclasses import replace

from data.errors import UserError
from data.plan import EpochPlan, Part

LAYOUT = ("world_size", "num_workers", "batch_size", "shuffle_buffer")
# What orders the epoch's samples: a change makes "the samples already trained" unknowable.
ORDER = {"seed": None, "index_sha256": None, "tiles": None, "mix": None, "shuffle_block": 0}  # and defaults


def continue_epoch(
    plan: EpochPlan, saved: dict | None, now: dict, epoch: int | None
) -> tuple[EpochPlan, int, int]:
    """(plan, offset, consumed): where `saved` continues `plan`'s epoch. The same plan at `consumed`
    batches if the layout is unchanged; otherwise (elastic) the plan of the rest, with Lightning's
    batch count going on from `offset`. `now`: the current values of ORDER's settings. `epoch`
    None: trust the saved epoch (the loader's length is asked before Lightning restores it)."""
    if not saved or saved["epoch"] != (saved["epoch"] if epoch is None else epoch):
        return plan, 0, 0
    plan = replace(plan, epoch=saved["epoch"], before=tuple(Part(**p) for p in saved.get("parts", ())))
    offset = saved.get("offset", 0)
    part = Part(*(saved[k] for k in LAYOUT), saved["batches"] - offset)
    trained = replace(
        plan,
        world_size=part.world_size,
        num_workers=part.num_workers,
        batch_size=part.batch_size,
        buffer_size=part.buffer_size,
    )
    if part.batches >= len(trained) or not (part.batches or plan.before):
        return replace(plan, before=()), 0, 0  # at an epoch's end or start: nothing to continue
    for key, default in ORDER.items():  # a position saved before a setting existed holds its default
        before, after = saved.get(key, default), now.get(key, default)
        if before != after:
            raise UserError(
                f"cannot resume mid-epoch with a changed {key} ({before} -> {after}): it "
                "reorders the epoch, so the samples already trained cannot be told; resume with the original "
                "one, or from an end-of-epoch checkpoint"
            )
    if trained == plan:
        return plan, offset, part.batches
    return plan.resumed(part), saved["batches"], 0
