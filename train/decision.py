"""Defect vs good: the score, the threshold that meets a target escape rate, and what it costs.

On a production line every task's question is binary: pass the part, or stop it. With the
"defect" classes D (by default every class but the good one), each task gives a part a defect
score s in [0, 1] (train/tasks): for classification

    s = sum of the softmax probabilities of the classes in D          (= 1 - p(good))

for multi-label the largest probability of a label in D, for segmentation the strength of the
strongest region of D pixels; the part is stopped when s >= threshold. Two rates describe a
threshold t on an evaluation set with n defect and m good samples:

    escape rate      = #{defect samples with s < t} / n     defects passed as good
    false-alarm rate = #{good samples with s >= t} / m      good parts stopped

`choose_threshold` returns the highest t whose escape rate is at most the target, which is the
fewest false alarms that target allows. A split with good parts only (an anomaly detector's
validation, before any defect was collected) cannot measure escapes: `choose_for_false_alarm`
then returns the lowest t that stops at most a target share of the good parts, the most
sensitive threshold that false-alarm budget allows. Pure numpy, so it is tested exhaustively.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from data.errors import UserError
from data.targets import find_good  # noqa: F401 (the decision layer's own rule, re-exported)

# Escape-rate targets reported besides the chosen one, so a quality engineer sees the trade-off.
TARGETS = (0.001, 0.005, 0.01, 0.02, 0.05)


@dataclass(frozen=True)
class Decision:
    """What a deployed model needs to stop or pass a part; stored in the model spec's `extra`."""

    good: str
    defect_classes: tuple[str, ...]
    threshold: float  # on the defect score, 0..1: stop the part when score >= threshold
    labels: dict | None = None  # multi-label: each defect label's own threshold, by name

    def to_dict(self) -> dict:
        d = {**asdict(self), "defect_classes": list(self.defect_classes)}
        return d if self.labels else {k: v for k, v in d.items() if k != "labels"}

    @classmethod
    def from_dict(cls, d: dict) -> Decision:
        return cls(d["good"], tuple(d["defect_classes"]), float(d["threshold"]), d.get("labels"))


def defect_indices(spec) -> list[int] | None:
    """The columns of a model's defect classes: its decision's, else every class but its good
    one; None when it knows no good class (no decision can be made)."""
    stored = spec.extra.get("decision")
    if stored:
        return [spec.classes.index(c) for c in stored["defect_classes"]]
    if spec.good is None:
        return None
    return [i for i, c in enumerate(spec.classes) if c != spec.good]


def threshold_of(spec) -> float:
    """The stop threshold on the defect score: evaluation's choice, else 0.5 (more likely
    defect than good), the rule a model follows from training on."""
    stored = spec.extra.get("decision")
    return float(stored["threshold"]) if stored else 0.5


def defect_classes(classes: Sequence[str], good: str, defect: Sequence[str] | None = None) -> tuple[str, ...]:
    """The defect classes: `defect` if given, else every class but `good`; names are checked.
    Classes in neither (with a given `defect`) count with the good ones: parts that should pass."""
    if good not in classes:
        raise UserError(
            f"defect.good={good}: not a class of this model ({list(classes)}); set defect.good to the "
            "class of parts that pass, or defect.good=null for no defect decision"
        )
    chosen = tuple(defect) if defect else tuple(c for c in classes if c != good)
    unknown = [c for c in chosen if c not in classes]
    if unknown or good in chosen or not chosen or len(set(chosen)) < len(chosen):
        raise UserError(
            f"defect.classes={list(chosen)}: give one or more of {[c for c in classes if c != good]}, each "
            f"once (not the good class {good!r}), or leave it null for every class but {good!r}"
        )
    return chosen


def check_rate(name: str, value: float, closed: bool = False) -> float:
    """A rate or threshold in [0, 1) (`closed`: [0, 1]), else a message naming the setting."""
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise UserError(f"{name}={value}: expected a value in [0, 1{']' if closed else ')'}, e.g. 0.005")
    return float(value)


def choose_threshold(defect_scores: np.ndarray, target_escape: float) -> float:
    """The highest threshold that passes at most `target_escape` of the defect samples as good.

    With the n defect scores sorted, d(1) <= ... <= d(n), at most k = floor(target × n) may
    escape; t = d(k+1) lets exactly those below it escape (k, or fewer on ties), and any higher
    t lets d(k+1) escape too.
    """
    check_rate("defect.target_escape", target_escape)
    scores = np.sort(np.asarray(defect_scores, dtype=np.float64))
    if scores.size == 0:
        raise UserError("the evaluated split has no defect samples, so no threshold can be chosen")
    allowed = math.floor(target_escape * scores.size + 1e-9)  # 1e-9: 0.005 × 200 is 1, not 0.99..
    return float(scores[allowed])


def operating_point(defect_scores: np.ndarray, good_scores: np.ndarray, threshold: float) -> dict:
    """The counts and rates at `threshold`, with a 95% upper bound on the escape rate: on n
    defects a rate is known only to about 1/n, which a target of 0.5% on 100 defects hides."""
    defects, goods = np.asarray(defect_scores), np.asarray(good_scores)
    escapes = int((defects < threshold).sum())
    alarms = int((goods >= threshold).sum())
    return {
        "threshold": threshold,
        "defect_samples": int(defects.size),
        "good_samples": int(goods.size),
        "escapes": escapes,
        "false_alarms": alarms,
        "escape_rate": escapes / max(1, defects.size),
        "escape_rate_upper95": wilson_upper(escapes, int(defects.size)),
        "false_alarm_rate": alarms / max(1, goods.size),
    }


