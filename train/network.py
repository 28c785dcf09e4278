"""The network a checkpoint holds: a timm (or torchvision) backbone, with a task's head, behind
on-device normalisation, plus the plain-data spec that rebuilds it and preprocesses images the way
training did."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from data.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that inference needs; stored in checkpoints as a dict."""

    backbone: str  # timm name, or "tv/<name>" for torchvision
    classes: tuple[str, ...]
    image_size: int  # input side, pixels
    crop_pct: float = 0.875  # eval: resize the short side to image_size / crop_pct, centre crop
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB, on the 0..1 scale
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict = field(default_factory=dict)  # e.g. a decision threshold, added later
    task: str = "classify"  # train/tasks: classify, multilabel, segment
    good: str | None = None  # the class of parts that pass (None: the data set has none)
    options: dict = field(default_factory=dict)  # the task's own options, e.g. segment's min_area
    tiles: dict = field(default_factory=dict)  # trained on tiles: {"size", "overlap"} px; {}: whole images
    # 16-bit images' significant bits (data set's --bit-depth): value * 255 / (2^N - 1); None: each file's own
    bit_depth: int | None = None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_backbone(
    name: str, num_classes: int, pretrained: str | None = None, drop_rate: float = 0.0
) -> nn.Module:
    """A classifier network with a fresh `num_classes` head. Weights come only from a local file
    (`pretrained`: .safetensors, .pth or .bin); nothing is ever downloaded."""
    problem = backbone_problem(name)
    if problem:
        raise UserError(f"model.backbone={name}: {problem}")
    if name.startswith("tv/"):
        import torchvision

        net = torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
    else:
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    if pretrained:
        load_pretrained(net, pretrained)
    return net


def backbone_problem(name: object) -> str | None:
    """What is wrong with a backbone name, or None when timm (or torchvision, for tv/NAME) has it:
    the rule for model.backbone, checked before any work starts."""
    if not isinstance(name, str) or not name:
        return "must be a timm model name, or tv/<name> for torchvision"
    if name.startswith("tv/"):
        import torchvision

        known = [f"tv/{n}" for n in torchvision.models.list_models()]
    else:
        import timm

        if timm.is_model(name):
            return None
        known = timm.list_models()
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "e.g. resnet18, resnet50, convnext_tiny"
    return f"no such model ({hint}; list them with timm.list_models('resnet*'))"


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A local weights file's tensors (.safetensors, or .pth/.bin loaded with weights_only)."""
    if not os.path.isfile(path):
        raise UserError(f"model.pretrained={path}: no such file (give a local weights file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, or no torch file at all
        raise UserError(f"model.pretrained={path}: not a weights file ({str(e).splitlines()[0]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"model.pretrained={path}: holds no state dict of tensors")
    return state


def load_pretrained(net: nn.Module, path: str) -> None:
    """Load matching weights; the classifier head is skipped when its shape differs (a pretrained
    ImageNet head has 1000 classes, ours has the data set's)."""
    state = read_weights(path)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UserError(f"model.pretrained={path}: no tensor matches this backbone's names/shapes")
    net.load_state_dict(usable, strict=False)


class Network(nn.Module):
    """uint8 images (B, 3, H, W) → logits (B, C), or (B, C, H, W) for segmentation; normalisation
    lives here so training, inference and every export share it."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone, self.spec = backbone, spec
        # Scaled by 255 so the uint8 batch needs one subtract and one divide: (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # In the weights' float type: float32, or float16 in a half-precision export
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """float32 probabilities for uint8 images (B, 3, H, W): softmax over classes (B, C), or per
        pixel (B, C, H, W); for multi-label an independent sigmoid per class (B, C); for anomaly
        the raw anomaly map (B, 1, H, W), on the method's own scale (train/tasks/anomaly.py)."""
        if self.spec.task == "anomaly":
            return self.backbone.anomaly_map(self.normalize(images)).float()
        logits = self(images).float()
        return logits.sigmoid() if self.spec.task == "multilabel" else logits.softmax(dim=1)

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 32) -> list[dict] | dict:
        """See `train.predict.predict`: paths, bytes, PIL images, arrays (uint16 too) or uint8 tensors in."""
        from train.predict import predict

        def probs(batch: torch.Tensor):  # uint8 (B, 3, S, S) → (B, C) or (B, C, S, S)
            return self.probabilities(batch.to(self.mean.device)).cpu().numpy()

        return predict(images, self.spec, probs, batch_size)


def spec_for(
    net: nn.Module, backbone: str, classes: Sequence[str], image_size: int, crop_pct: float, **task
) -> ModelSpec:
    """The spec of a freshly built network, with the normalisation its pretrained weights expect;
    `task` holds the spec's task, good, options, tiles and the data set's bit depth."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return ModelSpec(backbone, tuple(classes), image_size, crop_pct, mean, std, **task)
