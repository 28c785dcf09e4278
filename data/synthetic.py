"""The embedded "surface inspection" data set: procedural close-ups of manufactured surfaces.

Each image shows one of TEXTURES (brushed metal, woven fabric, painted panel, speckled plastic)
at a random orientation, scale and colour, under uneven lighting (gradient, vignette, broad
glare, exposure) with sensor noise. It is clean ("ok") or has one kind of defect (sizes for a
96 px image; they scale with it):

- scratch: one to three thin (1-2 px), long, nearly straight lines, glinting or dark;
- spot:    one to three small round or oval blobs, 2.5-6.5 px radius, dark or light;
- crack:   a dark, jagged line with one to three branches;
- stain:   a larger (10-22 px radius), soft, blotchy discoloration: rust, oil, water or scorch.

Every class, "ok" included, may carry faint dust specks (under 1.2 px), a nuisance to ignore.
Defect centres lie in the central 80% of the image, so a random crop keeping 60% of the area
usually keeps them. Some defects are faint or hide in a texture that looks like them (a scratch
along brushed metal, a water mark on speckled plastic): learnable, not trivial. Classes are
balanced: indices 5k to 5k+4 hold each class once.

Sample `index` of the set with `seed` is a pure function of (seed, index, size), so workers can
render any sample in any order. Scene parameters have their own generator, so the same (seed,
index) at another size is the same scene, scaled.
"""

from itertools import pairwise

import numpy as np

CLASSES: tuple[str, ...] = ("ok", "scratch", "spot", "crack", "stain")
TEXTURES: tuple[str, ...] = ("brushed_metal", "woven_fabric", "painted_panel", "speckled_plastic")

_REF_SIZE = 96  # lengths in the code are pixels of a 96 px image, multiplied by size / 96
_MARGIN = 0.1  # defect centres lie in [0.1, 0.9] of the side


def label_of(seed: int, index: int) -> int:
    """Class index of sample `index`, without rendering it."""
    if seed < 0 or index < 0:
        raise ValueError(f"synthetic: seed={seed}, index={index}; both must be >= 0")
    block, slot = divmod(index, len(CLASSES))
    order = np.random.default_rng([seed, block, 2]).permutation(len(CLASSES))
    return int(order[slot])


def render(seed: int, index: int, size: int) -> tuple[np.ndarray, int, dict]:
    """Sample `index`: a (size, size, 3) uint8 RGB image, its class index and what was drawn.

    The dict is JSON-serialisable; positions (y, x) and lengths in it are pixels of this image,
    with (0, 0) the centre of the top-left pixel; angles are degrees.
    """
    image, label, drawn, _ = render_part(seed, index, size)
    return image, label, drawn


def render_part(
    seed: int, index: int, size: int, multi: float = 0.0
) -> tuple[np.ndarray, int, dict, np.ndarray]:
    """`render`, plus where each defect was drawn: a (size, size) uint8 mask of CLASSES indices
    (a pixel belongs to a defect where the defect covers at least half of it). With `multi` > 0
    that share of the defective parts also gets one or two defects of other kinds (drawn from
    their own generator, so the part's first defect and its lighting are those of `render`);
    `drawn["labels"]` names every defect kind on the part, ";"-separated."""
    label = label_of(seed, index)  # checks seed and index
    if size < 16:
        raise ValueError(f"synthetic.render: size={size} px is too small to show a defect; use >= 16")
    p = np.random.default_rng([seed, index, 0])  # scene parameters: the same draws at any size
    n = np.random.default_rng([seed, index, 1])  # per-pixel noise: depends on size
    px = size / _REF_SIZE
    texture = TEXTURES[int(p.integers(len(TEXTURES)))]
    albedo, surface = _TEXTURES[texture](p, n, size, px)
    bright = np.quantile(albedo, 0.99)  # of the bare surface: exposure must not hint at a defect
    dust = _dust(p, albedo, px)
    mask = np.zeros((size, size), np.uint8)
    defect = _draw(label, p, n, albedo, px, mask) if label else {}
    kinds = [label] if label else []
    q = np.random.default_rng([seed, index, 3])  # the extra defects' own draws
    if label and multi > 0 and q.random() < multi:
        others = [k for k in range(1, len(CLASSES)) if k != label]
        for k in q.choice(others, size=int(q.integers(1, 3)), replace=False):
            defect = {**_draw(int(k), q, n, albedo, px, mask), **defect}
            kinds.append(int(k))
    image, lighting = _light(p, n, albedo, bright)
    meta = dict(texture=texture, surface=surface, defect=CLASSES[label], **defect, dust_specks=dust)
    if multi > 0:
        meta["labels"] = ";".join(CLASSES[k] for k in sorted(kinds))
    return image, label, _plain({**meta, "lighting": lighting}), mask