def wilson_upper(k: int, n: int, z: float = 1.959964) -> float:
    """Upper end of the Wilson score interval for k successes in n trials (95% two-sided)."""
    if n == 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def curves(defect_scores: np.ndarray, good_scores: np.ndarray) -> dict[str, np.ndarray]:
    """ROC and precision-recall of "defect" against "good", one point per distinct score (as a
    threshold), thresholds descending: detection rate = 1 - escape rate (recall), false-alarm
    rate, and precision of the stop decision."""
    defects = np.asarray(defect_scores, dtype=np.float64)
    goods = np.asarray(good_scores, dtype=np.float64)
    scores = np.concatenate([defects, goods])
    is_defect = np.concatenate([np.ones(defects.size, bool), np.zeros(goods.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_defect = scores[order], is_defect[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each distinct score
    caught = np.cumsum(is_defect)[last]  # defects with score >= threshold
    alarms = np.cumsum(~is_defect)[last]
    return {
        "threshold": scores[last],
        "detection_rate": caught / max(1, defects.size),
        "false_alarm_rate": alarms / max(1, goods.size),
        "precision": caught / np.maximum(1, caught + alarms),
    }


def area(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under y(x), from the origin: ROC AUC with (false alarm, detection)."""
    return float(np.trapezoid(np.r_[0.0, y], np.r_[0.0, x]))


def report(
    defect_scores: np.ndarray,
    good_scores: np.ndarray,
    target_escape: float,
    threshold: float | None = None,
    chosen_by: str = "given threshold",
) -> dict:
    """The operating point at `threshold` (chosen for `target_escape` when None), the same at
    the standard targets, ROC AUC and average precision."""
    chosen = choose_threshold(defect_scores, target_escape) if threshold is None else float(threshold)
    c = curves(defect_scores, good_scores)
    recall_steps = np.diff(np.r_[0.0, c["detection_rate"]])
    notes = []
    if threshold is None and 0 < target_escape * len(defect_scores) < 1:
        notes.append(
            f"only {len(defect_scores)} defect samples: a {target_escape:.2%} escape rate needs at least "
            f"{math.ceil(1 / target_escape)} to be told apart from zero, so this threshold lets none escape"
        )
    return {
        "target_escape": target_escape,
        "chosen_by": "target_escape" if threshold is None else chosen_by,
        **operating_point(defect_scores, good_scores, chosen),
        "roc_auc": area(c["false_alarm_rate"], c["detection_rate"]),
        "average_precision": float((recall_steps * c["precision"]).sum()),
        "at_targets": [
            {"target_escape": t, **operating_point(defect_scores, good_scores, thr)}
            for t in TARGETS
            for thr in [choose_threshold(defect_scores, t)]
        ],
        "notes": notes,
    }


def choose_for_false_alarm(good_scores: np.ndarray, target_false_alarm: float) -> float:
    """The lowest threshold that stops at most `target_false_alarm` of the good samples.

    With the m good scores sorted descending, g(1) >= ... >= g(m), at most k = floor(target × m)
    may be stopped; the threshold just above g(k+1) (the next float) stops those strictly above
    it (k, or fewer on ties), and any lower one stops g(k+1) too. Never the minimum score, which
    would stop every part (anomalib 2433).
    """
    check_rate("defect.target_false_alarm", target_false_alarm)
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise UserError("the evaluated split has no good samples, so no false-alarm threshold can be chosen")
    allowed = math.floor(target_false_alarm * scores.size + 1e-9)
    return float(np.nextafter(scores[allowed], np.inf))


FALSE_ALARM_TARGETS = (0.001, 0.005, 0.01, 0.02, 0.05)


def false_alarm_report(
    good_scores: np.ndarray,
    target_false_alarm: float,
    threshold: float | None = None,
    chosen_by: str = "given threshold",
) -> dict:
    """The operating point on a split of good samples only: the false alarms at `threshold`
    (chosen for `target_false_alarm` when None), with a 95% upper bound, and the thresholds of
    the standard false-alarm targets. Escapes cannot be measured there, and the report says so."""
    goods = np.asarray(good_scores, dtype=np.float64)
    chosen = choose_for_false_alarm(goods, target_false_alarm) if threshold is None else float(threshold)
    alarms = int((goods >= chosen).sum())
    notes = [
        "the split has no defect samples: the threshold follows defect.target_false_alarm, and the escape "
        "rate is unknown until defects are evaluated (python -m train.evaluate split=test)"
    ]
    if threshold is None and 0 < target_false_alarm * goods.size < 1:
        notes.append(
            f"only {goods.size} good samples: a {target_false_alarm:.2%} false-alarm rate needs at least "
            f"{math.ceil(1 / target_false_alarm)}, so this threshold stops none of them"
        )
    return {
        "target_false_alarm": target_false_alarm,
        "chosen_by": "target_false_alarm" if threshold is None else chosen_by,
        "threshold": chosen,
        "good_samples": int(goods.size),
        "defect_samples": 0,
        "false_alarms": alarms,
        "false_alarm_rate": alarms / goods.size,
        "false_alarm_rate_upper95": wilson_upper(alarms, int(goods.size)),
        "at_targets": [
            {"target_false_alarm": t, "threshold": thr, "false_alarms": int((goods >= thr).sum())}
            for t in FALSE_ALARM_TARGETS
            for thr in [choose_for_false_alarm(goods, t)]
        ],
        "notes": notes,
    }
