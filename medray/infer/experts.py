"""Visual-experts mode (Visual Med-Alpaca's design): route the image to an expert that turns
it into text, then let a text LLM answer with that text in its prompt.

The router is deliberately small and inspectable: two image statistics and two thresholds.
- `white_fraction`: share of near-white pixels. Charts and plots sit on white paper; a
  radiograph or a slide almost never does.
- `saturation`: mean spread between the RGB channels (0 for grey). Radiology (X-ray, CT,
  MR) is grey; photographs, endoscopy and pathology stains are colourful.
An image is a `plot` if white_fraction >= plot_min_white, else `radiology` if
saturation <= radiology_max_saturation, else `other`. Tune the thresholds in ExpertsConfig.

The whole mode lives here; the pipeline's stages call two seams:
- preprocessing (CPU): `encode_for_expert` routes an image and encodes it for its expert;
- generation (actor): `Experts` runs the experts, then turns each row's question and expert
  text into the request the LLM answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
from pydantic import Field

from medray.config import StrictModel
from medray.data import user_message

from .prompts import messages_for
from medray.engines.types import Encoded, GenerationSettings, Request

if TYPE_CHECKING:  # the engine loads torch; ExpertsConfig is read by flag parsers too
    from medray.engines.hf import GenerationEngine

ImageType = Literal["radiology", "plot", "other"]


class ExpertsConfig(StrictModel):
    """Visual-experts mode: which expert reads which image type, and the router's thresholds."""

    radiology: str | None = "tiny://git"
    """Image-to-text model URI for radiology images (a GIT captioner)."""
    plot: str | None = None
    """Image-to-text model URI for plots (the plot-to-table slot, DePlot in Visual Med-Alpaca);
    None leaves plots without expert text."""
    plot_min_white: float = Field(0.5, ge=0, le=1)
    """Share of pixels brighter than 240 (all channels) from which an image is a plot."""
    radiology_max_saturation: float = Field(12.0, ge=0, le=255)
    """Largest mean channel spread (0..255) that still counts as a grey radiology image."""
    max_expert_tokens: int = Field(32, ge=1, le=512)
    """Tokens the expert may write."""

    def expert_for(self, kind: str) -> str | None:
        return {"radiology": self.radiology, "plot": self.plot}.get(kind)


def image_stats(image) -> tuple[float, float]:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    white = float(np.mean(np.all(arr > 240, axis=-1)))
    saturation = float(np.mean(arr.max(axis=-1) - arr.min(axis=-1)))
    return white, saturation


def route(image, cfg: ExpertsConfig) -> ImageType:
    white, saturation = image_stats(image)
    if white >= cfg.plot_min_white:
        return "plot"
    if saturation <= cfg.radiology_max_saturation:
        return "radiology"
    return "other"


def llm_prompt(question: str, expert_text: str, image_type: str) -> str:
    """The text LLM's instruction: the expert's reading of the image, then the question."""
    if not expert_text:
        return question
    what = {"radiology": "radiology image", "plot": "plot"}.get(image_type, "image")
    return f"Context: the {what} shows: {expert_text}\n\nQuestion: {question}"


DEFAULT_QUESTION = "Describe the findings."


def encode_for_expert(image, cfg: ExpertsConfig, processor_for: Callable) -> tuple[str, Encoded | None]:
    """Preprocessing: the image's type, and the expert's encoded caption request (None when no
    expert reads that type: the LLM then answers from the question alone).
    `processor_for(uri)` returns (processor, family), cached by the caller."""
    kind = route(image, cfg)
    expert = cfg.expert_for(kind)
    if not expert:
        return kind, None
    from medray.engines.encoding import encode_request

    processor, family = processor_for(expert)
    return kind, encode_request(processor, Request(messages_for("caption", family.kind, "", True), [image]))


class Experts:
    """Generation: one engine per configured expert, and the LLM's requests built from their text."""

    def __init__(self, cfg: ExpertsConfig, engine_for: Callable[[str], GenerationEngine]):
        self.cfg = cfg
        self.engines = {kind: engine_for(uri) for kind in ("radiology", "plot") if (uri := cfg.expert_for(kind))}
        self.settings = GenerationSettings(max_new_tokens=cfg.max_expert_tokens)

    def read(self, kinds: Sequence[str], encoded: Callable[[int], Encoded], rows: Sequence[int],
             batch_size: int) -> dict[int, str]:
        """Each row's expert text (rows of a type no expert reads are left out)."""
        texts: dict[int, str] = {}
        for kind, engine in self.engines.items():
            mine = [i for i in rows if kinds[i] == kind]
            for start in range(0, len(mine), batch_size):
                chunk = mine[start: start + batch_size]
                for i, answer in zip(chunk, engine.generate_encoded([encoded(i) for i in chunk], self.settings)):
                    texts[i] = answer.text
        return texts

    @staticmethod
    def llm_request(question: str, expert_text: str, kind: str) -> Request:
        return Request([user_message(llm_prompt(question or DEFAULT_QUESTION, expert_text, kind))])