def _draw(kind: int, p, n, albedo, px, mask: np.ndarray) -> dict:
    """Draw one defect of class `kind` and mark its pixels in `mask` (later defects on top)."""
    marks = np.zeros(mask.shape)
    drawn = _DEFECTS[kind](p, n, albedo, px, marks)
    mask[marks >= 0.5] = kind
    return drawn


# ---- helpers: noise, colour, anti-aliased shapes ---------------------------------------------------


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of `sigma` pixels with wrap-around edges (by FFT: fast at these sizes)."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(field) * kernel, s=field.shape)


def _noise(n: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(size, size) smooth noise, zero mean, unit std, blobs about `sigma` pixels across."""
    field = _blur(n.standard_normal((size, size)), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


def _colour(hue: float, sat: float, val: float) -> np.ndarray:
    """RGB in [0, 1] from a hue in [0, 1) on a smooth colour wheel."""
    wheel = 0.5 + 0.5 * np.cos(2 * np.pi * (hue - np.array([0.0, 1 / 3, 2 / 3])))
    return val * (1 - sat + sat * wheel)


def _coverage(dist: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a 1 px wide pixel covered by a band `width` px wide whose axis is `dist` px away."""
    return np.clip(np.minimum(dist + 0.5, width / 2) - np.maximum(dist - 0.5, -width / 2), 0, 1)


def _polyline(size: int, pts: np.ndarray, width: float) -> np.ndarray:
    """(size, size) anti-aliased mask in [0, 1] of a line `width` px wide through `pts` (k, 2)."""
    mask = np.zeros((size, size))
    for a, b in pairwise(pts):
        lo = np.clip(np.floor(np.minimum(a, b) - width - 1), 0, size).astype(int)
        hi = np.clip(np.ceil(np.maximum(a, b) + width + 2), 0, size).astype(int)
        if (hi <= lo).any():
            continue  # segment lies outside the image
        yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]  # only the segment's box: cracks have ~30
        d = b - a
        t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
        box = mask[lo[0] : hi[0], lo[1] : hi[1]]
        np.maximum(box, _coverage(np.hypot(yy - a[0] - t * d[0], xx - a[1] - t * d[1]), width), out=box)
    return mask


def _shade(albedo: np.ndarray, mask: np.ndarray, contrast: float, marks: np.ndarray | None = None) -> None:
    """Mark `albedo` in place where `mask` > 0. contrast > 0 adds that much light (a glint: as
    visible on a dark surface as on a light one); contrast < 0 absorbs that fraction (a pit)."""
    if marks is not None:  # where a defect is: its coverage, kept for the mask
        np.maximum(marks, mask, out=marks)
    if contrast > 0:
        albedo += (contrast * mask)[..., None]
    else:
        albedo *= (1 + contrast * mask)[..., None]


def _centre(p: np.random.Generator, size: int) -> np.ndarray:
    return p.uniform(_MARGIN, 1 - _MARGIN, 2) * (size - 1)


