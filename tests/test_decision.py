"""Threshold selection against its definition, by brute force over every candidate threshold."""

import math

import numpy as np
import pytest

from data.errors import UserError
from train.decision import Decision, choose_threshold, curves, defect_classes, operating_point, report


def brute_force(defects: np.ndarray, target: float) -> float:
    """The highest candidate threshold (any score, or above all) with escape rate <= target."""
    candidates = np.unique(np.r_[defects, 2.0])
    ok = [t for t in candidates if (defects < t).mean() <= target + 1e-12]
    return float(max(ok))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("target", [0.0, 0.005, 0.01, 0.1, 0.5])
def test_threshold_is_the_highest_that_meets_the_target(seed, target):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    # Ties on purpose (rounded scores): the rate must hold with them too.
    defects = np.round(rng.beta(5, 2, n), int(rng.integers(1, 4)))
    t = choose_threshold(defects, target)
    assert t == brute_force(defects, target)
    escapes = int((defects < t).sum())
    assert escapes / n <= target
    assert escapes <= math.floor(target * n + 1e-9)
    if len(np.unique(defects)) == n:  # distinct scores: exactly the allowed number escape
        assert escapes == math.floor(target * n + 1e-9)


def test_exact_target_on_distinct_scores():
    defects = np.linspace(0.01, 0.99, 200)  # 200 defects; 0.5% allows exactly one escape
    t = choose_threshold(defects, 0.005)
    assert t == defects[1]
    point = operating_point(defects, np.array([0.0, 0.005, 0.01, 0.5]), t)
    assert (point["escapes"], point["escape_rate"]) == (1, 0.005)
    assert (point["false_alarms"], point["false_alarm_rate"]) == (1, 0.25)  # only 0.5 >= t
    assert point["escape_rate"] <= point["escape_rate_upper95"] < 0.03


def test_curves_are_monotone_and_end_at_everything_stopped():
    rng = np.random.default_rng(0)
    defects, goods = rng.beta(5, 2, 300), rng.beta(2, 5, 700)
    c = curves(defects, goods)
    assert np.all(np.diff(c["threshold"]) < 0)
    assert np.all(np.diff(c["detection_rate"]) >= 0) and np.all(np.diff(c["false_alarm_rate"]) >= 0)
    assert c["detection_rate"][-1] == 1 and c["false_alarm_rate"][-1] == 1
    r = report(defects, goods, 0.01)
    assert 0.85 < r["roc_auc"] < 1 and 0.85 < r["average_precision"] < 1
    assert [p["target_escape"] for p in r["at_targets"]] == [0.001, 0.005, 0.01, 0.02, 0.05]
    rates = [p["false_alarm_rate"] for p in r["at_targets"]]
    assert rates == sorted(rates, reverse=True)  # a looser target costs fewer false alarms


def test_perfect_separation_gives_auc_one_and_no_false_alarms():
    r = report(np.array([0.9, 0.95, 0.99]), np.array([0.01, 0.2]), 0.01)
    assert r["roc_auc"] == 1.0 and r["average_precision"] == 1.0
    assert r["threshold"] == 0.9 and r["false_alarms"] == 0 and r["escapes"] == 0
    assert "only 3 defect samples" in r["notes"][0]


def test_a_given_threshold_is_reported_not_chosen():
    r = report(np.array([0.2, 0.6, 0.9]), np.array([0.1, 0.7]), 0.005, threshold=0.5)
    assert (r["threshold"], r["escapes"], r["false_alarms"], r["chosen_by"]) == (0.5, 1, 1, "given threshold")


def test_defect_classes_default_to_all_but_good_and_names_are_checked():
    classes = ("ok", "scratch", "spot")
    assert defect_classes(classes, "ok") == ("scratch", "spot")
    assert defect_classes(classes, "ok", ["spot"]) == ("spot",)
    with pytest.raises(UserError, match=r"defect\.good=good: not a class"):
        defect_classes(classes, "good")
    with pytest.raises(UserError, match=r"defect\.classes"):
        defect_classes(classes, "ok", ["dent"])
    with pytest.raises(UserError, match=r"defect\.classes"):
        defect_classes(classes, "ok", ["ok", "spot"])
    with pytest.raises(UserError, match="each once"):
        defect_classes(classes, "ok", ["spot", "spot"])  # would count its probability twice


def test_scores_sum_the_defect_probabilities():
    from train.network import ModelSpec
    from train.tasks.classify import Classify

    spec = ModelSpec("test_resnet", ("ok", "scratch", "spot"), 32, good="ok")
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert Classify().defect_scores(probs, spec, [2]).tolist() == pytest.approx([0.1, 0.8])
    d = Decision("ok", ("spot",), 0.5, {"spot": 0.3})
    assert Decision.from_dict(d.to_dict()) == d


def test_no_defects_or_a_bad_target_are_refused():
    with pytest.raises(UserError, match="no defect samples"):
        choose_threshold(np.array([]), 0.01)
    with pytest.raises(UserError, match=r"target_escape=1\.5: expected a value in \[0, 1\)"):
        choose_threshold(np.array([0.5]), 1.5)
