"""`task=anomaly task.method=draem`: learns from scratch, with no downloaded weights, what good
parts look like, by learning to find defects pasted onto them (the DRAEM idea, its
discriminative half: Zavrtanik et al., ICCV 2021).

Each training batch of good images gets synthetic defects on the device, half of its images by
default: a shape (blobs of thresholded multi-octave noise, or a thin stroke) filled with a
foreign texture (another image of the batch, flipped and shifted), a darker or lighter copy of
the part's own surface, or a flat colour with noise, blended at a random opacity. Part 1's
segmentation network (a timm encoder under a segmentation_models_pytorch decoder) learns the
pasted pixels with cross-entropy plus Dice. Real defects are never seen in training; what the
network learns is "this patch does not continue the surface around it".

The defects are drawn from a torch.Generator seeded by (seed, global step, rank), so a resumed
run pastes the same defects it would have pasted.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

OCTAVES = (2, 4, 8, 16)  # noise grid cells per side: blob scales from a quarter of the image down


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian (K,), K = 2 * ceil(3 sigma) + 1 (sigma in pixels)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur of maps (B, 1, H, W) with reflected borders, so a defect at
    the edge is not faded by zeros. Plain pad and conv ops: ONNX and TorchScript take them."""
    if kernel.numel() <= 1:
        return maps
    r = kernel.numel() // 2
    r = min(r, maps.shape[-1] - 1, maps.shape[-2] - 1)  # reflection needs a border that wide
    k = kernel[kernel.numel() // 2 - r : kernel.numel() // 2 + r + 1]
    k = k / k.sum()
    x = F.pad(maps, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).to(x.dtype))
    return F.conv2d(x, k.view(1, 1, -1, 1).to(x.dtype))


