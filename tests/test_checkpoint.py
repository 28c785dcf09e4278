"""Checkpoint files: written whole or not at all, read safely, and a failure named with its path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from data.errors import UserError
from train.checkpoint import load_checkpoint


class Payload:
    """Pickled code, which weights_only refuses to rebuild."""


@pytest.fixture
def small_disk(tmp_path, trained):
    """A tmpfs with room for one checkpoint of the tiny test model and a half, not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = int(os.path.getsize(trained) * 1.5)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_path(tmp_path, train_command, small_disk):
    # last.ckpt at step 2 fits; step 4's is written beside it and does not, so the run stops.
    out = subprocess.run(
        train_command(
            "logger=none",
            "checkpoint.every_n_steps=2",
            f"callbacks.checkpoint.dirpath={small_disk}",
            f"callbacks.mid_epoch.dirpath={small_disk}",
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = out.stdout + out.stderr
    assert out.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    (error,) = [line for line in output.splitlines() if "error:" in line]
    assert f"could not write the checkpoint {small_disk}/last.ckpt: No space left on device" in error
    assert "the previous one there is intact" in error and "resume=auto" in error
    assert sorted(os.listdir(small_disk)) == ["last.ckpt"]  # no half-written file left behind
    assert load_checkpoint(str(small_disk / "last.ckpt"))["global_step"] == 2


def test_unreadable_checkpoints_get_a_message_naming_the_file(tmp_path, trained):
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(Path(trained).read_bytes()[:50_000])
    with pytest.raises(UserError, match=rf"checkpoint {torn} is unreadable, truncated or corrupt"):
        load_checkpoint(str(torn))

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"x": Payload()}, unsafe)
    with pytest.raises(UserError, match=rf"checkpoint {unsafe} holds more than tensors and plain data"):
        load_checkpoint(str(unsafe))
