"""The vLLM engine, and the choice between it and the transformers engine.

vLLM (paged KV cache, continuous batching, CUDA graphs) is what runs generation at scale;
it is what Ray's own ray.data.llm and ray.serve.llm run. medray renders every prompt itself
(chat template, prompt tokenization, image rule: medray.models.processing) and hands vLLM
token ids with one placeholder per image plus the prepared image, so both engines see the
same prompt. vLLM expands the placeholder and runs the directory's image processor.

Where vLLM lives: in the process's own environment (a GPU image with the CUDA `vllm`), or in
another Python environment on the same nodes, named by MEDRAY_VLLM_PYTHON (vLLM's CPU build
pins transformers below medray's, so on CPU it has an environment of its own: `make vllm`).
Ray starts the vLLM actors with that interpreter (runtime_env py_executable); medray is
installed there too, and Ray is the same version.

One module, though long: choosing vLLM, its batch engine and its async serving engine hold
vLLM's options and traps in one place; issue #40 declares the seam they share with hf.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field

from medray.config import StrictModel

from .types import DEFAULT_ADAPTER, Answer, Encoded, GenerationSettings, RequestRejected

log = logging.getLogger(__name__)

EngineName = Literal["hf", "vllm"]
"""`hf`: medray's engine over transformers' generate: the embedded default, and what runs
models vLLM cannot (the GIT captioner of the visual-experts mode, adapters that train more
than LoRA on the LLM's linear layers). `vllm`: vLLM, for GPU deployments."""

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


def adapter_problem_for_vllm(uri: str) -> str | None:
    """Why vLLM cannot apply this PEFT adapter as trained, or None. vLLM's LoRA covers the
    LLM's linear layers; a projector trained in full beside it (`modules_to_save`, as
    LLaVA's LoRA recipes and BabyDoctor train it) or LoRA on fused MoE expert parameters
    (`target_parameters`, BiMediX) would be dropped, silently changing the model."""
    from medray.models.loading import ModelLoadError, adapter_extras, read_adapter_config

    try:
        cfg = read_adapter_config(uri)
    except ModelLoadError as e:
        return str(e)
    extras = adapter_extras(cfg)
    if extras:
        return f"it {extras}, which vLLM's LoRA (the LLM's linear layers) does not load"
    targets = cfg.get("target_modules") or []
    text = targets if isinstance(targets, str) else " ".join(targets)
    if "vision" in text or "projector" in text:
        return "it puts LoRA on the vision tower or the projector; vLLM's LoRA covers the LLM only"
    return None


def choose_engine(requested: EngineName, *, model: str, adapter: str | None = None,
                  experts: bool = False, adapters: dict[str, str] | None = None) -> tuple[EngineName, str]:
    """The engine a run gets, and why when it is not the one asked for. `vllm` falls back to
    `hf` for what vLLM cannot run, by name; asked for where vLLM is not installed, it is an
    error at start, not a silent fallback."""
    if requested == "hf":
        return "hf", ""
    reason = ""
    if experts:
        reason = "the visual-experts mode runs a GIT captioner, which vLLM does not run"
    else:
        for uri in [*([adapter] if adapter else []), *(adapters or {}).values()]:
            problem = adapter_problem_for_vllm(uri)
            if problem:
                reason = f"adapter {uri}: {problem}"
                break
    if reason:
        log.warning("engine vllm asked for %s, but %s: using the transformers engine (hf) for it", model, reason)
        return "hf", reason
    if not vllm_available():
        raise RuntimeError(
            f"engine vllm asked for {model}, but vLLM is not installed here: install it (GPU nodes: "
            f"`pip install vllm`; CPU: `make vllm`, then set {VLLM_PYTHON_ENV}=.venv-vllm/bin/python), "
            "or use engine hf")
    return "vllm", ""


def vllm_overrides(config: dict) -> dict | None:
    """Config fields vLLM reads differently from transformers. LLaVA-Med v1's projector is one
    linear layer, written as HF Llava's two with act "linear" (identity) and linear_2 = I;
    vLLM knows identity only as torch's class name."""
    if config.get("projector_hidden_act") == "linear":
        return {"projector_hidden_act": "torch.nn.modules.linear.Identity"}
    return None


def _engine_kwargs(path: Path, options: VLLMOptions, lora_paths: Sequence[Path], max_loras: int = 1) -> dict:
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


def model_stop(path: Path) -> tuple[str, ...]:
    """The model's own stop strings (generation_config.json), as the hf engine applies them."""
    from transformers import GenerationConfig

    try:
        return tuple(getattr(GenerationConfig.from_pretrained(path), "stop_strings", None) or ())
    except OSError:  # no generation_config.json
        return ()


def sampling_params(settings: GenerationSettings, stops: Sequence[str] = (), **extra):
    from vllm import SamplingParams

    stop = list(settings.stop) + [s for s in stops if s not in settings.stop]
    return SamplingParams(**settings.vllm_kwargs(), stop=stop or None, skip_special_tokens=True, **extra)


def vllm_prompt(e: Encoded) -> dict:
    """medray's rendered prompt in vLLM's form: ids with one placeholder per image, the images."""
    prompt: dict = {"prompt_token_ids": list(e.input_ids)}
    if e.images is not None and len(e.images):
        from PIL import Image

        prompt["multi_modal_data"] = {"image": [Image.fromarray(img) for img in e.images]}
        if e.image_kwargs:
            prompt["mm_processor_kwargs"] = dict(e.image_kwargs)
    return prompt


def answer_of(output) -> Answer:
    """An Answer from a finished vLLM RequestOutput, as the hf engine words it (stripped)."""
    done = output.outputs[0]
    return Answer(done.text.strip(), len(output.prompt_token_ids), len(done.token_ids),
                  "length" if done.finish_reason == "length" else "stop")


def resolve(model: str, adapter: str | None = None) -> tuple[Path, Path | None]:
    """Local directories of a model URI and an adapter URI; a model URI that is an adapter
    directory brings its base."""
    from medray.models.loading import adapter_base, resolve_adapter_uri, resolve_model_uri

    path = resolve_model_uri(model)
    base = adapter_base(path)
    if base:
        adapter, path = str(path), resolve_model_uri(base)
    return path, resolve_adapter_uri(adapter) if adapter else None


def lora_requests(paths: dict[str, Path]) -> dict:
    """A LoRARequest per adapter name, with ids fixed by name order (vLLM keys adapters by id)."""
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(sorted(paths.items()))}


