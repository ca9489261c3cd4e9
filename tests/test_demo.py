"""`medray demo`, the README's first command, end to end as a user runs it (a subprocess with
nothing configured): train, batch VQA before and after, evaluate, serve one request."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_trains_a_model_that_beats_the_untrained_one(tmp_path):
    exe = Path(sys.executable).with_name("medray")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MEDRAY_", "RAY_"))}
    out = subprocess.run([str(exe), "demo", "--workdir", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = out.stdout
    assert "medray demo: done" in summary
    for where in ("s3://medray-demo/corpus", "s3://medray-demo/runs/demo/align", "s3://medray-demo/runs/demo/instruct",
                  "s3://medray-demo/answers/untrained", "s3://medray-demo/answers/trained",
                  "s3://medray-demo/eval/untrained", "s3://medray-demo/eval/trained"):
        assert where in summary, where
    before, after = map(float, re.search(r"accuracy ([\d.]+) untrained -> ([\d.]+) trained", summary).groups())
    assert after - before >= 0.3, summary  # the demo checks this itself; so does its test
    served = re.search(r"Is there an opacity\? -> '(\w+)' \(reference '(\w+)'\)", summary)
    assert served, summary  # one request answered over HTTP by the Serve app
    assert any((tmp_path / "cache").rglob("*.safetensors"))  # workers loaded models through the S3 cache


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
