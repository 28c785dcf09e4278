"""Large line-camera images of parts with small defects, for training and testing tiled inspection.

Each image (any width x height, e.g. 4000x3000 px) is a part filling the frame: brushed metal
(fine streaks along the line or across it, tilted up to 1.5 degrees, fading in and out) or a
painted surface (mild grain 2-4 px across), under uneven lighting (a gradient, a vignette, broad
mottling) with sensor noise of 2-4 grey levels. A part is good ("ok") or has 1 to 3 defects of
one kind:

- spot:    a round or oval blob 10-50 px across, 15-40 grey levels darker or lighter, soft edge;
- scratch: a thin (2-4 px), slightly curved line 20-50 px long, 20-45 grey levels dark or glinting.

Every part, good ones included, carries faint dust specks under 3 px: a nuisance, as is the
texture. Defects lie at least EDGE px inside the image and never touch each other. Classes are
balanced: indices 4k to 4k+3 hold two good parts, one spot and one scratch.

Sample `index` of the set with `seed` is a pure function of (seed, index, width, height), so
workers render any sample in any order. Lengths are pixels and do not scale with the image:
a defect is as small on a 640x480 image as on a 4000x3000 one.

A loader renders these on the fly, so a 4000x3000 part takes about 0.2 s on one core and 110 MB
at peak: smooth fields are computed on knots 32 px apart and interpolated, the texture is a 1-D
profile or a coarse grid, each defect is drawn in its own small window, and pixels go through
in bands of BAND rows (float32), so the one full-frame float32 array is the luminance.
"""

import io
from itertools import pairwise
from statistics import NormalDist

import numpy as np

from data.synthetic import _coverage, _plain  # shared with the small-image set

CLASSES: tuple[str, ...] = ("ok", "spot", "scratch")
SURFACES: tuple[str, ...] = ("brushed_metal", "painted")
EDGE = 20  # px: the least distance from a defect's pixels to the image edge
MIN_SIDE = 128  # px: room for the largest defect (50 px) inside EDGE on both sides
BAND = 96  # rows processed at a time; a multiple of every knot spacing (32, 2, 3, 4 px)

_CELL = 32  # px between knots of the smooth fields (lighting, fading): all vary over >= 100 px
_GAP = 8  # px: the least distance between two defects' footprints
# Quantiles of a unit normal at 256 evenly spaced levels: sensor noise from one random byte per value
# (a byte and a table look-up take a quarter of the time of a float32 normal draw; the tails stop at
# 2.9 sigma).
_NORMAL = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], np.float32)
_NORMAL /= _NORMAL.std()


def label_of(seed: int, index: int) -> int:
    """Class index of sample `index`, without rendering it."""
    if seed < 0 or index < 0:
        raise ValueError(f"synthetic_large: seed={seed}, index={index}; both must be >= 0")
    block, slot = divmod(index, 4)
    return int(np.random.default_rng([seed, block, 2]).permutation([0, 0, 1, 2])[slot])