class VLLMEngine:
    """vLLM over a model directory (local, s3:// or tiny://), with an optional PEFT adapter.
    `generate_encoded` takes the prompts medray rendered (`encode_request(expand=False)`)."""

    continuous = True
    """Give it every row at once: vLLM schedules them step by step, so a short answer never
    waits for a long one."""

    def __init__(self, model: str, adapter: str | None = None, options: VLLMOptions | None = None,
                 adapters: dict[str, str] | None = None):
        from medray.models.loading import resolve_adapter_uri

        path, adapter_path = resolve(model, adapter)
        paths = {**({DEFAULT_ADAPTER: adapter_path} if adapter_path else {}),
                 **{name: resolve_adapter_uri(uri) for name, uri in (adapters or {}).items()}}
        # One engine per actor, in this process: the actor is the unit Ray schedules and
        # restarts, and a second process per actor only adds start-up.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        # Every adapter resident at once: a shard mixes them freely.
        self.llm = LLM(**_engine_kwargs(path, options or VLLMOptions(), list(paths.values()), len(paths)))
        self.loras = lora_requests(paths)
        self.lora = self.loras.get(DEFAULT_ADAPTER)
        self.model_stop = model_stop(path)

    def generate_encoded(self, encoded: Sequence[Encoded], settings: GenerationSettings = GenerationSettings(),
                         adapters: Sequence[str | None] | None = None,
                         deadlines=None) -> list[Answer | RequestRejected]:
        """`adapters`: the adapter of each row by name (None: the base model); without it,
        every row gets the engine's `adapter`. A row vLLM refuses (a prompt longer than
        max_model_len, ...) gets a RequestRejected in its place, and the others their Answers:
        each row is handed over alone (LLM.enqueue), since in one `generate` call the first
        refused prompt fails them all, then all run together."""
        from vllm.exceptions import VLLMClientError

        params = sampling_params(settings, self.model_stop)
        rejected: dict[int, RequestRejected] = {}
        for i, e in enumerate(encoded):
            lora = self.lora if adapters is None else self.loras[adapters[i]] if adapters[i] else None
            try:
                self.llm.enqueue(vllm_prompt(e), params, lora_request=lora, use_tqdm=False)
            except VLLMClientError as err:
                rejected[i] = RequestRejected(str(err))
        # In the order they were queued: LLM sorts its outputs by its own request counter (the
        # ids enqueue returns carry a suffix its outputs do not, so they cannot be matched).
        outputs = iter(self.llm.wait_for_completion(use_tqdm=False) if len(rejected) < len(encoded) else ())
        answers = [rejected[i] if i in rejected else answer_of(next(outputs)) for i in range(len(encoded))]
        if next(outputs, None) is not None:
            raise RuntimeError("vLLM returned more outputs than medray queued")
        return answers


def load_vllm_engine(model: str, adapter: str | None = None, options: dict | None = None,
                     adapters: dict[str, str] | None = None) -> VLLMEngine:
    return VLLMEngine(model, adapter, VLLMOptions.model_validate(options or {}), adapters)


