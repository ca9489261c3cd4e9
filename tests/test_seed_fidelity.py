"""A converted LLaVA-Med checkpoint sees, tokenizes and scores what the original does.

The fixtures are written here in LLaVA's own layout, independently of medray's writer: a
LLaVA-format language model (LlavaMistralForCausalLM / LLaVA-Med v1's LlavaLlamaForCausalLM
key names, `mm_*` config fields), the projector under `model.mm_projector`, and the CLIP
tower in a directory of its own, as `mm_vision_tower` names it. The tokenizers are
SentencePiece-style Llama tokenizers (byte fallback, Metaspace), legacy and not.

The reference below is LLaVA-Med's inference written from its semantics (microsoft/LLaVA-Med,
tag v1.0.0 for v1, main for v1.5), not from medray's code:
- v1.5 (llava_arch.py, mm_utils.py, model_vqa.py): `expand2square` on the processor's mean
  colour (the mean grey for a mode-L image) when `image_aspect_ratio` is "pad", then the
  tower's CLIP processor; prompt "[INST] <image>\\nQ [/INST]" (mistral_instruct, empty
  system); ids by `tokenizer_image_token` (each piece tokenized on its own with BOS, one BOS
  kept, -200 for the image); tower hidden state at `mm_vision_select_layer`, CLS dropped,
  projector, features spliced in at -200.
- v1 (llava.py, model_vqa_med.py): the CLIP processor alone; prompt = the `simple`
  conversation with the question followed by "\\n<im_start>" + "<im_patch>" x N + "<im_end>",
  tokenized whole; features replace the `<im_patch>` embeddings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medray.cli import main as cli_main
from medray.data import ChatCollator, Example
from medray.infer import GenerationEngine, Request
from medray.models import ModelLoadError, load_model
from medray.models.convert import convert_llava
from medray.models.processing import save_processor

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id
V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the human's questions.")
QUESTION = "Is there an opacity in the left lung?"
CORPUS = ["[INST] Is there an opacity in the left lung? [/INST] yes", "Where is the opacity? left right none",
          V1_SYSTEM, "###Human: Hi!###Assistant: Hi there!  How can I help you today?",
          "A chest x-ray with a mass at the edge of the image."]
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=32)
LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
          max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
N_PATCHES = (32 // 8) ** 2


# ------------------------------------------------------------------------ fixtures, LLaVA's layout
def _llama_tokenizer(out, *, legacy: bool, extra: list[str] = ()):
    """A SentencePiece-style Llama tokenizer trained here, saved the way a checkpoint carries it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                                            show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], legacy=legacy,
                         add_bos_token=True)
    if extra:  # LLaVA-Med v1's training added its image tokens and saved them with the model
        tok.add_tokens(list(extra), special_tokens=True)
    tok.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["legacy"] = legacy  # as checkpoints state it (transformers 5 would not write it)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


def _tower(out, seed: int):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _save(sd: dict, out):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, out / "model.safetensors", metadata={"format": "pt"})


