"""The model families medray knows, and how to tell which one a directory holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["vlm", "text", "captioner"]


@dataclass(frozen=True)
class Family:
    name: str
    kind: Kind
    """vlm: image+text chat (LLaVA); text: causal LM; captioner: image-to-text (GIT)."""
    chat_template: str
    """Default template name in medray.models.templates."""
    seeds: str
    """Which published systems use it, for docs and --help."""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llava-mistral", "vlm", "mistral_instruct", "LLaVA-Med v1.5"),
    Family("llava-llama", "vlm", "vicuna_v1", "LLaVA-Med v1 (converted: llava_med_v1); BabyDoctor (llama_2)"),
    Family("llama", "text", "alpaca", "Med-Alpaca / Visual Med-Alpaca"),
    Family("mixtral", "text", "mixtral_instruct", "BiMediX"),
    Family("git", "captioner", "git_caption", "GIT captioner (Visual Med-Alpaca's visual experts)"),
)}

# LLaVA's own (pre-transformers) checkpoints name themselves like this.
ORIGINAL_LLAVA_TYPES = ("llava_llama", "llava_mistral", "llava_mpt", "llava")


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}") from None


def is_original_llava(config: dict) -> bool:
    """A config in LLaVA's own format. LLaVA-Med v1 says model_type "llava", as HF Llava does,
    but it is a flat Llama config with mm_* fields and no text_config: read as HF Llava it
    would silently get default sizes."""
    model_type = config.get("model_type")
    if model_type == "llava":
        return "text_config" not in config and any(k.startswith("mm_") for k in config)
    return model_type in ORIGINAL_LLAVA_TYPES


def family_of(config: dict) -> Family:
    """Family of a config.json dict; raises ValueError naming what is unsupported."""
    model_type = config.get("model_type")
    if is_original_llava(config):
        raise ValueError(
            f"this is a checkpoint in LLaVA's own format (model_type {model_type!r} with mm_* fields), "
            "which transformers cannot load as it is; convert it once: medray convert llava SRC OUT_DIR")
    if model_type == "llava":
        text_type = (config.get("text_config") or {}).get("model_type", "llama")
        return FAMILIES["llava-mistral" if text_type == "mistral" else "llava-llama"]
    if model_type in ("llama", "mistral"):
        return FAMILIES["llama"]
    if model_type == "mixtral":
        return FAMILIES["mixtral"]
    if model_type == "git":
        return FAMILIES["git"]
    raise ValueError(
        f"model_type {model_type!r} is not a medray family "
        f"(supported: llava, llama, mistral, mixtral, git)")
