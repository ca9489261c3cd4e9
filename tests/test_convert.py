"""LLaVA's own checkpoint format -> HF Llava, and LLaVA-Med v1 delta weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

from medray.cli import main as cli_main
from medray.data import ChatCollator, Example
from medray.models import ModelLoadError, load_model, write_tiny_model
from medray.models.convert import apply_delta, convert_llava, read_state_dict, write_llava_format


def _batch(processor):
    img = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there an opacity?"}]},
            {"role": "assistant", "content": "yes, in the left lung"}]
    batch = ChatCollator(processor)([Example(msgs, [img])])
    batch.pop("labels")
    return batch


@pytest.mark.parametrize("family,template", [("llava-mistral", "[INST]"), ("llava-llama", "USER:")])
@pytest.mark.parametrize("tower_in_checkpoint", [True, False])
def test_converted_llava_matches_the_hf_model(family, template, tower_in_checkpoint, tmp_path):
    hf = write_tiny_model(family, tmp_path / "hf", seed=11)
    reference = LlavaForConditionalGeneration.from_pretrained(hf).eval()
    tower_dir = tmp_path / "clip"
    reference.model.vision_tower.save_pretrained(tower_dir)
    from transformers import CLIPImageProcessor
    CLIPImageProcessor.from_pretrained(hf).save_pretrained(tower_dir)

    src = write_llava_format(hf, tmp_path / "llava", tower_ref=str(tower_dir), include_tower=tower_in_checkpoint)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] in ("llava_mistral", "llava_llama") and "mm_vision_tower" in cfg
    assert any(k.startswith("model.mm_projector.") for k in read_state_dict(src))

    assert cli_main(["convert", "llava", str(src), str(tmp_path / "out")]) == 0
    converted = load_model(str(tmp_path / "out"))
    batch = _batch(converted.processor)
    assert template in converted.processor.tokenizer.decode(batch["input_ids"][0])
    with torch.no_grad():
        expected = reference(**batch).logits
        got = converted.model(**batch).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_linear_projector_is_represented_exactly(tmp_path):
    hf = write_tiny_model("llava-llama", tmp_path / "hf", seed=4)
    src = write_llava_format(hf, tmp_path / "llava", projector="linear")
    sd = read_state_dict(src)
    w, b = sd["model.mm_projector.weight"], sd["model.mm_projector.bias"]
    # The fixture names CLIP-L/14-336 as its tower, but holds a tiny one.
    with pytest.raises(ModelLoadError, match="--vision-tower"):
        convert_llava(src, tmp_path / "bad")
    tower = tmp_path / "clip"
    LlavaForConditionalGeneration.from_pretrained(hf).model.vision_tower.save_pretrained(tower)
    out = convert_llava(src, tmp_path / "out", vision_tower=str(tower))
    proj = load_model(str(out)).model.model.multi_modal_projector
    x = torch.randn(3, 5, w.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(proj(x), torch.nn.functional.linear(x, w, b), rtol=0, atol=1e-6)


def test_unknown_tower_needs_a_directory(tmp_path):
    hf = write_tiny_model("llava-mistral", tmp_path / "hf")
    src = write_llava_format(hf, tmp_path / "llava", tower_ref="someone/clip-unknown", include_tower=False)
    with pytest.raises(ModelLoadError, match="--vision-tower"):
        convert_llava(src, tmp_path / "out")


def test_apply_delta_recovers_the_target(tmp_path):
    """LLaVA-Med v1 shipped target - base; base + delta must give the target back."""
    hf = write_tiny_model("llava-llama", tmp_path / "hf", seed=5)
    target_dir = write_llava_format(hf, tmp_path / "target")
    target = read_state_dict(target_dir)

    # The base LLaMA has fewer tokens than LLaVA-Med (which added its own).
    cfg = json.loads((target_dir / "config.json").read_text())
    base_vocab = cfg["vocab_size"] - 64
    torch.manual_seed(9)
    base_model = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")}, vocab_size=base_vocab,
        tie_word_embeddings=False))
    base_model.save_pretrained(tmp_path / "base")
    base = base_model.state_dict()

    delta = {}
    for k, t in target.items():
        if k not in base:
            delta[k] = t.clone()
        elif base[k].shape == t.shape:
            delta[k] = t - base[k]
        else:
            delta[k] = t.clone()
            delta[k][: base[k].shape[0]] -= base[k]
    from safetensors.torch import save_file
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    save_file(delta, delta_dir / "model.safetensors")
    for f in target_dir.iterdir():
        if f.suffix != ".safetensors":
            (delta_dir / f.name).write_bytes(f.read_bytes())

    merged = read_state_dict(apply_delta(tmp_path / "base", delta_dir, tmp_path / "merged"))
    assert merged.keys() == target.keys()
    for k in target:
        torch.testing.assert_close(merged[k], target[k], rtol=0, atol=1e-6)

    # And straight to a loadable HF directory (the fixture's tower is tiny, not CLIP-L).
    tower = tmp_path / "clip"
    LlavaForConditionalGeneration.from_pretrained(hf).model.vision_tower.save_pretrained(tower)
    assert cli_main(["convert", "apply-delta", "--base", str(tmp_path / "base"), "--delta", str(delta_dir),
                     str(tmp_path / "hf-out"), "--to-hf", "--vision-tower", str(tower)]) == 0
    assert load_model(str(tmp_path / "hf-out")).family.name == "llava-llama"


def test_pickle_checkpoints_need_explicit_consent(tmp_path):
    hf = write_tiny_model("llava-mistral", tmp_path / "hf")
    tower = tmp_path / "clip"
    LlavaForConditionalGeneration.from_pretrained(hf).model.vision_tower.save_pretrained(tower)
    src = write_llava_format(hf, tmp_path / "llava", tower_ref=str(tower))
    sd = read_state_dict(src)
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        convert_llava(src, tmp_path / "out")
    assert cli_main(["convert", "llava", str(src), str(tmp_path / "out"), "--allow-pickle"]) == 0
    assert not list((tmp_path / "out").glob("*.bin"))
