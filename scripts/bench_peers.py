"""The peers in the loader benchmark: Mosaic Streaming (MDS) and LitData over the same images.

    pip install -e ".[bench]"      # mosaicml-streaming, litdata: not in the default install

Each peer reads a copy of the benchmark set in its own format, written once next to the set
(`<set>/mds/`, `<set>/litdata/`) from our shards in their order: the JPEG bytes unchanged, the
class index beside them. Each runs two ways:

    mosaic, litdata        as their users write them: the peer's StreamingDataset subclassed to
                           decode with PIL and apply torchvision's Compose (L1's float pipeline),
                           batched by the peer's documented loader
    mosaic+ours, litdata+ours
                           the same loader with our data.transforms.TrainTransform on the bytes
                           (reduced-scale decode, uint8 out): the loader machinery alone compared

Peers are imported only here, and only in the benchmark's child processes.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
from collections.abc import Callable, Iterable

PEERS = {"mosaic": "streaming", "litdata": "litdata"}  # contender → the module it needs
EXTRA = 'pip install -e ".[bench]"'


def available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(module) is not None for name, module in PEERS.items()}


def _samples(index: str) -> Iterable[tuple[bytes, int]]:
    """(JPEG bytes, class index) in our shards' order."""
    from data.index import load_index
    from data.samples import image_bytes, read_shard

    ds = load_index(index)
    for shard in ds.split("train").shards:
        for s in read_shard(ds.shard_url(shard)):
            yield image_bytes(s), int(s["cls"])


def _written(out: str, write: Callable[[str], None]) -> str:
    """`out`, written by `write(tmp)` into a temporary folder first and renamed when whole."""
    if os.path.exists(os.path.join(out, ".complete")):
        return out
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def mds_dir(index: str, directory: str) -> str:
    """The set as MDS shards: columns jpg (bytes, unchanged) and cls (int)."""

    def write(tmp: str) -> None:
        from streaming import MDSWriter

        with MDSWriter(out=tmp, columns={"jpg": "bytes", "cls": "int"}, size_limit="64mb") as w:
            for jpg, cls in _samples(index):
                w.write({"jpg": jpg, "cls": cls})

    return _written(os.path.join(directory, "mds"), write)


def _litdata_item(item: tuple[bytes, int]) -> dict:
    jpg, cls = item
    return {"jpg": jpg, "cls": cls}  # bytes stay bytes (litdata's BytesSerializer)


def litdata_dir(index: str, directory: str) -> str:
    """The set as LitData chunks (`litdata.optimize`): jpg bytes unchanged, cls int."""

    def write(tmp: str) -> None:
        import litdata

        items = list(_samples(index))
        litdata.optimize(
            fn=_litdata_item, inputs=items, output_dir=tmp, chunk_bytes="64MB", num_workers=1, verbose=False
        )

    return _written(os.path.join(directory, "litdata"), write)


def prepare(index: str, directory: str, names: Iterable[str]) -> None:
    """Write the copies the chosen peers read (before any timing)."""
    bases = {n.split("+")[0] for n in names}
    if "mosaic" in bases:
        mds_dir(index, directory)
    if "litdata" in bases:
        litdata_dir(index, directory)


def _pil_then(transform: Callable) -> Callable[[bytes], object]:
    from PIL import Image

    return lambda jpg: transform(Image.open(io.BytesIO(jpg)).convert("RGB"))


def _transform(ours: bool, torchvision_transform: Callable) -> Callable[[bytes], object]:
    if ours:
        from data.transforms import TrainTransform

        return TrainTransform(224)  # bytes → uint8 (3, 224, 224)
    return _pil_then(torchvision_transform)  # bytes → float (3, 224, 224), normalised


def mosaic(directory: str, workers: int, batch: int, ours: bool, torchvision_transform: Callable) -> Iterable:
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    transform = _transform(ours, torchvision_transform)

    class Images(StreamingDataset):  # the pattern of Mosaic's own examples
        def __getitem__(self, idx: int):
            obj = super().__getitem__(idx)
            return transform(obj["jpg"]), obj["cls"]

    # Streaming coordinates workers through shared memory named after the dataset; a crashed run
    # leaves it behind, so clear what no live process holds first.
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = Images(local=os.path.join(directory, "mds"), shuffle=True, batch_size=batch)
    return DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)


def litdata(
    directory: str, workers: int, batch: int, ours: bool, torchvision_transform: Callable
) -> Iterable:
    import litdata as ld

    transform = _transform(ours, torchvision_transform)

    class Images(ld.StreamingDataset):  # the pattern of LitData's README
        def __getitem__(self, index):
            obj = super().__getitem__(index)
            return transform(obj["jpg"]), obj["cls"]

    ds = Images(input_dir=os.path.join(directory, "litdata"), shuffle=True, drop_last=True)
    return ld.StreamingDataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)
