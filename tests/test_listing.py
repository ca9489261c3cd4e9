"""A corpus listed and read inside the pipeline: key ranges listed by several tasks, manifests
streamed in blocks, resume from an index of ids, digests summed block by block.

Fixtures are written here by hand, in the formats' own terms (S3 keys, JSON lines, Parquet
written by pyarrow, the shard format of before this change), not by medray's writers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray import provenance, storage
from medray.data.shards import read_shards
from medray.data.synthetic import chest_image, png_bytes
from medray.infer import InferConfig, run_inference

QUESTION = "Is there an opacity?"


def _cfg(**kw) -> InferConfig:
    base = dict(model="tiny://llava-mistral", task="vqa", question=QUESTION, max_new_tokens=1, batch_size=16,
                rows_per_shard=32)
    base.update(kw)
    return InferConfig(**base)


def _set_digest_by_hand(pairs) -> str:
    """The documented set digest: sum of sha256 over each canonical JSON [id, answer], mod 2**256."""
    total = sum(int.from_bytes(hashlib.sha256(json.dumps([str(i), str(a)], separators=(",", ":")).encode()).digest(),
                               "big") for i, a in pairs) % (1 << 256)
    return f"sha256-set:{len(pairs)}:{total:064x}"


# ----------------------------------------------------------------------------- key ranges
LAYOUTS = {
    # MIMIC-CXR's tree: files/p10..p19/p<patient>/s<study>/<dicom id>.jpg
    "tree": [f"files/p1{i % 10}/p1{i % 10}{i:06d}/s{50000 + i}/{i:08x}.jpg" for i in range(1500)],
    # one flat level, decimal names past a page (1,000 keys)
    "flat": [f"{i:06d}.png" for i in range(2500)],
    # hex names with a shared lead, a non-image key and a lone subfolder
    "hex": [f"img_{hashlib.md5(str(i).encode()).hexdigest()[:12]}.dcm" for i in range(1200)] + ["notes.txt", "a/b.png"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_prefix_split_into_ranges_lists_every_key_once(bucket, tmp_path, layout):
    from concurrent.futures import ThreadPoolExecutor

    keys = LAYOUTS[layout]
    client = storage.default_storage().client
    name = bucket[len("s3://"):]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=name, Key=f"c/{k}", Body=b"x"), keys))
    for k in keys:
        (tmp_path / k).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / k).write_bytes(b"x")
    for prefix, uri_of in ((f"{bucket}/c", lambda k: f"{bucket}/c/{k}"), (str(tmp_path), lambda k: str(tmp_path / k))):
        ranges = storage.split_prefix(prefix, 32)
        pages = [[f.uri for f in page] for r in ranges for page in storage.list_range(r)]
        listed = [u for page in pages for u in page]
        assert sorted(listed) == sorted(uri_of(k) for k in keys) and len(set(listed)) == len(keys), prefix
        assert max(len(p) for p in pages) <= 1000  # a page at a time
        if layout in ("tree", "flat"):
            assert len(ranges) > 1, (prefix, ranges)  # listed by several tasks
        # Contiguous, from the start to the end: a key the probes never saw still has a range.
        assert ranges[0].start == "" and ranges[-1].end is None
        assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))


def test_a_prefix_listed_by_several_tasks_answers_every_image_once(ray_cluster, bucket):
    img = png_bytes(chest_image("left", 64))
    wanted = [f"scans/site{s}/{i:04d}.png" for s in range(4) for i in range(30)]
    others = ["scans/site0/readme.txt", "scans/site1/skip/0001.png", "scans/site2/0000.json"]
    for k in wanted + others:
        storage.write_bytes(f"{bucket}/{k}", img)
    cfg = _cfg(input=f"{bucket}/scans", output=f"{bucket}/out", exclude="*/skip/*")
    from medray.infer.sources import plan_parts

    assert len(plan_parts(cfg)) >= 4  # one range per site at least
    seen = []
    summary = run_inference(cfg, progress=False, on_progress=seen.append)
    rows = read_shards(f"{bucket}/out")
    assert Counter(r["id"] for r in rows) == Counter(k[len("scans/"):] for k in wanted)  # each once, no others
    assert (summary.rows, summary.errors, summary.skipped) == (120, 0, 0)
    assert seen[-1].rows_total == 120 and seen[-1].rows_done == 120 and seen[-1].rows_listed == 120
    # The record's digests are sums over rows, recomputed here by hand.
    made = provenance.read(f"{bucket}/out")
    assert made.output.digest == _set_digest_by_hand([(r["id"], r["answer"]) for r in rows])
    # A listed image's row: its id and URI, no question, references or adapter of its own.
    listing = sum(int.from_bytes(hashlib.sha256(json.dumps([r["id"], r["image"], "", "", ""],
                                                           separators=(",", ":")).encode()).digest(), "big")
                  for r in rows) % (1 << 256)
    assert made.input("input").digest == f"sha256-set:120:{listing:064x}"


# ----------------------------------------------------------------------------- manifests
def _write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        p.write_bytes(png_bytes(chest_image(("left", "right", "none")[i % 3], 32 + (i % 5) * 8)))
        paths.append(str(p))
    return paths


def test_a_200k_row_manifest_streams_the_first_shard_before_it_is_read(ray_cluster, tmp_path):
    import psutil

    images = _write_images(tmp_path / "img", 40)
    manifest = tmp_path / "manifest.jsonl"
    with open(manifest, "w") as f:  # LLaVA-Med's question-file form, by hand
        for i in range(200_000):
            f.write(json.dumps({"question_id": f"q{i:06d}", "image": images[i % len(images)], "text": QUESTION}) + "\n")
    # A small run first, so that what the driver loads once (Ray Data's executor) is not counted.
    warm = tmp_path / "warm.jsonl"
    warm.write_text("".join(line + "\n" for line in manifest.read_text().splitlines()[:40]))
    run_inference(_cfg(input=str(warm), output=str(tmp_path / "warm-out")), progress=False)

    me = psutil.Process()
    base = me.memory_info().rss
    peak, running = [base], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    cfg = _cfg(input=str(manifest), output=str(tmp_path / "out"), max_rows_ahead=30_000)
    at_first: list = []

    class Enough(Exception):
        pass

    def stop_at_first_shards(p):
        if p.rows_done >= 64:
            at_first.append(p)
            raise Enough()

    try:
        with pytest.raises(Enough):
            run_inference(cfg, progress=False, on_progress=stop_at_first_shards)
    finally:
        running[0] = False
    p = at_first[0]
    # Not read to its end when the first shards were written: the listing waits for the answers.
    assert p.rows_total is None and 64 <= p.rows_listed <= cfg.rows_ahead() + 2_000, p
    growth_mb = (peak[0] - base) / 2**20
    # Listed into a driver list, 200k rows cost ~1.5 KB each (~300 MB); streamed, nothing per row.
    assert growth_mb < 150, f"driver RSS grew {growth_mb:.0f} MB"
    written = read_shards(str(tmp_path / "out"))
    assert len(written) >= 64 and len({r["id"] for r in written}) == len(written)


def test_the_listing_runs_ahead_by_the_start_bound_until_a_first_shard_is_written():
    from medray.digests import SetDigest
    from medray.infer.ledger import RunLedger

    ledger = RunLedger(2, ahead_at_start=1_000, ahead=5_000)
    ledger.begin(0)
    ledger.add(0, 900, 0, str(SetDigest()))
    assert ledger.may_list()
    ledger.add(0, 600, 100, str(SetDigest()))  # 1,400 to answer, none written: the start bound holds
    assert not ledger.may_list()
    ledger.wrote(256)  # the first shard: now up to 5,000 ahead
    assert ledger.may_list()
    ledger.add(0, 4_000, 0, str(SetDigest()))
    assert ledger.ahead() == 5_144 and not ledger.may_list()
    cfg = _cfg(input="x", output="y", rows_per_shard=256, max_actors=2, max_rows_ahead=1)
    assert cfg.rows_ahead_at_start() == cfg.rows_ahead() == 4 * 256 * 2 + 20_000  # never below what fills the first shards


def test_a_parquet_manifest_is_read_in_parts_with_only_the_columns_a_record_reads(ray_cluster, tmp_path):
    images = _write_images(tmp_path / "img", 12)
    n = 300
    table = pa.table({"id": [f"r{i}" for i in range(n)], "image": [images[i % 12] for i in range(n)],
                      "question": [QUESTION] * n, "answer": ["yes"] * n,
                      # a column no record reads, which must stay on disk: embedded report text
                      "report_text": ["x" * 2000] * n})
    path = tmp_path / "manifest.parquet"
    pq.write_table(table, path, row_group_size=50)
    from medray.data.streams import read_part, split_records_file

    parts = split_records_file(str(path), 4)  # 6 row groups of 50 rows: 3 parts of 2
    assert [(p.row_groups, p.first_row) for p in parts] == [((0, 1), 0), ((2, 3), 100), ((4, 5), 200)]
    rows = [r for part in parts for page in read_part(part) for r in page]
    assert [n for n, _ in rows] == list(range(300)) and all("report_text" not in r for _, r in rows)
    summary = run_inference(_cfg(input=str(path), output=str(tmp_path / "out")), progress=False)
    assert (summary.rows, summary.errors) == (300, 0)
    got = read_shards(str(tmp_path / "out"))
    assert sorted(r["id"] for r in got) == sorted(f"r{i}" for i in range(n))
    assert {json.loads(r["references"]) for r in got} == {"yes"}


def test_a_manifest_row_that_is_not_json_fails_alone(ray_cluster, tmp_path):
    images = _write_images(tmp_path / "img", 3)
    manifest = tmp_path / "m.jsonl"
    lines = [json.dumps({"id": f"a{i}", "image": images[i % 3], "question": QUESTION}) for i in range(10)]
    lines[4] = '{"id": "a4", "image": '  # cut off
    manifest.write_text("\n".join(lines) + "\n")
    summary = run_inference(_cfg(input=str(manifest), output=str(tmp_path / "out")), progress=False)
    assert (summary.rows, summary.errors) == (10, 1)
    rows = {r["id"]: r for r in read_shards(str(tmp_path / "out"))}
    assert "not JSON" in rows["4"]["error"] and all(rows[f"a{i}"]["answer"] for i in range(10) if i != 4)


# ----------------------------------------------------------------------------- crashes and resume
def _medray_infer(args: list[str], cluster) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("medray")
    env = {**os.environ, "RAY_ADDRESS": cluster.get_runtime_context().gcs_address}
    return subprocess.Popen([str(exe), "infer", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_stable(output: Path) -> None:
    """Until no shard has appeared for 5 s: a dead driver's actor may finish the shard it was
    writing (atomically)."""
    seen, since = -1, time.monotonic()
    while time.monotonic() - since < 5:
        now = len(list(output.glob("part-*")))
        if now != seen:
            seen, since = now, time.monotonic()
        time.sleep(0.2)


def test_crashes_at_several_points_then_a_rerun_give_every_row_once_and_the_same_digests(ray_cluster, tmp_path):
    images = _write_images(tmp_path / "img", 25)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"x{i:05d}", "image": images[i % 25], "question": QUESTION}) + "\n"
                                for i in range(5000)))
    args = ["--model", "tiny://llava-mistral", "--input", str(manifest), "--task", "vqa", "--max-new-tokens", "1",
            "--batch-size", "32", "--rows-per-shard", "64"]
    whole = tmp_path / "whole"
    assert subprocess.run([str(Path(sys.executable).with_name("medray")), "infer", *args, "--output", str(whole)],
                          env={**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address},
                          capture_output=True).returncode == 0
    out = tmp_path / "out"
    # The driver killed early (a few shards in) and again half-way, a generation actor killed
    # in between: each rerun takes only the rows missing.
    for kill_at in (2, 40):
        proc = _medray_infer([*args, "--output", str(out)], ray_cluster)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list(out.glob("part-*"))) < kill_at:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_stable(out)
    done_before = len(read_shards(str(out)))
    assert 40 * 32 <= done_before < 5000  # shards of 64 rows, or of fewer where Ray Data's bundles split
    killed, shards_before = [], len(list(out.glob("part-*")))

    def kill_an_actor():
        import psutil

        while not killed:
            for p in psutil.process_iter(["cmdline"]):
                if any("MapBatches(PackedGenerator)" in part for part in (p.info["cmdline"] or [])):
                    if len(list(out.glob("part-*"))) > shards_before + 3:
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                        return
            time.sleep(0.1)

    threading.Thread(target=kill_an_actor, daemon=True).start()
    summary = run_inference(_cfg(input=str(manifest), output=str(out), batch_size=32, rows_per_shard=64, question=None),
                            progress=False)
    struck, _ = list(killed), killed.append(0)  # (stops the thread if it never struck)
    assert struck, "no generation actor was killed during the rerun"
    assert summary.skipped == done_before and summary.rows == 5000 - done_before
    counts = Counter(r["id"] for r in read_shards(str(out)))
    assert len(counts) == 5000 and max(counts.values()) == 1
    a, b = provenance.read(str(out)), provenance.read(str(whole))
    assert a.output.digest == b.output.digest and a.input("input").digest == b.input("input").digest
    assert a.finished_at and a.output.digest.startswith("sha256-set:5000:")

    # A rerun of the finished output writes nothing and reads no answer column.
    again = run_inference(_cfg(input=str(manifest), output=str(out), batch_size=32, rows_per_shard=64, question=None),
                          progress=False)
    assert (again.rows, again.skipped) == (0, 5000)
    assert provenance.read(str(out)).output.digest == b.output.digest


def test_an_output_written_before_this_change_resumes(ray_cluster, tmp_path):
    """Today's shards (Parquet without a footer digest, and JSONL) and today's record with the
    old answers digest, written by hand: the rerun answers only the rest and records the set
    digest of all of them."""
    images = _write_images(tmp_path / "img", 10)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"k{i}", "image": images[i % 10], "question": QUESTION}) + "\n"
                                for i in range(40)))
    out = tmp_path / "out"
    out.mkdir()
    columns = ["id", "image", "question", "answer", "references", "model", "generation", "latency_s",
               "completion_tokens", "error", "image_type", "expert_text"]

    def old_rows(ids):
        return [{"id": i, "image": images[int(i[1:]) % 10], "question": QUESTION, "answer": f"old-{i}",
                 "references": "", "model": "tiny://llava-mistral", "generation": "{}", "latency_s": 0.1,
                 "completion_tokens": 1, "error": "", "image_type": "", "expert_text": ""} for i in ids]

    def name(ids, ext):
        return "part-" + hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:20] + ext

    first, second = [f"k{i}" for i in range(0, 12)], [f"k{i}" for i in range(12, 20)]
    rows = old_rows(first)
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), out / name(first, ".parquet"))
    (out / name(second, ".jsonl")).write_text("".join(json.dumps(r) + "\n" for r in old_rows(second)))
    cfg = _cfg(input=str(manifest), output=str(out))
    settings = cfg.model_dump(mode="json", include={"task", "question", "max_new_tokens", "temperature", "top_p",
                                                     "stop", "seed", "engine", "experts", "max_pixels"})
    old_digest = "sha256:" + hashlib.sha256(json.dumps(
        sorted((i, f"old-{i}") for i in first + second), separators=(",", ":")).encode()).hexdigest()
    record = {"schema": "medray.provenance/1", "kind": "inference", "name": "out",
              "inputs": [{"role": "model", "uri": "tiny://llava-mistral",
                          "digest": provenance.digest_model("tiny://llava-mistral")},
                         {"role": "input", "uri": str(manifest), "digest": "sha256:" + "0" * 64}],
              "settings": settings, "settings_hash": provenance.hash_json(settings),
              "output": {"role": "answers", "uri": str(out), "digest": old_digest},
              "made_by": {"medray": "0.1.0", "git_commit": None, "python": "3.11.7", "packages": {}},
              "started_at": "2026-12-01T00:00:00+00:00", "finished_at": None}
    (out / "_provenance.json").write_text(json.dumps(record))

    summary = run_inference(cfg, progress=False)
    assert (summary.rows, summary.skipped) == (20, 20)
    got = read_shards(str(out))
    counts = Counter(r["id"] for r in got)
    assert len(counts) == 40 and max(counts.values()) == 1
    answers = {r["id"]: r["answer"] for r in got}
    assert all(answers[i] == f"old-{i}" for i in first + second)  # old answers kept as they were
    made = provenance.read(str(out))
    assert made.output.digest == _set_digest_by_hand(list(answers.items()))
