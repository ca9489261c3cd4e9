"""`medray demo`, the README's first command, end to end as a user runs it (a subprocess with
nothing configured): train, batch VQA before and after, evaluate, serve one request."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
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
    # Nothing a newcomer cannot act on (each was on this output once; raycluster says whose).
    for noise in ("max_restarts", "Token authentication", "will not be applied", "requires torchvision",
                  "deprecated", "Traceback"):
        assert noise not in out.stdout + out.stderr, (noise, out.stderr[-3000:])
    for part in ("corpus", "runs/demo/align", "runs/demo/instruct", "answers/untrained", "answers/trained",
                 "eval/untrained", "eval/trained", "report.html"):
        assert str(results / part) in summary, part
        assert (results / part).exists(), part  # there after the demo (and its S3 store) ended
    assert not list(results.rglob("_ray"))  # Ray Train's run state stays behind
    assert "s3://medray-demo" not in summary
    before, after = map(float, re.search(r"overall accuracy ([\d.]+) untrained -> ([\d.]+) trained",
                                         summary).groups())
    assert after - before >= 0.3, summary  # the demo checks this itself; so does its test
    # The same figure, by the same name, per eval in the summary and in the report.
    assert re.search(rf"overall {after:.2f}: closed accuracy [\d.]+, open exact match [\d.]+", summary), summary
    served = re.search(r"Is there an opacity\? -> '(\w+)' \(reference '(\w+)'\)", summary)
    assert served, summary  # one request answered over HTTP by the Serve app
    assert "http://127.0.0.1" not in summary.split("Serve the trained model")[0]  # no URL of an app gone since
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
    for want in ("stage align", "stage instruct", "before training (base model tiny://llava-mistral)",
                 "after stage instruct", "reference:", "learning rate 0.0", "steps 400", "schedule constant",
                 "max_new_tokens 6", "decoding greedy", f"{100 * after:.1f} %"):
        assert want in text, want
    assert "s3://" not in page.content()  # the store the demo ran on is gone: the page names the copy
    assert page.evaluate("document.querySelectorAll('figure img.thumb').length") == 12
    assert sum("training loss" in alt for alt, _ in images) == 2
    marks = page.evaluate("[...document.querySelectorAll('figcaption')].map(f => f.innerText)")
    assert any(("where" in m.lower() or "which" in m.lower()) and "✓" in m for m in marks), marks  # open ones too

    # The README's serving step, as the summary prints it: the trained model, served with a
    # local job store, answers a held-out DICOM's question correctly in the web page.
    command = re.search(r"MEDRAY_API_KEYS=(\S+) (\S+) serve (\S+)", summary)
    example = re.search(r"e\.g\. (\S+\.dcm): '([^']+)' \(reference '(\w+)'\)", summary)
    assert command and example, summary
    key, _, config = command.groups()
    dicom, question, reference = example.groups()
    assert Path(config) == results / "serve.yaml" and Path(dicom).is_file()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        served = subprocess.Popen([str(exe), "serve", config], stdout=out, stderr=subprocess.STDOUT,
                                  env={**env, "MEDRAY_API_KEYS": key})
    try:
        for _ in range(240):  # the address the summary gives; the page waits for the model to load
            try:
                if page.goto("http://127.0.0.1:8000/").ok:
                    break
            except Exception:  # not listening yet
                pass
            assert served.poll() is None, log.read_text()[-3000:]  # (HAProxy answers 503 before the app is up)
            time.sleep(0.5)
        page.fill("#key", key)
        page.dispatch_event("#key", "change")
        page.wait_for_function("!document.getElementById('ask').disabled && "
                               "document.querySelector('#model').value === 'medray-demo'", timeout=180_000)
        page.set_input_files("#image", dicom)
        page.fill("#question", question)
        page.fill("#max-tokens", "6")  # as the demo's batch runs asked
        page.click("#ask")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=120_000)
        shown = page.inner_text("#answer")
        from medray.eval import corrected_closed_hit, open_hit

        right = corrected_closed_hit(shown, reference) if reference in ("yes", "no") else open_hit(shown, reference)
        assert right, (shown, reference)
        served.send_signal(signal.SIGTERM)
        assert served.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if served.poll() is None:
            served.kill()


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
