"""Model URIs and loading: a directory, s3://bucket/prefix, or tiny://family?seed=N."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

import torch

from medray import storage

from .families import Family, family_of
from .processing import ModelOptions, attach_options
from .tiny import tiny_model_dir

log = logging.getLogger(__name__)

Quantization = Literal["nf4", "int8"]


class ModelLoadError(ValueError):
    """A model URI could not be loaded; the message says what to change."""


def resolve_model_uri(uri: str) -> Path:
    """Turn a model URI into a local HF directory, fetching or building it if needed."""
    uri = str(uri)
    if uri.startswith("tiny://"):
        parsed = urlparse(uri)
        seed = int(parse_qs(parsed.query).get("seed", ["0"])[0])
        return tiny_model_dir(parsed.netloc, seed, cache=storage.cache_root())
    if storage.is_s3(uri):
        return storage.sync_prefix(uri).path
    path = storage.local_path(uri)
    if not path.is_dir():
        hint = (" It looks like a Hub id: medray does not download from the Hub; "
                "download the model to a directory or an s3:// prefix and pass that."
                if uri.count("/") == 1 and not uri.startswith((".", "/")) else "")
        raise ModelLoadError(f"model directory {uri!r} does not exist.{hint}")
    return path


def adapter_base(path: Path) -> str | None:
    """For a PEFT adapter directory (adapter_config.json, no config.json): its base model URI."""
    if not (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return None
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{path} is a PEFT adapter that names no base model")
    return base


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    return json.loads(cfg.read_text())


def _check_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    raise ModelLoadError(
        f"{path} has no .safetensors weights"
        + (f" (found pickle files {pickled})" if pickled else "")
        + ". medray loads safetensors only, because pickle files can run code when loaded; "
        "convert them once with `medray convert llava --allow-pickle` or "
        "`model.save_pretrained(dir, safe_serialization=True)`.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 where the hardware does it natively; fp32 on CPU, where bf16 matmuls are slow
    # and fp16 ones are not implemented for every op.
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(kind: Quantization, family: Family, compute_dtype: torch.dtype):
    """bitsandbytes settings that leave the vision tower, projector and head in full precision."""
    from transformers import BitsAndBytesConfig

    # transformers 5 matches skip names against full module paths, so bare names such
    # as "vision_tower" would silently quantize the tower.
    skip = ["lm_head"]
    if family.kind == "vlm":
        skip += ["model.vision_tower", "model.multi_modal_projector"]
    if family.kind == "captioner":
        skip += ["git.image_encoder", "git.visual_projection", "output"]
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=skip)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ModelLoadError(f"unknown quantization {kind!r}; use 'nf4' or 'int8'")


@dataclass
class LoadedModel:
    """A model with the processor (or tokenizer) that prepares its inputs."""

    model: Any
    processor: Any
    """A ProcessorMixin for image models, a tokenizer for text models."""
    family: Family
    path: Path
    uri: str

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _model_class(family: Family):
    import transformers as tf

    return tf.AutoModelForImageTextToText if family.kind == "vlm" else tf.AutoModelForCausalLM


def load_processor(path: Path, family: Family, *, trust_remote_code: bool = False):
    """The directory's processor (a tokenizer for text models), carrying medray's options for it
    (`medray_config.json`: image rule, prompt tokenization)."""
    from transformers import AutoProcessor, AutoTokenizer

    options = ModelOptions.load(path)
    if family.kind == "text":
        return attach_options(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), options)
    return attach_options(AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code), options)


def load_model(uri: str, *, device: str | None = None, dtype: torch.dtype | str | None = None,
               quantization: Quantization | None = None, adapter: str | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load model and processor from a model URI.

    Safetensors only; no remote code unless `trust_remote_code` is set; bf16 on a GPU and
    fp32 on a CPU unless `dtype` says otherwise. `adapter` is a PEFT adapter directory
    (or s3:// / local URI) applied on top.

    >>> lm = load_model("tiny://llava-mistral")                 # doctest: +SKIP
    >>> lm.family.name
    'llava-mistral'
    """
    path = resolve_model_uri(uri)
    base = adapter_base(path)
    if base is not None:
        # A PEFT adapter directory stands for its base + the adapter, as with AutoPeftModel.
        if adapter:
            raise ModelLoadError(f"{uri} is itself an adapter; load its base with adapter={uri!r} instead")
        return load_model(base, device=device, dtype=dtype, quantization=quantization, adapter=uri,
                          trust_remote_code=trust_remote_code)
    config = read_config(path)
    try:
        family = family_of(config)
    except ValueError as e:
        if config.get("auto_map") and not trust_remote_code:
            raise ModelLoadError(
                f"{uri} needs its own Python code (auto_map in config.json); medray does not run "
                "a model's code unless asked: set trust_remote_code (--trust-remote-code) "
                "if you trust its source.") from e
        raise ModelLoadError(f"{uri}: {e}") from e
    _check_safetensors(path)

    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    kwargs: dict = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if quantization:
        kwargs["quantization_config"] = quantization_config(quantization, family, dtype)
        kwargs["device_map"] = {"": device}
    model = _model_class(family).from_pretrained(path, **kwargs)
    if not quantization:
        model.to(device)
    if adapter:
        model = attach_adapter(model, adapter)
    model.eval()
    processor = load_processor(path, family, trust_remote_code=trust_remote_code)
    log.info("loaded %s (%s, %s on %s)", uri, family.name, dtype, device)
    return LoadedModel(model, processor, family, path, uri)