async def _client_errors_rejected(outputs):
    """vLLM's outputs, with what vLLM blames on the request (VLLMClientError: a prompt longer
    than max_model_len, ...) raised as RequestRejected, medray's word for the caller's fault."""
    from vllm.exceptions import VLLMClientError

    try:
        async for out in outputs:
            yield out
    except VLLMClientError as e:
        raise RequestRejected(str(e)) from e


class SchedulerState:
    """What vLLM's scheduler reported at its latest step: the requests running and waiting,
    and the share of the KV cache in use; with the peaks since start. Requests wait when the
    running batch is full (max_num_seqs) or the KV cache is (its budget, kv_cache_gib). Fed
    by a vLLM stat logger on the replica's event loop."""

    def __init__(self):
        self.kv_cache_tokens = 0
        self.running = self.waiting = self.peak_waiting = self.preempted = 0
        self.kv_cache_usage = self.peak_kv_cache_usage = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        state = self

        class SchedulerStatLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    state.running, state.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                    state.kv_cache_usage = scheduler_stats.kv_cache_usage
                    state.peak_waiting = max(state.peak_waiting, state.waiting)
                    state.peak_kv_cache_usage = max(state.peak_kv_cache_usage, state.kv_cache_usage)
                if iteration_stats is not None:
                    state.preempted += iteration_stats.num_preempted_reqs

            def log_engine_initialized(self):
                pass

        return SchedulerStatLogger


class AsyncVLLMEngine:
    """vLLM's async engine for a server: each request joins the running batch at the next
    step (continuous batching), streamed or not; several LoRA adapters at once (each request
    names its own); a request whose caller goes away is aborted (vLLM's generate aborts on
    cancellation). When the KV cache is full, requests wait in vLLM's queue."""

    def __init__(self, model: str, adapters: dict[str, str], options: VLLMOptions, max_loras: int):
        from medray.models import family_of, load_processor
        from medray.models.loading import read_config, resolve_adapter_uri

        path, _ = resolve(model)
        self.family = family_of(read_config(path))
        self.processor = load_processor(path, self.family)
        # Every configured adapter is fetched now: one that cannot be read fails the start,
        # never a request.
        lora_paths = {name: resolve_adapter_uri(uri) for name, uri in adapters.items()}
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.scheduler = SchedulerState()
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**_engine_kwargs(path, options, list(lora_paths.values()), max_loras)),
            stat_loggers=[self.scheduler.stat_logger_factory()])
        cache = self.engine.vllm_config.cache_config  # sized by the engine core as it started
        self.scheduler.kv_cache_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        self.loras = lora_requests(lora_paths)
        self.model_stop = model_stop(path)

    def encode(self, request) -> Encoded:
        from .engine import encode_request

        return encode_request(self.processor, request, expand=False)

    def _outputs(self, request, settings: GenerationSettings, adapter: str | None, final_only: bool):
        import uuid

        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE
        return self.engine.generate(vllm_prompt(self.encode(request)),
                                    sampling_params(settings, self.model_stop, output_kind=kind),
                                    f"medray-{uuid.uuid4().hex}",
                                    lora_request=self.loras[adapter] if adapter else None)

    async def stream(self, request, settings: GenerationSettings, adapter: str | None = None,
                     interval_s: float = 0.0):
        """Yields text deltas that add up to the Answer's text (trailing space held back until
        it is certain, as the hf engine's streams do), then the Answer. After each delta it
        waits `interval_s` before taking the next: vLLM keeps generating meanwhile and merges
        the steps' outputs into one, so a stream costs this process one wake-up per interval,
        not one per token (on 2 cores that work came out of vLLM's own engine process)."""
        from contextlib import aclosing

        sent, last = "", None
        # Closed explicitly when this generator is (a caller gone): vLLM then aborts the request
        # at once, not when the garbage collector gets to it.
        async with aclosing(self._outputs(request, settings, adapter, final_only=False)) as outputs:
            async for out in _client_errors_rejected(outputs):
                last = out
                safe = out.outputs[0].text.strip()
                if not out.finished and len(safe) > len(sent) and safe.startswith(sent) \
                        and "\ufffd" not in safe[len(sent):]:
                    yield safe[len(sent):]
                    sent = safe
                    if interval_s:
                        await asyncio.sleep(interval_s)
        answer = answer_of(last)
        if answer.text.startswith(sent) and len(answer.text) > len(sent):
            yield answer.text[len(sent):]
        yield answer

    async def generate(self, request, settings: GenerationSettings, adapter: str | None = None) -> Answer:
        last = None
        async for out in _client_errors_rejected(self._outputs(request, settings, adapter, final_only=True)):
            last = out
        return answer_of(last)

    def shutdown(self) -> None:
        self.engine.shutdown()
