"""Decode + augment: uint8 out, reduced-scale JPEG decode, bombs refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from data import decode
from data import jpeg as jpeg_module
from data.samples import BadSample
from data.transforms import EvalTransform, TrainTransform


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_train_transform_gives_uint8_of_the_output_size():
    torch.manual_seed(0)
    out = TrainTransform(64, scale=(0.5, 1.0))(jpeg(640, 480))
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    assert out.float().std() > 1  # real pixels, not a blank canvas


def test_train_transform_is_random_and_seedable():
    t, data = TrainTransform(32), jpeg(200, 150)
    torch.manual_seed(1)
    a = t(data)
    torch.manual_seed(1)
    assert torch.equal(a, t(data))
    assert not torch.equal(a, t(data))


def test_large_jpeg_decodes_at_reduced_scale():
    small = decode.decode_rgb(decode.open_image(jpeg(1024, 768)), spare=4.5)
    assert small.size == (256, 192)  # the 1/4 DCT scale still covers what is needed
    assert decode.decode_rgb(decode.open_image(jpeg(1024, 768)), spare=1.5).size == (1024, 768)


def test_full_crop_of_an_odd_sized_reduced_jpeg_stays_inside_the_image():
    buf = io.BytesIO()
    Image.new("RGB", (1001, 999), (200, 200, 200)).save(buf, format="JPEG", quality=95)
    out = TrainTransform(64, scale=(1.0, 1.0), ratio=(1001 / 999, 1001 / 999), hflip=0.0)(buf.getvalue())
    assert out.min() >= 195  # no zero padding from a box past the bottom or right edge


def test_eval_transform_is_deterministic_and_matches_for_pil_input():
    t, data = EvalTransform(48, crop_pct=0.875), jpeg(300, 200)
    a = t(data)
    assert a.shape == (3, 48, 48) and torch.equal(a, t(data))
    assert torch.equal(a, t.apply(Image.open(io.BytesIO(data))))


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(decode, "MAX_PIXELS", 100 * 100)
    with pytest.raises(BadSample, match="over the 10000 pixel limit"):
        EvalTransform(32)(jpeg(200, 200))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_decoded_straight_to_a_tensor_matches_pil(mode):
    """A crop too small for a DCT reduction skips PIL; the pixels are libjpeg-turbo's either way."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(96, 80))).convert(mode).save(buf, format="JPEG", quality=90)
    whole = TrainTransform(64, scale=(1.0, 1.0), ratio=(96 / 80, 96 / 80), hflip=0.0)(buf.getvalue())
    pil = F.pil_to_tensor(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    expected = F.resize(pil, [64, 64], antialias=True)
    assert whole.shape == (3, 64, 64)
    assert (whole.int() - expected.int()).abs().max() <= 2  # IDCT rounding may differ by a level


def test_eval_transform_decodes_small_jpegs_straight_to_a_tensor_like_pil():
    data, t = jpeg(96, 80), EvalTransform(64)  # resize to 73 px: no DCT reduction to gain
    direct, pil = t(data), t.apply(Image.open(io.BytesIO(data)))
    assert direct.shape == pil.shape == (3, 64, 64)
    assert (direct.int() - pil.int()).abs().max() <= 2


@pytest.mark.parametrize("size", [(1001, 999), (640, 427), (257, 255), (4000, 3000)])
@pytest.mark.parametrize("spare", [1.5, 2.0, 3.3, 5.0, 9.0])
def test_jpeg_decode_picks_pillows_dct_scale_and_gives_its_pixels(size, spare):
    """data/jpeg.py decodes at the scale Pillow's draft picks for the same request, to the same
    pixels (both are libjpeg-turbo, islow IDCT, fancy upsampling)."""
    data = jpeg(*size)
    ours = jpeg_module.decode_jpeg(data, *size, spare)
    pil = np.asarray(decode.decode_rgb(decode.open_image(data), spare))
    assert ours.shape == pil.shape and np.array_equal(ours, pil)


def test_grey_and_progressive_jpegs_decode_as_pillow_converts_them():
    rgb = Image.open(io.BytesIO(jpeg(300, 200)))
    for kw in ({"progressive": True}, {}):
        for im in (rgb, rgb.convert("L")):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85, **kw)
            data = buf.getvalue()
            assert jpeg_module.jpeg_size(data) == (300, 200)
            pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert np.array_equal(jpeg_module.decode_jpeg(data, 300, 200), pil)


def test_cmyk_jpegs_and_other_formats_go_through_pillow():
    buf = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(buf, format="JPEG")
    assert jpeg_module.jpeg_size(buf.getvalue()) is None  # Pillow's CMYK conversion, as before
    out = EvalTransform(32, fit="stretch")(buf.getvalue())
    expected = F.resize(F.pil_to_tensor(Image.open(buf).convert("RGB")), [32, 32], antialias=True)
    assert torch.equal(out, expected)
    png = io.BytesIO()
    Image.new("RGB", (64, 48)).save(png, format="PNG")
    assert jpeg_module.jpeg_size(png.getvalue()) is None


def test_a_truncated_jpeg_is_an_error_not_a_grey_image():
    data = jpeg(300, 200)
    with pytest.raises(ValueError):
        TrainTransform(64)(data[: len(data) // 2])
