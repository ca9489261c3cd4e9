"""Batch inference on Ray Data against the loopback S3 endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from medray import provenance, storage
from medray.data.synthetic import chest_image, png_bytes, write_synthetic
from medray.data.shards import read_shards
from medray.infer import AllRowsFailed, InferConfig, run_inference
from medray.models.tiny import write_tiny_model


def _rows(output: str) -> list[dict]:
    return read_shards(output)


def _cfg(**kw) -> InferConfig:
    base = dict(model="tiny://llava-mistral", task="vqa", question="Is there an opacity?", max_new_tokens=3,
                batch_size=16, rows_per_shard=32)
    base.update(kw)
    return InferConfig(**base)


def test_200_images_in_s3_give_exactly_200_rows(ray_cluster, bucket):
    write_synthetic("chest-vqa", f"{bucket}/corpus", n=200, seed=3, dicom_fraction=0.3)
    images = [f.uri for f in storage.list_files(f"{bucket}/corpus/images")]
    assert len(images) == 200 and any(u.endswith(".dcm") for u in images)

    summary = run_inference(_cfg(input=f"{bucket}/corpus/images", output=f"{bucket}/out"), progress=False)
    assert (summary.rows, summary.errors, summary.skipped) == (200, 0, 0)
    rows = _rows(f"{bucket}/out")
    assert sorted(r["image"] for r in rows) == sorted(images)  # every image exactly once
    assert len({r["id"] for r in rows}) == 200
    assert all(r["answer"] and r["completion_tokens"] > 0 and r["model"] == "tiny://llava-mistral" for r in rows)
    assert json.loads(rows[0]["generation"])["max_new_tokens"] == 3
    assert summary.rows_per_s > 0 and summary.tokens_per_s > 0


def test_bad_files_fail_their_own_rows(ray_cluster, bucket):
    write_synthetic("chest-vqa", f"{bucket}/mixed", n=54, seed=4, dicom_fraction=0.3)
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    good_png = png_bytes(chest_image("left", 64))
    bad = {  # 6 of 60 files, 10 %
        "bad/truncated.png": good_png[:100],
        "bad/not-an-image.png": b"hello, I am text",
        "bad/truncated.dcm": ct[:3000],
        "bad/garbage.dcm": b"\x00" * 128 + b"DICM" + b"\x13" * 50,
        "bad/empty.jpg": b"",
        "bad/huge.png": png_bytes(chest_image("none", 256)),  # over max_pixels below
    }
    for name, data in bad.items():
        storage.write_bytes(f"{bucket}/mixed/images/{name}", data)

    summary = run_inference(_cfg(input=f"{bucket}/mixed/images", output=f"{bucket}/out2", max_pixels=128 * 128,
                                 format="jsonl"), progress=False)
    assert (summary.rows, summary.errors) == (60, 6)
    rows = {r["id"]: r for r in _rows(f"{bucket}/out2")}
    assert len(rows) == 60
    for name in bad:
        assert rows[name]["error"] and rows[name]["answer"] == "", name
        assert name.split("/")[1] in rows[name]["error"] or "limit" in rows[name]["error"] or "empty" in rows[name]["error"]
    assert sum(1 for r in rows.values() if not r["error"]) == 54


def test_question_file_and_per_row_questions(ray_cluster, tmp_path):
    corpus = write_synthetic("chest-vqa", str(tmp_path / "c"), n=12, seed=5)
    records = [json.loads(x) for x in Path(corpus.records).read_text().splitlines()]
    # LLaVA-Med's question-file form, as model_vqa.py reads it.
    qfile = tmp_path / "c" / "questions.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": 100 + i, "image": r["image"], "text": r["question"]}) + "\n"
                             for i, r in enumerate(records)))
    summary = run_inference(_cfg(input=str(qfile), output=str(tmp_path / "out"), question=None), progress=False)
    assert summary.rows == 12 and summary.errors == 0
    rows = {r["id"]: r for r in _rows(str(tmp_path / "out"))}
    assert sorted(rows) == sorted(str(100 + i) for i in range(12))
    assert {r["question"] for r in rows.values()} == {r["question"] for r in records}

    # Greedy decoding is deterministic: a second run into another prefix gives the same answers.
    run_inference(_cfg(input=str(qfile), output=str(tmp_path / "out-again"), question=None), progress=False)
    again = {r["id"]: r["answer"] for r in _rows(str(tmp_path / "out-again"))}
    assert again == {k: r["answer"] for k, r in rows.items()}

    # A vqa row with no question anywhere fails that row with a message (and, the only row, the run).
    qfile.write_text(json.dumps({"question_id": 1, "image": records[0]["image"]}) + "\n")
    with pytest.raises(AllRowsFailed, match="1: ValueError: no question"):
        run_inference(_cfg(input=str(qfile), output=str(tmp_path / "out-noq"), question=None), progress=False)
    (row,) = _rows(str(tmp_path / "out-noq"))
    assert "no question" in row["error"]


def _generator_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("MapBatches(PackedGenerator)" in part for part in (p.info["cmdline"] or []))]


def test_a_killed_actor_loses_no_row_and_duplicates_none(ray_cluster, bucket):
    write_synthetic("chest-vqa", f"{bucket}/kill", n=120, seed=6, dicom_fraction=0.2)
    output = f"{bucket}/out-kill"
    killed = []

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            shards = storage.list_files(output, include="part-*")
            pids = _generator_pids()
            if shards and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_inference(_cfg(input=f"{bucket}/kill/images", output=output, batch_size=8, rows_per_shard=8),
                            progress=False)
    thread.join()
    assert killed, "the generation actor was never killed"
    rows = _rows(output)
    counts = Counter(r["id"] for r in rows)
    assert len(counts) == 120 and max(counts.values()) == 1
    assert all(not r["error"] for r in rows) and summary.errors == 0


def test_an_interrupted_run_resumes_with_only_the_missing_rows(ray_cluster, tmp_path):
    from _kill import kill_once_shards_land

    write_synthetic("chest-vqa", str(tmp_path / "c"), n=96, seed=7)
    output = tmp_path / "out"
    exe = Path(sys.executable).with_name("medray")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([str(exe), "infer", "--model", "tiny://llava-mistral", "--input",
                             str(tmp_path / "c" / "images"), "--output", str(output), "--task", "vqa",
                             "--question", "Is there an opacity?", "--max-new-tokens", "3", "--batch-size", "8",
                             "--rows-per-shard", "8"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_once_shards_land(proc, output, shards=2)  # the driver dies mid-job
    done_before = len(_rows(str(output)))
    assert 0 < done_before < 96
    assert not list(output.glob(".*partial"))  # no half-written shard is visible

    summary = run_inference(_cfg(input=str(tmp_path / "c" / "images"), output=str(output), batch_size=8,
                                 rows_per_shard=8), progress=False)
    assert summary.skipped == done_before and summary.rows == 96 - done_before
    counts = Counter(r["id"] for r in _rows(str(output)))
    assert len(counts) == 96 and max(counts.values()) == 1


def test_infer_cli_and_config_errors(ray_cluster, tmp_path, capsys):
    from medray.cli import main as cli_main

    write_synthetic("chest-captions", str(tmp_path / "c"), n=4, seed=8)
    assert cli_main(["infer", "--model", "tiny://git", "--input", str(tmp_path / "c" / "images"),
                     "--output", str(tmp_path / "out"), "--task", "caption", "--max-new-tokens", "4"]) == 0
    assert "4 rows (0 errors" in capsys.readouterr().out
    assert cli_main(["infer", "--model", "tiny://llava-mistral", "--input", str(tmp_path / "c" / "images"),
                     "--output", str(tmp_path / "chat"), "--task", "chat", "--question", "Describe the findings.",
                     "--temperature", "0.7", "--seed", "3", "--max-new-tokens", "4",
                     "--preprocess-tasks", "1"]) == 0  # one preprocess task at a time: still every row
    chat = _rows(str(tmp_path / "chat"))
    assert len(chat) == 4 and all(r["question"] == "Describe the findings." and r["answer"] for r in chat)
    assert json.loads(chat[0]["generation"])["temperature"] == 0.7
    with pytest.raises(ValueError, match="chat needs --question"):
        InferConfig(model="tiny://llama", input="x", output="y", task="chat")
    # Preprocess tasks are capped by default, 2 per generation actor (see InferConfig.preprocess_tasks).
    assert InferConfig(model="m", input="x", output="y", max_actors=3).preprocess_concurrency() == 6
    assert InferConfig(model="m", input="x", output="y", preprocess_tasks=5).preprocess_concurrency() == 5
    with pytest.raises(ValueError, match="preprocess_tasks"):
        InferConfig(model="m", input="x", output="y", preprocess_tasks=0)


def _plot_png() -> bytes:
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(5, 60), (5, 5)], fill="black")
    draw.line([(5, 60), (90, 60)], fill="black")
    draw.line([(5, 50), (30, 30), (60, 40), (90, 10)], fill="blue", width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _photo_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    arr[..., 0] = 200  # strongly coloured
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_router_classifies_image_types():
    import io

    from PIL import Image

    from medray.infer.experts import ExpertsConfig, route

    cfg = ExpertsConfig()
    assert route(Image.fromarray(chest_image("left", 64)).convert("RGB"), cfg) == "radiology"
    assert route(Image.open(io.BytesIO(_plot_png())), cfg) == "plot"
    assert route(Image.open(io.BytesIO(_photo_png())), cfg) == "other"
    assert route(Image.open(io.BytesIO(_plot_png())), ExpertsConfig(plot_min_white=0.99)) == "radiology"


def test_visual_experts_mode_end_to_end(ray_cluster, tmp_path):
    from medray.cli import main as cli_main

    images = tmp_path / "mixed"
    write_synthetic("chest-vqa", str(tmp_path / "c"), n=4, seed=9, dicom_fraction=0.5)
    images.mkdir()
    for p in (tmp_path / "c" / "images").iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    (images / "chart.png").write_bytes(_plot_png())
    (images / "photo.png").write_bytes(_photo_png())

    assert cli_main(["infer", "--model", "tiny://llama", "--experts", "--radiology-expert", "tiny://git",
                     "--input", str(images), "--output", str(tmp_path / "out"), "--task", "vqa",
                     "--question", "Is there an opacity?", "--max-new-tokens", "4", "--format", "jsonl"]) == 0
    rows = {r["id"]: r for r in _rows(str(tmp_path / "out"))}
    assert len(rows) == 6 and not any(r["error"] for r in rows.values())
    assert rows["chart.png"]["image_type"] == "plot" and rows["chart.png"]["expert_text"] == ""
    assert rows["photo.png"]["image_type"] == "other" and rows["photo.png"]["expert_text"] == ""
    radiology = [r for k, r in rows.items() if k not in ("chart.png", "photo.png")]
    assert all(r["image_type"] == "radiology" and r["expert_text"] for r in radiology)
    assert all(r["completion_tokens"] > 0 and r["model"] == "tiny://llama" for r in rows.values())


def test_job_entrypoint_takes_the_cli_flags(ray_cluster, tmp_path):
    """jobs/infer.py (for `ray job submit`) runs the same pipeline with the same flags, on the
    cluster that RAY_ADDRESS names, as under `ray job submit`."""
    repo = Path(__file__).resolve().parents[1]
    write_synthetic("chest-vqa", str(tmp_path / "c"), n=3, seed=10)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, str(repo / "jobs" / "infer.py"), "--model", "tiny://llava-mistral",
                          "--input", str(tmp_path / "c" / "images"), "--output", str(tmp_path / "out"),
                          "--task", "caption", "--max-new-tokens", "3", "--format", "jsonl"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(_rows(str(tmp_path / "out"))) == 3


def test_llava_med_test_json_with_an_image_folder(ray_cluster, tmp_path, capsys):
    """LLaVA-Med's own VQA test file (conversations + answer_type), images in a separate folder,
    as its model_vqa_med.py --image-folder reads them."""
    from medray.cli import main as cli_main

    images = tmp_path / "images"
    images.mkdir()
    qa = [("left", "Is there an opacity?", "yes", "CLOSED"), ("none", "Where is the opacity?", "none", "OPEN"),
          ("right", "Is the heart enlarged?", "no", "CLOSED")]
    test = []
    for i, (side, q, a, kind) in enumerate(qa):
        (images / f"synpic{i}.png").write_bytes(png_bytes(chest_image(side, 64)))
        test.append({"id": f"vqarad-{i}", "image": f"synpic{i}.png", "answer_type": kind,
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    test.append({"id": "broken", "image": "synpic0.png", "answer_type": "OPEN", "conversations": "not a list"})
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.json").write_text(json.dumps(test))

    assert cli_main(["infer", "--model", "tiny://llava-mistral", "--task", "vqa", "--input", str(data / "test.json"),
                     "--image-folder", str(images), "--output", str(tmp_path / "out"), "--format", "jsonl",
                     "--max-new-tokens", "3"]) == 0
    rows = {r["id"]: r for r in _rows(str(tmp_path / "out"))}
    assert sorted(rows) == ["broken", "vqarad-0", "vqarad-1", "vqarad-2"]
    for i, (_, q, a, _) in enumerate(qa):
        row = rows[f"vqarad-{i}"]
        assert (row["question"], row["image"], json.loads(row["references"])) == (q, str(images / f"synpic{i}.png"), a)
        assert row["answer"] and not row["error"]
    assert "RecordError" in rows["broken"]["error"] and "conversations" in rows["broken"]["error"]

    # Without the image folder every image is missing: every row fails, and so does the run.
    capsys.readouterr()
    assert cli_main(["infer", "--model", "tiny://llava-mistral", "--task", "vqa", "--input", str(data / "test.json"),
                     "--output", str(tmp_path / "out-missing"), "--max-new-tokens", "3"]) != 0
    err = capsys.readouterr().err
    assert "all 4 rows failed" in err and "vqarad-0" in err and "synpic0.png" in err
    assert len(_rows(str(tmp_path / "out-missing"))) == 4  # the errors are written all the same


def test_the_stages_run_without_ray(tmp_path):
    """preprocess -> Generator is the pipeline minus Ray: every row lands in one shard, the bad
    one with its error."""
    import numpy as np

    from medray.infer.stages import Generator, preprocess

    corpus = write_synthetic("chest-vqa", str(tmp_path / "c"), n=3, seed=11)
    (tmp_path / "c" / "images" / "bad.png").write_bytes(b"not a png")
    images = sorted(str(p) for p in (tmp_path / "c" / "images").iterdir())
    cfg = _cfg(input=corpus.records, output=str(tmp_path / "out"), format="jsonl").model_dump(mode="json")
    n = len(images)
    batch = {"id": np.array([f"r{i}" for i in range(n)], dtype=object), "image": np.array(images, dtype=object),
             "question": np.array([""] * n, dtype=object), "references": np.array([""] * n, dtype=object),
             "error": np.array([""] * n, dtype=object)}
    written = Generator(cfg)(preprocess(batch, cfg=cfg))
    rows = {r["id"]: r for r in _rows(str(tmp_path / "out"))}
    assert sorted(rows) == [f"r{i}" for i in range(n)]
    # What the driver gets back: one row per shard, counts and the answers' set digest.
    assert (written["rows"].tolist(), written["errors"].tolist()) == ([n], [1])
    assert str(written["answers"][0]) == provenance.digest_answers({k: r["answer"] for k, r in rows.items()})
    bad = images.index(str(tmp_path / "c" / "images" / "bad.png"))
    assert "bad.png" in rows[f"r{bad}"]["error"] and rows[f"r{bad}"]["answer"] == ""
    assert all(r["answer"] and r["question"] == "Is there an opacity?" for k, r in rows.items() if k != f"r{bad}")

    # Allowed image prefixes (the job API's): an image outside them fails its row unread.
    fenced = {**cfg, "allowed_image_prefixes": [str(tmp_path / "elsewhere")]}
    out = preprocess(batch, cfg=fenced)
    assert all("outside the allowed input prefixes" in e for e in out["error"])


def test_experts_stages_run_without_ray_with_injected_engines(tmp_path):
    """The experts mode through preprocess -> Generator, no Ray: the radiology image's expert
    text reaches the LLM's prompt, the plot (no plot expert) is answered from the question
    alone, and the engines come from the injected factory."""
    import numpy as np

    from medray.infer import GenerationEngine
    from medray.engines.hf import load_engine
    from medray.infer.stages import Generator, preprocess

    made, prompts = [], []

    class Recording(GenerationEngine):
        def generate_encoded(self, encoded, settings=None, adapters=None):
            if self.loaded.family.kind == "text":
                prompts.extend(self.tokenizer.decode(e.input_ids) for e in encoded)
            return super().generate_encoded(encoded, settings, adapters)

    def engine_for(model, adapter=None):
        made.append(model)
        return Recording(load_engine(model, adapter).loaded)

    (tmp_path / "scan.png").write_bytes(png_bytes(chest_image("left", 64)))
    (tmp_path / "chart.png").write_bytes(_plot_png())
    cfg = _cfg(model="tiny://llama", input=str(tmp_path), output=str(tmp_path / "out"), format="jsonl",
               experts={"radiology": "tiny://git"}, max_new_tokens=2).model_dump(mode="json")
    images = [str(tmp_path / "scan.png"), str(tmp_path / "chart.png")]
    batch = {"id": np.array(["scan", "chart"], dtype=object), "image": np.array(images, dtype=object),
             "question": np.array(["", ""], dtype=object), "references": np.array(["", ""], dtype=object),
             "error": np.array(["", ""], dtype=object)}
    out = Generator(cfg, engine_for=engine_for).generate(preprocess(batch, cfg=cfg))
    assert made == ["tiny://llama", "tiny://git"]
    assert list(out["image_type"]) == ["radiology", "plot"] and not any(out["error"])
    scan_text = out["expert_text"][0]
    assert scan_text and out["expert_text"][1] == ""
    assert len(prompts) == 2
    assert f"Context: the radiology image shows: {scan_text}" in prompts[0] and "Is there an opacity?" in prompts[0]
    assert "Context:" not in prompts[1] and "Is there an opacity?" in prompts[1]


def test_max_model_len_defaults_to_the_model_context_and_is_refused_over_it(tmp_path, monkeypatch):
    """vLLM's own default (4,096) failed on every model with a shorter context, the tiny
    families' 2,048 among them, in an engine process where Serve buried the error. Unset, the
    engine gets none and derives the model's; set over it, the run and the deployment are
    refused when they are built, naming both lengths and the config key."""
    from transformers import LlamaConfig

    from medray.engines.vllm_sizing import VLLMOptions, check_options_for, engine_kwargs, model_context

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert VLLMOptions().max_model_len is None
    tiny = write_tiny_model("llava-mistral", tmp_path / "tiny")
    assert model_context(json.loads((tiny / "config.json").read_text())) == (2048, "max_position_embeddings")
    assert engine_kwargs(tiny, VLLMOptions(), [])["max_model_len"] is None
    with pytest.raises(ValueError, match=r"max_model_len 4096 is over the context of model tiny: 2048 tokens "
                                         r"\(max_position_embeddings in its config.json\)"):
        engine_kwargs(tiny, VLLMOptions(max_model_len=4096), [])
    with pytest.raises(ValueError, match=r"max_model_len 2049 .* 2048 tokens"):
        check_options_for(str(tiny), VLLMOptions(max_model_len=2049))
    check_options_for(str(tiny), VLLMOptions(max_model_len=2048))
    # RoPE scaling stretches the context by rules vLLM owns: no figure, no refusal from medray.
    scaled = LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 4.0}).to_dict()
    assert model_context(scaled) is None


def test_a_kv_budget_below_one_sequence_is_refused_at_start(tmp_path, monkeypatch):
    """A KV cache budget that cannot hold one max_model_len sequence is the operator's to fix,
    refused when the engine is built, saying what the budget holds: vLLM would refuse it in its
    engine-core process, advising a setting the budget overrides. Per-token sizes are the
    published ones: Llama-2-7B 0.5 MiB, Mistral-7B (8 KV heads) 128 KiB, in 16 bits."""
    from transformers import LlamaConfig, LlavaConfig, MistralConfig

    from medray.engines.vllm_sizing import VLLMOptions, engine_kwargs, kv_cache_floor

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # restored after (engine_kwargs sets it)
    llama = LlavaConfig(text_config=LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                                max_position_embeddings=4096, dtype="float16").to_dict())
    mistral = MistralConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            sliding_window=4096, dtype="bfloat16")
    for name, config, per_token in (("llava-7b", llama, 2**19), ("mistral-7b", mistral, 2**17)):
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text(config.to_json_string())
        fits = VLLMOptions(max_model_len=4096, kv_cache_gib=4096 * per_token / 2**30)
        assert kv_cache_floor(config.to_dict(), fits) == (4096 * per_token, per_token)
        assert engine_kwargs(model, fits, [])["kv_cache_memory_bytes"] == 4096 * per_token
        short = fits.model_copy(update={"kv_cache_gib": fits.kv_cache_gib / 2})
        with pytest.raises(ValueError, match=rf"max_model_len 4096 .*\({per_token} bytes per token\).* holds 2048 "
                                             "tokens") as refused:
            engine_kwargs(model, short, [])
        assert "Raise kv_cache_gib, or lower max_model_len" in str(refused.value)
        engine_kwargs(model, short.model_copy(update={"max_model_len": 2048}), [])  # what it holds fits
    # float32 weights run in 16 bits under dtype auto (vLLM's CPU platform as its GPUs), unless
    # float32 is asked for, as the shipped CPU config does: 1,024 bytes per token, the figure
    # vLLM's own cache reports in test_vllm's load test (1 MiB, 1,024 tokens).
    tiny = write_tiny_model("llava-mistral", tmp_path / "tiny")
    config = json.loads((tiny / "config.json").read_text())
    assert kv_cache_floor(config, VLLMOptions(max_model_len=512, dtype="float32")) == (512 * 1024, 1024)
    assert kv_cache_floor(config, VLLMOptions(max_model_len=512)) == (512 * 512, 512)
    # Unset, max_model_len is the model's own context (2,048 tokens for the tiny families).
    assert kv_cache_floor(config, VLLMOptions(dtype="float32")) == (2048 * 1024, 1024)
    # Attention this does not count (MLA) is left to vLLM's own check.
    assert kv_cache_floor({"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64, "kv_lora_rank": 16},
                          VLLMOptions()) is None


def test_the_engine_a_run_gets_and_why(tmp_path, monkeypatch):
    """`engine: vllm` runs on vLLM where it can, falls back to hf by name for what vLLM cannot
    run, and is refused at start where vLLM is not installed."""
    import argparse

    from medray.infer import add_infer_arguments, infer_config_from_args
    from medray.engines import choose

    monkeypatch.setenv("MEDRAY_VLLM_PYTHON", sys.executable)  # an interpreter that exists
    assert choose("hf", model="m") == ("hf", "")
    assert choose("vllm", model="m") == ("vllm", "")
    engine, why = choose("vllm", model="m", experts=True)
    assert engine == "hf" and "GIT" in why
    # PEFT's own adapter_config.json for LLaVA's LoRA recipe: the projector trained in full.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["multi_modal_projector"], "base_model_name_or_path": "tiny://llava-mistral"}))
    engine, why = choose("vllm", model="m", adapter=str(adapter))
    assert engine == "hf" and "modules_to_save" in why and "multi_modal_projector" in why
    monkeypatch.setenv("MEDRAY_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(RuntimeError, match="engine vllm asked for m, but it is not installed here: install vLLM"):
        choose("vllm", model="m")

    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    cfg = infer_config_from_args(parser.parse_args(
        ["--model", "m", "--input", "i", "--output", "o", "--engine", "vllm", "--vllm", '{"max_model_len": 2048}']))
    assert cfg.engine == "vllm" and cfg.vllm.max_model_len == 2048 and cfg.vllm.max_num_seqs == 256
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--input", "i", "--output", "o", "--engine", "tensorrt"])


def test_adapters_a_run_can_mix_and_the_ones_it_cannot(tmp_path, monkeypatch):
    """Named adapters (`--adapters`) that records rows choose: the flag parses, reserved or
    malformed names are refused, vLLM falls back to hf by name when one of them carries more
    than LoRA, and adapters that cannot share generate calls are refused before any row runs."""
    import argparse

    from medray.infer import add_infer_arguments, infer_config_from_args
    from medray.engines import check_adapters
    from medray.engines import choose

    def adapter(name: str, **extra) -> str:  # PEFT's own adapter_config.json fields
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "tiny://llava-mistral", **extra}))
        return str(path)

    plain, projector = adapter("plain"), adapter("projector", modules_to_save=["multi_modal_projector"])
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    cfg = infer_config_from_args(parser.parse_args(
        ["--model", "m", "--input", "i.jsonl", "--output", "o", "--adapter", plain,
         "--adapters", json.dumps({"vqa-rad": plain, "slake": plain})]))
    assert cfg.all_adapters() == {"default": plain, "vqa-rad": plain, "slake": plain}
    assert (cfg.row_adapter("slake"), cfg.row_adapter(""), cfg.row_adapter(None)) == ("slake", "default", "default")
    assert InferConfig(model="m", input="i", output="o").row_adapter("") is None  # no adapter: the base model
    for bad in ("default", "a:b", ""):
        with pytest.raises(ValueError, match="adapter names"):
            InferConfig(model="m", input="i", output="o", adapters={bad: plain})

    monkeypatch.setenv("MEDRAY_VLLM_PYTHON", sys.executable)
    assert choose("vllm", model="m", adapters={"x": plain}) == ("vllm", "")
    engine, why = choose("vllm", model="m", adapters={"x": plain, "y": projector})
    assert engine == "hf" and "multi_modal_projector" in why
    check_adapters({"x": plain, "default": plain}, "m", "hf")
    with pytest.raises(ValueError, match="'y' .*modules_to_save.*--adapter"):
        check_adapters({"x": plain, "y": projector}, "m", "hf", alone="Run each alone (--adapter). ")
