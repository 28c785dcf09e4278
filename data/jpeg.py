"""JPEG decoding for the loader: simplejpeg (libjpeg-turbo), header and pixels both read in C.

Measured against Pillow and torchvision on the benchmark sets (scripts/bench_decode.py), it gives
the same pixels (libjpeg-turbo's islow IDCT and fancy upsampling, as Pillow's and torchvision's
defaults) and is the fastest in the transform: its header read replaces Pillow's Image.open
(about a tenth of a small image's whole transform), and it decodes at 1/2, 1/4 and 1/8 scale as
Pillow's `draft` does. torchvision's decoders are deprecated from 0.29 (for TorchCodec).

Plain JPEGs only (YCbCr, grey or RGB): CMYK and YCCK ones, and anything that is not a JPEG, go
through Pillow as before (data/decode.py), which converts them as it always has.
"""

from __future__ import annotations

import math

import numpy as np
import simplejpeg

from data import decode
from data.samples import BadSample

SOI = b"\xff\xd8"  # every JPEG stream starts with it
PLAIN = ("YCbCr", "Gray", "RGB")  # colour spaces libjpeg-turbo turns into RGB as Pillow does
DECODER = f"simplejpeg {simplejpeg.__version__} (libjpeg-turbo; islow IDCT, fancy upsampling)"


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a plain JPEG, read from its header; None for anything else (another
    format, CMYK, or a header libjpeg-turbo cannot read: Pillow then says what is wrong).
    BadSample for a decompression bomb."""
    if data[:2] != SOI:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in PLAIN:
        return None
    if width * height > decode.MAX_PIXELS:  # read at call time: one limit for both decoders
        raise BadSample(f"image over the {decode.MAX_PIXELS} pixel limit (decompression bomb)")
    return width, height


def dct_scale(width: int, height: int, spare: float) -> int:
    """The DCT reduction (1, 2, 4 or 8) that keeps the decoded image at least 1/spare of the full
    one on both sides: what Pillow's `draft` picks for the size data/decode.py asks it for."""
    if spare < 2:
        return 1
    room = min(width // math.ceil(width / spare), height // math.ceil(height / spare))
    return next(d for d in (8, 4, 2, 1) if d <= room)


def decode_jpeg(data: bytes, width: int, height: int, spare: float = 1.0) -> np.ndarray:
    """uint8 (H, W, 3) RGB, reduced by `dct_scale(width, height, spare)`; sides round up, as
    libjpeg's scaled sizes do. ValueError for a corrupt or truncated stream."""
    scale = dct_scale(width, height, spare)
    if scale == 1:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    # libjpeg-turbo picks the strongest reduction whose sides still reach these: exactly 1/scale
    return simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_width=width // scale, min_height=height // scale
    )
