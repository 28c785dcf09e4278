"""PIL-level decoding shared by the writer and the loader: no torch here, so writer processes
start fast."""

from __future__ import annotations

import io
import math

from PIL import Image

MAX_PIXELS = 64_000_000  # an image header claiming more is treated as a decompression bomb


def open_image(data: bytes) -> Image.Image:
    """Open lazily (header only) and refuse a decompression bomb before any pixel is decoded."""
    im = Image.open(io.BytesIO(data))
    if im.width * im.height > MAX_PIXELS:
        raise ValueError(f"image of {im.width}x{im.height} pixels is over the {MAX_PIXELS} limit")
    return im


def decode_rgb(im: Image.Image, spare: float) -> tuple[Image.Image, float]:
    """Decode as RGB, reduced by up to `spare` (how many times larger the region we need is than
    the output); returns the image and its scale relative to the header size. JPEG reduces by
    1/2, 1/4 or 1/8 inside the DCT, which skips most of the decode work."""
    full = im.size
    if spare >= 2 and im.format == "JPEG":
        im.draft("RGB", (math.ceil(full[0] / spare), math.ceil(full[1] / spare)))
    im = im.convert("RGB")
    return im, im.size[0] / full[0]
