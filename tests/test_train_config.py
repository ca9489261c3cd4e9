"""Curriculum manifests: validation, overrides, and every shipped manifest loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from medray.train import Curriculum, ManifestError, load_manifest
from medray.train._data import StepSampler
from medray.train.strategies import lr_lambda

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "manifests").rglob("*.yaml"))
TRAIN_MANIFESTS = [m for m in MANIFESTS if "serve" not in m.parts]


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    return p


BASE = """
base_model: tiny://llava-mistral
output: /tmp/x
stages:
  - name: align
    data: {synthetic: {kind: chest-captions, n: 32}}
    train: [projector]
    micro_batch_size: 4
    workers: 2
"""


@pytest.mark.parametrize("path", TRAIN_MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_manifest_validates(path):
    cur = load_manifest(path, ["output=/tmp/elsewhere"])
    assert cur.output == "/tmp/elsewhere" and cur.stages
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "each manifest starts with a comment saying what it is"
    assert "medray train" in path.read_text() or "ray job submit" in path.read_text()


def test_tiny_llava_med_has_align_then_instruct():
    cur = load_manifest(REPO / "manifests/tiny/llava-med.yaml")
    assert [s.name for s in cur.stages] == ["align", "instruct"]
    assert cur.stages[0].train == ["projector"] and sorted(cur.stages[1].train) == ["llm", "projector"]


def test_seed_recipes_carry_published_hyperparameters():
    llava = load_manifest(REPO / "manifests/llava-med/curriculum.yaml")
    s1, s2 = llava.stages[:2]
    assert (s1.lr, s1.epochs, s1.global_batch_size, s1.train) == (2e-3, 1, 128, ["projector"])
    assert (s2.lr, s2.epochs, s2.strategy, s2.schedule, s2.warmup_ratio, s2.max_length, s2.precision,
            s2.gradient_checkpointing) == (2e-5, 3, "fsdp", "cosine", 0.03, 2048, "bf16", True)
    alpaca = load_manifest(REPO / "manifests/med-alpaca/lora.yaml").stages[0]
    assert (alpaca.global_batch_size, alpaca.lr, alpaca.epochs, alpaca.max_length) == (128, 1e-4, 3, 512)
    baby = load_manifest(REPO / "manifests/babydoctor/lora-qlora.yaml").stages
    assert [s.quantization for s in baby] == ["none", "nf4"] and all(s.epochs == 1 for s in baby)
    bimedix = load_manifest(REPO / "manifests/bimedix/qlora.yaml").stages[0]
    assert bimedix.quantization == "nf4" and "gate" in bimedix.lora.target_modules
    assert bimedix.lora.target_parameters == ["experts.gate_up_proj", "experts.down_proj"]


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ManifestError, match=r"unknown key 'stages.0.learning_rate'"):
        load_manifest(_write(tmp_path, BASE + "    learning_rate: 0.1\n"))
    with pytest.raises(ManifestError, match=r"unknown key 'outptu'"):
        load_manifest(_write(tmp_path, BASE.replace("output:", "outptu:")))


def test_overrides_address_stages_by_name_or_index(tmp_path):
    p = _write(tmp_path, BASE)
    cur = load_manifest(p, ["output=s3://b/run", "stages.align.max_steps=5", "stages.0.lr=0.01"])
    assert (cur.output, cur.stages[0].max_steps, cur.stages[0].lr) == ("s3://b/run", 5, 0.01)
    with pytest.raises(ManifestError, match="no stage 'nope'"):
        load_manifest(p, ["stages.nope.lr=1"])
    with pytest.raises(ManifestError, match="expected key=value"):
        load_manifest(p, ["output"])


def test_batch_arithmetic(tmp_path):
    p = _write(tmp_path, BASE)
    cur = load_manifest(p, ["stages.align.global_batch_size=32"])
    assert cur.stages[0].accum == 4 and cur.stages[0].examples_per_step == 32
    with pytest.raises(ManifestError, match="not a multiple"):
        load_manifest(p, ["stages.align.global_batch_size=30"])
    with pytest.raises(ManifestError, match="contradicts"):
        load_manifest(p, ["stages.align.global_batch_size=32", "stages.align.grad_accum=2"])


@pytest.mark.parametrize("patch,message", [
    ("stages.align.train=[]", "trains nothing"),
    ("stages.align.quantization=nf4", "add `lora`"),
    ("stages.align.train=[retina]", "stages.0.train.0"),
    ("stages.align.lr=0", "lr"),
    ("stages.align.offload_params=true", "deepspeed_zero3"),
    ("stages.align.name=bad/name", "name"),
])
def test_invalid_stages_are_explained(tmp_path, patch, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_write(tmp_path, BASE), [patch])


def test_fingerprint_ignores_bookkeeping_but_not_hyperparameters(tmp_path):
    p = _write(tmp_path, BASE)
    a = load_manifest(p)
    assert a.fingerprint(0) == load_manifest(p, ["stages.align.log_every=3", "output=/elsewhere"]).fingerprint(0)
    assert a.fingerprint(0) != load_manifest(p, ["stages.align.lr=0.5"]).fingerprint(0)


def test_sampler_covers_each_epoch_once_and_is_addressable():
    s = StepSampler(50, world=2, micro_batch=3, accum=2, seed=7)
    assert s.steps_per_epoch == 4  # 12 examples per step; the 2 left over sit this epoch out
    seen = [i for step in range(4) for m in range(2) for r in range(2) for i in s.indices(step, m, r)]
    assert len(seen) == len(set(seen)) == 48
    assert s.indices(5, 1, 1) == StepSampler(50, world=2, micro_batch=3, accum=2, seed=7).indices(5, 1, 1)
    assert s.indices(4, 0, 0) != s.indices(0, 0, 0)  # a new permutation each epoch


def test_schedule_warms_up_then_decays():
    from medray.train import StageConfig

    stage = StageConfig.model_validate({"name": "s", "data": {"records": "x.jsonl"}, "train": ["llm"],
                                        "warmup_ratio": 0.1, "schedule": "cosine"})
    f = lr_lambda(stage, 100)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0)


def test_curriculum_requires_merge_before_chaining():
    with pytest.raises(ValueError, match="merge: true"):
        Curriculum.model_validate({"base_model": "tiny://llama", "output": "/tmp/o", "stages": [
            {"name": "a", "data": {"records": "r.jsonl"}, "lora": {"merge": False}},
            {"name": "b", "data": {"records": "r.jsonl"}, "train": ["llm"]}]})


def test_records_dataset_caches_image_bytes_within_its_budget(tmp_path, monkeypatch):
    from medray import storage
    from medray.data.synthetic import write_synthetic
    from medray.train._data import RecordsDataset

    corpus = write_synthetic("chest-vqa", str(tmp_path / "c"), n=6, seed=0)
    reads = []
    real = storage.read_bytes
    ds = RecordsDataset(corpus.records)
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(uri) or real(uri))  # count image reads
    first = [ds[i] for i in range(6)]
    again = [ds[i] for i in range(6)]
    assert len(reads) == 6  # the second epoch is served from the cache
    assert [e.messages for e in first] == [e.messages for e in again]
    small = RecordsDataset(corpus.records, cache_bytes=1)  # nothing fits: every read goes out
    reads.clear()
    [small[i] for i in range(6)] + [small[i] for i in range(6)]
    assert len(reads) == 12 and small.cached == 0


def test_records_without_answers_are_refused_for_training(tmp_path):
    from medray.train._data import RecordsDataset

    (tmp_path / "images.jsonl").write_text('{"id": "1", "image": "a.png"}\n')
    (tmp_path / "questions.jsonl").write_text('{"question_id": 1, "image": "a.png", "text": "Where?"}\n')
    for name in ("images.jsonl", "questions.jsonl"):
        with pytest.raises(ValueError, match="no answer to learn"):
            RecordsDataset(str(tmp_path / name))


def _pixels_of(png: bytes, colour: str):
    """(row, col) of the pixels of one exact colour (a chart's series colour)."""
    import io

    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return np.argwhere((np.abs(arr - rgb).sum(axis=-1) <= 6)), arr.shape


def test_loss_chart_starts_at_zero_and_shows_epochs():
    """A small drop reads as small: the y-axis starts at 0 (not at the curve's minimum); a
    0.08 drop from 2.3 spans a few pixels, not the whole height. With epochs logged, they get
    an axis of their own, and the chart keeps its size."""
    from medray.charts import LINE
    from medray.train.metrics import MetricsLog

    log = MetricsLog([{"step": s, "loss": 2.3 - 0.01 * s} for s in range(1, 9)])
    line, shape = _pixels_of(log.loss_png("t", size=(640, 360)), LINE)
    assert shape[:2] == (360, 640) and len(line) > 100
    rows = line[:, 0]
    assert rows.max() - rows.min() < 0.1 * 360  # the drop is 3 % of the axis
    assert rows.max() < 0.3 * 360  # near the top of the axis: 2.3 of about 2.5
    with_epochs = MetricsLog([{"step": s, "epoch": s / 4, "loss": 2.3 - 0.01 * s, "lr": 1e-3 * min(1, s / 3)}
                              for s in range(1, 9)])
    top, shape = _pixels_of(with_epochs.loss_png("t"), LINE)
    assert shape[:2] == (360, 640) and top[:, 0].min() > rows.min()  # the epoch axis takes room above
    lr, _ = _pixels_of(with_epochs.lr_png("t"), LINE)
    assert lr[:, 0].max() - lr[:, 0].min() > 0.3 * 360  # warm-up from a third to the full rate


def test_eval_bars_are_to_scale_per_series():
    import numpy as np

    from medray.charts import SERIES, bars_png

    png = bars_png({"closed": {"before": 0.25, "after": 0.75}, "open": {"before": None, "after": 0.5}}, title="t")
    before, _ = _pixels_of(png, SERIES[0])
    after, _ = _pixels_of(png, SERIES[1])
    # A bar's height: the most pixels of its colour in one column (a legend patch is short).
    h = lambda px: np.bincount(px[:, 1]).max()  # noqa: E731
    assert len(before) and len(after)
    assert 2.6 < h(after) / h(before) < 3.4  # 75 % against 25 %


def test_only_complete_checkpoints_count_and_pruning_keeps_the_newest(tmp_path):
    """A checkpoint counts once every rank's manifest and every file it lists (at its size)
    are in storage; a node lost mid-upload leaves one that does not. Pruning keeps the newest
    complete ones and removes the rest, incomplete ones included."""
    import json

    from medray.train import checkpoints

    run = tmp_path / "run"

    def write(name, step, *, ranks=(0, 1), cut=None):
        d = run / name
        d.mkdir(parents=True)
        for r in ranks:
            (d / f"__{r}_0.distcp").write_bytes(b"x" * (10 + r))
            files = {f"__{r}_0.distcp": 10 + r}
            (d / f"worker-{r}.json").write_text(json.dumps({"step": step, "files": files}))
        if cut:
            (d / cut).write_bytes(b"x")  # arrived short

    write("checkpoint_a", 4)
    write("checkpoint_b", 8)
    write("checkpoint_c", 12, ranks=(0,))                      # rank 1's manifest never arrived
    write("checkpoint_d", 16, cut="__1_0.distcp")              # rank 1's shard cut short
    assert [s for s, _ in checkpoints.complete(str(run), 2)] == [4, 8]
    assert checkpoints.newest(str(run), 2)[0] == 8
    deleted = checkpoints.prune(str(run), 2, keep=1)
    assert sorted(p.rsplit("/", 1)[1] for p in deleted) == ["checkpoint_a", "checkpoint_c", "checkpoint_d"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_b"]
