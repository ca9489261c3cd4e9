"""Which weights a stage trains: named parts (vision / projector / llm) and LoRA adapters."""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from medray.models import Family

from .config import LoraSpec

log = logging.getLogger(__name__)

# Module-path prefixes of each part, per family kind (transformers 5 layout).
PART_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "vlm": {"vision": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.",),
            "llm": ("model.language_model.", "lm_head.")},
    "captioner": {"vision": ("git.image_encoder.",), "projector": ("git.visual_projection.",),
                  "llm": ("git.embeddings.", "git.encoder.", "output.")},
    "text": {"llm": ("",)},
}
# The module that holds each part, for PEFT's modules_to_save.
PART_MODULES = {"vlm": {"vision": "vision_tower", "projector": "multi_modal_projector"},
                "captioner": {"vision": "image_encoder", "projector": "visual_projection"}}


def part_of(name: str, family: Family) -> str | None:
    for part, prefixes in PART_PREFIXES[family.kind].items():
        if any(name.startswith(p) for p in prefixes):
            return part
    return None


def freeze_all_but(model: torch.nn.Module, family: Family, parts: Iterable[str]) -> list[str]:
    """Set requires_grad on exactly the parameters of `parts`; returns their names."""
    parts = set(parts)
    unknown = parts - set(PART_PREFIXES[family.kind])
    if unknown:
        raise ValueError(f"a {family.name} model has no part(s) {sorted(unknown)}; "
                         f"it has {sorted(PART_PREFIXES[family.kind])}")
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name, family) in parts)
        if p.requires_grad:
            trained.append(name)
    return trained


def apply_lora(model: torch.nn.Module, family: Family, spec: LoraSpec, full_parts: Iterable[str]):
    """Wrap in PEFT LoRA; parts trained in full ride along as modules_to_save."""
    from peft import LoraConfig, get_peft_model

    full_parts = list(full_parts)
    if "llm" in full_parts:
        raise ValueError("train: [llm] together with lora makes the adapter pointless; drop one")
    modules_to_save = [PART_MODULES[family.kind][p] for p in full_parts] if full_parts else None
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=spec.target_modules, target_parameters=spec.target_parameters or None,
        modules_to_save=modules_to_save, task_type="CAUSAL_LM" if family.kind == "text" else None,
    )
    peft_model = get_peft_model(model, config)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s (+%s): %d trainable parameters", spec.r, spec.target_modules,
             spec.target_parameters, n_train)
    return peft_model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
