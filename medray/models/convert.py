"""Checkpoints in LLaVA's own format -> HF LlavaForConditionalGeneration directories.

LLaVA (and LLaVA-Med, e.g. microsoft/llava-med-v1.5-mistral-7b) publish models as
`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`: model_type llava_llama / llava_mistral,
`mm_*` config fields, the projector under `model.mm_projector.*` and (sometimes) the CLIP
tower under `model.vision_tower.vision_tower.vision_model.*`. Plain transformers cannot load
that. The converter renames tensors, builds the HF config, adds the `<image>` token LLaVA
never had (it used the id -200 instead) and writes an ordinary HF directory.

The model is assembled on the meta device and filled with `assign=True`, so a 7B
conversion needs memory for one copy of the weights, not two.

Why one file of this size: every fact about LLaVA's own format (config fields, tensor
names, tokens, image rule, the delta scheme) is here, so a second format never half-lives
elsewhere.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from medray import storage

from .loading import ModelLoadError, read_config, resolve_model_uri
from .processing import ModelOptions, attach_options, save_processor
from .saving import save_model
from .templates import get_template

log = logging.getLogger(__name__)

# The towers LLaVA-Med uses, so conversion needs no Hub access for their configs.
# Values are the public configs of openai/clip-vit-large-patch14(-336).
_CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5)
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L14, "image_size": 224},
}
_TEXT_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava": "llama"}
# LLaVA v1.5's conversation for each language model (llava/conversation.py), as medray templates.
_DEFAULT_TEMPLATES = {"llava_llama": "vicuna_v1", "llava_mistral": "mistral_instruct"}
_TOWER_PREFIX = re.compile(r"^(model\.vision_tower\.)?(vision_tower\.)?(vision_model\.)?")


@dataclass(frozen=True)
class LlavaSource:
    """What a LLaVA-format config says, as far as it changes what the model sees.

    LLaVA-Med v1 (tag v1.0.0: llava/model/llava.py, llava/eval/model_vqa_med.py) and v1.5
    (llava_arch.py, mm_utils.py, model_vqa.py) differ in nearly every input detail:

    | | v1 (model_type llava) | v1.5 (llava_mistral / llava_llama) |
    | image placeholder | `<im_start>` + `<im_patch>` x N + `<im_end>` after the question | `<image>` (id -200) before it |
    | image rule | CLIP resize + centre crop | `image_aspect_ratio` (pad: expand2square) |
    | prompt ids | the whole prompt, tokenized once | text around `<image>` tokenized piece by piece |
    | template | `simple` (### turns, example exchange) | mistral_instruct / vicuna_v1 |
    | feature layer default | -1 | -2 |
    """

    version: str
    """"v1" or "v1.5"."""
    text_type: str
    image_token: str
    image_rule: str
    """"pad" or "crop"."""
    projector: str
    """"linear" or "mlp2x_gelu"."""
    select_layer: int
    select_strategy: str
    template: str
    prompt_tokenization: str
    added_tokens: tuple[str, ...]
    """Tokens LLaVA's own code adds to the tokenizer, in its order, when they are missing."""

    @classmethod
    def read(cls, cfg: dict, src: str, chat_template: str | None = None) -> "LlavaSource":
        mtype = cfg.get("model_type")
        if mtype not in _TEXT_TYPES:
            raise ModelLoadError(f"{src} has model_type {mtype!r}; expected one of {sorted(_TEXT_TYPES)} "
                                 "(LLaVA-Med v1: llava; v1.5: llava_mistral, llava_llama)")
        if mtype == "llava" and "text_config" in cfg:
            raise ModelLoadError(f"{src} is already a Hugging Face Llava directory; load it as it is")
        projector = cfg.get("mm_projector_type", "linear")
        if projector not in ("linear", "mlp2x_gelu"):
            raise ModelLoadError(f"{src}: mm_projector_type {projector!r} is not supported (linear, mlp2x_gelu)")
        select = cfg.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise ModelLoadError(f"{src}: mm_vision_select_feature {select!r} is not supported (patch, cls_patch)")
        if cfg.get("mm_patch_merge_type", "flat") != "flat":
            raise ModelLoadError(f"{src}: mm_patch_merge_type {cfg['mm_patch_merge_type']!r} (LLaVA-NeXT tiling) "
                                 "is not supported; only 'flat'")
        strategy = "default" if select == "patch" else "full"
        if mtype == "llava":
            if projector != "linear":
                raise ModelLoadError(f"{src}: LLaVA-Med v1 (model_type llava) has a linear projector, "
                                     f"not mm_projector_type {projector!r}")
            start_end = bool(cfg.get("mm_use_im_start_end", False))
            return cls("v1", "llama", "<im_patch>", "crop", "linear", cfg.get("mm_vision_select_layer", -1),
                       strategy, chat_template or ("llava_med_v1" if start_end else "llava_med_v1_patch"),
                       "llava_v1", ("<im_patch>",) + (("<im_start>", "<im_end>") if start_end else ()))
        if cfg.get("mm_use_im_start_end"):
            raise ModelLoadError(
                f"{src}: mm_use_im_start_end: true under model_type {mtype!r} cannot be honoured; medray "
                "converts LLaVA v1.5 checkpoints that mark the image with <image> alone")
        aspect = cfg.get("image_aspect_ratio") or "square"
        if aspect not in ("pad", "square", "crop"):
            raise ModelLoadError(f"{src}: image_aspect_ratio {aspect!r} is not supported (pad, square)")
        return cls("v1.5", _TEXT_TYPES[mtype], "<image>", "pad" if aspect == "pad" else "crop", projector,
                   cfg.get("mm_vision_select_layer", -2), strategy, chat_template or _DEFAULT_TEMPLATES[mtype],
                   "llava", ("<image>",))


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(f))
        return sd
    pickled = sorted(path.glob("pytorch_model*.bin"))
    if not pickled:
        raise ModelLoadError(f"{path} holds no weights (*.safetensors or pytorch_model*.bin)")
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} holds pickle weights ({pickled[0].name}); pass --allow-pickle to convert them "
            "(they are read with torch's weights-only unpickler, which refuses code)")
    sd = {}
    for f in pickled:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def _resolve_local(uri: str | Path) -> Path:
    uri = str(uri)
    return storage.sync_prefix(uri).path if storage.is_s3(uri) else storage.local_path(uri)


