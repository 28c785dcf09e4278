"""The task layer: what differs between inspection tasks, one small module each.

    classify    one class per part (softmax)           target: class index
    multilabel  any set of defect labels (sigmoid)      target: multi-hot over the classes
    segment     a class per pixel (softmax per pixel)   target: mask of class indices
    anomaly     how far from good, per pixel and part    target: good/defect map (good parts train)

A task object owns its network head, loss, validation metrics, how probabilities become the
part's defect score in [0, 1], what `predict` returns and how an evaluation reports it. It holds
only plain options (`options()`), saved in the checkpoint's spec so `load_model` rebuilds it; the
data, plan, stream, trainer, evaluation, export and registry are one code path for all.
"""

from __future__ import annotations

from data.errors import UserError

NAMES = ("classify", "multilabel", "segment", "anomaly")


def task_for(name: str, options: dict | None = None):
    """The task object `name` with its saved `options` (a checkpoint's spec.task / spec.options)."""
    if name == "classify":
        from train.tasks.classify import Classify as cls
    elif name == "multilabel":
        from train.tasks.multilabel import MultiLabel as cls
    elif name == "segment":
        from train.tasks.segment import Segment as cls
    elif name == "anomaly":
        from train.tasks.anomaly import Anomaly as cls
    else:
        raise UserError(f"task={name}: not a task of this version (known: {', '.join(NAMES)})")
    return cls(**(options or {}))


def of(spec):
    """The task of a model spec (old checkpoints, written before tasks, are `classify`)."""
    return task_for(spec.task, spec.options)
