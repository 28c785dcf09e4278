"""data/memory.py: on the CPU, large freed tensors' memory stays with the process for the next
step instead of being faulted in afresh (glibc's mmap and trim thresholds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from data import memory

_CYCLES = """
import os, resource, sys, torch
from data.memory import bounded_in_worker, keep_freed_memory
if sys.argv[1] != "default":
    assert keep_freed_memory() and keep_freed_memory()  # a second call is a no-op
if sys.argv[1] == "worker":  # a loader worker forked from a process that keeps freed memory
    if os.fork():
        sys.exit(os.wait()[1])
    bounded_in_worker()
faults = []
for _ in range(32):  # a 64 MiB tensor made, written and freed, as a step's activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[16:]))
"""


def _faults(kind: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CYCLES, kind], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_memory_is_reused_instead_of_faulted_in_again():
    """By default glibc unmaps a 64 MiB block when it is freed, so each new one faults in all its
    16,384 pages; kept, the later cycles reuse the freed blocks. The first 7 to 9 grow the heap
    (torch's 64-byte-aligned blocks do not fit the hole the last one left until a few holes
    merge), so the last 16 of 32 cycles are counted."""
    default, kept, worker = _faults("default"), _faults("kept"), _faults("worker")
    assert default >= 16 * 256  # 16 cycles, at least 2 MiB huge pages' worth each (16,384 pages here)
    assert kept * 4 < default, (kept, default)
    # A loader worker forked from it unmaps its large blocks again: its memory stays bounded.
    assert worker * 4 > default * 3, (worker, default)


def test_only_a_model_on_the_cpu_keeps_freed_memory(make_cfg, monkeypatch):
    assert memory.on_cpu("cpu") and not memory.on_cpu("gpu") and not memory.on_cpu("mps")
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    from train.run import train

    train(make_cfg("trainer.accelerator=cpu", "trainer.max_epochs=1", "logger=none"))
    assert calls == [1]


def test_bench_malloc_runs_both_ways_at_tiny_size():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_malloc.py"
    spec = importlib.util.spec_from_file_location("bench_malloc", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--steps", "2", "--repeat", "1", "--size", "32", "--batch", "2"])
    for kind in ("default", "kept"):
        assert result[kind]["steps_per_s"] > 0 and result[kind]["peak_rss_mb"] > 0
    assert result["kept_over_default"] > 0
