"""Where a server's processes spend their CPU while a bench drives them: py-spy samples (busy
threads only, without pausing them) of each process, sorted into named parts by the frames on
their stacks. The first part whose frames a sample holds takes it, so the order below goes
from the specific to the general.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# (part, any of these substrings in a frame of the stack)
PARTS = [
    ("medray prompt encoding (chat template, tokenizer, image rule)", ("encode_request (",)),
    ("ingress image decode", ("read_image (", "load_image (")),
    ("ingress request validation (pydantic)", ("pydantic", "to_settings (")),
    ("vLLM input processing (its tokenizer and image processor)", ("input_processor", "process_inputs",
                                                                   "_process_multimodal", "preprocess (")),
    ("vLLM output processing (detokenize, outputs)", ("output_processor", "process_outputs", "detokeniz")),
    ("vLLM model forward", ("forward (",)),
    ("vLLM scheduler and engine loop", ("vllm/v1/core", "vllm/v1/engine/core.py")),
    ("SSE chunks (ingress)", ("sse_chunks (",)),
    ("medray stream and generate (replica)", ("medray/serve/model.py", "medray/engines/vllm.py")),
    ("medray chat route (ingress)", ("medray/serve/chat.py", "medray/serve/app.py")),
    ("Serve's replica and handle code", ("ray/serve/",)),
    ("HTTP server (uvicorn, starlette, fastapi)", ("uvicorn", "starlette", "fastapi", "h11")),
    ("Ray core (actor calls, object transfer)", ("ray/_private", "_raylet", "ray/actor.py")),
    ("asyncio event loop", ("asyncio/",)),
]


def find_processes(titles: dict[str, str]) -> dict[str, int]:
    """pid of the newest process whose command line starts with each title (Ray's `ray::`
    names): a server stopped just before may still be exiting."""
    found: dict[str, tuple[int, int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, ValueError, IndexError):
            continue
        for name, title in titles.items():
            if cmd.startswith(title) and started >= found.get(name, (0, -1))[1]:
                found[name] = (int(pid), started)
    return {name: pid for name, (pid, _) in found.items()}


def start(pids: dict[str, int], seconds: float, rate: int = 50) -> dict[str, tuple[subprocess.Popen, Path]]:
    """py-spy, sampling each process for `seconds` in the background."""
    out = {}
    for name, pid in pids.items():
        path = Path(tempfile.mkstemp(suffix=".txt")[1])
        proc = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                 "--rate", str(rate), "--nonblocking", "--format", "raw", "--output", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out[name] = (proc, path)
    return out


def finish(started: dict[str, tuple[subprocess.Popen, Path]], rate: int = 50) -> dict[str, dict[str, float]]:
    """CPU seconds sampled per part, per process."""
    result = {}
    for name, (proc, path) in started.items():
        proc.wait()
        parts: Counter = Counter()
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            part = next((p for p, marks in PARTS if any(m in stack for m in marks)), "other")
            parts[part] += int(count) / rate
        result[name] = dict(parts.most_common())
        if os.environ.get("BENCH_PROFILE_KEEP"):  # a folder: the raw samples, for a closer look
            path.rename(Path(os.environ["BENCH_PROFILE_KEEP"]) / f"{name.replace(' ', '-')}-{path.name}")
        else:
            path.unlink()
    return result
