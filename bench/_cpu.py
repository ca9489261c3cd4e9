"""Where a run's CPU goes: a per-second sample of every process's CPU time (Linux /proc),
summed by kind of process over any window of the run afterwards. Benches use it to say what
ran beside the measured work (a rate alone cannot tell a starved stage from a slow one)."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _processes() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds so far), for every process this user can read."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read(200).replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out[int(pid)] = (cmd, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


class CpuTimeline:
    """Samples every `interval_s` in a thread, from `start()` to `stop()`; `kind(pid, cmdline)`
    names each process's kind at each sample (a Ray worker's title changes with its task)."""

    def __init__(self, kind: Callable[[int, str], str], interval_s: float = 1.0):
        self.kind, self.interval_s = kind, interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []  # (time.perf_counter(), CPU s by kind)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-timeline")

    def start(self) -> CpuTimeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        before = _processes()
        while not self._stop.wait(self.interval_s):
            now, spent = _processes(), {}
            for pid, (cmd, cpu) in now.items():
                k = self.kind(pid, cmd)
                if k:  # a process started since the last sample: all its CPU is new
                    spent[k] = spent.get(k, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
            before = now
            self.samples.append((time.perf_counter(), spent))

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Mean cores each kind used from `start` to `end` (time.perf_counter() values)."""
        total: dict[str, float] = {}
        for t, spent in self.samples:
            if start < t <= end:
                for k, v in spent.items():
                    total[k] = total.get(k, 0.0) + v
        span = max(end - start, 1e-9)
        return {k: v / span for k, v in sorted(total.items(), key=lambda kv: -kv[1])}
