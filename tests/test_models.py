"""Model URIs, tiny models, loading rules and generation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medray import storage
from medray.cli import main as cli_main
from medray.infer import GenerationEngine, GenerationSettings, Request
from medray.models import ModelLoadError, load_model, resolve_model_uri

from conftest import FAMILY_NAMES

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there an opacity?"}]}]


def _messages(family: str, text: str = "Is there an opacity?") -> list[dict]:
    image = [{"type": "image"}] if family.startswith("llava") else []
    return [{"role": "user", "content": image + [{"type": "text", "text": text}]}]


def _images(family: str) -> list:
    return [Image.new("RGB", (40, 40), (120, 20, 20))] if family in ("llava-mistral", "llava-llama", "git") else []


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_cli_output_loads_with_plain_transformers(family, tmp_path):
    import transformers as tf

    out = tmp_path / family
    assert cli_main(["tiny-model", "--family", family, "--out", str(out), "--seed", "3"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.bin"))

    if family.startswith("llava"):
        model = tf.AutoModelForImageTextToText.from_pretrained(out)
        proc = tf.AutoProcessor.from_pretrained(out)
        prompt = proc.apply_chat_template(QUESTION, add_generation_prompt=True)
        inputs = proc(text=prompt, images=_images(family), add_special_tokens=False, return_tensors="pt")
    elif family == "git":
        model = tf.AutoModelForCausalLM.from_pretrained(out)
        proc = tf.AutoProcessor.from_pretrained(out)
        inputs = {"pixel_values": proc(images=_images(family), return_tensors="pt")["pixel_values"]}
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(out)
        tok = tf.AutoTokenizer.from_pretrained(out)
        prompt = tok.apply_chat_template(_messages(family), add_generation_prompt=True, tokenize=False)
        inputs = tok(prompt, add_special_tokens=False, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[-1] >= 5


def test_tiny_models_are_deterministic_in_the_seed(tmp_path):
    from medray.models import write_tiny_model

    a = write_tiny_model("llava-mistral", tmp_path / "a", seed=7)
    b = write_tiny_model("llava-mistral", tmp_path / "b", seed=7)
    c = write_tiny_model("llava-mistral", tmp_path / "c", seed=8)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_tiny_uri_builds_once_and_loads(tmp_path):
    first = resolve_model_uri("tiny://llama?seed=2")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_uri("tiny://llama?seed=2") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model_uri("tiny://llama?seed=3") != first
    lm = load_model("tiny://llama?seed=2")
    assert lm.family.name == "llama" and lm.device.type == "cpu"
    assert next(lm.model.parameters()).dtype == torch.float32  # fp32 on a CPU
    with pytest.raises(ValueError, match="unknown model family"):
        resolve_model_uri("tiny://gpt5")


def test_model_round_trips_through_s3_and_is_cached_by_etag(tiny_dirs, bucket):
    uri = f"{bucket}/models/llava-med-tiny"
    storage.upload_dir(tiny_dirs["llava-mistral"], uri)

    lm = load_model(uri)
    assert lm.family.name == "llava-mistral"
    engine = GenerationEngine(lm)
    answer = engine.generate([Request(QUESTION, _images("llava-mistral"))],
                             GenerationSettings(max_new_tokens=6))[0]
    assert answer.completion_tokens > 0 and answer.prompt_tokens > 16

    # Loading again fetches nothing: every object's ETag matches the mirror.
    assert storage.sync_prefix(uri).downloaded == ()
    again = load_model(uri)
    assert engine.generate([Request(QUESTION, _images("llava-mistral"))],
                           GenerationSettings(max_new_tokens=6))[0].text == \
        GenerationEngine(again).generate([Request(QUESTION, _images("llava-mistral"))],
                                         GenerationSettings(max_new_tokens=6))[0].text


def test_pickle_weights_are_refused(tiny_dirs, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["llama"], d)
    weights = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(weights, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(str(d))


def test_remote_code_is_off_unless_asked(tiny_dirs, tmp_path):
    d = tmp_path / "custom"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="medgpt_custom", auto_map={"AutoModelForCausalLM": "modeling_medgpt.MedGPT"})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(str(d))


def test_clear_errors_for_unloadable_uris(tiny_dirs, tmp_path):
    with pytest.raises(ModelLoadError, match="Hub"):
        load_model("microsoft/llava-med-v1.5-mistral-7b")
    d = tmp_path / "llava-format"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llava_mistral"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="medray convert llava"):
        load_model(str(d))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_engine_batches_match_single_requests(family, tiny_dirs):
    """Left padding is right: each row of a batch answers as it would alone, greedily."""
    engine = GenerationEngine(load_model(str(tiny_dirs[family])))
    settings = GenerationSettings(max_new_tokens=6)
    texts = ["Is there an opacity?", "Where is the opacity in the left lung?"]
    if family == "git":
        texts = ["", ""]
    reqs = [Request(_messages(family, t), _images(family)) for t in texts]
    batched = engine.generate(reqs, settings)
    single = [engine.generate([r], settings)[0] for r in reqs]
    assert [a.text for a in batched] == [a.text for a in single]
    assert batched == engine.generate(reqs, settings)  # deterministic


def test_engine_stop_strings_and_length(tiny_dirs):
    engine = GenerationEngine(load_model(str(tiny_dirs["llama"])))
    req = Request(_messages("llama"))
    full = engine.generate([req], GenerationSettings(max_new_tokens=12))[0]
    assert full.finish_reason == "length" and full.completion_tokens == 12
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = engine.generate([req], GenerationSettings(max_new_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)


def test_engine_takes_vllm_s_sampling_extensions(tiny_dirs):
    """ignore_eos and min_tokens hold end-of-sequence back, repetition_penalty changes greedy
    answers, and top_k 1 makes a sample the greedy answer, on the transformers engine."""
    engine = GenerationEngine(load_model(str(tiny_dirs["llama"])))
    reqs = [Request(_messages("llama", t)) for t in ("Is edema a tumor?", "Name a bone.", "What is a CT?")]
    greedy = engine.generate(reqs, GenerationSettings(max_new_tokens=12))
    # The model's end-of-sequence made the greedy first token: the answer ends at once.
    inputs = engine._collate([engine.encode(reqs[0])])
    with torch.inference_mode():
        out = engine.loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False,
                                           pad_token_id=engine.tokenizer.pad_token_id)
    first = int(out[0, inputs["input_ids"].shape[1]])
    engine.loaded.model.generation_config.eos_token_id = first
    ended = engine.generate(reqs[:1], GenerationSettings(max_new_tokens=12))[0]
    assert (ended.completion_tokens, ended.finish_reason) == (0, "stop")
    for settings, tokens in ((GenerationSettings(max_new_tokens=12, ignore_eos=True), 12),
                             (GenerationSettings(max_new_tokens=12, min_tokens=5), 5)):
        answer = engine.generate(reqs[:1], settings)[0]
        assert answer.completion_tokens >= tokens, (settings, answer)
    engine.loaded.model.generation_config.eos_token_id = None
    penalised = engine.generate(reqs, GenerationSettings(max_new_tokens=12, repetition_penalty=1.8))
    assert [a.text for a in penalised] != [a.text for a in greedy]
    narrow = engine.generate(reqs, GenerationSettings(max_new_tokens=12, temperature=1.5, top_k=1, seed=0))
    assert [a.text for a in narrow] == [a.text for a in greedy]


def test_a_models_own_stop_strings_apply_to_every_request(tiny_dirs, tmp_path):
    # generation_config.json's stop_strings (a converted LLaVA-Med v1 says "###").
    model_dir = tmp_path / "llama"
    shutil.copytree(tiny_dirs["llama"], model_dir)
    req = Request(_messages("llama"))
    full = GenerationEngine(load_model(str(model_dir))).generate([req], GenerationSettings(max_new_tokens=12))[0]
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**gen, "stop_strings": [full.text[2:4]]}))
    engine = GenerationEngine(load_model(str(model_dir)))
    cut = engine.generate([req], GenerationSettings(max_new_tokens=12))[0]
    assert cut.finish_reason == "stop" and full.text.startswith(cut.text) and full.text[2:4] not in cut.text
    streamed = list(engine.stream(engine.encode(req), GenerationSettings(max_new_tokens=12)))
    assert "".join(x for x in streamed if isinstance(x, str)) == cut.text


def test_lora_adapter_directory_is_applied(tiny_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model

    lm = load_model(str(tiny_dirs["llama"]))
    ids = torch.tensor([[1, 10, 20, 30]])
    base_logits = lm.model(input_ids=ids).logits
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    with_adapter = load_model(str(tiny_dirs["llama"]), adapter=str(tmp_path / "adapter"))
    got = with_adapter.model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)
    with pytest.raises(ModelLoadError, match="PEFT adapter"):
        load_model(str(tiny_dirs["llama"]), adapter=str(tmp_path))


def test_4bit_load_quantizes_only_the_llm(tiny_dirs):
    import bitsandbytes as bnb

    lm = load_model(str(tiny_dirs["llava-mistral"]), quantization="nf4")
    inner = lm.model.model
    assert isinstance(inner.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(inner.multi_modal_projector.linear_1, bnb.nn.Linear4bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in inner.vision_tower.modules())
    assert not isinstance(lm.model.lm_head, bnb.nn.Linear4bit)
    answer = GenerationEngine(lm).generate([Request(QUESTION, _images("llava-mistral"))],
                                           GenerationSettings(max_new_tokens=4))[0]
    assert answer.completion_tokens > 0


@pytest.mark.gpu
def test_gpu_load_defaults_to_bf16(tiny_dirs):
    lm = load_model(str(tiny_dirs["llava-mistral"]))
    assert lm.device.type == "cuda"
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    answer = GenerationEngine(lm).generate([Request(QUESTION, _images("llava-mistral"))],
                                           GenerationSettings(max_new_tokens=4))[0]
    assert answer.completion_tokens > 0


def test_console_script_help_for_every_subcommand(capsys):
    # The installed console script once (each run imports torch: ~2 s here) ...
    exe = Path(sys.executable).with_name("medray")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: medray" in out.stdout, out.stderr
    # ... and every subcommand's help through the same main(): argparse formats it only when
    # asked, so a broken help string would surface only here.
    commands = [["tiny-model"], ["convert"], ["convert", "llava"], ["convert", "apply-delta"], ["ask"], ["train"],
                ["infer"], ["eval"], ["serve"], ["key-digest"], ["demo"], ["show"], ["report"]]
    for cmd in commands:
        with pytest.raises(SystemExit) as exit_:
            cli_main([*cmd, "--help"])
        assert exit_.value.code == 0, cmd
        assert f"usage: medray {cmd[0]}" in capsys.readouterr().out, cmd


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    assert cli_main(["ask", "--model", str(tmp_path / "nope"), "--question", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medray: error:") and "does not exist" in err


def test_ask_answers_about_a_dicom_in_s3(tiny_dirs, bucket, capsys):
    from pydicom.data import get_testdata_file

    uri = f"{bucket}/scans/ct.dcm"
    storage.write_bytes(uri, Path(get_testdata_file("CT_small.dcm")).read_bytes())
    assert cli_main(["ask", "--model", str(tiny_dirs["llava-mistral"]), "--image", uri,
                     "--question", "What modality is this?", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["question"] == "What modality is this?" and out["completion_tokens"] > 0
    storage.write_bytes(f"{bucket}/scans/broken.dcm", b"\x00" * 128 + b"DICM" + b"\x01" * 40)
    assert cli_main(["ask", "--model", str(tiny_dirs["llava-mistral"]), "--image", f"{bucket}/scans/broken.dcm",
                     "--question", "?"]) == 2
    assert "broken.dcm" in capsys.readouterr().err


def test_streamed_deltas_add_up_to_the_batched_answer(tiny_dirs):
    lm = load_model(str(tiny_dirs["llava-mistral"]))
    engine = GenerationEngine(lm)
    encoded = engine.encode(Request(QUESTION, _images("llava-mistral")))
    full = engine.generate_encoded([encoded], GenerationSettings(max_new_tokens=12))[0]
    for settings in (GenerationSettings(max_new_tokens=12), GenerationSettings(max_new_tokens=12,
                                                                               stop=(full.text[3:5],))):
        expected = engine.generate_encoded([encoded], settings)[0]
        events = list(engine.stream(encoded, settings))
        deltas, final = events[:-1], events[-1]
        assert len(deltas) >= 2 and all(isinstance(d, str) and d for d in deltas)
        assert "".join(deltas) == expected.text == final.text
        assert final.finish_reason == expected.finish_reason


def test_a_closed_stream_stops_generating(tiny_dirs):
    import threading

    lm = load_model(str(tiny_dirs["llama"]))
    engine = GenerationEngine(lm)
    encoded = engine.encode(Request([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]))
    forward = lm.model.forward
    steps = []

    def counted(*args, **kwargs):
        steps.append(threading.current_thread().name)
        return forward(*args, **kwargs)

    lm.model.forward = counted
    stream = engine.stream(encoded, GenerationSettings(max_new_tokens=4000))
    next(stream)
    stream.close()  # what a disconnecting client does: generation must stop, not run 4,000 steps
    done = len(steps)
    assert done < 20, done
    assert engine.submit(len, steps).result(timeout=30) == done  # the generation thread is free, and idle
    assert set(steps) == {engine._worker_thread.name}  # every step ran on the engine's one generation thread


def test_a_batch_of_streams_answers_each_row_as_it_would_alone(tiny_dirs):
    """Streamed rows share one generate call: each row's deltas add up to the answer it gets
    alone, with its own max_new_tokens, and a short row's answer comes out at its own last
    step, not the batch's."""
    lm = load_model(str(tiny_dirs["llava-mistral"]))
    engine = GenerationEngine(lm)
    questions = ["Is there an opacity?", "Describe the image.", "Where is the lesion?"]
    encoded = [engine.encode(Request([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                     _images("llava-mistral"))) for q in questions]
    limits = [3, 12, 7]
    deltas: list[list[str]] = [[] for _ in encoded]
    answers: dict[int, tuple[int, object]] = {}
    steps = 0
    for steps, events in enumerate(engine.stream_batch(encoded, GenerationSettings(max_new_tokens=12),
                                                       max_new_tokens=limits), start=1):
        for row, row_events in enumerate(events):
            for event in row_events:
                assert row not in answers, "nothing after a row's answer"
                if isinstance(event, str):
                    deltas[row].append(event)
                else:
                    answers[row] = (steps, event)
    for row, (e, limit) in enumerate(zip(encoded, limits)):
        alone = engine.generate_encoded([e], GenerationSettings(max_new_tokens=limit))[0]
        step, answer = answers[row]
        assert answer == alone and "".join(deltas[row]) == alone.text
    assert answers[0][0] <= 3 < answers[1][0]  # the 3-token row was answered by step 3


def test_a_row_past_its_deadline_stops_and_its_batch_mates_do_not(tiny_dirs):
    import time

    engine = GenerationEngine(load_model(str(tiny_dirs["llama"])))
    encoded = [engine.encode(Request([{"role": "user", "content": [{"type": "text", "text": q}]}]))
               for q in ("Describe the film.", "Tell me more.")]
    settings = GenerationSettings(max_new_tokens=40)
    late, on_time = engine.generate_encoded(encoded, settings, deadlines=[time.monotonic() - 1, None])
    assert late.completion_tokens <= 1 and late.finish_reason == "length"
    alone = engine.generate_encoded([encoded[1]], settings)[0]
    assert on_time == alone and on_time.completion_tokens > 20
