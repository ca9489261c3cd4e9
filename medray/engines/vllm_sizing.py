"""vLLM's sizing: the engine arguments medray derives from a model directory and its
`VLLMOptions` (context length, KV-cache budget, LoRA slots), and the checks that refuse a
size vLLM would refuse, at start and in words, before vLLM's engine process does. Apart from
the engine classes (vllm.py): torch- and vLLM-free, so configs and deploy-time checks load it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from pydantic import Field

from medray.config import StrictModel

log = logging.getLogger(__name__)

VLLM_PYTHON_ENV = "MEDRAY_VLLM_PYTHON"
CPU_KV_CACHE_GIB = 4
"""The KV cache's budget on CPU when neither the config nor VLLM_CPU_KVCACHE_SPACE sets one:
without one, vLLM's CPU worker reserves gpu_memory_utilization (0.9) of the host's memory."""


class VLLMOptions(StrictModel):
    """How a vLLM engine is sized. The KV cache is the budget: when it is full, requests wait
    for room (vLLM's scheduler), they are not refused."""

    max_model_len: int | None = Field(None, ge=64)
    """Longest prompt plus answer, in tokens. None: the model's own context (what vLLM derives
    from config.json); a value over it is refused at start, naming both."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences one engine step holds at most (the running batch)."""
    kv_cache_gib: float | None = Field(None, gt=0)
    """The KV cache's budget in GiB (fractions too). None: on GPU, what gpu_memory_utilization
    leaves; on CPU, VLLM_CPU_KVCACHE_SPACE where it is set, else 4 GiB. It must hold one
    max_model_len sequence: a smaller one is refused at start, saying what it holds."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """GPU only: the share of the GPU's memory vLLM may take (weights, activations, KV cache)."""
    dtype: str = "auto"
    """Weights' dtype in the engine: auto (the checkpoint's), bfloat16, float16, float32."""
    enforce_eager: bool = False
    """No CUDA graphs (always so on CPU, where there are none)."""
    max_lora_rank: int = Field(64, ge=1)
    """Largest LoRA rank an adapter may have."""


INSTALL_HINT = (f"install vLLM (GPU nodes: `pip install vllm`; CPU: `make vllm`, then set "
                f"{VLLM_PYTHON_ENV}=.venv-vllm/bin/python)")


def vllm_available() -> bool:
    """Whether vLLM actors can start: MEDRAY_VLLM_PYTHON names an interpreter, or this
    environment has vLLM."""
    python = os.environ.get(VLLM_PYTHON_ENV)
    if python:
        return Path(python).is_file()
    return importlib.util.find_spec("vllm") is not None


def actor_runtime_env() -> dict:
    """What a vLLM actor's runtime_env needs: the other interpreter, when there is one."""
    python = os.environ.get(VLLM_PYTHON_ENV)
    return {"py_executable": python} if python else {}


def lora_scope_problem(config: dict) -> str | None:
    """What of a plain-LoRA adapter (medray.engines.adapters holds the rest of the rule) vLLM's
    LoRA would drop: it covers the LLM's linear layers, not the vision tower or the projector."""
    targets = config.get("target_modules") or []
    text = targets if isinstance(targets, str) else " ".join(targets)
    if "vision" in text or "projector" in text:
        return "puts LoRA on the vision tower or the projector; vLLM's LoRA covers the LLM only"
    return None


def vllm_overrides(config: dict) -> dict | None:
    """Config fields vLLM reads differently from transformers. LLaVA-Med v1's projector is one
    linear layer, written as HF Llava's two with act "linear" (identity) and linear_2 = I;
    vLLM knows identity only as torch's class name."""
    if config.get("projector_hidden_act") == "linear":
        return {"projector_hidden_act": "torch.nn.modules.linear.Identity"}
    return None


def engine_kwargs(path: Path, options: VLLMOptions, lora_paths: Sequence[Path], max_loras: int = 1) -> dict:
    """vLLM engine arguments for a model directory (LLM(...) and AsyncEngineArgs(...) alike)."""
    from medray.models.loading import read_config
    import torch

    config = read_config(path)
    check_max_model_len(config, options, path.name)
    cpu = not torch.cuda.is_available()
    if cpu:
        # The model runs in the engine's own process (vLLM's "uni" executor), as vLLM runs it on
        # one GPU. The async engine (Serve) always has an engine-core process; on CPU vLLM adds a
        # third for the model unless multiprocessing is off in this one, and that worker
        # busy-waits (sched_yield) for each step. Measured, 32 requests of 64 tokens: start-up
        # 7.5 s instead of 14.8 s, generation 0.14-0.20 s instead of 0.18-0.28 s.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    kwargs = dict(model=str(path), dtype=options.dtype, max_model_len=options.max_model_len,
                  max_num_seqs=options.max_num_seqs, enforce_eager=options.enforce_eager or cpu,
                  trust_remote_code=False, seed=0)
    overrides = vllm_overrides(config)
    if overrides:  # AsyncEngineArgs refuses None here, where LLM() takes it
        kwargs["hf_overrides"] = overrides
    if not cpu:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        if options.kv_cache_gib:
            kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2**30)
    else:
        kwargs["distributed_executor_backend"] = "uni"  # see the environment above
        # In bytes, as on GPU. vLLM's CPU variable VLLM_CPU_KVCACHE_SPACE takes whole GiB, so a
        # budget below 1 GiB became 1 GiB (measured: 0.001 GiB gave 8,192 blocks of 128 tokens),
        # and where it is set it replaces kv_cache_memory_bytes: the config's budget wins.
        kwargs["kv_cache_memory_bytes"] = int((options.kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
        if options.kv_cache_gib and os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
            log.warning("VLLM_CPU_KVCACHE_SPACE is set; the config's kv_cache_gib (%s) is used instead",
                        options.kv_cache_gib)
    if "kv_cache_memory_bytes" in kwargs:
        _check_kv_budget(config, options, kwargs["kv_cache_memory_bytes"], path)
    if "vision_config" in config:
        kwargs["limit_mm_per_prompt"] = {"image": 1}
    if lora_paths:
        rank = max(json.loads((p / "adapter_config.json").read_text()).get("r", 8) for p in lora_paths)
        slots = max(1, min(max_loras, len(lora_paths)))
        if cpu:
            # vLLM's CPU LoRA ops (lora/ops/torch_ops) pick each row's slot with
            # `weights[indices]`, and a base-model row's index is -1: Python wraps it to the
            # last slot, so in a step that mixes base and adapter rows the base rows ran the
            # last slot's adapter (measured: 104 of 104 base answers changed). The GPU kernels
            # skip -1. One slot more than there are adapters keeps the last slot zero.
            slots = len(lora_paths) + 1
        kwargs.update(enable_lora=True, max_lora_rank=_lora_rank(max(options.max_lora_rank, rank)),
                      max_loras=slots, max_cpu_loras=max(slots, len(lora_paths)))
    return kwargs


# The config.json keys vLLM reads a model's context from, the smallest one present winning
# (vllm/transformers_utils/model_arch_config_convertor.py, derive_max_model_len_and_key).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")


def model_context(config: dict) -> tuple[int, str] | None:
    """(tokens, key): the context vLLM derives for this config.json when max_model_len is
    unset, or None where RoPE scaling changes it (vLLM scales it by the factor, by rules per
    RoPE kind that medray leaves to vLLM) or no key is present."""
    text = config.get("text_config") or config
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    if rope and any(r.get("rope_type", r.get("type", "default")) != "default" or r.get("factor") not in (None, 1, 1.0)
                    for r in (rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope])):
        return None
    found = [(int(text[k]), k) for k in CONTEXT_KEYS if isinstance(text.get(k), (int, float))]
    return min(found) if found else None


def check_max_model_len(config: dict, options: VLLMOptions, name: str) -> None:
    """Refuse at start a max_model_len over the model's context. vLLM refuses it too, but in
    its engine process, where Serve shows it only in the controller's log and restarts the
    replica, and `serve run` ends with "Failed to update the deployments"."""
    context = model_context(config)
    if options.max_model_len is not None and context is not None and options.max_model_len > context[0]:
        raise ValueError(f"vllm.max_model_len {options.max_model_len} is over the context of model {name}: "
                         f"{context[0]} tokens ({context[1]} in its config.json). Set max_model_len to at most "
                         f"{context[0]}, or leave it out to use the model's own")


def check_options_for(model: str, options: VLLMOptions) -> None:
    """check_max_model_len where a run or a deployment is built, so a wrong length fails the
    command that asked for it. Reads config.json only (a tiny:// model is built; it is small);
    where that cannot be read here, the engine checks again when it starts."""
    if options.max_model_len is None:
        return
    from medray import storage

    try:
        if model.startswith("tiny://"):
            from medray.models.loading import read_config, resolve_model_uri

            config = read_config(resolve_model_uri(model))
        else:
            config = json.loads(storage.read_bytes(model.rstrip("/") + "/config.json"))
    except Exception:  # an adapter directory, a store this node cannot reach: the engine's check
        return
    check_max_model_len(config, options, model)


def kv_cache_floor(config: dict, options: VLLMOptions) -> tuple[int, int] | None:
    """(bytes, bytes per token): the least KV cache one max_model_len sequence of this model
    takes in vLLM, or None where the model's attention is not one this counts (MLA, layers of
    mixed kinds). A lower bound, so it never refuses what vLLM would run: vLLM also rounds up to
    whole blocks, and gives a sliding window one block more. The cache is in the
    engine's dtype, and `auto` runs float32 weights in 16 bits (vLLM's CPU platform as its GPUs)."""
    text = config.get("text_config") or config
    if text.get("kv_lora_rank") or len(set(text.get("layer_types") or ["full_attention"])) > 1:
        return None
    try:
        layers, heads = int(text["num_hidden_layers"]), int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return None
    width = 4 if options.dtype in ("float32", "float") else 2
    per_token = 2 * layers * kv_heads * head_dim * width  # K and V, every layer
    length = options.max_model_len or (model_context(config) or (None,))[0]
    if length is None:
        return None  # vLLM decides the length (RoPE scaling): no floor medray can vouch for
    window = text.get("sliding_window")
    tokens = min(length, int(window)) if window else length
    return tokens * per_token, per_token


def _check_kv_budget(config: dict, options: VLLMOptions, budget: int, path: Path) -> None:
    """Refuse at start a KV budget that cannot hold one max_model_len sequence. vLLM refuses it
    too, but on the engine core's process (Serve shows "Engine core initialization failed")
    and with advice to raise gpu_memory_utilization, which a set budget overrides."""
    floor = kv_cache_floor(config, options)
    if floor is not None and floor[0] > budget:
        need, per_token = floor
        raise ValueError(
            f"the KV cache budget ({budget / 2**30:.4g} GiB{'' if options.kv_cache_gib else ', the CPU default'}; "
            "kv_cache_gib) cannot hold one sequence of "
            f"max_model_len {need // per_token} tokens for {path.name}: that takes at least "
            f"{need / 2**30:.4g} GiB ({per_token} bytes per token). Raise kv_cache_gib, or lower max_model_len "
            f"(it holds {budget // per_token} tokens)")


def _lora_rank(rank: int) -> int:
    """vLLM takes LoRA ranks from a fixed list (8, 16, 32, 64, ...): the smallest that holds `rank`."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest (512)")

