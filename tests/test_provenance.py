"""Provenance: content digests of model directories, and the record every curriculum stage
keeps of what made it, followed by `medray show` down to the base model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file, save_file

from medray import provenance, storage
from medray.cli import main
from medray.data.shards import read_shards
from medray.infer import InferConfig, OutputConflict, run_inference
from medray.provenance import Provenance
from medray.models import write_tiny_model
from medray.train import StageConflict, load_manifest, run_curriculum


def _change_one_weight(model_dir: Path) -> str:
    """Add 1e-3 to one element of one tensor, rewriting the safetensors file; returns its name."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    name = sorted(k for k in tensors if k.endswith("weight") and "layers.0" in k)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, path, metadata={"format": "pt"})
    return name


def _by_hand(model_dir: Path) -> str:
    """The digest as documented, computed here without medray: sha256 over the canonical JSON
    of [name, size, sha256] for each top-level file, bookkeeping and hidden files left out."""
    entries = []
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in {
                "medray_stage.json", "_provenance.json", "medray_digest.json", "metrics.jsonl", "loss.png", "lr.png"}:
            entries.append([f.name, f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()])
    return "sha256:" + hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


def test_a_directory_digest_names_its_content_and_only_that(tmp_path, s3_server, bucket):
    model = write_tiny_model("llama", tmp_path / "m", seed=0)
    first = provenance.digest_dir(model)
    assert first == _by_hand(model)
    # Where it sits does not matter: a copy, and the same files as an S3 prefix (read
    # through medray's mirror), have the same digest.
    copy = Path(shutil.copytree(model, tmp_path / "copy"))
    assert provenance.digest_dir(copy) == first
    storage.upload_dir(model, f"{bucket}/models/m")
    assert provenance.digest_model(f"{bucket}/models/m") == first
    # Fetched once to be digested, then recorded beside the prefix: the next reader takes the
    # record while the listing still matches it, and digests again when it does not.
    recorded = json.loads(storage.read_text(f"{bucket}/models/m/medray_digest.json"))
    assert recorded["digest"] == first
    storage.write_bytes(f"{bucket}/models/m/extra.txt", b"one more file")
    assert provenance.digest_model(f"{bucket}/models/m") not in (first, None)
    # medray's bookkeeping beside a model is not the model.
    (copy / "metrics.jsonl").write_text('{"loss": 1}\n')
    (copy / "medray_stage.json").write_text("{}")
    assert provenance.digest_dir(copy) == first
    # One changed weight is another model.
    _change_one_weight(copy)
    assert provenance.digest_dir(copy) not in (first, None)
    assert provenance.digest_dir(copy) == _by_hand(copy)


def test_a_digest_computed_again_reads_only_changed_files(tmp_path, monkeypatch):
    model = write_tiny_model("llama", tmp_path / "m", seed=0)
    provenance.digest_dir(model)
    read: list[str] = []
    real = provenance._file_sha256
    monkeypatch.setattr(provenance, "_file_sha256", lambda p: read.append(p.name) or real(p))
    again = provenance.digest_dir(model)
    assert read == [] and again == _by_hand(model)
    _change_one_weight(model)
    assert provenance.digest_dir(model) == _by_hand(model)
    assert read == ["model.safetensors"]


def _manifest(path: Path, base: Path, output: Path) -> Path:
    stage = {"data": {"synthetic": {"kind": "text-qa", "n": 16, "seed": 1}}, "train": ["llm"], "lr": 2e-3,
             "micro_batch_size": 4, "global_batch_size": 4, "max_steps": 2, "max_length": 64,
             "checkpoint_every": 100, "log_every": 1, "workers": 1, "cpus_per_worker": 1}
    path.write_text(yaml.safe_dump({"base_model": str(base), "output": str(output), "seed": 0,
                                    "stages": [{"name": "first", **stage}, {"name": "second", **stage}]}))
    return path