def render_large(seed: int, index: int, width: int, height: int) -> tuple[np.ndarray, int, dict, np.ndarray]:
    """Sample `index`: a (height, width, 3) uint8 RGB image, its class index, what was drawn, and
    a (height, width) uint8 mask of CLASSES indices (0 good; a pixel is a defect's where the defect
    covers at least half of it).

    The dict is JSON-serialisable. Positions (y, x) and lengths in it are pixels, with (0, 0) the
    centre of the top-left pixel; "defects" lists each one with its "box" [y0, x0, y1, x1) of mask
    pixels; contrasts and "noise" are grey levels (of 255); angles are degrees.
    """
    label = label_of(seed, index)  # checks seed and index
    if min(width, height) < MIN_SIDE:
        raise ValueError(
            f"synthetic_large: {width}x{height} px leaves no room for a 50 px defect {EDGE} px "
            f"inside the edge; use sides >= {MIN_SIDE}"
        )
    p = np.random.default_rng([seed, index, 0])  # scene and defect parameters
    n = np.random.default_rng([seed, index, 1])  # texture noise
    kind = SURFACES[int(p.integers(len(SURFACES)))]
    colour, lum, surface, lighting = _surface(kind, p, n, height, width)
    dust = _dust(p, lum)
    mask = np.zeros((height, width), np.uint8)
    defects = _defects(label, p, lum, mask) if label else []
    noise = float(p.uniform(2, 4))
    image = _expose(lum, colour, noise, np.random.default_rng([seed, index, 3]))
    meta = dict(defect=CLASSES[label], surface=surface, lighting=lighting, noise=noise)
    return image, label, _plain(dict(meta, dust_specks=dust, defects=defects)), mask


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """RGB uint8 (H, W, 3) → baseline JPEG bytes, 4:2:0 chroma; the same bytes on every run."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_jpeg: image is {image.dtype} {image.shape}; expected uint8 (H, W, 3) RGB")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """uint8 (H, W) class indices → single-channel PNG bytes, as the shard writer reads them."""
    from data.targets import encode_mask  # one PNG encoding for every mask (torch-free)

    return encode_mask(mask)


# ---- surface and lighting: luminance in grey levels, one full-frame float32 (H, W) -----------------


def _surface(kind, p, n, height, width):
    """The part under its lighting: RGB factors (3,) with mean 1, luminance (H, W) float32 in grey
    levels, and what was drawn."""
    hue, sat = p.uniform(0, 1), p.uniform(0, 0.08) if kind == "brushed_metal" else p.uniform(0.15, 0.5)
    colour = (1 + sat * np.cos(2 * np.pi * (hue - np.array([0, 1 / 3, 2 / 3])))).astype(np.float32)
    knots = np.indices(_knots(height, width, _CELL)) * float(_CELL)  # (2, h, w): their (y, x), px
    g_angle, gradient, vignette = p.uniform(0, 2 * np.pi), p.uniform(0, 0.3), p.uniform(0, 0.35)
    centre = p.uniform(0.35, 0.65, 2) * (height, width)
    side = max(height, width)
    yy, xx = (knots[0] - height / 2) / side, (knots[1] - width / 2) / side  # in longer sides, centred
    shade = 1 + gradient * 2 * (xx * np.cos(g_angle) + yy * np.sin(g_angle))
    shade *= 1 - vignette * 2 * (((knots[0] - centre[0]) ** 2 + (knots[1] - centre[1]) ** 2) / side**2)
    shade *= 1 + 0.03 * _waves(p, knots, 200, 1200)  # broad mottling
    # Auto exposure: the brightest surface stays 35 grey levels below full scale, room for a glint.
    level = min(p.uniform(90, 170), 220 / (colour.max() * shade[: (height - 1) // _CELL + 2].max()))
    base = _bilinear(level * shade, width)
    if kind == "brushed_metal":
        depth = p.uniform(2, 6)  # streak contrast, grey levels (std)
        amp = _bilinear(depth * (0.55 + 0.45 * np.tanh(1.5 * _waves(p, knots, 100, 600))), width)
        texture, drawn = _streaks(p, n, height, width)
        surface = dict(kind=kind, **drawn, depth=depth)
    else:
        grain, depth = int(p.choice([2, 3, 4])), p.uniform(1.5, 4)  # blob size px, grey levels
        coarse = n.standard_normal(_knots(height, width, grain), np.float32)
        texture, amp = _bilinear(1.5 * coarse, width, grain), None  # x1.5: interpolation halves the variance
        surface = dict(kind=kind, grain=grain, depth=depth)
    lum = np.empty((height, width), np.float32)
    for y in range(0, height, BAND):
        band = lum[y : y + BAND]  # the last one may be short
        # base + amplitude * texture: the grain's amplitude is one number, the streaks' a field.
        np.multiply(texture(y)[: len(band)], amp(y)[: len(band)] if amp else depth, out=band)
        band += base(y)[: len(band)]
    lighting = dict(level=level, gradient=gradient, gradient_angle=np.degrees(g_angle), vignette=vignette)
    return colour, lum, surface, dict(lighting, vignette_centre=centre)


def _waves(p, knots, shortest, longest, count=4):
    """Smooth field at `knots` (2, h, w) px, zero mean, std about 1: `count` plane waves with
    wavelengths between `shortest` and `longest` px."""
    field = np.zeros(knots.shape[1:])
    for _ in range(count):
        angle, wavelength, phase = p.uniform(0, np.pi), p.uniform(shortest, longest), p.uniform(0, 2 * np.pi)
        along = knots[0] * np.sin(angle) + knots[1] * np.cos(angle)
        field += np.cos(2 * np.pi * along / wavelength + phase)
    return field * np.sqrt(2 / count)


# A field below is band(y) → rows y to y + BAND of it, (BAND, width) float32, for y a multiple of BAND
# (rows past the image included: slice them off). The rows are a reused buffer: copy them to keep them.


def _knots(height, width, cell):
    """(rows, columns) of knots `cell` px apart from (0, 0) that every band and column lies within."""
    return -(-height // BAND) * BAND // cell + 1, (width - 1) // cell + 2


def _bilinear(grid, width, cell=_CELL):
    """The field interpolating `grid` (_knots(height, width, cell)), bilinearly."""
    pos = np.arange(width) / cell
    ix = pos.astype(np.int64)
    tx = (pos - ix).astype(np.float32)
    grid = grid.astype(np.float32)
    # (h, width): interpolated along x once. take, not grid[:, ix]: that result is column-major.
    across = np.take(grid, ix, axis=1) * (1 - tx) + np.take(grid, ix + 1, axis=1) * tx
    step = np.diff(across, axis=0)
    ty = (np.arange(cell) / cell).astype(np.float32)[:, None]  # (cell, 1): row within a knot's span
    buf = np.empty((BAND // cell, cell, width), np.float32)

    def band(y):
        spans = slice(y // cell, (y + BAND) // cell)
        np.multiply(step[spans, None], ty, out=buf)
        np.add(buf, across[spans, None], out=buf)
        return buf.reshape(BAND, width)

    return band


def _streaks(p, n, height, width):
    """Brushed-metal texture: unit-std streaks, a 1-D profile swept along the line (x) or across it
    (y), tilted by shifting it one pixel every 1 / slope px."""
    along_x = bool(p.random() < 0.5)
    tilt = p.uniform(-1.5, 1.5)  # degrees
    rows = -(-height // BAND) * BAND
    shift = np.rint(np.tan(np.radians(tilt)) * np.arange(width if along_x else rows)).astype(np.intp)
    shift -= shift.min()
    raw = n.standard_normal((2, (rows if along_x else width) + shift.max()))
    fine, coarse = _smooth(raw[0], p.uniform(0.6, 1.2)), _smooth(raw[1], p.uniform(4, 12))
    profile = (0.8 * fine + 0.6 * coarse).astype(np.float32)  # unit std: both parts are
    buf = np.empty((BAND, width), np.float32)
    if along_x:  # streak y + shift[x] at (y, x)
        offsets = np.arange(BAND)[:, None] + shift

        def band(y):
            return np.take(profile[y:], offsets, out=buf)

    else:  # streak x + shift[y] at (y, x): row y is a window of the profile
        windows = np.lib.stride_tricks.sliding_window_view(profile, width)

        def band(y):
            return np.take(windows, shift[y : y + BAND], axis=0, out=buf)

    return band, dict(brushing="along" if along_x else "across", tilt=tilt)


def _smooth(values, sigma):
    """1-D Gaussian blur of `sigma` samples, rescaled to unit std."""
    taps = np.arange(-int(3 * sigma) - 1, int(3 * sigma) + 2)
    out = np.convolve(values, np.exp(-0.5 * (taps / sigma) ** 2), mode="same")
    return out / out.std()


def _expose(lum, colour, noise, rng):
    """Luminance (H, W) grey levels → RGB uint8 with sensor noise of std `noise`, band by band."""
    height, width = lum.shape
    image = np.empty((height, width, 3), np.uint8)
    table = _NORMAL * np.float32(noise) + np.float32(0.5)  # +0.5: the uint8 cast rounds
    buf, tmp = np.empty((BAND, width, 3), np.float32), np.empty((BAND, width), np.float32)
    for y in range(0, height, BAND):
        rows = slice(y, min(y + BAND, height))
        out = buf[: rows.stop - y]
        np.take(table, rng.integers(0, 256, out.shape, dtype=np.uint8), out=out)
        for c in range(3):
            out[..., c] += np.multiply(lum[rows], colour[c], out=tmp[: len(out)])
        image[rows] = np.clip(out, 0, 255, out=out)
    return image


# ---- dust and defects: each drawn in its own window of `lum` -------------------------------------


def _window(lum, centre, reach):
    """Slices of `lum` within `reach` px of `centre`, and their pixel coordinates (y, x)."""
    lo = np.maximum(np.floor(centre - reach), 0).astype(int)
    hi = np.minimum(np.ceil(centre + reach) + 1, lum.shape).astype(int)
    yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]].astype(float)
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1])), yy - centre[0], xx - centre[1]


def _dust(p, lum) -> int:
    """Faint specks 1-3 px across on every part, 5 to 40 per megapixel: nuisance, not a defect."""
    count = int(p.poisson(p.uniform(5, 40) * lum.size / 1e6))
    for _ in range(count):
        centre = p.uniform(0, 1, 2) * (np.array(lum.shape) - 1)
        radius, contrast = p.uniform(0.5, 1.4), p.uniform(5, 20) * p.choice([-1, 1])
        win, dy, dx = _window(lum, centre, 3)
        lum[win] += contrast * np.clip(radius + 0.5 - np.hypot(dy, dx), 0, 1)
    return count


def _defects(label, p, lum, mask) -> list[dict]:
    """1 to 3 defects of class `label`, apart from each other and EDGE px inside the image."""
    drawn, placed = [], []  # placed: (centre, reach) of each footprint
    for _ in range(int(p.integers(1, 4))):
        shape = _SHAPES[label](p)
        for _ in range(20):  # tries; a crowded small image may take fewer defects
            centre = p.uniform(EDGE + shape["reach"], np.array(lum.shape) - 1 - EDGE - shape["reach"])
            if all(np.hypot(*(centre - c)) > r + shape["reach"] + _GAP for c, r in placed):
                break
        else:
            continue
        win, dy, dx = _window(lum, centre, shape["reach"])
        cover, shade = _PROFILES[label](shape, dy, dx)  # (h, w) each, in [0, 1]
        lum[win] += shape["contrast"] * shade
        mask[win][cover >= 0.5] = label
        ys, xs = np.nonzero(cover >= 0.5)
        y0, x0 = win[0].start, win[1].start
        box = [y0 + ys.min(), x0 + xs.min(), y0 + ys.max() + 1, x0 + xs.max() + 1]
        placed.append((centre, shape["reach"]))
        drawn.append(dict(kind=CLASSES[label], centre=centre, box=box, **shape))
    return drawn


def _spot_shape(p) -> dict:
    diameter = p.uniform(10, 50)  # px, along the long axis
    aspect = min(p.uniform(1, 1.5), diameter / 10)  # the short axis stays >= 10 px
    soft = p.uniform(2, min(5, diameter / aspect / 2))  # px: width of the edge's fall-off
    shape = dict(diameter=diameter, aspect=aspect, angle=p.uniform(0, 180), soft=soft)
    return dict(shape, contrast=p.uniform(15, 40) * p.choice([-1, -1, 1]), reach=diameter / 2 + soft)


def _spot_profile(shape, dy, dx):
    angle = np.radians(shape["angle"])
    u, v = dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)
    a = shape["diameter"] / 2
    q = np.hypot(u / a, v * shape["aspect"] / a)  # 1 on the outline
    radius = np.divide(np.hypot(u, v), q, out=np.full_like(q, a), where=q > 1e-9)  # px, centre to outline
    outside = (q - 1) * radius  # px past the outline along the ray from the centre
    edge = np.clip(0.5 - outside / shape["soft"], 0, 1)
    return np.clip(0.5 - outside, 0, 1), edge * edge * (3 - 2 * edge)  # smoothstep: a soft edge


def _scratch_shape(p) -> dict:
    length, width = p.uniform(20, 50), p.uniform(2, 4)  # px
    bend = p.uniform(0.5, 3) * p.choice([-1, 1])  # px of sag at the middle: slightly curved
    shape = dict(length=length, width=width, angle=p.uniform(0, 180), bend=bend)
    return dict(shape, contrast=p.uniform(20, 45) * p.choice([-1, -1, 1]), reach=length / 2 + width)


def _scratch_profile(shape, dy, dx):
    angle, t = np.radians(shape["angle"]), np.linspace(-0.5, 0.5, 9)
    along, sag = t * shape["length"], shape["bend"] * (1 - 4 * t**2)
    rot = np.array([[np.sin(angle), np.cos(angle)], [np.cos(angle), -np.sin(angle)]])
    pts = np.stack([along, sag], 1) @ rot.T  # (9, 2) y, x from the centre
    dist = np.full(dy.shape, np.inf)
    for a, b in pairwise(pts):  # (y, x) ends of each of 8 segments
        d = b - a
        s = np.clip(((dy - a[0]) * d[0] + (dx - a[1]) * d[1]) / (d @ d), 0, 1)
        np.minimum(dist, np.hypot(dy - a[0] - s * d[0], dx - a[1] - s * d[1]), out=dist)
    cover = _coverage(dist, shape["width"])
    return cover, cover


_SHAPES = {1: _spot_shape, 2: _scratch_shape}  # by class index; "ok" draws none
_PROFILES = {1: _spot_profile, 2: _scratch_profile}
