"""Provenance cost, run by hand: `python bench/digest.py [--gib 2]`.

What naming a model by its content costs (medray.provenance.digest_dir):
1. the first digest of a model directory reads every file once: its throughput (GB/s)
   against a bare sha256 of the same bytes in this run (the floor: the ratio says what the
   directory walk, the cache and the JSON add);
2. the digest computed again (nothing changed: size and mtime hit the cache) against the
   first one: the ratio a serve replica, a job's driver or a stage pays every time after.
The directory is a stand-in for a model: safetensors-sized files of random bytes, written
once, on this machine's local disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from _stats import add_repeat, record, spread

from medray import provenance


def bare_sha256(files: list[Path]) -> float:
    """Seconds to sha256 every file, 1 MiB at a time, nothing else."""
    t0 = time.perf_counter()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=2.0, help="size of the stand-in model")
    add_repeat(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medray-bench-digest-") as tmp:
        os.environ["MEDRAY_CACHE_DIR"] = os.path.join(tmp, "cache")  # a cold cache of its own
        model = Path(tmp, "model")
        model.mkdir()
        shard = int(args.gib * (1 << 30) / 4)
        for i in range(4):  # four shards, as a 7B model ships in a few files
            with open(model / f"model-{i + 1:05d}-of-00004.safetensors", "wb") as f:
                for _ in range(shard >> 24):
                    f.write(os.urandom(1 << 24))
        (model / "config.json").write_text("{}")
        files = sorted(p for p in model.iterdir())
        size = sum(p.stat().st_size for p in files)
        bare, cold, warm = [], [], []
        for _ in range(args.repeat):
            bare.append(bare_sha256(files))
            t0 = time.perf_counter()
            provenance.digest_dir(model, cache=False)
            cold.append(time.perf_counter() - t0)
            provenance.digest_dir(model)  # fills the cache
            t0 = time.perf_counter()
            provenance.digest_dir(model)
            warm.append(time.perf_counter() - t0)
        gb = size / 1e9
        lines = [
            f"stand-in model: {gb:.2f} GB in {len(files)} files (page cache warm after the first read)",
            f"bare sha256: {spread([gb / s for s in bare])} GB/s",
            f"first digest (digest_dir, no cache): {spread([gb / s for s in cold])} GB/s; "
            f"throughput relative to bare sha256 {spread([b / c for b, c in zip(bare, cold)])}",
            f"digest again (cache hit): {spread([1e3 * s for s in warm], '{:.2f}')} ms; ratio to the first "
            f"{spread([w / c for w, c in zip(warm, cold)], '{:.5f}')}",
        ]
    print("\n".join(lines))
    if not args.no_record:
        record("digest", lines)


if __name__ == "__main__":
    main()
