"""Test helper: kill a `medray infer` driver mid-run, as a crashed machine or an OOM kill would,
and wait until what it left behind stops changing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_once_shards_land(proc: subprocess.Popen, output: Path, shards: int = 1, timeout_s: float = 180) -> None:
    """SIGKILL `proc`'s process group (started with start_new_session=True) once `output` holds
    `shards` shards; then wait until the shard count has held for 5 s: Ray stops the dead
    driver's actors within moments, and one caught mid-write may still finish its shard
    (atomically)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(list(output.glob("part-*"))) < shards:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    seen, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 5:
        now = len(list(output.glob("part-*")))
        if now != seen:
            seen, stable_since = now, time.monotonic()
        time.sleep(0.2)