def write_llava_med_v15(root, *, legacy: bool, aspect: str = "pad", embedded_tower: bool = False, seed: int = 0):
    """llava-med-v1.5-mistral-7b's layout at toy size."""
    from transformers import MistralConfig, MistralForCausalLM

    ckpt, tower = root / "llava-med-v1.5", _tower(root / "clip", seed + 1)
    ckpt.mkdir(parents=True)
    tok = _llama_tokenizer(ckpt, legacy=legacy)
    torch.manual_seed(seed)
    lm_cfg = MistralConfig(vocab_size=len(tok), **LM)
    sd = MistralForCausalLM(lm_cfg).state_dict()
    g = torch.Generator().manual_seed(seed + 2)
    sd.update({"model.mm_projector.0.weight": torch.randn(64, 32, generator=g) * 0.2,
               "model.mm_projector.0.bias": torch.randn(64, generator=g) * 0.1,
               "model.mm_projector.2.weight": torch.randn(64, 64, generator=g) * 0.2,
               "model.mm_projector.2.bias": torch.randn(64, generator=g) * 0.1})
    if embedded_tower:  # a stale, rounded copy, as bf16 checkpoints carry it: LLaVA ignores it
        from safetensors.torch import load_file
        for k, v in load_file(tower / "model.safetensors").items():
            sd["model.vision_tower.vision_tower." + k] = (v.to(torch.bfloat16).float() + 0.01)
    _save(sd, ckpt)
    cfg = {**lm_cfg.to_dict(), "model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
           "mm_vision_tower": str(tower), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
           "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": aspect,
           "use_mm_proj": True, "tokenizer_padding_side": "right"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt, tower


def write_llava_med_v1(root, *, legacy: bool, seed: int = 0):
    """LLaVA-Med v1 (LlavaLlamaForCausalLM, model_type llava) at toy size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt, tower = root / "llava-med-v1", _tower(root / "clip", seed + 1)
    ckpt.mkdir(parents=True)
    tok = _llama_tokenizer(ckpt, legacy=legacy, extra=["<im_patch>", "<im_start>", "<im_end>"])
    torch.manual_seed(seed)
    lm_cfg = LlamaConfig(vocab_size=len(tok), **LM)
    sd = LlamaForCausalLM(lm_cfg).state_dict()
    g = torch.Generator().manual_seed(seed + 2)
    sd.update({"model.mm_projector.weight": torch.randn(64, 32, generator=g) * 0.2,
               "model.mm_projector.bias": torch.randn(64, generator=g) * 0.1})
    _save(sd, ckpt)
    cfg = {**lm_cfg.to_dict(), "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
           "mm_vision_tower": str(tower), "mm_hidden_size": 32, "use_mm_proj": True,
           "mm_use_im_start_end": True, "mm_vision_select_layer": -2}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt, tower


# ------------------------------------------------------------------------ the reference
def ref_expand2square(img: Image.Image, mean) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    bg = int(255 * sum(mean) / len(mean)) if img.mode == "L" else tuple(int(x * 255) for x in mean)
    side = max(w, h)
    out = Image.new(img.mode, (side, side), bg)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def ref_pixels(tower, img: Image.Image, *, pad: bool) -> torch.Tensor:
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(tower)
    if pad:
        img = ref_expand2square(img, proc.image_mean)
    return torch.as_tensor(np.asarray(proc.preprocess(img, return_tensors="np")["pixel_values"]))


def ref_tokenizer_image_token(prompt: str, tok) -> list[int]:
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def ref_prompt_ids(ckpt, version: str, question: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    if version == "v1.5":
        return ref_tokenizer_image_token(f"[INST] <image>\n{question} [/INST]", tok)
    qs = question + "\n<im_start>" + "<im_patch>" * N_PATCHES + "<im_end>"
    prompt = (V1_SYSTEM + "###" + "Human: Hi!###" + "Assistant: Hi there!  How can I help you today?\n###"
              + "Human: " + qs + "###")
    return tok([prompt]).input_ids[0]


@torch.no_grad()
def ref_logits(ckpt, tower, version: str, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file
    from transformers import (AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    cfg = json.loads((ckpt / "config.json").read_text())
    sd = load_file(ckpt / "model.safetensors")
    fields = {k: cfg[k] for k in ("vocab_size", *LM)}
    lm = (MistralForCausalLM(MistralConfig(**fields)) if version == "v1.5" else LlamaForCausalLM(LlamaConfig(**fields)))
    lm.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))})
    lm.eval()
    tower_model = CLIPVisionModel.from_pretrained(tower).eval()
    hidden = tower_model(pixels, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]][:, 1:]
    if version == "v1.5":
        h = torch.nn.functional.linear(hidden, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])
        h = torch.nn.functional.linear(torch.nn.functional.gelu(h), sd["model.mm_projector.2.weight"],
                                       sd["model.mm_projector.2.bias"])
    else:
        h = torch.nn.functional.linear(hidden, sd["model.mm_projector.weight"], sd["model.mm_projector.bias"])
    feats = h[0]
    embed = lm.get_input_embeddings()
    t = torch.tensor(ids)
    if version == "v1.5":
        at = ids.index(IMAGE_TOKEN_INDEX)
        embeds = torch.cat([embed(t[:at]), feats, embed(t[at + 1:])])
    else:
        patch = AutoTokenizer.from_pretrained(ckpt).convert_tokens_to_ids("<im_patch>")
        embeds = embed(t).clone()
        embeds[t == patch] = feats
    return lm(inputs_embeds=embeds[None]).logits[0]


# ------------------------------------------------------------------------ images
def strip_image() -> Image.Image:
    """96x48, dark, with a bright strip along its left edge: a centre crop cuts it away."""
    arr = np.full((48, 96, 3), 40, dtype=np.uint8)
    arr[:, :6] = (250, 250, 250)
    arr[20:28, 40:56] = (180, 60, 60)
    return Image.fromarray(arr)


def grey_portrait() -> Image.Image:
    arr = (np.arange(40 * 72).reshape(72, 40) % 200 + 30).astype(np.uint8)
    arr[:, :4] = 255
    return Image.fromarray(arr, mode="L")


def square_image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(3).rand(32, 32, 3) * 255).astype(np.uint8))


IMAGES = {"square": square_image, "strip-96x48": strip_image, "grey-40x72": grey_portrait}


def _medray_inputs(lm, img: Image.Image):
    engine = GenerationEngine(lm)
    enc = engine.encode(Request([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                [img]))
    return enc.input_ids, torch.as_tensor(enc.pixel_values)


def _check_against_reference(ckpt, tower, out, version: str, img: Image.Image, *, pad: bool):
    lm = load_model(str(out), dtype=torch.float32)
    ids, pixels = _medray_inputs(lm, img)
    ref_px = ref_pixels(tower, img, pad=pad)
    torch.testing.assert_close(pixels, ref_px, rtol=0, atol=1e-6)
    ref_ids = ref_prompt_ids(ckpt, version, QUESTION)
    image_id = lm.model.config.image_token_index
    expanded = [x for t in ref_ids for x in ([image_id] * N_PATCHES if t == IMAGE_TOKEN_INDEX else [t])]
    assert ids == expanded
    with torch.no_grad():
        got = lm.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    expected = ref_logits(ckpt, tower, version, ref_ids, ref_px)
    assert got.shape[0] == expected.shape[0]
    # Columns past the source vocabulary are tokens the conversion added (<image>, <pad>).
    torch.testing.assert_close(got[:, : expected.shape[1]], expected, rtol=0, atol=1e-4)
    return lm


# ------------------------------------------------------------------------ v1.5
def _image_processor_config(out) -> dict:
    # transformers 5 keeps the image processor inside processor_config.json.
    return json.loads((out / "processor_config.json").read_text())["image_processor"]


@pytest.mark.parametrize("legacy", [False, True], ids=["non-legacy", "legacy"])
def test_llava_med_v15_converted_model_matches_the_reference(tmp_path, legacy):
    ckpt, tower = write_llava_med_v15(tmp_path, legacy=legacy, embedded_tower=True)
    out = tmp_path / "hf"
    assert cli_main(["convert", "llava", str(ckpt), str(out)]) == 0
    preproc = _image_processor_config(out)
    assert preproc["image_processor_type"] == "LlavaImageProcessor" and preproc["do_pad"] is True
    assert json.loads((out / "tokenizer_config.json").read_text())["legacy"] is legacy
    resaved = tmp_path / "resaved"  # as a training export saves it again
    save_processor(load_model(str(out)).processor, resaved)
    assert json.loads((resaved / "tokenizer_config.json").read_text())["legacy"] is legacy
    for name, make in IMAGES.items():
        _check_against_reference(ckpt, tower, out, "v1.5", make(), pad=True)


def test_padding_keeps_the_edge_that_a_crop_loses(tmp_path):
    ckpt, tower = write_llava_med_v15(tmp_path, legacy=False)
    out = convert_llava(ckpt, tmp_path / "hf")
    lm = load_model(str(out))
    _, padded = _medray_inputs(lm, strip_image())
    cropped = ref_pixels(tower, strip_image(), pad=False)
    # The strip is the brightest thing in the image: with padding it reaches the model's
    # leftmost columns; the centre crop throws it away.
    assert padded[0, 0, 8:24, 0].mean() > 1.5 and cropped[0, 0, 8:24, :2].mean() < 0
    # medray_config.json can override the rule: crop for this model gives the plain CLIP pixels.
    (out / "medray_config.json").write_text(json.dumps({"image_aspect_ratio": "crop",
                                                        "prompt_tokenization": "llava"}))
    _, overridden = _medray_inputs(load_model(str(out)), strip_image())
    torch.testing.assert_close(overridden, cropped, rtol=0, atol=1e-6)


def test_square_checkpoints_crop_and_every_input_path_agrees(tmp_path):
    ckpt, tower = write_llava_med_v15(tmp_path, legacy=False, aspect="square")
    out = convert_llava(ckpt, tmp_path / "hf")
    assert _image_processor_config(out)["image_processor_type"] == "CLIPImageProcessor"
    lm = _check_against_reference(ckpt, tower, out, "v1.5", strip_image(), pad=False)
    # Training sees what generation sees: the collator applies the same rule and tokenization.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "yes"}]
    batch = ChatCollator(lm.processor)([Example(msgs, [strip_image()])])
    _, pixels = _medray_inputs(lm, strip_image())
    torch.testing.assert_close(batch["pixel_values"], pixels)
    # LLaVA's training tokenizes the whole conversation with tokenizer_image_token.
    from transformers import AutoTokenizer
    ref = ref_tokenizer_image_token(f"[INST] <image>\n{QUESTION} [/INST] yes </s>", AutoTokenizer.from_pretrained(ckpt))
    image_id = lm.model.config.image_token_index
    assert batch["input_ids"][0].tolist() == [x for t in ref for x in ([image_id] * N_PATCHES if t < 0 else [t])]
    answer = [t for t, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) if lab != -100]
    assert "yes" in lm.tokenizer.decode(answer) and lm.model.config.image_token_index not in answer
    # A model trained with crop can be told to pad scans (medray_config.json).
    (out / "medray_config.json").write_text(json.dumps({"image_aspect_ratio": "pad", "prompt_tokenization": "llava"}))
    _, padded = _medray_inputs(load_model(str(out)), strip_image())
    torch.testing.assert_close(padded, ref_pixels(tower, strip_image(), pad=True), rtol=0, atol=1e-6)


def test_start_end_tokens_under_v15_are_refused_by_name(tmp_path):
    ckpt, _ = write_llava_med_v15(tmp_path, legacy=False)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "mm_use_im_start_end": True}))
    with pytest.raises(ModelLoadError, match="mm_use_im_start_end"):
        convert_llava(ckpt, tmp_path / "hf")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "image_aspect_ratio": "anyres"}))
    with pytest.raises(ModelLoadError, match="image_aspect_ratio"):
        convert_llava(ckpt, tmp_path / "hf2")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf2").exists()


def test_the_tower_directory_wins_and_may_hold_pickle_weights(tmp_path):
    ckpt, tower = write_llava_med_v15(tmp_path, legacy=False, embedded_tower=True)
    from safetensors.torch import load_file

    sd = load_file(tower / "model.safetensors")
    (tower / "model.safetensors").unlink()
    torch.save(sd, tower / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        convert_llava(ckpt, tmp_path / "refused", vision_tower=str(tower))
    out = convert_llava(ckpt, tmp_path / "hf", vision_tower=str(tower), allow_pickle=True)
    got = load_model(str(out)).model.model.vision_tower.state_dict()
    suffix = "encoder.layers.0.self_attn.q_proj.weight"
    (mine,) = [v for k, v in got.items() if k.endswith(suffix)]
    (tower_dir,) = [v for k, v in sd.items() if k.endswith(suffix)]
    torch.testing.assert_close(mine, tower_dir, rtol=0, atol=0)  # not the checkpoint's stale copy


# ------------------------------------------------------------------------ v1
@pytest.mark.parametrize("legacy", [False, True], ids=["non-legacy", "legacy"])
def test_llava_med_v1_converted_model_matches_the_reference(tmp_path, legacy):
    ckpt, tower = write_llava_med_v1(tmp_path, legacy=legacy)
    with pytest.raises(ModelLoadError, match="convert"):  # not silently read as an HF Llava
        load_model(str(ckpt))
    out = tmp_path / "hf"
    assert cli_main(["convert", "llava", str(ckpt), str(out)]) == 0
    for make in (square_image, strip_image):
        lm = _check_against_reference(ckpt, tower, out, "v1", make(), pad=False)
    assert lm.model.generation_config.stop_strings == ["###"]
    assert lm.processor.tokenizer.convert_ids_to_tokens(lm.model.config.image_token_index) == "<im_patch>"


def test_llava_med_v1_delta_converts_to_hf(tmp_path):
    """v1 shipped target - base; `apply-delta --to-hf` rebuilds and converts it."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt, tower = write_llava_med_v1(tmp_path, legacy=False, seed=5)
    target = load_file(ckpt / "model.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    torch.manual_seed(9)  # the base LLaMA lacks LLaVA-Med's three image tokens
    base = LlamaForCausalLM(LlamaConfig(vocab_size=cfg["vocab_size"] - 3, **LM))
    base.save_pretrained(tmp_path / "base")
    base_sd = base.state_dict()
    delta = {}
    for k, t in target.items():
        delta[k] = t.clone()
        if k in base_sd:
            delta[k][tuple(slice(0, n) for n in base_sd[k].shape)] -= base_sd[k]
    (tmp_path / "delta").mkdir()
    save_file(delta, tmp_path / "delta" / "model.safetensors")
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / "delta" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "hf"
    assert cli_main(["convert", "apply-delta", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "delta"),
                     str(out), "--to-hf"]) == 0
    _check_against_reference(ckpt, tower, out, "v1", strip_image(), pad=False)


def test_the_batch_pipeline_prepares_inputs_as_the_engine_does(tmp_path):
    """Batch inference's CPU stage (no Ray needed to call it) follows the same rule."""
    from medray.infer import InferConfig
    from medray.infer.stages import preprocess

    ckpt, _ = write_llava_med_v15(tmp_path, legacy=False)
    out = convert_llava(ckpt, tmp_path / "hf")
    image = tmp_path / "scan.png"
    grey_portrait().save(image)
    cfg = InferConfig(model=str(out), input=str(tmp_path), output=str(tmp_path / "answers"), task="vqa")
    batch = {"id": np.array(["a"], dtype=object), "image": np.array([str(image)], dtype=object),
             "question": np.array([QUESTION], dtype=object), "references": np.array([""], dtype=object),
             "error": np.array([""], dtype=object)}
    row = preprocess(batch, cfg=cfg.model_dump(mode="json"))
    assert row["error"][0] == ""
    ids, pixels = _medray_inputs(load_model(str(out)), Image.open(image))
    assert row["input_ids"][0].tolist() == ids
    np.testing.assert_array_equal(row["pixel_values"][0], pixels.numpy())
