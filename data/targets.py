"""What each task learns from a sample besides its image, read from plain WebDataset files:

    class   KEY.cls (or a KEY.json field): the class index             (data.samples.Labels)
    labels  KEY.json "labels": defect names, ";"-separated or a list   → multi-hot (C,) float32
            (absent: the sample's class, so a classification set trains as multi-label)
    mask    KEY.mask.png: one channel of class indices, 0 the good class → uint8 (H, W)
            (absent on a good sample: all good)
    anomaly the same mask as good (0) / defect (1) pixels → uint8 (H, W); 255 everywhere on a
            defect sample without a mask (a defect, place unknown). In the train split a defect
            sample is left out (LEFT_OUT): the anomaly task learns what good looks like

A target that cannot be read is a BadSample with a reason of its own, counted by the loader.
Torch-free, so `data verify` shares it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data.errors import UserError
from data.samples import LEFT_OUT, BadSample, Labels, image_bytes

GOOD_NAMES = ("good", "ok", "pass")  # MVTec AD's name, our embedded set's, and a line's
MASK_EXT = "mask.png"


def find_good(classes: Sequence[str]) -> str | None:
    """The class of parts that pass, by name (any case): `good`, `ok` or `pass`; None if none."""
    found = [c for c in classes if c.lower() in GOOD_NAMES]
    return found[0] if len(found) == 1 else None


def good_first(classes: Sequence[str]) -> tuple[str, ...]:
    """Sorted class names with the good class first: the order of a data set with masks, whose
    value 0 is the good class."""
    good = find_good(classes)
    rest = sorted(c for c in set(classes) if c != good)
    return (good, *rest) if good else tuple(rest)


def split_labels(value) -> list[str]:
    """A `labels` value as names: "scratch;spot", ["scratch", "spot"], "" or None (none)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(";") if v.strip()]


@dataclass(frozen=True)
class MultiHot:
    labels: Labels  # the class reader: the fallback, and the class names
    spatial = False

    def __call__(self, sample: dict) -> np.ndarray:
        classes, good = self.labels.classes, find_good(self.labels.classes)
        names = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                raise BadSample("KEY.json is not JSON") from None
            if isinstance(meta, dict) and "labels" in meta:
                names = split_labels(meta["labels"])
        if names is None:
            names = [classes[self.labels(sample)]]
        out = np.zeros(len(classes), np.float32)
        for name in names:
            if name not in classes:
                raise BadSample("unknown label name")
            out[classes.index(name)] = 1
        if good is not None:
            g = classes.index(good)
            out[g] = 0
            out[g] = float(not out.any())  # good exactly when no defect label is on
        return out


def read_mask(data: bytes) -> np.ndarray:
    """A mask file's pixels, uint8 (H, W); refuses what is no class-index mask (colour, lossy)."""
    from data.decode import open_image

    im = open_image(data)
    if im.format != "PNG":
        raise BadSample(f"mask is {im.format or 'not an image'}, not PNG (a lossy mask blurs class edges)")
    if im.mode not in ("1", "L", "P", "I;16", "I"):
        raise BadSample(f"mask is {im.mode}, not single-channel (one class index per pixel)")
    if im.mode == "P":
        return np.asarray(im, dtype=np.uint8)  # palette indices are the class indices
    a = np.asarray(im.convert("L") if im.mode == "1" else im)
    if a.max(initial=0) > 255:
        raise BadSample("mask values out of range")
    # A copy whatever the type: PIL's buffer is read-only, and masks go on into torch tensors.
    return a.astype(np.uint8)


def mask_classes(mask: np.ndarray, label: int, num_classes: int) -> np.ndarray:
    """Class indices from a stored mask. A binary mask (0 and one other value, or 0 and values
    all >= 128, such as 255 or MVTec LOCO's 236-255 edges) marks the sample's own class `label`;
    otherwise its values are class indices, each below `num_classes`."""
    # Only the marked pixels are looked at (a few percent of a part): bincount over all of them
    # would take an int64 copy of the whole mask, 400 MB at 50 MP.
    marks = np.unique(mask[mask > 0])
    if marks.size == 0:
        return mask
    if marks.size == 1 or marks.min() >= 128:
        return np.where(mask > 0, np.uint8(label), np.uint8(0))
    if marks.max() >= num_classes:
        raise BadSample("mask values out of range")
    return mask


@dataclass(frozen=True)
class Mask:
    labels: Labels
    spatial = True  # moves with the image through the transform

    def __call__(self, sample: dict) -> np.ndarray:
        classes = self.labels.classes
        label = self.labels(sample)
        if MASK_EXT not in sample:
            if classes[label] != find_good(classes):
                raise BadSample("no mask for a defect sample")
            from data.decode import open_image

            im = open_image(image_bytes(sample))  # header only: the size of an all-good mask
            return np.zeros((im.height, im.width), np.uint8)
        mask = mask_classes(read_mask(sample[MASK_EXT]), label, len(classes))
        if label == 0 and mask.any() and classes[0] == find_good(classes):
            raise BadSample("defect pixels in the mask of a good sample")
        return mask


UNKNOWN = 255  # an anomaly target's pixel of a defect sample whose defect has no mask


@dataclass(frozen=True)
class AnomalyMap:
    labels: Labels
    train: bool  # the train split: defect samples are left out, before their image is decoded
    spatial = True

    def __call__(self, sample: dict) -> np.ndarray:
        classes = self.labels.classes
        label = self.labels(sample)
        good = classes[label] == find_good(classes)
        if self.train and not good:
            raise BadSample(LEFT_OUT)
        if MASK_EXT in sample:
            mask = mask_classes(read_mask(sample[MASK_EXT]), label, len(classes)) > 0
            if good and mask.any():
                raise BadSample("defect pixels in the mask of a good sample")
            if good or mask.any():
                return mask.astype(np.uint8)
        # No mask, or a defect's mask without a defect pixel: a defect, its place unknown.
        from data.decode import open_image

        im = open_image(image_bytes(sample))  # header only: the size of the map
        return np.full((im.height, im.width), 0 if good else UNKNOWN, np.uint8)


def reader(kind: str, labels: Labels, train: bool = False):
    """The target reader a task asks for: "class", "labels", "mask" or "anomaly" (`train`: the
    reader of the train split, where the anomaly task leaves defects out)."""
    if kind == "class":
        return labels
    if kind == "labels":
        return MultiHot(labels)
    if kind == "mask":
        return Mask(labels)
    if kind == "anomaly":
        return AnomalyMap(labels, train)
    raise ValueError(f"target {kind!r}: expected class, labels, mask or anomaly")


def check_index(index, target: str) -> None:
    """Refuse a data set that cannot give `target`: masks for segment, a good class for anomaly."""
    if target == "mask" and "created_by" in index.extra and not index.extra.get("masks"):
        raise UserError(
            f"task=segment needs masks, and the data set {index.location} was written without any: "
            "write it with a mask column (python -m data write --from-manifest, or the MVTec AD layout)"
        )
    if target == "anomaly" and find_good(index.classes) is None:
        raise UserError(
            f"task=anomaly learns what good parts look like, and the data set {index.location} has no "
            f"good class among {list(index.classes)} (one named good, ok or pass): name it so"
        )


def encode_mask(mask: np.ndarray) -> bytes:
    """uint8 (H, W) class indices → PNG bytes, deterministic (no time or text chunks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
