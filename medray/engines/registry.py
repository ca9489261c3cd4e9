"""The engines by name, and the rules that pick one: `ENGINES`, `choose`, and which adapters
an engine can run (`adapter_problem`, with its one message, `adapter_refusal`).

An engine is one module (its batch engine, its serving engine) and one line here; the batch
pipeline, `medray infer`, jobs and the Serve replica read everything they need from its entry.
The entry names its classes by import path, so choosing and checking an engine loads neither
torch nor the engine.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from . import vllm_sizing

log = logging.getLogger(__name__)


def _nothing() -> dict:
    return {}


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Engine:
    """What the rest of medray knows of an engine."""

    name: str
    batch: str
    """`module:callable` that makes its BatchEngine: (model, adapter=None, adapters=None, options=None)."""
    serving: str
    """`module:class` of its ServingEngine: (spec, report)."""
    expands_images: bool
    """True: a prompt goes to it with each image's placeholder expanded to the image's tokens and
    the pixels processed (transformers' form); False: one placeholder and the prepared image,
    which the engine expands itself (vLLM's)."""
    runs_experts: bool = False
    """Whether it runs the visual-experts mode's GIT captioner."""
    loads_in_start: bool = False
    """True: a batch actor loads it in its constructor, on the actor's own thread (vLLM's
    engine is tested to start so); False: beside the actor's start (the hf load)."""
    options: str | None = None
    """The field of InferConfig and of a Serve ModelSpec that holds its sizing options."""
    lora_scope_problem: Callable[[dict], str | None] | None = None
    """What of a plain-LoRA adapter's config it cannot apply, beyond the rule every engine shares."""
    installed: Callable[[], bool] = _always
    install_hint: str = ""
    runtime_env: Callable[[], dict] = _nothing
    """What its actors' runtime_env needs (vLLM's own interpreter, MEDRAY_VLLM_PYTHON)."""
    check_options: Callable[[str, Any], None] | None = None
    """Refuse at start, in words, options the engine would refuse later in its own process."""
    ongoing_limit: Callable[[Any], int] = field(default=lambda spec: max(2 * spec.max_batch_size, 16))
    """A Serve replica's max_ongoing_requests when the spec sets none."""
    frees_loop: bool = False
    """True: its ServingEngine computes off the replica's event loop (vLLM: on a thread of its
    own and in its engine process), so the replica's loop stays free to serve HTTP and one
    replica can be the ingress too (medray.serve.app, "one replica"). hf's batch steps hold
    their loop."""

    def load_batch(self) -> Callable:
        return _import(self.batch)

    def serving_class(self) -> type:
        return _import(self.serving)

    def options_of(self, config) -> Any:
        """Its options from a config that carries them (InferConfig, ModelSpec), or None."""
        return getattr(config, self.options) if self.options else None

    def check_options_of(self, model: str, config) -> None:
        """`check_options` on the options `config` carries, where the engine has such a check."""
        if self.check_options:
            self.check_options(model, self.options_of(config))


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


ENGINES: dict[str, Engine] = {
    "hf": Engine("hf", batch="medray.engines.hf:load_engine", serving="medray.engines.hf_serving:HFServingEngine",
                 expands_images=True, runs_experts=True),
    "vllm": Engine("vllm", batch="medray.engines.vllm:load_vllm_engine",
                   serving="medray.engines.vllm:AsyncVLLMEngine", expands_images=False, loads_in_start=True,
                   options="vllm", lora_scope_problem=vllm_sizing.lora_scope_problem,
                   installed=vllm_sizing.vllm_available, install_hint=vllm_sizing.INSTALL_HINT,
                   runtime_env=vllm_sizing.actor_runtime_env, check_options=vllm_sizing.check_options_for,
                   ongoing_limit=lambda spec: spec.vllm.max_num_seqs, frees_loop=True),
}
EngineName = Literal[tuple(ENGINES)]  # type: ignore[valid-type]
"""`hf`: medray's engine over transformers' generate: the embedded default, and what runs what
vLLM cannot (the GIT captioner of the visual-experts mode, adapters that train more than LoRA
on the LLM's linear layers). `vllm`: vLLM, for GPU deployments."""
FALLBACK = "hf"
"""The engine that runs what another cannot (it runs every model medray loads)."""


def adapter_problem(uri: str, engine: str) -> str | None:
    """Why `engine` cannot run this PEFT adapter beside the base model and other adapters (in
    one generate call, or one engine step), or None when it can. The rule every engine shares:
    plain LoRA only (PEFT batches mixed adapters only for LoRA layers; vLLM's LoRA loads LoRA on
    the LLM's linear layers only), so an adapter that trains a module in full beside it
    (`modules_to_save`: the projector in LLaVA's and BabyDoctor's LoRA recipes) or puts LoRA on
    raw parameters (`target_parameters`: BiMediX's fused MoE experts) is refused; then the
    engine's own scope (vLLM: not on the vision tower or the projector)."""
    from medray.models.loading import ModelLoadError, adapter_extras, read_adapter_config

    try:
        config = read_adapter_config(uri)
    except ModelLoadError as e:
        return str(e)
    extras = adapter_extras(config)
    if extras:
        return extras
    scope = ENGINES[engine].lora_scope_problem
    return scope(config) if scope else None


def adapter_refusal(problems: list[tuple[str, str, str]], model: str, engine: str, alone: str) -> ValueError:
    """The one message for adapters an engine cannot run: `problems` as (name, uri, why);
    `alone` says how the caller can still run one (a run of its own, a merged model)."""
    listed = "; ".join(f"adapter {name!r} ({uri}) {why}" for name, uri, why in problems)
    return ValueError(
        f"{listed}: these cannot run on engine {engine} with model {model!r} beside the base model and other "
        f"adapters, which share each generate call (LoRA on the LLM's linear layers only). {alone}Use the "
        "stage's merged export instead (set lora.merge: true; `medray train` writes the merged model in the stage "
        "directory, beside adapter/) as a model of its own, or train the adapter with those modules frozen")


def check_adapters(adapters: dict[str, str], model: str, engine: str, alone: str = "") -> None:
    """Refuse, at start, adapters `engine` cannot run beside each other (adapter_problem)."""
    problems = [(name, uri, why) for name, uri in adapters.items() if (why := adapter_problem(uri, engine))]
    if problems:
        raise adapter_refusal(problems, model, engine, alone)


def choose(requested: str, *, model: str, adapter: str | None = None, experts: bool = False,
           adapters: dict[str, str] | None = None) -> tuple[str, str]:
    """The engine a run gets, and why when it is not the one asked for: what the asked-for
    engine cannot run (the experts' captioner, an adapter: adapter_problem) goes to FALLBACK,
    by name, with a warning. An engine that is not installed is an error at start, never a
    silent fallback."""
    entry = ENGINES[requested]
    if requested == FALLBACK:
        return requested, ""
    reason = ""
    if experts and not entry.runs_experts:
        reason = f"the visual-experts mode runs a GIT captioner, which {requested} does not run"
    else:
        for uri in [*([adapter] if adapter else []), *(adapters or {}).values()]:
            problem = adapter_problem(uri, requested)
            if problem:
                reason = f"adapter {uri} {problem}, which {requested} cannot apply"
                break
    if reason:
        log.warning("engine %s asked for %s, but %s: using engine %s for it", requested, model, reason, FALLBACK)
        return FALLBACK, reason
    if not entry.installed():
        raise RuntimeError(f"engine {requested} asked for {model}, but it is not installed here: "
                           f"{entry.install_hint or 'install it'}, or use engine {FALLBACK}")
    return requested, ""
