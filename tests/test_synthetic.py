"""The embedded inspection set: deterministic, balanced, image-like, and not linearly separable."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data import synthetic
from data.synthetic import CLASSES, TEXTURES, label_of, render

_DRAWN = {"scratch": "scratches", "spot": "spots", "crack": "crack", "stain": "stain"}  # meta key per defect
_REPO = Path(synthetic.__file__).resolve().parents[1]

# Fingerprints of a few samples, computed in a fresh interpreter: no state may leak between calls,
# and the module must not pull in torch or scipy (it runs in every loader worker).
_FRESH = """
import hashlib, json, sys
from data.synthetic import render
out = {"heavy": [m for m in ("torch", "scipy") if m in sys.modules], "digests": []}
for i in (7, 3, 0):
    img, label, meta = render(11, i, 40)
    out["digests"].append([hashlib.sha256(img.tobytes()).hexdigest(), label, meta])
print(json.dumps(out))
"""


def _digest(seed: int, index: int, size: int) -> list:
    img, label, meta = render(seed, index, size)
    return [hashlib.sha256(img.tobytes()).hexdigest(), label, meta]


def test_render_is_a_pure_function_of_seed_index_and_size():
    a_img, a_label, a_meta = render(5, 12, 48)
    render(5, 13, 48), render(6, 12, 96)  # other calls in between change nothing
    b_img, b_label, b_meta = render(5, 12, 48)
    assert np.array_equal(a_img, b_img) and a_label == b_label and a_meta == b_meta

    fresh = subprocess.run(
        [sys.executable, "-c", _FRESH], capture_output=True, text=True, check=True, cwd=_REPO
    )
    got = json.loads(fresh.stdout)
    assert got["heavy"] == []
    assert got["digests"] == [_digest(11, i, 40) for i in (7, 3, 0)]


def test_seeds_and_indices_give_different_images():
    base = render(0, 4, 32)[0]
    assert not np.array_equal(base, render(1, 4, 32)[0])
    assert not np.array_equal(base, render(0, 9, 32)[0])
    assert [label_of(0, i) for i in range(40)] != [label_of(1, i) for i in range(40)]


def test_label_of_agrees_with_render():
    for i in range(60):
        _, label, meta = render(2, i, 32)
        assert label == label_of(2, i)
        assert meta["defect"] == CLASSES[label]
        drawn = set(_DRAWN.values()) & meta.keys()  # "ok" draws no defect, the others their own
        assert drawn == ({_DRAWN[CLASSES[label]]} if label else set())
        json.dumps(meta)  # shards store it as JSON


def test_classes_are_balanced_and_every_texture_appears():
    labels = [label_of(3, i) for i in range(500)]
    assert Counter(labels) == {c: 100 for c in range(len(CLASSES))}
    # Any aligned block of len(CLASSES) indices holds each class once.
    assert all(sorted(labels[k : k + 5]) == list(range(5)) for k in range(0, 500, 5))
    textures = Counter(render(3, i, 16)[2]["texture"] for i in range(200))
    assert set(textures) == set(TEXTURES)
    assert min(textures.values()) >= 25, textures  # ~50 each expected
    assert CLASSES[0] == "ok"


def test_images_look_like_photographs_of_surfaces():
    means = []
    for i in range(40):
        img, _, _ = render(4, i, 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert img.std() > 2, f"sample {i} is nearly constant"
        assert np.ptp(img) > 20, f"sample {i} spans only {np.ptp(img)} grey levels"
        assert (img == 255).mean() < 0.2 and (img == 0).mean() < 0.2, f"sample {i} is clipped"
        means.append(img.mean())
    assert 40 < np.mean(means) < 200 and np.std(means) > 15  # varied exposure and colour


def test_the_same_scene_is_drawn_at_any_size():
    for i in range(10):
        small, big = render(8, i, 48)[2], render(8, i, 96)[2]
        for key in ("texture", "defect", "dust_specks"):
            assert small[key] == big[key]
        small["lighting"].pop("exposure"), big["lighting"].pop("exposure")  # metered from the pixels
        assert small["lighting"] == big["lighting"]
        if small["defect"] != "ok":  # positions scale with the side: centres lie at u * (size - 1)
            s, b = _first_defect(small), _first_defect(big)
            assert np.allclose(np.array(s["centre"]) * 95 / 47, b["centre"], atol=0.05)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="seed=-1"):
        label_of(-1, 0)
    with pytest.raises(ValueError, match="index=-2"):
        render(0, -2, 64)
    with pytest.raises(ValueError, match="size=8"):
        render(0, 0, 8)


def test_a_linear_probe_on_raw_pixels_does_not_solve_it():
    """A logistic regression on 16x16 pixels fits 400 training images but barely beats chance on
    held-out ones: the defect, not the colour or brightness of the image, sets the class."""
    x, y = _pixels(range(500), size=32)
    held_out = _probe(x, y, train=400)
    print(f"linear probe held-out accuracy: {held_out:.3f} (chance {1 / len(CLASSES):.2f})")
    assert held_out < 0.6

    # Control: the same probe does find a class signal when one is linearly present.
    leak = torch.nn.functional.one_hot(y, len(CLASSES)).float() * 3
    assert _probe(torch.cat([x, leak], 1), y, train=400) > 0.95


def _pixels(indices, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    imgs, labels = zip(*(render(9, i, size)[:2] for i in indices))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.avg_pool2d(x, 2).flatten(1)  # (N, 3 * 16 * 16)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(labels)


def _probe(x: torch.Tensor, y: torch.Tensor, train: int) -> float:
    """Held-out accuracy of a logistic regression fitted to the first `train` rows."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(CLASSES))
    opt = torch.optim.Adam(linear.parameters(), lr=0.01)
    for _ in range(200):  # full batch, to convergence on the training set
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(x[:train]), y[:train]).backward()
        opt.step()
    with torch.no_grad():
        return (linear(x[train:]).argmax(1) == y[train:]).float().mean().item()


def _first_defect(meta: dict) -> dict:
    drawn = meta[_DRAWN[meta["defect"]]]
    return drawn[0] if isinstance(drawn, list) else drawn