def _printed_json(capsys) -> dict:
    """What `medray show --json` printed. In this process, which also drives the session's Ray,
    Ray's driver thread may print a raylet warning into the same stdout ("N worker processes
    have been started"); a `medray show` of its own runs without Ray and prints the JSON alone."""
    lines = [x for x in capsys.readouterr().out.splitlines() if "(raylet)" not in x]
    return json.loads("\n".join(lines))


def test_every_stage_records_what_made_it_and_a_changed_base_changes_every_digest(ray_cluster, tmp_path, capsys):
    base = write_tiny_model("llama", tmp_path / "base", seed=0)
    manifest = _manifest(tmp_path / "run.yaml", base, tmp_path / "run")
    run_curriculum(load_manifest(manifest))

    records = {s: provenance.read(str(tmp_path / "run" / s)) for s in ("first", "second")}
    first, second = records["first"], records["second"]
    assert first.kind == "stage" and first.name == "first"
    assert first.input("start_model").digest == _by_hand(base)
    assert first.input("manifest").digest == "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    data = first.input("data")
    assert data.digest == "sha256:" + hashlib.sha256(storage.read_bytes(data.uri)).hexdigest()
    # Each output's recorded digest is its content's, and the next stage starts from it.
    for stage, record in records.items():
        assert record.output.digest == _by_hand(tmp_path / "run" / stage), stage
        written = json.loads((tmp_path / "run" / stage / "medray_digest.json").read_text())
        assert written["digest"] == record.output.digest  # beside the model, for anyone to check
        assert record.made_by.packages["torch"] and record.made_by.medray
        assert record.settings["world_size"] == 1 and record.settings["strategy"] == "ddp"
        assert record.finished_at >= record.started_at
    assert second.input("start_model").uri == str(tmp_path / "run" / "first")
    assert second.input("start_model").digest == first.output.digest

    # `medray show` follows the chain down to the base model, with digests at each step.
    capsys.readouterr()  # what training printed in this process (DeepSpeed's first import) is not show's
    assert main(["show", str(tmp_path / "run" / "second"), "--json"]) == 0
    tree = _printed_json(capsys)
    assert (tree["name"], tree["digest"]) == ("second", second.output.digest)
    down = next(n for n in tree["inputs"] if n["role"] == "start_model")
    assert (down["kind"], down["name"], down["digest"]) == ("stage", "first", first.output.digest)
    leaf = next(n for n in down["inputs"] if n["role"] == "start_model")
    assert (leaf["uri"], leaf["digest"]) == (str(base), _by_hand(base)) and "kind" not in leaf
    assert tree["settings"]["lr"] == 2e-3 and tree["settings"]["max_steps"] == 2  # every setting, by name
    assert main(["show", str(tmp_path / "run" / "second")]) == 0
    text = capsys.readouterr().out
    assert "stage 'second'" in text and "stage 'first'" in text and _by_hand(base) in text
    # The settings that made each step, not only their hash.
    assert "settings: trains llm, learning rate 0.002, schedule cosine" in text and "steps 2" in text, text

    # Answers from the trained model, and their score: the chain goes on from them.
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": a, "answer_type": t}) + "\n"
                                 for i, (q, a, t) in enumerate([("Is there an opacity?", "yes", "CLOSED"),
                                                                ("Is the heart enlarged?", "no", "CLOSED"),
                                                                ("Which organ is shown?", "lung", "OPEN")])))
    answers = tmp_path / "answers"
    infer = InferConfig(model=str(tmp_path / "run" / "second"), input=str(questions), output=str(answers),
                        task="vqa", max_new_tokens=4, rows_per_shard=2)
    run_inference(infer, progress=False)
    made = provenance.read(str(answers))
    rows = read_shards(str(answers))
    assert made.kind == "inference" and made.input("model").digest == second.output.digest
    assert made.output.digest == provenance.digest_answers({r["id"]: r["answer"] for r in rows})
    assert made.settings["max_new_tokens"] == 4 and made.finished_at
    # Over a records file each row is asked its own question: no run-wide one is recorded.
    assert "question" not in made.settings and made.settings["question_for_rows_without_one"] is None
    # Every row, and every Parquet shard's metadata, name the weights that answered.
    assert {json.loads(r["generation"])["model_digest"] for r in rows} == {second.output.digest}
    for shard in sorted(answers.glob("part-*.parquet")):
        meta = pq.read_schema(shard).metadata[b"medray.provenance"]
        assert json.loads(meta)["inputs"][0]["digest"] == second.output.digest
    main(["eval", "--predictions", str(answers), "--references", str(questions), "--out", str(tmp_path / "eval")])
    capsys.readouterr()
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    scored = Provenance.model_validate(report["provenance"])
    assert scored.input("predictions").digest == made.output.digest
    assert report["predictions_provenance"] == made.dump()  # what answered travels with the score
    assert scored.input("references").digest == "sha256:" + hashlib.sha256(questions.read_bytes()).hexdigest()

    # eval report -> answers -> stage `second` -> stage `first` -> base model, digests at each step.
    assert main(["show", str(tmp_path / "eval"), "--json"]) == 0
    tree = _printed_json(capsys)
    assert tree["kind"] == "eval"
    hops = [tree]
    while (nxt := [n for n in hops[-1].get("inputs", []) if n["role"] in ("predictions", "model", "start_model")]):
        hops.append(nxt[0])
    assert [(h.get("kind"), h["digest"]) for h in hops[1:]] == [
        ("inference", made.output.digest), ("stage", second.output.digest), ("stage", first.output.digest),
        (None, _by_hand(base))]
    assert main(["show", str(tmp_path / "eval")]) == 0
    text = capsys.readouterr().out
    assert "eval 'eval'" in text and "inference 'answers'" in text and _by_hand(base) in text
    assert "settings: task vqa, engine hf, questions each row's own, max_new_tokens 4, decoding greedy" in text, text

    # `medray report` gathers the run: both stages' curves, the eval named by what answered
    # (found through the answers' record), and the lineage.
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report.html")]) == 0
    capsys.readouterr()
    page = (tmp_path / "report.html").read_text()
    for want in ("stage first", "stage second", "after stage second", _by_hand(base), 'alt="stage second learning rate"',
                 "learning rate 0.002", "steps 2", "max_new_tokens 4", "decoding greedy", "<th>overall</th>"):
        assert want in page, want
    assert page.count("<img ") == 5  # two curves per stage, the accuracy chart; no images to sample

    # Answers are not added to an output that other settings made ...
    with pytest.raises(OutputConflict, match=r"max_new_tokens: 4 then, 8 now"):
        run_inference(infer.model_copy(update={"max_new_tokens": 8}), progress=False)

    # One weight of the base changed: a rerun into the same output refuses and says why ...
    _change_one_weight(base)
    with pytest.raises(StageConflict, match=r"other inputs.*start_model .*base"):
        run_curriculum(load_manifest(manifest))
    # ... and the same manifest into a new output changes every digest downstream.
    run_curriculum(load_manifest(manifest, [f"output={tmp_path / 'rerun'}"]))
    for stage, record in records.items():
        again = provenance.read(str(tmp_path / "rerun" / stage))
        assert again.input("start_model").digest != record.input("start_model").digest, stage
        assert again.output.digest != record.output.digest, stage
        assert again.input("data").digest == record.input("data").digest  # the same records
    # ... the answers too: the new model may not add to the old answers, and answers it
    # gives elsewhere name it.
    changed = infer.model_copy(update={"model": str(tmp_path / "rerun" / "second")})
    with pytest.raises(OutputConflict, match=r"model .*rerun/second: sha256:\w+ then, sha256:\w+ now"):
        run_inference(changed, progress=False)
    run_inference(changed.model_copy(update={"output": str(tmp_path / "answers2")}), progress=False)
    again = provenance.read(str(tmp_path / "answers2"))
    assert again.input("model").digest == provenance.read(str(tmp_path / "rerun" / "second")).output.digest
    assert again.input("model").digest != made.input("model").digest
    assert again.input("input").digest == made.input("input").digest


def test_show_says_when_there_is_nothing_to_show(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) != 0
    assert "no medray provenance" in capsys.readouterr().err
