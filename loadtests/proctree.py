"""CPU time and memory of a server's whole process tree, read from /proc (Linux).

Servers here are trees: `bentoml serve` runs an arbiter, an API worker and a model worker; uvicorn and
MLServer run a supervisor and workers. A figure for the root process alone would miss most of the work.
"""

from __future__ import annotations

import contextlib
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Self

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# Positions in /proc/<pid>/stat after the ")" that closes the command name (which may hold spaces).
STATE, PPID, UTIME, STIME, CUTIME, CSTIME, STARTTIME = 0, 1, 11, 12, 13, 14, 19


def _stat(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None  # exited between listing and reading
    return text[text.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[PPID]), []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process."""
    fields = _stat(pid)
    return int(fields[STARTTIME]) if fields is not None else None


def is_running(pid: int, started: int | None = None) -> bool:
    """Whether the process exists and is not a zombie (and, given its start time, is still that one)."""
    fields = _stat(pid)
    return fields is not None and fields[STATE] != "Z" and started in (None, int(fields[STARTTIME]))


def cpu_seconds(root: int) -> float:
    """User + system CPU time of the tree so far. Children that have exited and been waited for are in
    their parent's cutime/cstime, so the total does not drop when a worker is replaced."""
    ticks = 0
    for pid in tree(root):
        if (fields := _stat(pid)) is not None:
            ticks += sum(int(fields[index]) for index in (UTIME, STIME, CUTIME, CSTIME))
    return ticks / CLOCK_TICKS


def rss_bytes(root: int) -> int:
    """Resident memory of the tree now (the sum over its processes; shared pages count in each)."""
    total = 0
    for pid in tree(root):
        try:
            total += int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE_BYTES
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def runqueue_wait_seconds(root: int) -> float:
    """How long the tree's threads have waited, ready to run, for a core (the kernel's run delay): where the
    machine is shared, time a server lost to other processes rather than to its own work."""
    waited = 0
    for pid in tree(root):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in (PROC / str(pid) / "task").iterdir():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    waited += int((task / "schedstat").read_text().split()[1])
    return waited / 1e9


class Sampler(ABC):
    """Calls `sample()` every `interval` seconds in a background thread while the `with` block runs."""

    def __init__(self, root: int, interval: float) -> None:
        self.root = root
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{type(self).__name__}-{root}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @abstractmethod
    def sample(self) -> None:
        """Take one sample (on the background thread)."""

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


class PeakRss(Sampler):
    """The highest resident memory of the tree while the `with` block runs."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        super().__init__(root, interval)
        self.peak = 0

    def sample(self) -> None:
        self.peak = max(self.peak, rss_bytes(self.root))
