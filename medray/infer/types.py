"""What the engines take and give: requests, settings, answers and encoded rows, plus the
generation limits. Torch-free, so that whatever only builds or checks these (the Serve
ingress, config and flag parsers, the OpenAI schema) does not load torch: the engines
(engine.py, vllm_engine.py) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The generation limits, defined once: batch options, job requests and the chat API check
# their own fields against these.
MAX_NEW_TOKENS = 4096
MAX_TEMPERATURE = 2.0


class RequestRejected(ValueError):
    """A request that cannot be answered as it is: its messages do not render into a prompt for
    this model, or the prompt does not fit it. The caller's to fix (the Serve ingress answers
    400, batch inference fails the row). Anything else an engine raises is the server's fault,
    never blamed on the request. Raised where the request is encoded (`encode_request`) and
    where an engine refuses a prompt (vLLM's client errors)."""


DEFAULT_ADAPTER = "default"
"""The name of a run's default adapter (`adapter`) among its named ones: PEFT's own default
name, the one `PeftModel.from_pretrained` gives it."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    """Upper bound on generated tokens per answer."""
    temperature: float = 0.0
    """0 means greedy (deterministic); > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass, used only when sampling."""
    stop: tuple[str, ...] = ()
    """Strings that end an answer; the answer is cut before the first one."""
    seed: int | None = None
    """Seed for sampling, for reproducible samples."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}]")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class Request:
    messages: list[dict]
    images: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length'."""


@dataclass
class Encoded:
    """One request after preprocessing: what a generation worker needs, nothing more."""

    input_ids: list[int]
    pixel_values: Any = None
    """numpy float32 (n_images, 3, H, W), or None for text-only requests."""
    images: Any = None
    """For vLLM instead of pixel_values (ids then hold one placeholder per image): the images
    after the model's image rule, uint8 RGB arrays."""
    image_kwargs: dict | None = None
