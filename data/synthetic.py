"""The embedded "surface inspection" data set: procedural close-ups of manufactured surfaces.

Each image shows one of TEXTURES (brushed metal, woven fabric, painted panel, speckled
plastic) at a random orientation, scale and colour, under uneven lighting (a gradient, a
vignette, a broad highlight, exposure) with sensor noise. It is either clean ("ok") or
carries one kind of defect:

- scratch: one to three thin, long, nearly straight lines, brighter or darker than the surface;
- spot:    one to three small round or oval blobs, 1.5-4.5 px radius at 96 px;
- crack:   a dark, jagged line with a few branches;
- stain:   a larger, soft, irregular discoloration (rust, oil, water mark), sometimes ringed.

Any image, "ok" included, may carry faint dust specks (under 1.2 px, low contrast): a nuisance
a model must learn to ignore. Defects lie in the central 80% of the image so that a random
crop keeping 60% of the area usually keeps them; some are low contrast on busy textures, so
the task is learnable but not trivial. Classes are balanced: every run of len(CLASSES)
consecutive indices starting at a multiple of len(CLASSES) holds each class once.

Sample `index` of the set with `seed` is a pure function of (seed, index, size): no state is
kept between calls, so workers can render any sample in any order. Scene parameters come from
their own generator, so the same (seed, index) at another size is the same scene with all
lengths scaled; lengths quoted here are for a 96 px image.
"""

from itertools import pairwise

import numpy as np

CLASSES: tuple[str, ...] = ("ok", "scratch", "spot", "crack", "stain")
TEXTURES: tuple[str, ...] = ("brushed_metal", "woven_fabric", "painted_panel", "speckled_plastic")

_REF_SIZE = 96  # lengths in the code are pixels of a 96 px image, multiplied by size / 96
_MARGIN = 0.1  # defect centres lie in [0.1, 0.9] of the side


def label_of(seed: int, index: int) -> int:
    """Class index of sample `index`, without rendering it."""
    _check(seed, index)
    block, slot = divmod(index, len(CLASSES))
    order = np.random.default_rng([seed, block, 2]).permutation(len(CLASSES))
    return int(order[slot])


def render(seed: int, index: int, size: int) -> tuple[np.ndarray, int, dict]:
    """Sample `index`: a (size, size, 3) uint8 RGB image, its class index and what was drawn.

    The dict is JSON-serialisable; positions and lengths in it are pixels of this image,
    with (0, 0) the centre of the top-left pixel.
    """
    _check(seed, index)
    if size < 16:
        raise ValueError(f"synthetic.render: size={size} px is too small to show a defect; use >= 16")
    label = label_of(seed, index)
    p = np.random.default_rng([seed, index, 0])  # scene parameters: independent of size
    n = np.random.default_rng([seed, index, 1])  # per-pixel noise: depends on size
    px = size / _REF_SIZE
    texture = TEXTURES[int(p.integers(len(TEXTURES)))]
    albedo, surface = _TEXTURE_FNS[texture](p, n, size, px)
    dust = _dust(p, albedo, px)
    defect = _DEFECT_FNS[label](p, n, albedo, px) if label else {}
    image, lighting = _light(p, n, albedo, px)
    meta = {
        "texture": texture,
        "surface": surface,
        "defect": CLASSES[label],
        **defect,
        "dust_specks": dust,
        "lighting": lighting,
    }
    return image, label, meta


def _check(seed: int, index: int) -> None:
    if seed < 0 or index < 0:
        raise ValueError(f"synthetic: seed={seed}, index={index}; both must be >= 0")


# ---- helpers: noise, colour, anti-aliased shapes -------------------------------------------


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with `sigma` pixels, periodic edges (FFT; fast at these sizes)."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(field) * kernel, s=field.shape)