def attach_adapter(model, uri: str, name: str = "default"):
    """`model` with the PEFT adapter at `uri` (local, s3://) loaded beside its others under
    `name` ("default": PEFT's own name for the first); returns the PeftModel, in eval mode."""
    from peft import PeftModel  # here: importing peft takes ~1 s, which a run without adapters skips

    path = str(resolve_adapter_uri(uri))
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, path, adapter_name=name)
    return model.eval()


def resolve_adapter_uri(uri: str) -> Path:
    path = storage.sync_prefix(uri).path if storage.is_s3(uri) else storage.local_path(uri)
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{uri} is not a PEFT adapter directory (no adapter_config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{uri} has no safetensors adapter weights; medray loads safetensors only")
    return path


def read_adapter_config(uri: str) -> dict:
    """A PEFT adapter directory's adapter_config.json (local or s3://), without its weights."""
    try:
        return json.loads(storage.read_bytes(uri.rstrip("/") + "/adapter_config.json"))
    except Exception as e:
        raise ModelLoadError(f"{uri} has no readable adapter_config.json ({type(e).__name__}): "
                             "not a PEFT adapter") from e


def adapter_extras(config: dict) -> str | None:
    """What a PEFT adapter carries beyond LoRA on linear layers, in words, or None for plain
    LoRA. Neither engine serves such an adapter beside the base model and other adapters: PEFT
    batches mixed adapters only for LoRA layers, and vLLM's LoRA covers the LLM's linear layers
    only. LLaVA's LoRA recipes (BabyDoctor's too) train the projector in full as
    modules_to_save; BiMediX's manifest puts LoRA on fused MoE experts (target_parameters)."""
    if config.get("peft_type", "LORA") != "LORA":
        return f"is a {config.get('peft_type')} adapter, not LoRA"
    if config.get("modules_to_save"):
        return f"trains {sorted(config['modules_to_save'])} in full beside its LoRA (PEFT modules_to_save)"
    if config.get("target_parameters"):
        return f"puts LoRA on parameters {sorted(config['target_parameters'])} (fused MoE experts)"
    return None


def render_chat(processor, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The model's chat template applied to content-part messages, as a string.

    The processor's template wins; processors that carry none (GIT's) use the tokenizer's.
    """
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    if not getattr(owner, "chat_template", None):
        raise ModelLoadError("this model has no chat template; save one with its processor or tokenizer")
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
