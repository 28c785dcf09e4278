"""The network parts: backbones by name, local pretrained weights, schedule, normalisation."""

from __future__ import annotations

from itertools import pairwise

import pytest
import timm
import torch
from safetensors.torch import save_file

from data.errors import UserError
from train.module import cosine_with_warmup
from train.network import ModelSpec, Network, build_backbone


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_load_from_a_local_file_and_the_head_is_fresh(tmp_path, suffix):
    source = timm.create_model("test_resnet", num_classes=1000)  # an "ImageNet" head
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    net = build_backbone("test_resnet", num_classes=5, pretrained=str(path))
    ours = net.state_dict()
    stem = next(k for k in ours if k.endswith("weight") and ours[k].dim() == 4)
    assert torch.equal(ours[stem], state[stem])
    assert net.get_classifier().out_features == 5


def test_pretrained_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(UserError, match=r"model.pretrained=.*nope.pth: no such file"):
        build_backbone("test_resnet", 5, pretrained=str(tmp_path / "nope.pth"))


def test_torchvision_backbones_by_prefix():
    net = build_backbone("tv/resnet18", 3)
    assert net.fc.out_features == 3
    with pytest.raises(UserError, match="tv/resnet1800: no such model"):
        build_backbone("tv/resnet1800", 3)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, total_steps=110, warmup_steps=10)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01
    assert all(a >= b for a, b in pairwise(lrs[9:]))


def test_classifier_normalises_uint8_on_the_device():
    spec = ModelSpec("x", ("a", "b"), 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))[:, :2]

    Network(Probe(), spec)(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8))
    assert torch.allclose(seen["x"], torch.full((1, 3, 8, 8), 2.0))  # (1 - 0.5) / 0.25
