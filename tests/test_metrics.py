"""Classification metrics against counts done by hand, and against torchmetrics' definitions."""

import numpy as np
import pytest
import torch
import torchmetrics as tm

from train.metrics import classification_report


def one_hot(predicted, c):
    probs = np.full((len(predicted), c), 0.01)
    probs[np.arange(len(predicted)), predicted] = 0.9
    return probs


def test_hand_counted_example():
    # true:      a a a b b c
    # predicted: a a b b c c
    labels = np.array([0, 0, 0, 1, 1, 2])
    r = classification_report(labels, one_hot([0, 0, 1, 1, 2, 2], 3), ("a", "b", "c"))
    assert r["samples"] == 6 and r["top1"] == pytest.approx(4 / 6)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"], b["support"]) == (0.5, 0.5, 2)
    assert (c["precision"], c["recall"], c["support"]) == (0.5, 1.0, 1)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    assert r["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert "top5" not in r


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    c, n = 8, 300
    labels = rng.integers(0, c - 1, n)  # the last class never occurs as a label
    probs = rng.dirichlet(np.ones(c), n)
    r = classification_report(labels, probs, [str(i) for i in range(c)])
    task = {"task": "multiclass", "num_classes": c}
    p, y = torch.tensor(probs), torch.tensor(labels)
    assert r["top1"] == pytest.approx(tm.functional.accuracy(p, y, **task, average="micro").item())
    assert r["top5"] == pytest.approx(tm.functional.accuracy(p, y, **task, top_k=5, average="micro").item())
    assert r["macro_f1"] == pytest.approx(tm.functional.f1_score(p, y, **task, average="macro").item())
    recall = tm.functional.recall(p, y, **task, average="none")
    assert [v["recall"] for v in r["per_class"].values()] == pytest.approx(recall.tolist())
