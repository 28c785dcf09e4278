"""`python -m data write ...` turns images into shards plus a dataset.json index;
`python -m data index DIR` indexes shards other tools wrote; `python -m data verify ...` checks
shards against their index; `python -m data inspect ...` shows a class histogram and writes a
grid of samples per class."""

from __future__ import annotations

import argparse
import logging
import sys

from data.checks import argument, integer, number
from data.errors import UserError

POSITIVE = integer(1)
FRACTION = number(0, 1, open_high=True)  # a share of each class; 1 would leave no training set
MIB = number(0, open_low=True)


def _part_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        w = h = 0
    if min(w, h) < 128:
        raise argparse.ArgumentTypeError(
            f"{text}: expected WIDTHxHEIGHT in pixels, each at least 128 (4000x3000)"
        )
    return w, h


def _write(args: argparse.Namespace) -> None:
    from data import sources
    from data.write import write_dataset

    if args.from_folder:
        items, origin = sources.from_folder(args.from_folder), {"folder": args.from_folder}
    elif args.from_manifest:
        items, origin = sources.from_manifest(args.from_manifest), {"manifest": args.from_manifest}
    elif args.from_sql:
        from data.sql import from_sql

        if not args.db:
            raise UserError(
                "--from-sql needs --db URL (a SQLAlchemy URL: sqlite:///inspections.db, postgresql://...)"
            )
        items, origin = from_sql(args.from_sql, args.db)
    else:
        n, size, large = args.synthetic, args.image_size, args.part_size
        items = sources.from_synthetic(n, args.seed, size, large=large)
        origin = {"synthetic": {"num_samples": n, "seed": args.seed, "image_size": size}}
        if large:
            origin["synthetic"]["large"] = list(large)
    report = write_dataset(
        items,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_samples=args.shard_samples,
        shard_size_mb=args.shard_size_mb,
        workers=args.workers,
        overwrite=args.overwrite,
        extra=origin,
        bit_depth=args.bit_depth,
        append=args.append,
        ray=args.ray,
    )
    parts = ", ".join(
        f"{name} {split.num_samples} in {len(split.shards)} shards"
        for name, split in report.index.splits.items()
    )
    rate = report.written / report.seconds
    if report.duplicates:
        print(f"skipped {report.duplicates} images the data set already holds (same bytes)")
    if args.append and not report.written:
        print(f"nothing new: {report.index.location} is unchanged (version {report.version})")
        return
    if args.append:
        print(f"version {report.version}: {report.written} new samples in {report.shards} new shards")
    if report.kept:
        print(f"kept {report.kept} shard groups an interrupted run of this write had finished")
    print(f"wrote {report.written} samples ({parts}) to {report.index.location}")
    print(f"{len(report.index.classes)} classes: {', '.join(report.index.classes)}")
    print(f"{report.seconds:.1f} s, {rate:.0f} images/s")
    if report.skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped.most_common())
        print(f"skipped {sum(report.skipped.values())} unreadable files ({reasons}), e.g.:")
        for example in report.skipped_examples:
            print(f"  {example}")


