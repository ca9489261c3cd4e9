"""`medray demo`, the README's first command, end to end as a user runs it (a subprocess with
nothing configured): train, batch VQA before and after, evaluate, serve one request."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_trains_a_model_that_beats_the_untrained_one(tmp_path, browser_page):
    """The demo as a user runs it, then what it leaves behind as a user opens it: local paths
    in the summary, the run copied out, `medray show` down to the base model, and a report
    page that renders in Chromium with every image loaded."""
    exe = Path(sys.executable).with_name("medray")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MEDRAY_", "RAY_"))}
    results = tmp_path / "results"
    out = subprocess.run([str(exe), "demo", "--workdir", str(tmp_path / "work"), "--results", str(results)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = out.stdout
    assert "medray demo: done" in summary
    for part in ("corpus", "runs/demo/align", "runs/demo/instruct", "answers/untrained", "answers/trained",
                 "eval/untrained", "eval/trained", "report.html"):
        assert str(results / part) in summary, part
        assert (results / part).exists(), part  # there after the demo (and its S3 store) ended
    assert not list(results.rglob("_ray"))  # Ray Train's run state stays behind
    assert "s3://medray-demo" not in summary
    before, after = map(float, re.search(r"accuracy ([\d.]+) untrained -> ([\d.]+) trained", summary).groups())
    assert after - before >= 0.3, summary  # the demo checks this itself; so does its test
    served = re.search(r"Is there an opacity\? -> '(\w+)' \(reference '(\w+)'\)", summary)
    assert served, summary  # one request answered over HTTP by the Serve app
    assert any((tmp_path / "work" / "cache").rglob("*.safetensors"))  # workers loaded models through the S3 cache
    # The answers were made through the loopback S3 store: their rows name the images there.
    from medray.data.shards import read_shards

    rows = read_shards(str(results / "answers" / "trained"))
    assert rows and all(r["image"].startswith("s3://medray-demo/corpus/test/") for r in rows)

    # `medray show` on the trained answers: answers -> stage instruct -> stage align -> the tiny base.
    shown = subprocess.run([str(exe), "show", str(results / "answers" / "trained"), "--json"], capture_output=True,
                           text=True, timeout=120, env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    node, chain = json.loads(shown.stdout), []
    while node:
        chain.append(node)
        node = next((n for n in node.get("inputs", []) if n["role"] in ("model", "start_model")), None)
    assert [(n.get("kind"), n.get("name")) for n in chain] == [
        ("inference", "trained"), ("stage", "instruct"), ("stage", "align"), (None, None)]
    assert chain[-1]["uri"] == "tiny://llava-mistral" and chain[-1]["digest"].startswith("sha256:")
    # The answers by their set digest (medray.digests), the models by their files' sha256.
    assert chain[0]["digest"].startswith("sha256-set:")
    assert all(n["digest"] and n["digest"].startswith("sha256:") for n in chain[1:])

    # The report opens from disk in Chromium: no console errors, every image loaded.
    page, errors = browser_page, []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((results / "report.html").as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate("[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert images and all(ok for _, ok in images), images
    assert not errors, errors
    text = page.inner_text("body")
    for want in ("stage align", "stage instruct", "before training", "after stage instruct", "reference:"):
        assert want in text, want
    assert page.evaluate("document.querySelectorAll('figure img.thumb').length") == 12
    assert sum("training loss" in alt for alt, _ in images) == 2


def test_demo_uses_a_corpus_that_is_already_there(tmp_path):
    """--corpus PREFIX: records that exist are used as they are; missing parts are synthesized."""
    from medray.data.synthetic import write_synthetic
    from medray.demo import DemoOptions, _corpus

    mine = write_synthetic("chest-vqa", str(tmp_path / "c" / "test"), n=5, seed=3)
    before = Path(mine.records).read_bytes()
    got = _corpus(DemoOptions(corpus=str(tmp_path / "c")), str(tmp_path / "root"))
    assert got["test"] == mine.records and Path(mine.records).read_bytes() == before
    assert Path(got["align"]).is_file() and Path(got["instruct"]).is_file()
    assert not (tmp_path / "root").exists()  # nothing written outside the given corpus
