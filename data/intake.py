"""Is a source file fit for a shard, and in what form: runs in the writer's worker processes.

Every image is decoded once here (at reduced scale where the format allows), so a file that would
fail every epoch of every run is dropped, counted and named once instead. JPEG, PNG, WebP, TIFF
and BMP keep their own bytes (16-bit camera images stay lossless, checked against the data set's
bit depth); anything else PIL reads becomes PNG. A mask must be a single-channel PNG of class
indices the size of its image. What is kept is hashed here too: an append skips an image the data
set already holds by its sha256.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from data.decode import container_bits, decode_fully, levels, open_image, own_depth
from data.sources import Item, Payload

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp"}


@dataclass(frozen=True)
class DeepPayload(Payload):
    """A 16-bit image's payload, kept as its own bytes."""

    used: int = 0  # bits its values use, when it declares no depth of its own (a --bit-depth hint)


class Refused(str):
    """A source file that must not be written at all (a colour or lossy mask): the write stops."""


class TooDeep(Refused):
    """An image with values over the depth it is written at: the write stops."""


def check_image(payload: Payload, bit_depth: int | None = None) -> Payload | TooDeep:
    """Decode fully (at reduced scale where the format allows): a file that fails here would fail
    every epoch of every run, so it is cheaper to drop it once now. A 16-bit image decodes whole
    and must fit `bit_depth` (None: its own depth)."""
    head = open_image(payload.data)
    size = head.size  # read here, in the worker: the index records it, and the reduced decode shrinks it
    container = container_bits(head, payload.data)
    if container > 8:  # kept as it is, whole: its depth is the point
        peak = int(levels(head, payload.data).max())
        depth = bit_depth or own_depth(head, payload.data)
        if peak >= 1 << depth:
            given = f"--bit-depth {bit_depth}" if bit_depth else f"its own {depth}-bit depth"
            return TooDeep(
                f"pixel values up to {peak} do not fit {given} (at most {(1 << depth) - 1}); pass "
                f"--bit-depth {peak.bit_length()} (or more: the camera's bit depth)"
            )
        used = peak.bit_length() if depth == container else 0
        data, ext = payload.data, KEPT_FORMATS.get(head.format)
        if ext is None:  # a 16-bit PGM, say: kept lossless, as a 16-bit PNG
            buf = io.BytesIO()
            head.save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
        return DeepPayload(data, ext, payload.meta, payload.mask, size, used)
    with decode_fully(head) as im:
        fmt = im.format
        if fmt in KEPT_FORMATS:
            return Payload(payload.data, KEPT_FORMATS[fmt], payload.meta, payload.mask, size)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return Payload(buf.getvalue(), "png", payload.meta, payload.mask, size)


def check_mask(payload: Payload, label: int, num_classes: int) -> str | None:
    """Why a payload's mask cannot be written: Refused (wrong kind of file), or a reason to
    skip the item (another size than its image, values out of range); None when it is fine."""
    from data.decode import open_image
    from data.samples import BadSample
    from data.targets import mask_classes, read_mask

    try:
        mask = read_mask(payload.mask)
    except BadSample as e:
        return Refused(str(e))
    except Exception as e:  # PIL raises many types for unreadable files
        return Refused(f"unreadable mask: {e}".splitlines()[0][:200])
    with open_image(payload.data) as im:
        if mask.shape != (im.height, im.width):
            return f"mask size differs: {mask.shape[1]}x{mask.shape[0]}, image {im.width}x{im.height}"
    try:
        mask_classes(mask, label, num_classes)
    except BadSample as e:
        return f"{e}: values up to {int(mask.max())}, {num_classes} classes"
    return None


def _load(job: tuple[Item, int, int, int | None]) -> Payload | str:
    """Runs in a worker: the checked payload, or why the item is skipped ("reason: detail")."""
    from PIL import UnidentifiedImageError

    item, label, num_classes, bit_depth = job
    try:
        payload = item.read()
        if item.mask is None:  # the data set's masks are those its items declare
            payload = Payload(payload.data, payload.ext, payload.meta)
        if payload.mask is not None:
            problem = check_mask(payload, label, num_classes)
            if problem:
                return problem
        return check_image(payload, bit_depth)
    except UnidentifiedImageError:
        return "not an image: PIL cannot identify it"
    except FileNotFoundError as e:
        return f"missing file: {e.filename}"
    except Exception as e:  # PIL raises many types for corrupt data; skip and report, never fatal
        return f"corrupt image: {e}".splitlines()[0][:200]


def hashed(job) -> tuple[Payload | str, bytes | None]:
    """Runs in a worker: `_load`, and the sha256 of the image bytes the shard will hold (an
    append skips an image the data set already has by it)."""
    payload = _load(job)
    return payload, hashlib.sha256(payload.data).digest() if isinstance(payload, Payload) else None
