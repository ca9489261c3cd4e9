"""Visual-experts mode (Visual Med-Alpaca's design): route the image to an expert that turns
it into text, then let a text LLM answer with that text in its prompt.

The router is deliberately small and inspectable: two image statistics and two thresholds.
- `white_fraction`: share of near-white pixels. Charts and plots sit on white paper; a
  radiograph or a slide almost never does.
- `saturation`: mean spread between the RGB channels (0 for grey). Radiology (X-ray, CT,
  MR) is grey; photographs, endoscopy and pathology stains are colourful.
An image is a `plot` if white_fraction >= plot_min_white, else `radiology` if
saturation <= radiology_max_saturation, else `other`. Tune the thresholds in ExpertsConfig.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from medray.config import StrictModel

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
