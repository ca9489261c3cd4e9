"""What every bench prints: repeated runs as median (min to max), the machine they ran on, and
the last figures kept in bench/RESULTS.md.

One run on a shared 2-core machine can be off by 2x in either direction, so a figure is
always the median of `--repeat` runs with its spread, measured with nothing else running.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def add_repeat(parser) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--no-record", action="store_true", help="do not update bench/RESULTS.md")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """'median (min to max, n runs)'."""
    return (f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))} to {fmt.format(max(values))}, "
            f"{len(values)} runs)")


def machine(threads: int | None = None) -> str:
    import torch

    line = (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__} with "
            f"{threads or torch.get_num_threads()} thread(s)")
    if torch.cuda.is_available():
        line += f", {torch.cuda.get_device_name(0)}"
    return line


def record(bench: str, lines: list[str], threads: int | None = None) -> None:
    """Replace this bench's section of bench/RESULTS.md with `lines`, dated, with the machine."""
    head = f"## bench/{bench}.py"
    body = [head, "", f"{datetime.date.today().isoformat()}, {machine(threads)}:", ""] + [f"- {x}" for x in lines]
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nThe last figures of each bench, written by the bench itself (`--no-record` to "
        "skip). Medians of `--repeat` runs with min and max, measured with nothing else running.\n")
    sections = text.split("\n## ")
    kept = [s for s in sections[1:] if not s.startswith(f"bench/{bench}.py")]
    text = "\n## ".join([sections[0].rstrip() + "\n"] + kept)
    RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(body) + "\n")
