"""What the engines take and give: requests, settings, answers and encoded rows, plus the
generation limits. Torch-free, so that whatever only builds or checks these (the Serve
ingress, config and flag parsers, the OpenAI schema) does not load torch: the engines
(hf.py, vllm.py) import them from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The generation limits, defined once: GenerationSettings' bounds, and the serving limits
# (a server's max_tokens may not exceed them).
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


class GenerationFields(BaseModel):
    """The generation settings' fields, for the models that carry them beside their own
    (InferConfig); GenerationSettings is what the engines take."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    """Upper bound on generated tokens per answer."""
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE)
    """0 = greedy, deterministic; above 0 samples."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass, used only when sampling."""
    stop: tuple[str, ...] = ()
    """Strings that end an answer (repeatable); the answer is cut before the first one."""
    seed: int | None = None
    """Seed for sampling, for reproducible samples."""
    # vLLM's sampling extensions to OpenAI's API, under vLLM's names, so that what a vLLM user
    # sends means the same here. Each one's default leaves generation as it was before it
    # existed: an output's record from before a setting existed resumes (pipeline.check_output).
    top_k: int = Field(0, ge=0)
    """Sample among the k likeliest tokens only; 0 = no limit. Used only when sampling."""
    min_p: float = Field(0.0, ge=0, le=1)
    """Drop tokens less likely than min_p times the likeliest one; 0 = off. Used only when sampling."""
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    """Above 1 makes tokens already in the prompt or answer less likely (greedy too); 1 = off."""
    min_tokens: int = Field(0, ge=0, le=MAX_NEW_TOKENS)
    """End-of-sequence is held back until this many tokens are generated (stop strings still end it)."""
    ignore_eos: bool = False
    """Generate on past end-of-sequence, up to max_new_tokens (or a stop string): benchmarks' fixed lengths."""

    @model_validator(mode="after")
    def _min_within_max(self):
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_new_tokens ({self.max_new_tokens})")
        return self

    @property
    def settings(self) -> GenerationSettings:
        """These fields' values as the engines take them."""
        if type(self) is GenerationSettings:
            return self
        return GenerationSettings(**{name: getattr(self, name) for name in GENERATION_FIELDS})


class GenerationSettings(GenerationFields):
    """How an answer is generated: every generation setting, its default and its bounds,
    declared once (GenerationFields). The batch options (InferConfig) and so `medray infer`'s flags, a job's
    request, the OpenAI chat request (`serve.openai_api`) and the settings a rerun must match
    (`pipeline.ANSWER_FIELDS`) take their fields from these; each engine reads them through
    the one method that speaks its API (`transformers_kwargs`, `vllm_kwargs`). A new setting
    is a field here and a line in each of those methods.

    Frozen: equal settings are equal, hashable objects, which is how a serving replica groups
    requests into generate calls."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def transformers_kwargs(self) -> dict:
        """The arguments of transformers' `generate` (the seed is torch's, set by the engine;
        stop strings need its tokenizer). A setting at its default is left out, so what the
        model's generation_config.json says applies, as it did before the setting existed."""
        kwargs: dict = dict(max_new_tokens=self.max_new_tokens)
        if self.ignore_eos or self.min_tokens:  # ignore_eos as vLLM means it: no end-of-sequence at all
            kwargs["min_new_tokens"] = self.max_new_tokens if self.ignore_eos else self.min_tokens
        if self.repetition_penalty != 1:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if not self.sampled:
            # None, not absent: a model's generation_config.json may set them, and greedy ignores them.
            return dict(kwargs, do_sample=False, temperature=None, top_p=None, top_k=None)
        kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        if self.top_k:
            kwargs["top_k"] = self.top_k
        if self.min_p:
            kwargs["min_p"] = self.min_p
        return kwargs

    def vllm_kwargs(self) -> dict:
        """The arguments of vLLM's SamplingParams (stop strings merged with the model's by the engine)."""
        return dict(max_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_p=self.top_p if self.sampled else 1.0, seed=self.seed if self.sampled else None,
                    min_p=self.min_p if self.sampled else 0.0, repetition_penalty=self.repetition_penalty,
                    min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                    # Passed only when set: vLLM's "off" was -1, and is 0 since.
                    **({"top_k": self.top_k} if self.sampled and self.top_k else {}))


GENERATION_FIELDS: tuple[str, ...] = tuple(GenerationFields.model_fields)
"""The names of the generation settings, in declaration order."""


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


_UNSETTLED_END = re.compile(r"[\s\ufffd]+$")
_SPACE_END = re.compile(r"\s+$")


def new_text(text: str, sent: str, hold: int = 0, whole_chars: bool = False) -> str:
    """What a streamed answer's text so far adds to `sent` that is certain, both engines' rule:
    not trailing space (answers are stripped; the space is sent once text follows it), not a
    trailing U+FFFD (half a multi-byte character, which the next token may complete; one
    inside the text is final: a random-weight model emits invalid bytes, and holding back
    everything after one held a whole answer back) unless the text grows by whole characters
    only (`whole_chars`: vLLM's detokenizer holds half characters back itself), not the last
    `hold` characters (a stop string may be starting). '' when nothing new is certain."""
    safe = (_SPACE_END if whole_chars else _UNSETTLED_END).sub("", text)
    if hold:
        safe = safe[: max(len(sent), len(safe) - hold)]
    return safe[len(sent):] if len(safe) > len(sent) and safe.startswith(sent) else ""


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
