"""Image bytes → uint8 (3, size, size) tensors, decoding no more pixels than the output needs.

Train: RandomResizedCrop + horizontal flip, with the crop box drawn from the header size before
decoding, so a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the crop
at the output size; where no reduction applies, torchvision's libjpeg-turbo decode writes the
tensor directly (PIL would need a further copy into an array). Eval: resize the short side to
size / crop_pct, centre crop, decoded likewise. Output stays uint8: normalisation runs on the
device, in the module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop as _RRC
from torchvision.transforms.v2 import functional as F

from data.decode import decode_rgb, open_image


@dataclass(frozen=True)
class TrainTransform:
    size: int  # output side, pixels
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range, w / h
    hflip: float = 0.5  # probability of a horizontal flip

    def __call__(self, data: bytes) -> torch.Tensor:
        im = open_image(data)  # header only: size, format, and the decompression-bomb check
        top, left, h, w = _RRC.get_params(im, list(self.scale), list(self.ratio))
        spare = min(h, w) / self.size  # how many times larger the crop is than the output
        if _direct_jpeg(im, spare):
            pixels = _decode_jpeg(data)
        else:
            full_w, full_h = im.size
            im = decode_rgb(im, spare)
            # The box, drawn on the header size, in decoded pixels; per axis, since a reduced
            # JPEG rounds each side up on its own. Clamped, so rounding never crops past an edge.
            fx, fy = im.width / full_w, im.height / full_h
            top, left = min(round(top * fy), im.height - 1), min(round(left * fx), im.width - 1)
            h = max(1, min(round(h * fy), im.height - top))
            w = max(1, min(round(w * fx), im.width - left))
            pixels = F.pil_to_tensor(im)
        out = F.resized_crop(
            pixels, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
        )
        return F.horizontal_flip(out) if torch.rand(()) < self.hflip else out


@dataclass(frozen=True)
class EvalTransform:
    size: int  # output side, pixels
    crop_pct: float = 0.875  # centre crop as a fraction of the resized short side

    @property
    def resize(self) -> int:
        return math.floor(self.size / self.crop_pct)

    def __call__(self, data: bytes) -> torch.Tensor:
        im = open_image(data)
        if _direct_jpeg(im, min(im.size) / self.resize):
            return self.apply(_decode_jpeg(data))
        return self.apply(im)

    def apply(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """The same resize and crop for an image already open: PIL, or uint8 (3, H, W)."""
        if isinstance(image, Image.Image):
            image = decode_rgb(image, min(image.size) / self.resize)
            image = F.pil_to_tensor(image)
        out = F.resize(image, [self.resize], InterpolationMode.BILINEAR, antialias=True)
        return F.center_crop(out, [self.size, self.size])


def _direct_jpeg(im: Image.Image, spare: float) -> bool:
    """A JPEG with no DCT reduction to gain (the region needed is under twice the output) goes
    straight from libjpeg-turbo into a tensor: PIL's image-to-array copy would be about a fifth
    of the time at ImageNet sizes."""
    return im.format == "JPEG" and im.mode in ("RGB", "L") and spare < 2


def _decode_jpeg(data: bytes) -> torch.Tensor:
    """uint8 (3, H, W)."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
