"""The vLLM engine: vLLM's offline engine for the batch pipeline (`VLLMEngine`) and its async
engine for a Serve replica (`AsyncVLLMEngine`).

vLLM (paged KV cache, continuous batching, CUDA graphs) is what runs generation at scale;
it is what Ray's own ray.data.llm and ray.serve.llm run. medray renders every prompt itself
(chat template, prompt tokenization, image rule: medray.models.processing) and hands vLLM
token ids with one placeholder per image plus the prepared image, so both engines see the
same prompt. vLLM expands the placeholder and runs the directory's image processor.

Where vLLM lives: in the process's own environment (a GPU image with the CUDA `vllm`), or in
another Python environment on the same nodes, named by MEDRAY_VLLM_PYTHON (vLLM's CPU build
pins transformers below medray's, so on CPU it has an environment of its own: `make vllm`).
Ray starts the vLLM actors with that interpreter (runtime_env py_executable); medray is
installed there too, and Ray is the same version. How an engine is sized: vllm_sizing.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from .encoding import encode_request
from .types import DEFAULT_ADAPTER, Answer, Encoded, GenerationSettings, RequestRejected, new_text
from .vllm_sizing import VLLMOptions, engine_kwargs

log = logging.getLogger(__name__)


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
        self.llm = LLM(**engine_kwargs(path, options or VLLMOptions(), list(paths.values()), len(paths)))
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


def load_vllm_engine(model: str, adapter: str | None = None, adapters: dict[str, str] | None = None,
                     options: VLLMOptions | dict | None = None) -> VLLMEngine:
    """The vLLM batch engine (the registry's loader for engine vllm)."""
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
    """vLLM's async engine behind the ServingEngine protocol: each request joins the running
    batch at the next step (continuous batching), streamed or not; several LoRA adapters at
    once (each request names its own); a request whose caller goes away, or whose deadline
    passes, is aborted (vLLM's generate aborts on cancellation). When the KV cache is full,
    requests wait in vLLM's queue. No @serve.batch: vLLM batches by steps itself."""

    def __init__(self, spec, report=None):
        from medray.models import family_of, load_processor
        from medray.models.loading import read_config, resolve_adapter_uri

        path, _ = resolve(spec.uri)
        self.family = family_of(read_config(path))
        self.processor = load_processor(path, self.family)
        self.adapters = sorted(spec.adapters)
        self.interval_s = spec.stream_interval_s
        # Every configured adapter is fetched now: one that cannot be read fails the start,
        # never a request.
        lora_paths = {name: resolve_adapter_uri(uri) for name, uri in spec.adapters.items()}
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.scheduler = SchedulerState()
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_kwargs(path, spec.vllm, list(lora_paths.values()), spec.max_loaded_adapters)),
            stat_loggers=[self.scheduler.stat_logger_factory()])
        cache = self.engine.vllm_config.cache_config  # sized by the engine core as it started
        self.scheduler.kv_cache_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        self.loras = lora_requests(lora_paths)
        self.model_stop = model_stop(path)

    def state(self) -> dict:
        return {"adapters": {"configured": self.adapters, "resident": self.adapters, "loads": 0},
                "scheduler": self.scheduler.as_dict()}

    def gauges(self) -> dict:
        # The scheduler's state at vLLM's latest step: requests it queues, the KV cache in use.
        return {"engine_waiting": self.scheduler.waiting, "kv_cache_usage": self.scheduler.kv_cache_usage}

    def recent_batch_sizes(self) -> list[int]:
        return []  # vLLM's batch changes every step; there are no batches to count

    def encode(self, request) -> Encoded:
        return encode_request(self.processor, request, expand=False)

    def _outputs(self, request, settings: GenerationSettings, adapter: str | None, final_only: bool):
        import uuid

        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE
        return self.engine.generate(vllm_prompt(self.encode(request)),
                                    sampling_params(settings, self.model_stop, output_kind=kind),
                                    f"medray-{uuid.uuid4().hex}",
                                    lora_request=self.loras[adapter] if adapter else None)

    async def _deltas(self, request, settings: GenerationSettings, adapter: str | None):
        """Text deltas that add up to the Answer's text (trailing space held back until it is
        certain, as the hf engine's streams do), then the Answer. After each delta it waits
        stream_interval_s before taking the next: vLLM keeps generating meanwhile and merges
        the steps' outputs into one, so a stream costs this process one wake-up per interval,
        not one per token (on 2 cores that work came out of vLLM's own engine process)."""
        from contextlib import aclosing

        sent, last = "", None
        # Closed explicitly when this generator is (a caller gone): vLLM then aborts the request
        # at once, not when the garbage collector gets to it.
        async with aclosing(self._outputs(request, settings, adapter, final_only=False)) as outputs:
            async for out in _client_errors_rejected(outputs):
                last = out
                delta = "" if out.finished else new_text(out.outputs[0].text.lstrip(), sent, whole_chars=True)
                if delta:
                    yield delta
                    sent += delta
                    if self.interval_s:
                        await asyncio.sleep(self.interval_s)
        answer = answer_of(last)
        if answer.text.startswith(sent) and len(answer.text) > len(sent):
            yield answer.text[len(sent):]
        yield answer

    async def stream(self, request, settings: GenerationSettings, adapter: str | None, deadline: float | None):
        from contextlib import aclosing

        sent_at, message = 0.0, []
        async with aclosing(self._deltas(request, settings, adapter)) as events:
            while True:
                # A wait per delta, not one timeout around the loop: a timeout's cancellation
                # must not land in the consumer while this generator is suspended at a yield.
                # asyncio.timeout_at, not wait_for: no task made per delta (loop.time() is
                # time.monotonic()).
                try:  # past the deadline the wait is cancelled, and with it the request inside vLLM
                    async with asyncio.timeout_at(deadline):
                        event = await events.__anext__()
                except StopAsyncIteration:
                    return
                if isinstance(event, Answer):  # with the text not sent yet
                    yield message + [event]
                    return
                message.append(event)
                now = time.monotonic()
                if now - sent_at >= self.interval_s:
                    yield message
                    message, sent_at = [], now

    async def generate(self, request, settings: GenerationSettings, adapter: str | None,
                       deadline: float | None) -> Answer:
        last = None
        async with asyncio.timeout_at(deadline):  # past it, the request inside vLLM is aborted too
            async for out in _client_errors_rejected(self._outputs(request, settings, adapter, final_only=True)):
                last = out
        return answer_of(last)

    def shutdown(self) -> None:
        self.engine.shutdown()
