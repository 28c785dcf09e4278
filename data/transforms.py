"""Image bytes → uint8 (3, size, size) tensors, decoding no more pixels than the output needs.

Train: RandomResizedCrop + horizontal flip, with the crop box drawn from the header size before
decoding, so a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the crop
at the output size. A plain JPEG's header and pixels are read by libjpeg-turbo through simplejpeg
(data/jpeg.py: the same pixels as Pillow, 1.15x faster in this transform); other formats and
CMYK JPEGs by Pillow (data/decode.py). Eval: resize the short side to
size / crop_pct, centre crop, decoded likewise; or (segmentation, `fit="stretch"`) the whole
image resized to size x size, so a predicted mask maps back onto every pixel. Output stays uint8:
normalisation runs on the device, in the module.

A mask (uint8 (H, W) class indices at the image's own size) moves with its image: in training it
is sampled, nearest-neighbour, at the centres of the output pixels of the very crop and flip the
image got, whatever JPEG scale decoded the image; in evaluation it keeps the image's own size,
where metrics are counted.

A 16-bit camera image is scaled to 8 bits by `bit_depth` (the data set's, from dataset.json; None:
each file's own), as data/decode.py says; only then cropped and resized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop as _RRC
from torchvision.transforms.v2 import functional as F

from data.decode import decode_rgb, open_image
from data.jpeg import decode_jpeg, jpeg_size
from data.samples import BadSample


@dataclass(frozen=True)
class TrainTransform:
    size: int  # output side, pixels
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range, w / h
    hflip: float = 0.5  # probability of a horizontal flip
    bit_depth: int | None = None  # significant bits of 16-bit images (None: each file's own)

    def __call__(self, data: bytes, mask: np.ndarray | None = None):
        """uint8 (3, S, S); with a mask, (image, mask uint8 (S, S))."""
        jpeg = jpeg_size(data)  # a plain JPEG's header, read by libjpeg-turbo (data/jpeg.py)
        im = None if jpeg else open_image(data)  # else Pillow's: header only, bomb checked
        full_w, full_h = jpeg or im.size
        check_mask(full_w, full_h, mask)
        top, left, h, w = _RRC.get_params(_sized(full_w, full_h), list(self.scale), list(self.ratio))
        spare = min(h, w) / self.size  # how many times larger the crop is than the output
        if jpeg:
            pixels = _chw(decode_jpeg(data, full_w, full_h, spare))
        else:
            pixels = F.pil_to_tensor(decode_rgb(im, spare, data, self.bit_depth))
        (top, left, h, w), (fx, fy) = decoded_box((top, left, h, w), full_w, full_h, pixels)
        out = F.resized_crop(
            pixels, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
        )
        flip = bool(torch.rand(()) < self.hflip)
        out = F.horizontal_flip(out) if flip else out
        if mask is None:
            return out
        # The output pixel centres, in decoded pixels, then in the mask's (full-size) pixels.
        centres = (np.arange(self.size) + 0.5) / self.size
        rows = np.clip(((top + centres * h) / fy).astype(np.intp), 0, full_h - 1)
        cols = np.clip(((left + centres * w) / fx).astype(np.intp), 0, full_w - 1)
        m = mask[np.ix_(rows, cols[::-1] if flip else cols)]  # numpy's take: a tenth of torch's indexing here
        return out, torch.from_numpy(m)


@dataclass(frozen=True)
class EvalTransform:
    size: int  # output side, pixels
    crop_pct: float = 0.875  # centre crop as a fraction of the resized short side
    fit: str = "crop"  # "crop": short side, then centre crop; "stretch": whole image to size x size;
    # "none": the image at its own size (a whole part, tiled by the model: data/tiles.py)
    bit_depth: int | None = None  # significant bits of 16-bit images (None: each file's own)

    @property
    def resize(self) -> int:
        return math.floor(self.size / self.crop_pct)

    def __call__(self, data: bytes, mask: np.ndarray | None = None):
        """uint8 (3, S, S); with a mask, (image, the mask as uint8 (H, W), unchanged)."""
        jpeg = jpeg_size(data)
        if jpeg:
            check_mask(*jpeg, mask)
            pixels = _chw(decode_jpeg(data, *jpeg, self._spare(jpeg)))
            out = self.apply(pixels.contiguous() if self.fit == "none" else pixels)
        else:
            im = open_image(data)
            check_mask(im.width, im.height, mask)
            out = self.apply(im, data)
        return out if mask is None else (out, torch.from_numpy(mask))

    def _spare(self, size: tuple[int, int]) -> float:
        """How many times larger than the output the decoded image needs to be, at most."""
        if self.fit == "stretch":
            return min(size[0] / self.size, size[1] / self.size)
        if self.fit == "none":
            return 1.0
        return min(size) / self.resize

    def apply(self, image: Image.Image | torch.Tensor, data: bytes | None = None) -> torch.Tensor:
        """The same resize and crop for an image already open: PIL (`data`: its file's bytes, which
        a 16-bit colour image decodes from), or uint8 (3, H, W)."""
        if isinstance(image, Image.Image):
            image = decode_rgb(image, self._spare(image.size), data, self.bit_depth)
            image = F.pil_to_tensor(image)
        if self.fit == "none":
            return image
        if self.fit == "stretch":
            return F.resize(image, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True)
        out = F.resize(image, [self.resize], InterpolationMode.BILINEAR, antialias=True)
        return F.center_crop(out, [self.size, self.size])


def check_mask(width: int, height: int, mask: np.ndarray | None) -> None:
    if mask is not None and mask.shape != (height, width):
        raise BadSample("mask size differs from its image")


def decoded_box(
    box: tuple[int, int, int, int], full_w: int, full_h: int, pixels: torch.Tensor
) -> tuple[tuple[int, int, int, int], tuple[float, float]]:
    """A (top, left, h, w) box drawn on the header size, in the pixels of the decoded (3, H, W)
    image, and the (x, y) scale between them; per axis, since a reduced JPEG rounds each side up
    on its own. Clamped, so rounding never crops past an edge."""
    top, left, h, w = box
    fx, fy = pixels.shape[2] / full_w, pixels.shape[1] / full_h
    top, left = min(round(top * fy), pixels.shape[1] - 1), min(round(left * fx), pixels.shape[2] - 1)
    h = max(1, min(round(h * fy), pixels.shape[1] - top))
    w = max(1, min(round(w * fx), pixels.shape[2] - left))
    return (top, left, h, w), (fx, fy)


def _sized(width: int, height: int) -> torch.Tensor:
    """A stand-in image of this size for torchvision's box drawing, which reads only its shape."""
    return torch.empty((3, height, width), device="meta")


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) → a (3, H, W) view: channels-last in memory, which torchvision's uint8 resize
    reads as fast as planar (it converts planar to channels-last inside)."""
    return torch.from_numpy(pixels).permute(2, 0, 1)
