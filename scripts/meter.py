"""CPU time and memory of a process and all its descendants, read from Linux /proc.

No psutil: it is not a dependency of ours, and three /proc files answer everything needed.
RSS summed over processes counts pages that forked workers share with their parent once per
process; PSS (proportional set size) divides each shared page among its sharers, so its sum is
what the tree really holds. Both are reported.
"""

from __future__ import annotations

import os
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat CPU times are in these, per second
PAGE = os.sysconf("SC_PAGE_SIZE")  # bytes


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of `pid`, or None if it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def tree(root: int) -> dict[int, float]:
    """{pid: CPU seconds} for `root` and every live descendant."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := _stat(int(name))):
            stats[int(name)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1]
            todo.extend(children.get(pid, ()))
    return out


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores) since boot."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


def wait_idle(timeout: float, threshold: float = 0.25, window: float = 1.0) -> float:
    """Wait until the machine is nearly idle (under `threshold` cores busy over `window` seconds)
    or `timeout` seconds pass; the busy cores last measured. On a shared machine a neighbour's
    burst would otherwise land in one contender's figures and not another's."""
    deadline = time.monotonic() + timeout
    while True:
        before = busy_seconds()
        time.sleep(window)
        busy = (busy_seconds() - before) / window
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of `pid` in bytes; zeros if it has gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0, 0
    return rss, pss


class TreeMeter:
    """Samples this process's tree in a background thread: peak summed RSS and PSS, and CPU
    seconds of every process seen, kept after a process exits (its last sample, so a worker
    that exits between samples loses at most `interval` of CPU)."""

    def __init__(self, interval: float = 0.1, root: int | None = None):
        self.interval, self.root = interval, root or os.getpid()
        self.peak_rss = self.peak_pss = 0  # bytes
        self._cpu: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TreeMeter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the tree, every process ever seen included."""
        self._poll()
        return sum(self._cpu.values())

    def sample(self) -> None:
        memory = [_memory(pid) for pid in self._poll()]
        self.peak_rss = max(self.peak_rss, sum(rss for rss, _ in memory))
        self.peak_pss = max(self.peak_pss, sum(pss for _, pss in memory))

    def _poll(self) -> list[int]:
        """The live pids; their CPU seconds recorded."""
        live = tree(self.root)
        with self._lock:  # called from both the sampling thread and the caller's
            self._cpu.update(live)
        return list(live)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