def _plain(x):
    """`x` with numpy values made JSON-serialisable and floats rounded to 0.01."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    x = np.asarray(x).tolist() if isinstance(x, np.ndarray | np.generic) else x
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return round(x, 2) if isinstance(x, float) else x


# ---- surfaces: each returns an albedo (size, size, 3), about [0, 1], and what it drew ---------------


def _brushed_metal(p, n, size, px):
    angle = p.uniform(0, np.pi)  # brushing direction, radians
    colour = _colour(p.uniform(0, 1), p.uniform(0, 0.12), p.uniform(0.45, 0.8))
    depth = p.uniform(0.04, 0.10)
    yy, xx = np.indices((size, size), float)  # pixels
    # Streaks: 1-D noise across the brushing direction, fading in and out along it.
    across = (yy - size / 2) * np.cos(angle) - (xx - size / 2) * np.sin(angle)
    profile = _blur(n.standard_normal((1, 2 * size + 2)), 0.6 * px)[0]
    streaks = np.interp(across + size, np.arange(profile.size), profile) / (profile.std() + 1e-12)
    fade = 0.6 + 0.4 * np.tanh(_noise(n, size, 6 * px))
    lum = 1 + depth * streaks * fade + 0.02 * _noise(n, size, 10 * px)
    return lum[..., None] * colour, dict(angle=np.degrees(angle), depth=depth)


def _woven_fabric(p, n, size, px):
    angle = p.uniform(0, np.pi / 2)
    pitch = p.uniform(3.5, 7.0) * px  # thread spacing, pixels
    warp = _colour(p.uniform(0, 1), p.uniform(0.2, 0.6), p.uniform(0.35, 0.8))
    weft = warp if p.random() < 0.7 else _colour(p.uniform(0, 1), p.uniform(0, 0.4), p.uniform(0.4, 0.9))
    depth = p.uniform(0.2, 0.45)
    yy, xx = np.indices((size, size), float)
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / pitch  # in threads
    v = (yy * np.cos(angle) - xx * np.sin(angle)) / pitch
    # Plain weave: warp and weft take turns on top; a thread is brightest along its middle.
    top = (np.floor(u) + np.floor(v)) % 2 > 0
    su, sv = np.sin(np.pi * (u % 1)), np.sin(np.pi * (v % 1))
    lum = np.where(top, su * (0.7 + 0.3 * sv), sv * (0.7 + 0.3 * su))
    lum = 1 + depth * (lum - 0.6) + 0.04 * _noise(n, size, 1.5 * px)
    return lum[..., None] * np.where(top[..., None], warp, weft), dict(angle=np.degrees(angle), pitch=pitch)


def _painted_panel(p, n, size, px):
    colour = _colour(p.uniform(0, 1), p.uniform(0.3, 0.85), p.uniform(0.3, 0.85))
    peel = p.uniform(0.015, 0.05)  # "orange peel" relief of sprayed paint
    lum = 1 + peel * _noise(n, size, p.uniform(1.0, 2.5) * px) + 0.03 * _noise(n, size, 20 * px)
    return lum[..., None] * colour, dict(orange_peel=peel)


def _speckled_plastic(p, n, size, px):
    base = _colour(p.uniform(0, 1), p.uniform(0.1, 0.7), p.uniform(0.25, 0.85))
    fleck = _colour(p.uniform(0, 1), p.uniform(0, 0.6), p.choice([0.1, 0.5, 0.95]))
    count = int(p.uniform(0.01, 0.05) * _REF_SIZE**2)  # 1 px flecks; as many at every size
    flecks = np.zeros((size, size))
    np.add.at(flecks, tuple(n.integers(0, size, (2, count))), n.uniform(0.3, 1.0, count))
    flecks = np.clip(_blur(flecks, 0.4 * px), 0, 1)[..., None]
    grain = 1 + 0.025 * _noise(n, size, 0.7 * px)[..., None]
    return grain * (base * (1 - flecks) + fleck * flecks), dict(flecks=count)


_TEXTURES = dict(zip(TEXTURES, (_brushed_metal, _woven_fabric, _painted_panel, _speckled_plastic)))


# ---- nuisance and defects: each marks the albedo in place and returns what it drew ------------------


def _dust(p, albedo, px) -> int:
    """Faint specks under 1.2 px radius on every class: fainter and smaller than any spot."""
    size, count = albedo.shape[0], int(p.integers(0, 7))
    yy, xx = np.indices((size, size), float)
    for _ in range(count):
        (cy, cx), radius = p.uniform(0, size - 1, 2), p.uniform(0.4, 1.1) * px
        contrast = p.uniform(0.03, 0.1) * (1 if p.random() < 0.7 else -1)
        _shade(albedo, _coverage(np.hypot(yy - cy, xx - cx), 2 * radius), contrast)
    return count


def _scratch(p, n, albedo, px, marks):
    size, lines = albedo.shape[0], []
    for _ in range(int(p.choice([1, 1, 1, 2, 2, 3]))):
        length, angle = p.uniform(0.35, 0.85) * size, p.uniform(0, np.pi)
        bend = p.uniform(-3, 3) * px  # sag at the middle, pixels: tool marks are rarely ruler-straight
        width, contrast = p.uniform(1.0, 2.2) * px, p.uniform(0.2, 0.6) * p.choice([1, 1, -1])
        t = np.linspace(-0.5, 0.5, 7)
        rot = np.array([[np.sin(angle), np.cos(angle)], [np.cos(angle), -np.sin(angle)]])
        centre = _centre(p, size)
        pts = centre + np.stack([t * length, bend * (1 - 4 * t**2)], 1) @ rot.T  # (7, 2) y, x
        _shade(albedo, _polyline(size, pts, width), contrast, marks)
        drawn = dict(centre=centre, length=length, angle=np.degrees(angle), width=width, contrast=contrast)
        lines.append(drawn)
    return dict(scratches=lines)


def _spot(p, n, albedo, px, marks):
    size, spots = albedo.shape[0], []
    yy, xx = np.indices((size, size), float)
    for _ in range(int(p.choice([1, 1, 2, 3]))):
        centre, radius = _centre(p, size), p.uniform(2.5, 6.5) * px
        aspect, angle = p.uniform(1.0, 1.6), p.uniform(0, np.pi)
        contrast = p.uniform(0.2, 0.7) * p.choice([-1, -1, 1])
        dy, dx = yy - centre[0], xx - centre[1]
        a, b = dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)
        dist = np.hypot(a / aspect, b)  # pixels; an oval stretched by `aspect` along `angle`
        _shade(albedo, np.clip(radius + 0.5 - dist, 0, 1) ** 0.7, contrast, marks)
        spots.append(dict(centre=centre, radius=radius, aspect=aspect, contrast=contrast))
    return dict(spots=spots)


def _crack(p, n, albedo, px, marks):
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
    _shade(albedo, mask, contrast, marks)
    drawn = dict(centre=main.mean(0), length=step * (len(main) - 1), branches=branches, width=width)
    return dict(crack=dict(drawn, contrast=contrast))


def _zigzag(p, start, heading, steps, step):
    """(steps + 1, 2) points `step` px apart: sharp random turns about a slowly drifting course."""
    course = heading + np.cumsum(p.normal(0, 0.12, steps))
    turns = course + p.normal(0, 0.6, steps)
    return start + np.vstack([[0, 0], np.cumsum(np.stack([np.sin(turns), np.cos(turns)], 1) * step, 0)])


# RGB factors a fully stained surface is multiplied by.
_TINTS = dict(rust=(0.85, 0.5, 0.3), oil=(0.55, 0.55, 0.6), water=(0.75, 0.77, 0.7), scorch=(0.45, 0.4, 0.35))


def _stain(p, n, albedo, px, marks):
    size, kind = albedo.shape[0], str(p.choice(list(_TINTS)))
    centre, radius = _centre(p, size), p.uniform(10, 22) * px
    strength, soft = p.uniform(0.45, 0.9), p.uniform(2.0, 6.0) * px  # soft: edge width, pixels
    ring = p.uniform(0.2, 0.6) if p.random() < 0.4 else 0.0  # darker rim, as a dried drop leaves
    yy, xx = np.indices((size, size), float)
    dy, dx = yy - centre[0], xx - centre[1]
    theta = np.arctan2(dy, dx)
    lobes = sum(p.uniform(0, 0.25 / k) * np.cos(k * theta + p.uniform(0, 2 * np.pi)) for k in range(1, 5))
    depth = radius * (1 + lobes) - np.hypot(dy, dx)  # pixels inside an irregular outline
    mask = np.clip(depth / soft + 0.5, 0, 1) * (1 - ring + ring * np.exp(-((depth / soft) ** 2)))
    mask *= np.clip(1 + 0.3 * _noise(n, size, 3 * px), 0, None)  # blotchy, not a flat decal
    np.maximum(marks, mask, out=marks)
    albedo *= 1 - strength * mask[..., None] * (1 - np.array(_TINTS[kind]))
    return dict(stain=dict(kind=kind, centre=centre, radius=radius, strength=strength, ring=ring))


_DEFECTS = {1: _scratch, 2: _spot, 3: _crack, 4: _stain}  # by class index; "ok" draws none


# ---- lighting and camera ----------------------------------------------------------------------------


def _light(p, n, albedo, bright):
    yy, xx = np.indices(albedo.shape[:2]) / albedo.shape[0] - 0.5  # centred, in image sides
    g_angle, gradient = p.uniform(0, 2 * np.pi), p.uniform(0, 0.35)
    vignette, v_centre = p.uniform(0, 0.4), p.uniform(-0.15, 0.15, 2)
    h_centre, h_width, glare = p.uniform(-0.5, 0.5, 2), p.uniform(0.3, 0.7), p.uniform(0, 0.2)
    exposure, noise = p.uniform(0.8, 1.15), p.uniform(0.004, 0.025)
    shade = 1 + gradient * 2 * (xx * np.cos(g_angle) + yy * np.sin(g_angle))
    shade *= 1 - vignette * 2 * ((yy - v_centre[0]) ** 2 + (xx - v_centre[1]) ** 2)
    # A broad specular highlight, far wider and smoother than any stain, adds white light.
    highlight = glare * np.exp(-((yy - h_centre[0]) ** 2 + (xx - h_centre[1]) ** 2) / (2 * h_width**2))
    # Auto exposure, as a camera does: the brightest 1% of the bare surface just reaches full scale.
    exposure = min(exposure, 1 / (bright * shade.max() + glare))
    image = exposure * (albedo * shade[..., None] + highlight[..., None])
    image += n.normal(0, noise, image.shape)  # sensor noise, in units of full scale
    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    drawn = dict(gradient=gradient, gradient_angle=np.degrees(g_angle), vignette=vignette, glare=glare)
    return pixels, dict(drawn, exposure=exposure, noise=noise)