# The image-processor settings a converted model keeps from its tower's CLIP processor.
_IMAGE_SETTINGS = ("size", "crop_size", "image_mean", "image_std", "resample", "rescale_factor", "do_resize",
                   "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


def _image_processor(settings: dict, rule: str):
    """A plain CLIP processor (crop), or transformers' LlavaImageProcessor with do_pad, which
    vLLM and transformers read as they are."""
    from .processing import image_processor_class

    if rule == "pad":
        return image_processor_class("LlavaImageProcessor")(**settings, do_pad=True)
    return image_processor_class("CLIPImageProcessor")(**settings)


def _vision_setup(tower: str, *, allow_pickle: bool):
    """(CLIPVisionConfig, image-processor settings, tower weights or None) for the tower LLaVA
    names. A tower directory wins over everything else: LLaVA loads its tower from there."""
    from transformers import CLIPVisionConfig

    from .processing import image_processor_class

    if tower not in KNOWN_TOWERS:
        local = _resolve_local(tower)
    else:  # a hub name, unless a directory of that name is here
        local = storage.local_path(tower) if storage.local_path(tower).is_dir() else None
    if local is not None and (local / "config.json").is_file():
        vcfg = CLIPVisionConfig.from_pretrained(local)
        if (local / "preprocessor_config.json").is_file():
            proc = image_processor_class("CLIPImageProcessor").from_pretrained(local).to_dict()
            settings = {k: proc[k] for k in _IMAGE_SETTINGS if k in proc}
        else:
            settings = _clip_settings(vcfg.image_size)
        weights = {}
        for k, v in read_state_dict(local, allow_pickle=allow_pickle).items():
            name = _tower_key(k)
            if name is not None:
                weights[name] = v
        return vcfg, settings, weights
    if tower in KNOWN_TOWERS:
        spec = KNOWN_TOWERS[tower]
        return CLIPVisionConfig(**spec), _clip_settings(spec["image_size"]), None
    raise ModelLoadError(
        f"vision tower {tower!r} is neither a local CLIP directory nor one of {sorted(KNOWN_TOWERS)}; "
        "pass --vision-tower DIR (an HF CLIP directory, local or s3://)")


def _clip_settings(image_size: int) -> dict:
    # OpenAI CLIP's preprocessing (transformers' defaults are its mean/std); only the size varies.
    return {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}


def _text_config(src_cfg: dict, text_type: str):
    from transformers import AutoConfig

    drop = {"model_type", "architectures", "auto_map", "_name_or_path", "transformers_version",
            "image_aspect_ratio", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
            "tokenizer_model_max_length", "tokenizer_padding_side", "image_grid_pinpoints"}
    kwargs = {k: v for k, v in src_cfg.items() if k not in drop and not k.startswith("mm_")}
    return AutoConfig.for_model(text_type, **kwargs)


def _map_key(key: str) -> str | None:
    """LLaVA tensor name -> HF Llava name (None: not part of the HF model)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        return {"0.weight": "model.multi_modal_projector.linear_1.weight",
                "0.bias": "model.multi_modal_projector.linear_1.bias",
                "2.weight": "model.multi_modal_projector.linear_2.weight",
                "2.bias": "model.multi_modal_projector.linear_2.bias",
                "weight": "model.multi_modal_projector.linear_1.weight",
                "bias": "model.multi_modal_projector.linear_1.bias"}[rest]
    if key.startswith("model.vision_tower."):
        return _tower_key(key)
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key == "lm_head.weight":
        return key
    return None


def _tower_key(key: str) -> str | None:
    rest = _TOWER_PREFIX.sub("", key)
    if rest.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale")):
        return None  # a full CLIPModel dir: only the vision half belongs to LLaVA
    if rest.endswith("position_ids"):
        return None
    return "model.vision_tower." + rest


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    # New token rows start at the mean of the old ones, as transformers' own LLaVA
    # conversion does, so the added tokens do not perturb the output distribution.
    if weight.shape[0] >= rows:
        return weight
    extra = weight.float().mean(0, keepdim=True).expand(rows - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra])


def convert_llava(src: str | Path, out: str | Path, *, vision_tower: str | None = None,
                  chat_template: str | None = None, allow_pickle: bool = False) -> Path:
    """Convert a LLaVA-format checkpoint directory (local or s3://) into an HF directory that
    sees, tokenizes and answers as the original does (see `LlavaSource`), or refuse, naming
    the config field that cannot be honoured."""
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    src_path = _resolve_local(src)
    src_cfg = read_config(src_path)
    spec = LlavaSource.read(src_cfg, str(src), chat_template)
    template = get_template(spec.template)
    sd = read_state_dict(src_path, allow_pickle=allow_pickle)

    tower = vision_tower or src_cfg.get("mm_vision_tower")
    if not tower:
        raise ModelLoadError(f"{src} names no vision tower (mm_vision_tower); pass --vision-tower")
    vcfg, image_settings, tower_sd = _vision_setup(tower, allow_pickle=allow_pickle)

    new_sd, embedded = {}, {}
    for k, v in sd.items():
        name = _map_key(k)
        if name is not None:
            (embedded if name.startswith("model.vision_tower.") else new_sd)[name] = v
    if tower_sd:
        if embedded:
            log.info("using the vision tower in %s, not the copy inside %s (LLaVA loads its tower from "
                     "the tower's own directory)", tower, src)
        new_sd.update(tower_sd)
    elif embedded:
        new_sd.update(embedded)
    else:
        raise ModelLoadError(f"{src} has no vision tower weights; pass --vision-tower DIR holding them")

    linear = spec.projector == "linear"
    if linear:
        # HF Llava's projector is linear_1 -> act -> linear_2. A single linear layer is
        # represented exactly by act="linear" (identity) and linear_2 = I, b = 0.
        width = new_sd["model.multi_modal_projector.linear_1.weight"].shape[0]
        dtype = new_sd["model.multi_modal_projector.linear_1.weight"].dtype
        new_sd["model.multi_modal_projector.linear_2.weight"] = torch.eye(width, dtype=dtype)
        new_sd["model.multi_modal_projector.linear_2.bias"] = torch.zeros(width, dtype=dtype)

    tokenizer = AutoTokenizer.from_pretrained(src_path)
    missing = [t for t in spec.added_tokens if t not in tokenizer.get_vocab()]
    if missing:  # as LLaVA's own code adds them at load time, in its order
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None and spec.version == "v1.5":
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    text_cfg = _text_config(src_cfg, spec.text_type)
    old_vocab = new_sd["model.language_model.embed_tokens.weight"].shape[0]
    if len(tokenizer) > old_vocab:
        vocab = -(-len(tokenizer) // 64) * 64
        for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            new_sd[name] = _grow_rows(new_sd[name], vocab)
        text_cfg.vocab_size = vocab
    text_cfg.pad_token_id = tokenizer.pad_token_id

    config = LlavaConfig(
        vision_config=vcfg, text_config=text_cfg,
        image_token_index=tokenizer.convert_tokens_to_ids(spec.image_token),
        vision_feature_layer=spec.select_layer,
        vision_feature_select_strategy=spec.select_strategy,
        projector_hidden_act="linear" if linear else "gelu",
        multimodal_projector_bias=True,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    try:
        missing_keys, unexpected = model.load_state_dict(new_sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches: usually the tower config is not the tower
        raise ModelLoadError(f"weights of {src} do not fit the config built for them (vision tower "
                             f"{tower!r}); pass --vision-tower DIR with the matching CLIP config. "
                             f"First mismatch: {str(e).splitlines()[1].strip()}") from e
    if missing_keys or unexpected:
        raise ModelLoadError(f"converted weights do not fit the HF model: missing {missing_keys[:5]}, "
                             f"unexpected {unexpected[:5]}")
    if config.text_config.tie_word_embeddings:
        model.tie_weights()

    tokenizer.chat_template = template
    processor = LlavaProcessor(image_processor=_image_processor(image_settings, spec.image_rule), tokenizer=tokenizer,
                               chat_template=template, patch_size=vcfg.patch_size,
                               vision_feature_select_strategy=spec.select_strategy,
                               num_additional_image_tokens=1, image_token=spec.image_token)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    save_processor(attach_options(processor, ModelOptions(prompt_tokenization=spec.prompt_tokenization)), out)
    _write_generation_config(src_path, out, spec)
    log.info("converted %s (LLaVA %s, %s) to %s", src, spec.version, src_cfg["model_type"], out)
    return out


def _write_generation_config(src_path: Path, out: Path, spec: LlavaSource) -> None:
    from transformers import GenerationConfig

    gen = src_path / "generation_config.json"
    if gen.is_file():
        shutil.copy(gen, out / "generation_config.json")
    if spec.version == "v1":
        # model_vqa_med.py cuts every answer at "###", the template's turn separator.
        config = GenerationConfig.from_pretrained(out)
        config.stop_strings = ["###"]
        config.save_pretrained(out)


def apply_delta(base: str | Path, delta: str | Path, out: str | Path, *, allow_pickle: bool = False) -> Path:
    """LLaVA-Med v1's delta release: target = delta + base, written in LLaVA's format.

    Tensors only in the delta (projector, vision tower) are copied; the delta's larger
    embedding and head matrices get the base added into their top-left block, as
    LLaVA's apply_delta does. Convert the result with `convert_llava`.
    """
    from safetensors.torch import save_file

    base_path, delta_path = resolve_model_uri(str(base)), _resolve_local(delta)
    base_sd = read_state_dict(base_path, allow_pickle=allow_pickle)
    delta_sd = read_state_dict(delta_path, allow_pickle=allow_pickle)
    target = {}
    for name, d in delta_sd.items():
        b = base_sd.get(name)
        if b is None:
            if not (name.startswith("model.mm_projector") or name.startswith("model.vision_tower")):
                raise ModelLoadError(f"delta tensor {name} has no counterpart in the base model")
            target[name] = d.clone()
        elif b.shape == d.shape:
            target[name] = (d.float() + b.float()).to(d.dtype)
        else:
            if b.dim() != d.dim() or any(bs > ds for bs, ds in zip(b.shape, d.shape)):
                raise ModelLoadError(f"{name}: base shape {tuple(b.shape)} does not fit delta {tuple(d.shape)}")
            t = d.clone().float()
            t[tuple(slice(0, s) for s in b.shape)] += b.float()
            target[name] = t.to(d.dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in target.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    for f in delta_path.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin") and not f.name.endswith(".index.json") \
                and not f.name.startswith(".medray"):
            shutil.copy(f, out / f.name)
    log.info("applied delta %s to %s -> %s", delta, base, out)
    return out


def write_llava_format(hf_dir: str | Path, out: str | Path, *, projector: str = "mlp2x_gelu",
                       model_type: str | None = None, tower_ref: str | None = None,
                       include_tower: bool = True) -> Path:
    """The inverse mapping: an HF Llava directory written in LLaVA's own format.

    Used to build LLaVA-format fixtures (the converter's tests) and to hand models to
    tools that only read that format.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = read_config(hf_dir)
    text = cfg["text_config"]
    model_type = model_type or {"llama": "llava_llama", "mistral": "llava_mistral"}[text["model_type"]]
    # Names as the loaded model has them: transformers may store a different (legacy)
    # layout on disk and maps it on load.
    sd = LlavaForConditionalGeneration.from_pretrained(hf_dir, use_safetensors=True).state_dict()
    new = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            new["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.multi_modal_projector."):
            if projector == "linear":
                if ".linear_1." in k:
                    new["model.mm_projector." + k.rsplit(".", 1)[1]] = v
            else:
                new[k.replace("model.multi_modal_projector.linear_1", "model.mm_projector.0")
                     .replace("model.multi_modal_projector.linear_2", "model.mm_projector.2")] = v
        elif k.startswith("model.vision_tower."):
            if include_tower:
                new["model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):]] = v
        elif k == "lm_head.weight":
            new[k] = v
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in new.items()}, out / "model.safetensors", metadata={"format": "pt"})
    llava_cfg = {k: v for k, v in text.items() if k not in ("model_type",)}
    llava_cfg.update(
        model_type=model_type,
        architectures=["LlavaMistralForCausalLM" if model_type == "llava_mistral" else "LlavaLlamaForCausalLM"],
        mm_vision_tower=tower_ref or "openai/clip-vit-large-patch14-336",
        mm_projector_type=projector, mm_vision_select_layer=cfg.get("vision_feature_layer", -2),
        mm_vision_select_feature="patch" if cfg.get("vision_feature_select_strategy") == "default" else "cls_patch",
        mm_hidden_size=cfg["vision_config"]["hidden_size"], mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio="pad",
    )
    (out / "config.json").write_text(json.dumps(llava_cfg, indent=2))
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out)
    return out