class DraemNet(nn.Module):
    """normalised images (B, 3, S, S) → logits (B, 2, S, S) (good, defect) for training; the raw
    anomaly map (B, 1, S, S), the smoothed defect probability, for scoring."""

    def __init__(self, seg: nn.Module, sigma: float):
        super().__init__()
        self.seg = seg
        # Derived from the options, so not saved: a checkpoint holds weights, the spec the sigma.
        self.register_buffer(
            "kernel", gaussian_kernel(sigma) if sigma > 0 else torch.ones(1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg(x)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        p = self.seg(x).float().softmax(dim=1)[:, 1:2]
        return smooth(p, self.kernel)


def _noise_blobs(b: int, h: int, w: int, gen: torch.Generator, device) -> torch.Tensor:
    """(B, H, W) bool: multi-octave value noise, each sample's own mix of scales, cut at a
    random quantile so a blob covers 0.5% to 8% of the image."""
    weights = torch.rand(b, len(OCTAVES), generator=gen, device=device) ** 2
    noise = torch.zeros(b, 1, h, w, device=device)
    for i, cells in enumerate(OCTAVES):
        grid = torch.randn(b, 1, cells + 1, cells + 1, generator=gen, device=device)
        noise += weights[:, i, None, None, None] * F.interpolate(
            grid, size=(h, w), mode="bicubic", align_corners=True
        )
    flat = noise.view(b, -1)
    area = 0.005 + 0.075 * torch.rand(b, 1, generator=gen, device=device)
    rank = ((1 - area) * (flat.shape[1] - 1)).long()  # each sample's own quantile
    cut = flat.sort(dim=1).values.gather(1, rank)
    return (flat >= cut).view(b, h, w)


def _strokes(b: int, h: int, w: int, gen: torch.Generator, device) -> torch.Tensor:
    """(B, H, W) bool: one thin, slightly bent stroke per sample (a scratch or a crack), 1 to 3
    pixels wide at 96 px, scaled with the image."""
    ys = torch.arange(h, device=device).view(1, h, 1).float()
    xs = torch.arange(w, device=device).view(1, 1, w).float()
    p0 = torch.rand(b, 2, generator=gen, device=device) * 0.8 + 0.1
    angle = torch.rand(b, generator=gen, device=device) * math.pi
    length = 0.2 + 0.5 * torch.rand(b, generator=gen, device=device)
    d = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)  # (B, 2): (dy, dx)
    y0, x0 = (p0[:, 0] * h).view(b, 1, 1), (p0[:, 1] * w).view(b, 1, 1)
    dy, dx = d[:, 0].view(b, 1, 1), d[:, 1].view(b, 1, 1)
    along = (ys - y0) * dy + (xs - x0) * dx  # pixels along the stroke
    across = (ys - y0) * dx - (xs - x0) * dy
    curvature = torch.rand(b, 1, 1, generator=gen, device=device) - 0.5  # bend: a few pixels at the ends
    bend = curvature * along**2 / max(h, w)
    half = (0.5 + torch.rand(b, 1, 1, generator=gen, device=device)) * max(h, w) / 96
    reach = (length * max(h, w) / 2).view(b, 1, 1)
    return (along.abs() <= reach) & ((across - bend).abs() <= half)


def paste_defects(
    images: torch.Tensor, gen: torch.Generator, prob: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, 3, H, W) → (images with synthetic defects, masks (B, H, W) int64, 1 on
    pasted pixels); a share `prob` of the images get one, the rest stay good."""
    b, _, h, w = images.shape
    device = images.device
    x = images.float()
    chosen = torch.rand(b, generator=gen, device=device) < prob
    stroke = torch.rand(b, generator=gen, device=device) < 0.3
    shape = torch.where(
        stroke.view(b, 1, 1), _strokes(b, h, w, gen, device), _noise_blobs(b, h, w, gen, device)
    )
    shape &= chosen.view(b, 1, 1)

    # Fillings: another part's surface (flipped, shifted), the part's own surface darker or
    # lighter, or a flat colour with grain.
    other = x[torch.randperm(b, generator=gen, device=device)].flip(-1)
    shift = int(torch.randint(0, max(1, h), (1,), generator=gen, device=device))
    other = other.roll(shifts=(shift, shift // 2), dims=(-2, -1))
    dark = torch.rand(b, 1, 1, 1, generator=gen, device=device) < 0.5
    factor = torch.where(
        dark,
        0.25 + 0.45 * torch.rand(b, 1, 1, 1, generator=gen, device=device),
        1.3 + 0.7 * torch.rand(b, 1, 1, 1, generator=gen, device=device),
    )
    tone = (x * factor).clamp(0, 255)
    flat = 255 * torch.rand(b, 3, 1, 1, generator=gen, device=device) + 20 * torch.randn(
        b, 3, h, w, generator=gen, device=device
    )
    kind = torch.randint(0, 3, (b, 1, 1, 1), generator=gen, device=device)
    fill = torch.where(kind == 0, other, torch.where(kind == 1, tone, flat))

    opacity = 0.4 + 0.6 * torch.rand(b, 1, 1, 1, generator=gen, device=device)
    alpha = shape[:, None].float()
    # A third of the defects fade out at their edges (a stain, a water mark): the blend weight is
    # the shape blurred over ~3% of the side, the label the shape itself.
    soft = torch.rand(b, 1, 1, 1, generator=gen, device=device) < 1 / 3
    k = gaussian_kernel(max(1.0, 0.03 * max(h, w))).to(device)
    alpha = opacity * torch.where(
        soft, torch.maximum(smooth(alpha, k) * 1.5, alpha * 0.5).clamp(max=1), alpha
    )
    out = (x * (1 - alpha) + fill.clamp(0, 255) * alpha).round().to(torch.uint8)
    return out, shape.long()


def generator_for(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The defects of one step: a pure function of (seed, step, rank), so resume repeats them."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return gen


class Draem:
    """The method's part of the anomaly task: its network, loss and training step."""

    def __init__(
        self,
        sigma: float,
        arch: str = "Unet",
        decoder_channels=None,
        dice: float = 1.0,
        defect_prob: float = 0.5,
    ):
        self.sigma, self.arch, self.dice = sigma, arch, float(dice)
        self.decoder_channels = list(decoder_channels) if decoder_channels else None
        self.defect_prob = float(defect_prob)

    def options(self) -> dict:
        return {
            "arch": self.arch,
            "decoder_channels": self.decoder_channels,
            "dice": self.dice,
            "defect_prob": self.defect_prob,
        }

    def build(self, backbone: str, pretrained: str | None) -> DraemNet:
        from train.tasks.segment import Segment

        seg = Segment(self.arch, decoder_channels=self.decoder_channels).build(backbone, 2, pretrained)
        return DraemNet(seg, self.sigma)

    def loss(self) -> nn.Module:
        from train.tasks.segment import SegmentLoss

        return SegmentLoss(self.dice)

    def train_step(self, module, images: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if len(images) == 1:  # left-out defects shrank the batch to one image: batch norm needs two
            images = torch.cat([images, images.flip(-1)])
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # Lightning's seed_everything(cfg.seed)
        gen = generator_for(images.device, seed, module.global_step, module.global_rank)
        images, masks = paste_defects(images, gen, self.defect_prob)
        loss = module.loss(module(images), masks)
        module.log("train/loss", loss, prog_bar=True)
        return loss
