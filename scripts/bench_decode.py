"""JPEG decoders against ours: Pillow and torchvision (libjpeg-turbo both), simplejpeg, PyTurboJPEG.

    cd scripts && python bench_decode.py [--variant large|small] [--images 5000] [--repeat 3]
                                         [--jpegs DIR] [--check 1000] [--quick] [--json FILE]

On the same JPEG bytes in memory (scripts/bench_data.py's set, or every *.jpg under --jpegs), in
one process with one thread, repeats interleaved, the fastest repeat counts:

  full      decode to uint8 RGB (H, W, 3) at full size
  reduced   decode at 1/2, 1/4 (1/8 for large) inside the DCT; torchvision has no reduced decode
  transform data.transforms.TrainTransform(224) as the tree has it ("ours"), against the same
            transform with only its decode swapped: the same box drawn from the header (same
            seed), the same DCT scale as Pillow's draft picks, the same resized_crop and flip.
            "pil+torchvision" is TrainTransform before data/jpeg.py: Pillow's draft where a DCT
            scale applies, else torchvision's decode_jpeg. This figure decides.

Pixels (over the first --check images, untimed): each full decode against Pillow's, each reduced
one against Pillow's draft at that scale, each transform's output against ours (same seed, same
boxes): max and mean |difference| in 8-bit levels and the share of values off by more than 1.

Clash: our dependency `turbojpeg` (a wheel bundling libturbojpeg under turbojpeg.libs/, which
data/region.py uses through ctypes) installs an extension module named `turbojpeg` that shadows
PyTurboJPEG's `turbojpeg.py` (Python imports the .so first). So PyTurboJPEG's file is loaded by
path, on the bundled library; as it stands PyTurboJPEG cannot be a plain dependency of ours.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.decode import open_image
from data.jpeg import dct_scale
from data.transforms import TrainTransform, decoded_box

Decode = Callable[[bytes, int], np.ndarray | torch.Tensor]  # (JPEG bytes, 1/scale) → uint8 pixels
INSTALL = 'pip install -e ".[bench]"'


def pil_decode(data: bytes, denom: int = 1) -> np.ndarray:
    """(H, W, 3); at 1/denom through draft (requests W // denom: Pillow then picks exactly denom)."""
    im = Image.open(io.BytesIO(data))
    if denom > 1:
        im.draft("RGB", (im.width // denom, im.height // denom))
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # as data/decode.py: no copy


def torchvision_decode(data: bytes, denom: int = 1) -> torch.Tensor:
    """(3, H, W); full size only (torchvision has no reduced-scale JPEG decode)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    assert denom == 1, "torchvision has no reduced-scale JPEG decode"
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def pil_torchvision_decode(data: bytes, denom: int = 1) -> np.ndarray | torch.Tensor:
    """TrainTransform's decode before data/jpeg.py: torchvision at full size, else Pillow's draft."""
    return torchvision_decode(data) if denom == 1 else pil_decode(data, denom)


def load_peers() -> tuple[dict[str, Decode], dict[str, str], list[str]]:
    """({name: decode} of the importable peers, {name: library version}, [missing names])."""
    decoders, versions, missing = {}, {}, []
    try:
        import simplejpeg

        def simple(data: bytes, denom: int = 1) -> np.ndarray:
            if denom == 1:
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            # The smallest scale whose sides reach these: exactly 1/denom, rounded up as libjpeg does.
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=w // denom, min_height=h // denom)

        decoders["simplejpeg"] = simple
        versions["simplejpeg"] = f"{simplejpeg.__version__} ({embedded_version(simplejpeg._jpeg.__file__)})"
    except ImportError:
        missing.append("simplejpeg")
    try:
        pyturbo, library = load_pyturbojpeg()
        tj, rgb = pyturbo.TurboJPEG(lib_path=library), pyturbo.TJPF_RGB

        def turbo(data: bytes, denom: int = 1) -> np.ndarray:
            return tj.decode(data, pixel_format=rgb, scaling_factor=None if denom == 1 else (1, denom))

        decoders["pyturbojpeg"] = turbo
        where = Path(library).name if library else "the system's"
        versions["pyturbojpeg"] = f"{pyturbo.__version__} on {where} ({embedded_version(library)})"
    except (ImportError, OSError, RuntimeError):
        missing.append("PyTurboJPEG")
    return decoders, versions, missing


def load_pyturbojpeg():
    """(PyTurboJPEG's module, the libturbojpeg to give it or None): its turbojpeg.py loaded by
    path beside the `turbojpeg` extension that shadows it, on that wheel's bundled library."""
    spec = importlib.util.find_spec("turbojpeg")
    if spec is None or not spec.origin:
        raise ImportError("no module turbojpeg")
    site = Path(spec.origin).parent
    libs = sorted(site.glob("turbojpeg.libs/libturbojpeg*.so*"))
    source = site / "turbojpeg.py"
    if not source.exists():
        raise ImportError(f"PyTurboJPEG's turbojpeg.py is not in {site}")
    spec = importlib.util.spec_from_file_location("pyturbojpeg", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, str(libs[0]) if libs else None


def embedded_version(library: str | None) -> str:
    """The 'libjpeg-turbo version X' string a shared library carries, else '?'."""
    if not library or not Path(library).exists():
        return "?"
    found = re.search(rb"libjpeg-turbo version ([0-9.]+)", Path(library).read_bytes())
    return f"libjpeg-turbo {found[1].decode()}" if found else "?"


@dataclass(frozen=True)
class SwappedTransform:
    """TrainTransform on RGB or grey JPEGs with the decode swapped; everything else as ours."""

    decode: Decode
    ours: TrainTransform  # its box ranges, flip probability and output size

    def __call__(self, data: bytes) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import RandomResizedCrop as RRC
        from torchvision.transforms.v2 import functional as F

        t, im = self.ours, open_image(data)
        full_w, full_h = im.size
        top, left, h, w = RRC.get_params(im, list(t.scale), list(t.ratio))
        pixels = self.decode(data, dct_scale(full_w, full_h, min(h, w) / t.size))
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) view, as pil_to_tensor gives
        (top, left, h, w), _ = decoded_box((top, left, h, w), full_w, full_h, pixels)
        out = F.resized_crop(
            pixels, top, left, h, w, [t.size] * 2, InterpolationMode.BILINEAR, antialias=True
        )
        return F.horizontal_flip(out) if bool(torch.rand(()) < t.hflip) else out


def hwc(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).numpy() if isinstance(pixels, torch.Tensor) else pixels


class Diff:
    """Running |a - b| over many images: max, mean, share over 1 level."""

    def __init__(self):
        self.max, self.total, self.over_1, self.values, self.shape_mismatches = 0, 0, 0, 0, 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            self.shape_mismatches += 1
            return
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        self.max = max(self.max, int(d.max()))
        self.total += int(d.sum())
        self.over_1 += int((d > 1).sum())
        self.values += d.size

    def figures(self) -> dict:
        n = max(self.values, 1)
        return {
            "max": self.max,
            "mean": self.total / n,
            "share_over_1": self.over_1 / n,
            "shape_mismatches": self.shape_mismatches,
        }


def check_pixels(jpegs: list[bytes], full: dict, reduced: dict, transforms: dict) -> dict:
    """Untimed: every contender's pixels against Pillow's (decodes) or ours (transforms)."""
    diffs = {("full", n): Diff() for n in full}
    diffs |= {(f"1/{d}", n): Diff() for d, names in reduced.items() for n in names}
    diffs |= {("transform", n): Diff() for n in transforms}
    for i, data in enumerate(jpegs):
        reference = pil_decode(data)
        for name, decode in full.items():
            diffs["full", name].add(hwc(decode(data)), reference)
        for denom, names in reduced.items():
            reference = pil_decode(data, denom)
            for name, decode in names.items():
                diffs[f"1/{denom}", name].add(hwc(decode(data, denom)), reference)
        torch.manual_seed(i)
        reference = transforms["ours"](data).numpy()
        for name, transform in transforms.items():
            torch.manual_seed(i)  # the same box and flip as ours
            diffs["transform", name].add(transform(data).numpy(), reference)
    out: dict = {}
    for (section, name), diff in diffs.items():
        out.setdefault(section, {})[name] = diff.figures()
    return out


def time_loop(fn: Callable[[bytes], object], jpegs: list[bytes]) -> float:
    """Seconds for one pass; the transforms' boxes are the same every pass (seed 0)."""
    torch.manual_seed(0)
    start = time.perf_counter()
    for data in jpegs:
        fn(data)
    return time.perf_counter() - start


def read_jpegs(a: argparse.Namespace) -> tuple[list[bytes], dict]:
    if a.jpegs:
        files = sorted(Path(a.jpegs).rglob("*.jp*g"))[: a.images]
        return [f.read_bytes() for f in files], {"source": a.jpegs}
    from bench_data import build

    from data.index import load_index
    from data.samples import image_bytes, read_shard

    bench = build(a.variant, 5000, root=a.root)
    ds = load_index(bench.index)
    urls = [ds.shard_url(s) for s in ds.split("train").shards]
    jpegs = [image_bytes(s) for url in urls for s in read_shard(url)]
    return jpegs[: a.images], {"source": bench.directory, **bench.stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("large", "small"), default="large", help="400-640 px or ~256 px")
    p.add_argument("--images", type=int, default=None, help="the first N of the set (default 5000)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes each, interleaved; the fastest counts")
    p.add_argument("--check", type=int, default=1000, help="images whose pixels are compared")
    p.add_argument("--jpegs", metavar="DIR", help="every *.jpg under DIR instead of the benchmark set")
    p.add_argument("--quick", action="store_true", help="64 images, one pass: checks the script runs")
    p.add_argument("--root", default="~/.cache/shardtrain/bench", help="where benchmark sets are cached")
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    a = p.parse_args()
    a.images = a.images or (64 if a.quick else 5000)
    a.repeat = 1 if a.quick else a.repeat
    torch.set_num_threads(1)
    # torchvision 0.29 deprecates its decoders and warns on every call: paid here, silently.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # Pillow's: only read

    import PIL
    import torchvision
    from PIL import features

    peers, versions, missing = load_peers()
    if missing:
        print(f"missing: {', '.join(missing)} (skipped; {INSTALL} installs them)")
    tv_lib = sorted(Path(torchvision.__file__).parent.parent.glob("torchvision.libs/libjpeg*.so*"))
    versions = {
        "pillow": f"{PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')})",
        "torchvision": f"{torchvision.__version__} ({embedded_version(str(tv_lib[0]) if tv_lib else None)})",
        **versions,
    }
    print("versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    jpegs, source = read_jpegs(a)
    if not jpegs:
        raise SystemExit(f"no JPEGs read from {source['source']}: expected *.jpg files or a benchmark set")
    print(
        f"{len(jpegs)} JPEGs, {sum(map(len, jpegs)) / len(jpegs) / 1000:.1f} KB mean, from {source['source']}"
    )

    full = {"pil": pil_decode, "torchvision": torchvision_decode, **peers}
    denoms = (2, 4, 8) if a.variant == "large" or a.jpegs else (2, 4)
    reduced = {d: {"pil": pil_decode, **peers} for d in denoms}
    # torchvision cannot decode reduced: in a transform only beside Pillow, as ours was
    ours = TrainTransform(224)
    swapped = {"pil+torchvision": pil_torchvision_decode, **reduced[2]}
    transforms = {"ours": ours, **{n: SwappedTransform(f, ours) for n, f in swapped.items()}}
    # (section, name) → one decode or transform of one image's bytes
    timed: dict[tuple[str, str], Callable[[bytes], object]] = {("full", n): f for n, f in full.items()}
    for d, names in reduced.items():
        timed |= {(f"1/{d}", n): (lambda data, f=f, d=d: f(data, d)) for n, f in names.items()}
    timed |= {("transform", n): t for n, t in transforms.items()}

    runs: dict[tuple[str, str], list[float]] = {k: [] for k in timed}
    load = {"1min_before": os.getloadavg()[0]}  # another benchmark beside these slows them all
    for r in range(a.repeat):
        for key, fn in timed.items():
            runs[key].append(time_loop(fn, jpegs))
        print(f"pass {r + 1}/{a.repeat} done", flush=True)
    load["1min_after"] = os.getloadavg()[0]
    results: dict = {}
    for (section, name), seconds in runs.items():
        best = min(seconds)
        results.setdefault(section, {})[name] = {
            "ms": best / len(jpegs) * 1e3,
            "img_s": len(jpegs) / best,
            "runs_ms": [s / len(jpegs) * 1e3 for s in seconds],
        }
    for r in results["transform"].values():
        r["over_ours"] = r["img_s"] / results["transform"]["ours"]["img_s"]
    pixels = check_pixels(jpegs[: a.check], full, reduced, transforms)

    print(f"\n{'':16}" + "".join(f"{s:>22}" for s in results) + "   (ms/image, images/s)")
    for name in dict.fromkeys(n for section in results.values() for n in section):
        cells = [results[s].get(name) for s in results]
        print(
            f"{name:16}" + "".join(f"{c['ms']:11.3f}{c['img_s']:11.0f}" if c else f"{'-':>22}" for c in cells)
        )
    print("torchvision has no reduced-scale decode: '-' at 1/2, 1/4, 1/8. transform: ours is the tree's")
    print("TrainTransform; the rest swap only its decode (pil+torchvision: the one before data/jpeg.py).")
    for name, r in results["transform"].items():
        print(f"transform {name}: {r['img_s']:.0f} img/s, x{r['over_ours']:.3f} of ours")
    print(f"\npixels over {min(a.check, len(jpegs))} images (decodes vs Pillow's, transforms vs ours):")
    for section, names in pixels.items():
        for name, d in names.items():
            shapes = f", {d['shape_mismatches']} shape mismatches" if d["shape_mismatches"] else ""
            print(
                f"  {section:10}{name:16} max {d['max']:3d}  mean {d['mean']:.4f}  "
                f">1: {d['share_over_1']:.2%}{shapes}"
            )
    if a.json:
        doc = {
            "versions": versions,
            "missing": missing,
            "images": len(jpegs),
            "repeat": a.repeat,
            "load": load,
        }
        doc |= {"set": source, "results": results, "pixels": pixels, "no_reduced": ["torchvision"]}
        Path(a.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