def _noise(n: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(size, size) smooth noise, zero mean, unit std, features about `sigma` pixels across."""
    field = _blur(n.standard_normal((size, size)), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


def _colour(hue: float, sat: float, val: float) -> np.ndarray:
    """RGB in [0, 1] from a hue in [0, 1) on a smooth colour wheel."""
    wheel = 0.5 + 0.5 * np.cos(2 * np.pi * (hue - np.array([0.0, 1 / 3, 2 / 3])))
    return val * (1 - sat + sat * wheel)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float64)


def _coverage(dist: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a 1 px wide pixel covered by a band `width` px wide at `dist` px away."""
    return np.clip(np.minimum(dist + 0.5, width / 2) - np.maximum(dist - 0.5, -width / 2), 0, 1)


def _polyline(size: int, pts: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased mask in [0, 1] of a polyline through `pts` (k, 2) as (y, x) pixels."""
    mask = np.zeros((size, size))
    for a, b in pairwise(pts):
        lo = np.clip(np.floor(np.minimum(a, b) - width - 1), 0, size).astype(int)
        hi = np.clip(np.ceil(np.maximum(a, b) + width + 2), 0, size).astype(int)
        if (hi <= lo).any():
            continue  # segment lies outside the image
        yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]
        d = b - a
        t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
        dist = np.hypot(yy - a[0] - t * d[0], xx - a[1] - t * d[1])
        box = mask[lo[0] : hi[0], lo[1] : hi[1]]
        np.maximum(box, _coverage(dist, width), out=box)
    return mask


def _shade(albedo: np.ndarray, mask: np.ndarray, contrast: float) -> None:
    """Blend `albedo` in place toward white (contrast > 0) or black (< 0) by |contrast| * mask."""
    m = (abs(contrast) * mask)[..., None]
    albedo += m * ((1.0 if contrast > 0 else 0.0) - albedo)


def _centre(p: np.random.Generator, size: int) -> np.ndarray:
    return p.uniform(_MARGIN, 1 - _MARGIN, 2) * (size - 1)


def _r(x) -> float | list:
    return np.round(x, 2).tolist()


# ---- surfaces: each returns an albedo (size, size, 3) in [0, 1] and what it drew ------------


def _brushed_metal(p, n, size, px):
    angle = p.uniform(0, np.pi)  # brushing direction, radians
    colour = _colour(p.uniform(0, 1), p.uniform(0, 0.12), p.uniform(0.45, 0.8))
    depth = p.uniform(0.04, 0.10)
    yy, xx = _grid(size)
    # Streaks: 1-D noise across the brushing direction, fading in and out along it.
    across = (yy - size / 2) * np.cos(angle) - (xx - size / 2) * np.sin(angle)
    profile = _blur(n.standard_normal((1, 2 * size + 2)), 0.6 * px)[0]
    streaks = np.interp(across + size, np.arange(profile.size), profile) / (profile.std() + 1e-12)
    fade = 0.6 + 0.4 * np.tanh(_noise(n, size, 6 * px))
    lum = 1 + depth * streaks * fade + 0.02 * _noise(n, size, 10 * px)
    return lum[..., None] * colour, {"angle_deg": _r(np.degrees(angle)), "depth": _r(depth)}


def _woven_fabric(p, n, size, px):
    angle = p.uniform(0, np.pi / 2)
    pitch = p.uniform(3.5, 7.0) * px  # thread spacing, pixels
    warp = _colour(p.uniform(0, 1), p.uniform(0.2, 0.6), p.uniform(0.35, 0.8))
    weft = warp if p.random() < 0.7 else _colour(p.uniform(0, 1), p.uniform(0, 0.4), p.uniform(0.4, 0.9))
    depth = p.uniform(0.2, 0.45)
    yy, xx = _grid(size)
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / pitch
    v = (yy * np.cos(angle) - xx * np.sin(angle)) / pitch
    # Plain weave: warp and weft take turns on top; a thread is brightest along its middle.
    on_top = ((np.floor(u) + np.floor(v)) % 2)[..., None] > 0
    su, sv = np.sin(np.pi * (u % 1)), np.sin(np.pi * (v % 1))
    lum = np.where(on_top[..., 0], su * (0.7 + 0.3 * sv), sv * (0.7 + 0.3 * su))
    lum = 1 + depth * (lum - 0.6) + 0.04 * _noise(n, size, 1.5 * px)
    albedo = lum[..., None] * np.where(on_top, warp, weft)
    return albedo, {"angle_deg": _r(np.degrees(angle)), "pitch": _r(pitch)}


def _painted_panel(p, n, size, px):
    colour = _colour(p.uniform(0, 1), p.uniform(0.3, 0.85), p.uniform(0.3, 0.85))
    peel = p.uniform(0.015, 0.05)  # "orange peel" relief of sprayed paint
    lum = 1 + peel * _noise(n, size, p.uniform(1.0, 2.5) * px) + 0.03 * _noise(n, size, 20 * px)
    return lum[..., None] * colour, {"orange_peel": _r(peel)}


def _speckled_plastic(p, n, size, px):
    base = _colour(p.uniform(0, 1), p.uniform(0.1, 0.7), p.uniform(0.25, 0.85))
    fleck = _colour(p.uniform(0, 1), p.uniform(0, 0.6), p.choice([0.1, 0.5, 0.95]))
    count = int(p.uniform(0.01, 0.05) * _REF_SIZE**2)  # same number at every size
    flecks = np.zeros((size, size))
    np.add.at(flecks, tuple(n.integers(0, size, (2, count))), n.uniform(0.3, 1.0, count))
    flecks = np.clip(_blur(flecks, 0.4 * px), 0, 1)[..., None]
    grain = 1 + 0.025 * _noise(n, size, 0.7 * px)[..., None]
    return grain * (base * (1 - flecks) + fleck * flecks), {"flecks": count}


_TEXTURE_FNS = {
    "brushed_metal": _brushed_metal,
    "woven_fabric": _woven_fabric,
    "painted_panel": _painted_panel,
    "speckled_plastic": _speckled_plastic,
}


# ---- nuisance and defects: each edits the albedo in place and returns what it drew ----------


def _dust(p, albedo, px) -> int:
    """Faint specks under 1.2 px radius: present on every class, so never a cue by itself."""
    size = albedo.shape[0]
    count = int(p.integers(0, 7))
    yy, xx = _grid(size)
    for _ in range(count):
        (cy, cx), radius = p.uniform(0, size - 1, 2), p.uniform(0.4, 1.1) * px
        contrast = p.uniform(0.03, 0.1) * (1 if p.random() < 0.7 else -1)
        _shade(albedo, _coverage(np.hypot(yy - cy, xx - cx), 2 * radius), contrast)
    return count


def _scratch(p, n, albedo, px):
    size, lines = albedo.shape[0], []
    for _ in range(int(p.choice([1, 1, 1, 2, 2, 3]))):
        length, angle = p.uniform(0.35, 0.85) * size, p.uniform(0, np.pi)
        bend = p.uniform(-3, 3) * px  # sag at the middle, pixels: tool marks are rarely ruler-straight
        width, contrast = p.uniform(1.0, 2.2) * px, p.uniform(0.2, 0.6) * p.choice([1, 1, -1])
        t = np.linspace(-0.5, 0.5, 7)
        along, off = t * length, bend * (1 - 4 * t**2)
        rot = np.array([[np.sin(angle), np.cos(angle)], [np.cos(angle), -np.sin(angle)]])
        centre = _centre(p, size)
        _shade(albedo, _polyline(size, centre + np.stack([along, off], 1) @ rot.T, width), contrast)
        lines.append(
            {
                "centre": _r(centre),
                "length": _r(length),
                "angle_deg": _r(np.degrees(angle)),
                "width": _r(width),
                "contrast": _r(contrast),
            }
        )
    return {"scratches": lines}


def _spot(p, n, albedo, px):
    size, spots = albedo.shape[0], []
    yy, xx = _grid(size)
    for _ in range(int(p.choice([1, 1, 2, 3]))):
        centre, radius = _centre(p, size), p.uniform(2.5, 6.5) * px
        aspect, angle = p.uniform(1.0, 1.6), p.uniform(0, np.pi)
        contrast = p.uniform(0.2, 0.7) * p.choice([-1, -1, 1])
        dy, dx = yy - centre[0], xx - centre[1]
        a, b = dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)
        dist = np.hypot(a / aspect, b)  # oval: stretched by `aspect` along `angle`
        _shade(albedo, np.clip(radius + 0.5 - dist, 0, 1) ** 0.7, contrast)
        spots.append(
            {"centre": _r(centre), "radius": _r(radius), "aspect": _r(aspect), "contrast": _r(contrast)}
        )
    return {"spots": spots}


def _crack(p, n, albedo, px):
    size = albedo.shape[0]
    step, heading = p.uniform(2.5, 4.0) * px, p.uniform(0, 2 * np.pi)
    main = _zigzag(p, np.zeros(2), heading, int(p.integers(10, 21)), step)
    main += _centre(p, size) - main.mean(0)
    width, contrast = p.uniform(1.2, 2.4) * px, -p.uniform(0.35, 0.75)
    mask = _polyline(size, main, width)
    branches = int(p.integers(1, 4))
    for _ in range(branches):
        turn = heading + p.choice([-1, 1]) * p.uniform(0.5, 1.2)
        twig = _zigzag(p, main[int(p.integers(1, len(main) - 1))], turn, int(p.integers(3, 9)), step)
        np.maximum(mask, _polyline(size, twig, 0.6 * width), out=mask)
    _shade(albedo, mask, contrast)
    return {
        "crack": {
            "centre": _r(main.mean(0)),
            "length": _r(step * (len(main) - 1)),
            "branches": branches,
            "width": _r(width),
            "contrast": _r(contrast),
        }
    }


def _zigzag(p, start, heading, steps, step):
    """(steps + 1, 2) points: sharp random turns around a slowly drifting course."""
    course = heading + np.cumsum(p.normal(0, 0.12, steps))
    turns = course + p.normal(0, 0.6, steps)
    return start + np.vstack([[0, 0], np.cumsum(np.stack([np.sin(turns), np.cos(turns)], 1) * step, 0)])


_STAIN_TINTS = {
    "rust": (0.85, 0.5, 0.3),
    "oil": (0.55, 0.55, 0.6),
    "water": (0.8, 0.82, 0.75),
    "scorch": (0.45, 0.4, 0.35),
}  # RGB factors the stained surface is multiplied by


def _stain(p, n, albedo, px):
    size = albedo.shape[0]
    kind = str(p.choice(list(_STAIN_TINTS)))
    centre, radius = _centre(p, size), p.uniform(10, 22) * px
    strength, soft = p.uniform(0.45, 0.9), p.uniform(2.0, 6.0) * px
    ring = p.uniform(0.2, 0.6) if p.random() < 0.4 else 0.0  # darker rim, as a dried drop leaves
    yy, xx = _grid(size)
    dy, dx = yy - centre[0], xx - centre[1]
    theta = np.arctan2(dy, dx)
    lobes = sum(p.uniform(0, 0.25 / k) * np.cos(k * theta + p.uniform(0, 2 * np.pi)) for k in range(1, 5))
    depth = radius * (1 + lobes) - np.hypot(dy, dx)  # pixels inside an irregular outline
    mask = np.clip(depth / soft + 0.5, 0, 1) * (1 - ring + ring * np.exp(-((depth / soft) ** 2)))
    mask *= np.clip(1 + 0.3 * _noise(n, size, 3 * px), 0, None)  # blotchy, not a flat decal
    albedo *= 1 - strength * mask[..., None] * (1 - np.array(_STAIN_TINTS[kind]))
    return {
        "stain": {
            "kind": kind,
            "centre": _r(centre),
            "radius": _r(radius),
            "strength": _r(strength),
            "ring": _r(ring),
        }
    }


_DEFECT_FNS = {1: _scratch, 2: _spot, 3: _crack, 4: _stain}


# ---- lighting and camera --------------------------------------------------------------------


def _light(p, n, albedo, px):
    size = albedo.shape[0]
    yy, xx = (g / size - 0.5 for g in _grid(size))  # centred, in image sides
    g_angle, g_amount = p.uniform(0, 2 * np.pi), p.uniform(0, 0.35)
    vignette, v_centre = p.uniform(0, 0.4), p.uniform(-0.15, 0.15, 2)
    h_centre, h_width, h_amount = p.uniform(-0.5, 0.5, 2), p.uniform(0.3, 0.7), p.uniform(0, 0.2)
    exposure, noise = p.uniform(0.8, 1.15), p.uniform(0.004, 0.025)
    shade = 1 + g_amount * 2 * (xx * np.cos(g_angle) + yy * np.sin(g_angle))
    shade *= 1 - vignette * 2 * ((yy - v_centre[0]) ** 2 + (xx - v_centre[1]) ** 2)
    # A broad specular highlight, far wider than any stain, adds white light.
    glare = h_amount * np.exp(-((yy - h_centre[0]) ** 2 + (xx - h_centre[1]) ** 2) / (2 * h_width**2))
    image = exposure * (albedo * shade[..., None] + glare[..., None])
    image += n.normal(0, noise, image.shape)
    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return pixels, {
        "gradient": _r(g_amount),
        "gradient_angle_deg": _r(np.degrees(g_angle)),
        "vignette": _r(vignette),
        "glare": _r(h_amount),
        "exposure": _r(exposure),
        "noise": _r(noise),
    }