def _verify(args: argparse.Namespace) -> int:
    from data.index import load_index
    from data.verify import verify

    index = load_index(args.index)
    checks = verify(index, decode=not args.no_decode, workers=args.workers)
    broken = [c for c in checks if c.problems]
    for check in broken:
        print(f"{check.url}:")
        for problem in check.problems:
            print(f"  {problem}")
    samples = sum(c.samples for c in checks)
    if broken:
        print(f"{len(broken)} of {len(checks)} shards have problems ({index.location})")
        return 1
    print(f"ok: {len(checks)} shards, {samples} samples match {index.location}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from data.scan import build_index

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    index = build_index(args.dir, classes, args.overwrite, args.label, args.val_fraction, args.seed)
    parts = ", ".join(f"{name} {s.num_samples} in {len(s.shards)} shards" for name, s in index.splits.items())
    print(f"wrote {index.location}: {parts}; {len(index.classes)} classes")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from data.index import load_index
    from data.overview import histogram, sample_grid

    index = load_index(args.index)
    counts = histogram(index)
    splits = list(counts)
    names = list(index.classes) + sorted({k for c in counts.values() for k in c} - set(index.classes))
    width = max(8, *(len(n) for n in names))
    print(f"{'class':<{width}}" + "".join(f"{s:>10}" for s in splits))
    for name in names:
        print(f"{name:<{width}}" + "".join(f"{counts[s][name]:>10}" for s in splits))
    print(f"{'total':<{width}}" + "".join(f"{sum(counts[s].values()):>10}" for s in splits))
    split = args.split or ("val" if "val" in index.splits else splits[0])
    sample_grid(index, split, args.per_class).save(args.out)
    print(f"wrote {args.out}: {args.per_class} {split} samples per class")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write", help="write shards and dataset.json from images")
    source = w.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="DIR", help="one subfolder per class")
    source.add_argument(
        "--from-manifest",
        metavar="FILE",
        help=".csv or .jsonl with path,label[,split] and any extra columns (kept in KEY.json)",
    )
    source.add_argument(
        "--from-sql",
        metavar="QUERY",
        help="rows of a SQL query, read as a manifest's columns (path, label, ...); with --db",
    )
    source.add_argument(
        "--synthetic", metavar="N", type=argument(POSITIVE), help="N samples of the embedded inspection set"
    )
    w.add_argument("out", help="output directory")
    w.add_argument(
        "--db", metavar="URL", help="--from-sql: SQLAlchemy URL (sqlite:///FILE, postgresql://USER@HOST/DB)"
    )
    w.add_argument(
        "--bit-depth",
        type=argument(integer(1, 16)),
        default=None,
        help="significant bits of 16-bit camera images (12 for a 12-bit camera); default: each file's own",
    )
    w.add_argument("--val-fraction", type=argument(FRACTION, float), default=0.1, help="per class (0.1)")
    w.add_argument("--seed", type=argument(integer()), default=0, help="split and shuffle seed (default 0)")
    w.add_argument("--shard-samples", type=argument(POSITIVE), default=10_000, help="max samples per shard")
    w.add_argument("--shard-size-mb", type=argument(MIB, float), default=256.0, help="max MiB per shard")
    w.add_argument("--workers", type=argument(POSITIVE), default=None, help="processes (default: all cores)")
    w.add_argument("--image-size", type=argument(integer(8)), default=96, help="synthetic images, pixels")
    w.add_argument(
        "--part-size",
        metavar="WxH",
        type=_part_size,
        help="synthetic: whole large parts of W x H pixels with 10-50 px defects (for tiles), e.g. 4000x3000",
    )
    w.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    w.add_argument(
        "--append",
        action="store_true",
        help="add the images as new shards of the data set in OUT (a new version; its shards stay as "
        "they are; images it already holds are skipped)",
    )
    w.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="write as Ray tasks, one per shard, on the cluster at ADDRESS (auto: this machine's, or a "
        "local one); OUT must be shared or object storage every node reaches",
    )
    w.set_defaults(run=_write)

    x = sub.add_parser("index", help="write dataset.json for shards made by other tools")
    x.add_argument("dir", help="directory (path or fsspec URL) holding the .tar shards")
    x.add_argument("--classes", help="class names in label order, comma-separated (default: 0..K-1)")
    x.add_argument(
        "--label",
        default="cls",
        help="where samples keep their class: cls (KEY.cls, default) or json:FIELD (a field of "
        "KEY.json holding the class index or name)",
    )
    x.add_argument(
        "--val-fraction",
        type=argument(FRACTION, float),
        default=0.0,
        help="move whole train shards, about this share of the samples, to val (default 0: none)",
    )
    x.add_argument("--seed", type=argument(integer()), default=0, help="which shards go to val (default 0)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing dataset.json")
    x.set_defaults(run=_index)

    v = sub.add_parser("verify", help="check every shard against dataset.json")
    v.add_argument("index", help="dataset.json or its directory (path or fsspec URL)")
    v.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    v.add_argument("--workers", type=argument(POSITIVE), default=None, help="processes (default: all cores)")
    v.set_defaults(run=_verify)

    i = sub.add_parser("inspect", help="class histogram and a PNG grid of samples per class")
    i.add_argument("index", help="dataset.json or its directory (path or fsspec URL)")
    i.add_argument("--out", default="samples.png", help="grid image to write (default samples.png)")
    i.add_argument("--split", default=None, help="split for the grid (default: val, else the first)")
    i.add_argument("--per-class", type=argument(POSITIVE), default=8, help="images per class row (default 8)")
    i.set_defaults(run=_inspect)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
