"""Batch inference at corpus scale, run by hand: `python bench/scale.py [--repeat 3]`.

Each run is the `medray infer` command, as a user starts it, attached to one local Ray that
this bench starts (so every run's driver is a process of its own, measured alone), on the
tiny model with one new token: what is measured is the pipeline's bookkeeping, not the model.
With nothing else running, each `--repeat` times (median, min to max):

1. a records manifest (JSONL, LLaVA-Med's question-file form, rows pointing at a few hundred
   small PNGs) of `--manifest-rows` rows: seconds from the command's start to its first
   shard, and the driver's peak RSS while the run lists the whole manifest (the run is
   stopped with Ctrl-C after `--window` seconds; --max-rows-ahead is lifted so that the
   listing does reach the end in that window). Targets: the 1M-row manifest's first shard
   within 1.5x the 10k one's; driver RSS growth from 10k to 1M rows under 150 MB;
2. an S3 prefix (the loopback S3 endpoint, moto) of `--prefix-objects` objects: seconds to
   the first shard. Target: 100k objects within 1.5x 10k. moto's listing slows as a bucket
   grows, so these are not S3's times; the point is that no listing runs before the first row;
3. a finished `--rerun-rows` run (its first run timed once, to the end): a rerun of it, in
   seconds (target: under 10 % of the first run), reading no answer column (every shard
   carries its digest in its footer: the index reads ids only; printed); then, with the
   shards holding about 1 % of the rows deleted, a rerun answers exactly those rows.

4. on `engine: vllm`, the pipeline against the peer a user would pick instead,
   vLLM's own `LLM.chat` (bench/_vllm_peer.py, in MEDRAY_VLLM_PYTHON's environment) over the
   same `--vllm-images` PNGs and the same random LLaVA (bench/infer.py's small geometry, 64
   image tokens), with the CPUs the pipeline gives its engine (`--vllm-cpus`: the actor's CPUs,
   the peer's threads), the same sizing, and up to 32 new tokens. Target: >= 0.8x images/s.
   The pipeline's rate is its steady one (after its first shard: the engine's start is not
   timed on either side).

Each figure is printed per 1M rows too, with what a 10M-image run would spend before its first
answer (the first-shard time, extrapolated linearly from the sizes measured).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from _stats import add_repeat, record, spread

from medray import storage
from medray.data.shards import SHARD_GLOB
from medray.data.synthetic import chest_image, png_bytes
from medray.storage.local_s3 import LocalS3Server

QUESTION = "Is there an opacity?"
MEDRAY = str(Path(sys.executable).with_name("medray"))
ARGS = ["--model", "tiny://llava-mistral", "--task", "vqa", "--question", QUESTION, "--max-new-tokens", "1",
        "--batch-size", "32", "--rows-per-shard", "256"]


def write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{i:04d}.png"
        p.write_bytes(png_bytes(chest_image(("left", "right", "none")[i % 3], 32 + 8 * (i % 4), seed=i)))
        out.append(str(p))
    return out


def write_manifest(path: Path, rows: int, images: list[str]) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"question_id": f"q{i:08d}", "image": images[i % len(images)], "text": QUESTION}) + "\n")


def put_objects(prefix: str, n: int, body: bytes) -> None:
    client = storage.default_storage().client
    loc = storage.parse_s3(prefix)
    keys = [f"{loc.key}/{i:07d}.png" for i in range(n)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=loc.bucket, Key=k, Body=body), keys))


def shards_in(output: str) -> int:
    return len(storage.list_files(output, include=SHARD_GLOB)) if storage.exists(output) or storage.is_s3(output) \
        else 0


def run_until(args: list[str], output: str, *, env: dict, window_s: float | None) -> dict:
    """`medray infer ... --output output`: seconds to its first shard, the driver's peak RSS, and
    (window_s None) seconds to its end; else stopped with Ctrl-C `window_s` after the first shard."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([MEDRAY, "infer", *args, "--output", output], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    me = psutil.Process(proc.pid)
    peak, first = 0, None
    local = Path(output)
    while proc.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if first is None and (any(local.glob("part-*")) if not storage.is_s3(output) else shards_in(output)):
            first = time.perf_counter() - t0
        if first is not None and window_s is not None and time.perf_counter() - t0 > first + window_s:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    total = time.perf_counter() - t0
    if first is None and window_s is None and proc.returncode == 0:
        first = total
    return {"first_s": first, "peak_mb": peak / 2**20, "total_s": total, "rc": proc.returncode, "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest-rows", default="10000,100000,1000000")
    parser.add_argument("--prefix-objects", default="10000,100000")
    parser.add_argument("--rerun-rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=300, help="distinct images the manifest rows point at")
    parser.add_argument("--window", type=float, default=30.0,
                        help="seconds a manifest or prefix run goes on after its first shard")
    parser.add_argument("--only", default="manifest,prefix,rerun,vllm",
                        help="comma-separated parts to run: manifest, prefix, rerun, vllm (needs MEDRAY_VLLM_PYTHON)")
    parser.add_argument("--vllm-images", type=int, default=256)
    parser.add_argument("--vllm-cpus", type=int, default=1, help="CPUs of the pipeline's vLLM actor = the peer's threads")
    parser.add_argument("--vllm-rows-per-shard", type=int, default=64,
                        help="several shards in --vllm-images, so that a steady rate after the first exists")
    add_repeat(parser)
    args = parser.parse_args()
    sizes = [int(x) for x in args.manifest_rows.split(",") if x]
    objects = [int(x) for x in args.prefix_objects.split(",") if x]
    import ray

    from medray.raycluster import connect

    tmp = Path(tempfile.mkdtemp(prefix="medray-scale-"))
    with LocalS3Server() as s3:
        os.environ.update(s3.env)
        connect("local", local={"num_cpus": os.cpu_count(), "include_dashboard": False}, log_to_driver=False,
                runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MEDRAY_"))}})
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        images = write_images(tmp / "img", args.images)
        # A first run warms the nodes' worker processes and the tiny model's cache.
        write_manifest(tmp / "warm.jsonl", 300, images)
        run_until([*ARGS, "--input", str(tmp / "warm.jsonl")], str(tmp / "warm-out"), env=env, window_s=None)
        parts = set(args.only.split(","))
        # Each part is recorded under its own heading, so a run of some parts (--only) leaves
        # the others' last figures in bench/RESULTS.md.
        runs = {"manifest": lambda: manifests(args, sizes, images, tmp, env),
                "prefix": lambda: prefixes(args, objects, tmp, env),
                "rerun": lambda: reruns(args, images, tmp, env), "vllm": lambda: vllm_against_peer(args, tmp)}
        try:
            for part, run in runs.items():
                if part in parts:
                    lines = run()
                    print("\n".join(lines))
                    if not args.no_record:
                        record(f"scale ({part})", lines)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _per_million(small: tuple[int, float], large: tuple[int, float]) -> float:
    (n0, v0), (n1, v1) = small, large
    return (v1 - v0) / (n1 - n0) * 1e6


def manifests(args, sizes, images, tmp: Path, env) -> list[str]:
    first: dict[int, list[float]] = {n: [] for n in sizes}
    peak: dict[int, list[float]] = {n: [] for n in sizes}
    for n in sizes:
        write_manifest(tmp / f"m{n}.jsonl", n, images)
    for r in range(args.repeat):
        for n in sizes:
            out = tmp / f"out-m{n}-{r}"
            # The listing is let run to the end (no read-ahead bound), so the driver's peak
            # covers a whole manifest streaming past it.
            got = run_until([*ARGS, "--input", str(tmp / f"m{n}.jsonl"), "--max-rows-ahead", str(10 * n)], str(out),
                            env=env, window_s=args.window)
            first[n].append(got["first_s"])
            peak[n].append(got["peak_mb"])
            print(f"manifest {n} rows, run {r + 1}: first shard {got['first_s']:.1f} s, driver peak {got['peak_mb']:.0f} MB")
            shutil.rmtree(out, ignore_errors=True)
    lines = [f"records manifest (JSONL, {args.images} distinct images; tiny model, 1 new token; run stopped "
             f"{args.window:.0f} s after its first shard): " + "; ".join(
                 f"{n:,} rows: first shard {spread(first[n], '{:.1f}')} s, driver peak RSS "
                 f"{spread(peak[n], '{:.0f}')} MB" for n in sizes)]
    lo, hi = sizes[0], sizes[-1]
    ratio = [b / a for a, b in zip(first[lo], first[hi])]
    growth = [b - a for a, b in zip(peak[lo], peak[hi])]
    lines.append(f"first shard {hi:,} rows / {lo:,} rows: {spread(ratio)}x (target <= 1.5x); driver RSS growth "
                 f"{spread(growth, '{:+.0f}')} MB (target < 150 MB)")
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    per_m_s = _per_million((lo, med(first[lo])), (hi, med(first[hi])))
    per_m_mb = _per_million((lo, med(peak[lo])), (hi, med(peak[hi])))
    lines.append(f"per 1M more rows: {per_m_s:+.1f} s to the first shard, {per_m_mb:+.0f} MB of driver RSS; a 10M-row "
                 f"manifest's first answer after about {med(first[hi]) + 9 * per_m_s:.0f} s "
                 f"(today's listing into the driver: 1.5 KB and ~25 s per 1M rows before the first row)")
    return lines


def prefixes(args, objects, tmp: Path, env) -> list[str]:
    body = png_bytes(chest_image("left", 48))
    first: dict[int, list[float]] = {n: [] for n in objects}
    bucket = "s3://medray-scale"
    storage.default_storage().client.create_bucket(Bucket="medray-scale")
    for n in objects:
        t0 = time.perf_counter()
        put_objects(f"{bucket}/p{n}", n, body)
        print(f"put {n} objects in {time.perf_counter() - t0:.0f} s")
    for r in range(args.repeat):
        for n in objects:
            out = tmp / f"out-p{n}-{r}"
            got = run_until([*ARGS, "--input", f"{bucket}/p{n}"], str(out), env=env, window_s=5)
            first[n].append(got["first_s"])
            print(f"prefix {n} objects, run {r + 1}: first shard {got['first_s']:.1f} s")
            shutil.rmtree(out, ignore_errors=True)
    lo, hi = objects[0], objects[-1]
    ratio = [b / a for a, b in zip(first[lo], first[hi])]
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    per_m_s = _per_million((lo, med(first[lo])), (hi, med(first[hi])))
    return [f"S3 prefix on the loopback endpoint (moto): " + "; ".join(
                f"{n:,} objects: first shard {spread(first[n], '{:.1f}')} s" for n in objects),
            f"first shard {hi:,} / {lo:,} objects: {spread(ratio)}x (target <= 1.5x); per 1M more objects "
            f"{per_m_s:+.1f} s; a 10M-object prefix's first answer after about {med(first[hi]) + 9.9 * per_m_s:.0f} s "
            "(a sequential listing in the driver: 10,000 list requests first)"]


def reruns(args, images, tmp: Path, env) -> list[str]:
    import pyarrow.parquet as pq

    from medray.infer.ledger import build_done_index

    n = args.rerun_rows
    write_manifest(tmp / "r.jsonl", n, images)
    out = tmp / "out-r"
    run = [*ARGS, "--input", str(tmp / "r.jsonl")]
    first = run_until(run, str(out), env=env, window_s=None)
    assert first["rc"] == 0, first
    print(f"first run of {n} rows: {first['total_s']:.0f} s")
    index = build_done_index(str(out))
    assert index.rows == n and index.legacy_shards == 0, index
    again, missing_ok = [], []
    for r in range(args.repeat):
        got = run_until(run, str(out), env=env, window_s=None)
        assert got["rc"] == 0 and "0 rows (" in got["out"], got["out"]
        again.append(got["total_s"])
        print(f"rerun {r + 1}: {got['total_s']:.1f} s")
    for r in range(args.repeat):
        shards = sorted(out.glob("part-*"))
        random.Random(r).shuffle(shards)
        gone, ids = 0, set()
        for s in shards:
            if gone >= n // 100:
                break
            ids |= set(pq.read_table(s, columns=["id"]).column("id").to_pylist())
            gone = len(ids)
            s.unlink()
        got = run_until(run, str(out), env=env, window_s=None)
        ok = got["rc"] == 0 and f"{gone} rows (0 errors, {n - gone} already done)" in got["out"]
        missing_ok.append(ok)
        print(f"1 % missing, run {r + 1}: {gone} rows deleted, rerun {got['total_s']:.1f} s, answered exactly "
              f"those: {ok}")
    share = [100 * a / first["total_s"] for a in again]
    return [f"finished {n:,}-row run: first run {first['total_s']:.0f} s (1 run, {n / first['total_s']:.0f} rows/s); "
            f"rerun {spread(again, '{:.1f}')} s = {spread(share, '{:.1f}')} % of it (target < 10 %); its index read "
            f"ids only ({index.legacy_shards} of {index.shards} shards read in full); per 1M rows "
            f"{sorted(again)[len(again) // 2] * 1e6 / n:.0f} s",
            f"rerun with ~1 % of the rows missing: answered exactly the missing rows in {sum(missing_ok)} of "
            f"{len(missing_ok)} runs"]


def vllm_against_peer(args, tmp: Path) -> list[str]:
    from infer import write_random_llava  # bench/infer.py: the small geometry, in the layout vLLM reads

    from medray.infer import InferConfig, run_inference

    vllm_python = os.environ.get("MEDRAY_VLLM_PYTHON")
    if not vllm_python:
        raise SystemExit("set MEDRAY_VLLM_PYTHON to vLLM's interpreter (make vllm: .venv-vllm/bin/python)")
    model = write_random_llava(str(tmp / "llava"))
    images = write_images(tmp / "vimg", args.vllm_images)
    sizing = {"max_model_len": 512, "max_num_seqs": 32, "kv_cache_gib": 0.25, "dtype": "float32"}
    new_tokens = 32
    job = tmp / "peer.json"
    job.write_text(json.dumps({"model": model, "images": images, "question": QUESTION, "max_tokens": new_tokens,
                               "max_num_seqs": sizing["max_num_seqs"], "max_model_len": sizing["max_model_len"],
                               "kv_cache_bytes": int(sizing["kv_cache_gib"] * 2**30), "repeat": args.repeat}))
    peer_env = {**os.environ, "OMP_NUM_THREADS": str(args.vllm_cpus), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([vllm_python, str(Path(__file__).with_name("_vllm_peer.py")), str(job)], env=peer_env,
                          capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the vLLM peer failed:\n{done.stderr[-3000:]}")
    peer = json.loads(line[len("RESULT "):])
    print(f"vLLM LLM.chat: {peer['images_per_s']} images/s, {peer['tokens_per_answer']} tokens per answer")

    def pipeline(out: Path):
        cfg = InferConfig(model=model, input=str(tmp / "vimg"), output=str(out), task="vqa", question=QUESTION,
                          max_new_tokens=new_tokens, engine="vllm", vllm=sizing, cpus_per_actor=args.vllm_cpus,
                          rows_per_shard=args.vllm_rows_per_shard, batch_size=32)
        summary = run_inference(cfg, progress=False)
        assert summary.rows == len(images) and summary.errors == 0, summary.line()
        return summary

    pipeline(tmp / "vwarm")
    steady, whole = [], []
    for r in range(args.repeat):
        summary = pipeline(tmp / f"vout-{r}")
        whole.append(summary.rows_per_s)
        steady.append((summary.rows - summary.first_rows) / (summary.seconds - summary.first_rows_s))
        print(f"pipeline (vllm) run {r + 1}: {summary.rows_per_s:.2f} images/s end to end, {steady[-1]:.2f} steady")
    ratio = [p / q for p, q in zip(steady, peer["images_per_s"])]
    return [f"engine vllm, random LLaVA (small geometry, 64 image tokens), {len(images)} images, up to {new_tokens} "
            f"new tokens, {args.vllm_cpus} CPU(s) for the engine, {args.vllm_rows_per_shard} rows per shard: "
            f"vLLM's own LLM.chat {spread(peer['images_per_s'], '{:.2f}')} images/s "
            f"({spread(peer['tokens_per_answer'], '{:.1f}')} new tokens per answer); the pipeline "
            f"{spread(steady, '{:.2f}')} steady, {spread(whole, '{:.2f}')} end to end (its engine's start included)",
            f"pipeline / vLLM alone: {spread(ratio)}x (target >= 0.8x)"]


if __name__ == "__main__":
    main()
