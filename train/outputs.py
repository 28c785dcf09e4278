"""Output directories that appear whole or not at all.

`python -m train.evaluate` and `python -m train.export` write a directory of related files (a
report and its plots; a model and the preprocessing it needs). A reader must never see half of
one, and a failed run must not destroy the last good one: files are written into a fresh
directory beside `out`, which replaces `out` in one rename only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from data.errors import UserError


def check_out(out: str | None, overwrite: bool, kind: str, inputs: tuple[str, ...] = ()) -> str:
    """`out` as an absolute path, refused when unset or already holding files. `overwrite=true`
    replaces only a previous output of the same `kind` (a directory holding that file: metrics.json
    for a report, preprocess.json for a bundle), and never one holding `inputs` (the checkpoint
    being read), so a mistyped `out=.` cannot delete a working directory."""
    if not out:
        raise UserError("out is not set: give the directory to write to (out=DIR)")
    out = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.isfile(out):
        raise UserError(f"out={out} is a file: give a directory")
    if not (os.path.isdir(out) and os.listdir(out)):
        return out
    if not overwrite:
        raise UserError(
            f"out={out} already holds files: choose another directory, or overwrite=true to replace it"
        )
    inside = [p for p in inputs if os.path.abspath(p).startswith(out + os.sep)]
    if not os.path.isfile(os.path.join(out, kind)) or inside:
        why = f"it holds {inside[0]}" if inside else f"it is not a previous output (no {kind})"
        raise UserError(
            f"out={out}: overwrite=true will not replace this directory, {why}; choose another out"
        )
    return out


@contextlib.contextmanager
def published(out: str) -> Iterator[str]:
    """Yields a fresh directory to write into; on success it becomes `out` (replacing a previous
    one), on an exception it is removed and `out` is left as it was."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(out):
        old = tmp + ".old"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
