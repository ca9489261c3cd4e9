"""Prompt + images -> model inputs, the way the model was trained to see them.

Every path that prepares inputs (batch inference, serving, `medray ask`, the training
collator) comes through `encode_prompt`, so a model is fed one way everywhere. Two things
vary by model and are read off its directory:

- **The image rule.** LLaVA v1.5 models (LLaVA-Med v1.5) say `image_aspect_ratio: "pad"`:
  a non-square image is pasted on a square canvas of the processor's mean colour before
  the CLIP processor resizes and centre-crops it, so nothing at the edges is cut away.
  Converted directories carry that as `do_pad` in the processor config (transformers'
  LlavaImageProcessor, which vLLM reads too); a plain CLIP processor crops.
  `medray_config.json` may override it (`image_aspect_ratio: pad|crop`), e.g. to pad scans
  for a model trained with crop. Padding is done here, not by the HF processor, because
  LLaVA pads a greyscale (mode L) image with the mean grey (114), where transformers
  converts it to RGB first and pads with (122, 116, 104).
- **How the prompt is tokenized** (`prompt_tokenization` in `medray_config.json`):
  - `template` (default): the rendered chat template, BOS included, tokenized whole.
  - `llava`: LLaVA's `tokenizer_image_token` (LLaVA-Med v1.5): the text on each side of
    `<image>` is tokenized on its own, with the tokenizer's BOS, which is kept once. A
    SentencePiece tokenizer then starts each piece with a word boundary, which tokenizing
    the whole string does not do (`▁[INST]` against `[` after `<s>` when `legacy` is off).
  - `llava_v1`: LLaVA-Med v1's `model_vqa_med.py`: the whole prompt with the tokenizer's BOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from medray.config import StrictModel

OPTIONS_FILE = "medray_config.json"
ImageRule = Literal["pad", "crop"]


class ModelOptions(StrictModel):
    """medray's own settings for a model directory (`medray_config.json`)."""

    image_aspect_ratio: ImageRule | None = Field(
        None, description="pad: paste non-square images on a mean-colour square before the processor; "
                          "crop: the processor's resize and centre crop. Unset: the processor's own rule.")
    prompt_tokenization: Literal["template", "llava", "llava_v1"] = Field(
        "template", description="how a rendered prompt becomes ids (see medray.models.processing)")

    @classmethod
    def load(cls, path: Path) -> "ModelOptions":
        f = Path(path) / OPTIONS_FILE
        if not f.is_file():
            return cls()
        try:
            return cls.model_validate_json(f.read_text())
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from e

    def save(self, path: Path) -> None:
        data = self.model_dump(exclude_defaults=True)
        if data:
            (Path(path) / OPTIONS_FILE).write_text(json.dumps(data, indent=2) + "\n")


def attach_options(processor, options: ModelOptions):
    """Keep a model's options with its processor (or tokenizer), where every encoder looks."""
    processor.medray_options = options
    return processor


def options_of(processor) -> ModelOptions:
    return getattr(processor, "medray_options", None) or ModelOptions()


def save_processor(processor, out: str | Path) -> None:
    """`save_pretrained` plus what it leaves out, so a saved model is fed as its source was:
    medray's options, and a Llama tokenizer's `legacy` flag. transformers 5 does not write
    that flag, and rebuilds the tokenizer's pre-tokenizer from it on load, so a legacy
    tokenizer would come back non-legacy and split text after special tokens differently."""
    processor.save_pretrained(out)
    options_of(processor).save(Path(out))
    legacy = getattr(_tokenizer(processor), "legacy", None)
    config_file = Path(out) / "tokenizer_config.json"
    if isinstance(legacy, bool) and config_file.is_file():
        config = json.loads(config_file.read_text())
        config["legacy"] = legacy
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


# ------------------------------------------------------------------------------ images
def image_rule(processor) -> ImageRule:
    rule = options_of(processor).image_aspect_ratio
    if rule:
        return rule
    return "pad" if getattr(getattr(processor, "image_processor", None), "do_pad", False) else "crop"


def expand_to_square(image, mean: list[float]):
    """LLaVA's expand2square: the image centred on a square of the mean colour (the mean grey
    for a greyscale image). LLaVA-Med v1.5's copy offsets it by (d // 2) or (d // 2 + 1) at
    random; the centre (d // 2) is upstream LLaVA's and transformers' choice."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    color = int(255 * sum(mean) / len(mean)) if image.mode == "L" else tuple(int(x * 255) for x in mean)
    side = max(w, h)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def prepare_images(processor, images: list) -> tuple[list, dict]:
    """Images after the model's image rule, and the keyword arguments its image processor
    then needs: what any engine's image processor is given (vLLM runs its own)."""
    image_processor = processor.image_processor
    kwargs = {}
    if image_rule(processor) == "pad":
        images = [expand_to_square(img, list(image_processor.image_mean)) for img in images]
    elif getattr(image_processor, "do_pad", False):
        kwargs["do_pad"] = False  # a crop override on a padding processor
    return images, kwargs


def pixel_values(processor, images: list) -> np.ndarray:
    """The processor's pixel values for images prepared by the model's image rule."""
    images, kwargs = prepare_images(processor, images)
    return np.asarray(processor.image_processor(images, return_tensors="np", **kwargs)["pixel_values"],
                      dtype=np.float32)


# ------------------------------------------------------------------------------ text
def _image_token(processor) -> str | None:
    return getattr(processor, "image_token", None) if hasattr(processor, "image_processor") else None


def prompt_ids(processor, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a rendered prompt and each token's (start, end) characters in `text`, with
    every image placeholder as one token."""
    tok = _tokenizer(processor)
    mode = options_of(processor).prompt_tokenization
    if mode == "template":
        return _tokenize(tok, text, 0, special=False)
    start = len(tok.bos_token) if tok.bos_token and text.startswith(tok.bos_token) else 0
    if mode == "llava_v1":
        return _tokenize(tok, text[start:], start, special=True)
    image_token = _image_token(processor)
    pieces = text[start:].split(image_token) if image_token else [text[start:]]
    chunks, pos = [], start
    for piece in pieces:
        chunks.append((pos, *_tokenize(tok, piece, pos, special=True)))
        pos += len(piece) + len(image_token or "")
    # tokenizer_image_token: one BOS if the first piece starts with it, stripped from each piece.
    first_ids = chunks[0][1]
    skip = 1 if first_ids and first_ids[0] == tok.bos_token_id else 0
    ids, offsets = ([tok.bos_token_id], [(start, start)]) if skip else ([], [])
    image_id = tok.convert_tokens_to_ids(image_token) if image_token else None
    for n, (piece_start, chunk_ids, chunk_offsets) in enumerate(chunks):
        if n:
            ids.append(image_id)
            offsets.append((piece_start - len(image_token), piece_start))
        ids += chunk_ids[skip:]
        offsets += chunk_offsets[skip:]
    return ids, offsets


def _tokenize(tok, text: str, shift: int, *, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(a + shift, b + shift) for a, b in enc["offset_mapping"]]


# ------------------------------------------------------------------------------ both
@dataclass
class EncodedPrompt:
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    """Characters of the rendered prompt each id stands for (image tokens: the placeholder's)."""
    pixel_values: np.ndarray | None = None
    images: list | None = None
    """Unexpanded prompts only: the images after the image rule (uint8 RGB arrays)."""
    image_kwargs: dict | None = None
    """Unexpanded prompts only: what the image processor must be called with."""


def image_tokens_per_image(processor, pixels: np.ndarray) -> int:
    """How many image tokens stand for one image (LlavaProcessor's count)."""
    height, width = pixels.shape[-2:]
    n = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def encode_prompt(processor, text: str, images: list | None = None, *, expand: bool = True) -> EncodedPrompt:
    """Ids (image placeholders expanded to the image's token count) and pixel values. With
    `expand=False`: ids with one placeholder per image and the images after the image rule,
    for an engine that expands placeholders and runs the image processor itself (vLLM: given
    expanded ids, it expands them again)."""
    ids, offsets = prompt_ids(processor, text)
    image_token = _image_token(processor)
    if image_token is not None:
        # One placeholder per image. A message's text that spells the placeholder out would add
        # one: the model would then look for an image that is not there, and fail the whole
        # batch it runs in (or, on vLLM, be refused), where this fails the request alone.
        count = ids.count(_tokenizer(processor).convert_tokens_to_ids(image_token))
        if count != len(images or ()):
            raise ValueError(f"the prompt has {count} image placeholder(s) ({image_token!r}) for {len(images or ())} "
                             f"image(s): remove {image_token!r} from the message text, and send each image as an "
                             "image_url part")
    if not images:
        return EncodedPrompt(ids, offsets)
    if not hasattr(processor, "image_processor"):
        raise ValueError("this model takes text only; remove the image")
    if not expand:
        prepared, kwargs = prepare_images(processor, images)
        return EncodedPrompt(ids, offsets, images=[np.asarray(img.convert("RGB"), dtype=np.uint8) for img in prepared],
                             image_kwargs=kwargs)
    pixels = pixel_values(processor, images)
    if image_token is None:  # GIT-style: the image enters through pixel_values alone
        return EncodedPrompt(ids, offsets, pixels)
    image_id = _tokenizer(processor).convert_tokens_to_ids(image_token)
    per_image = image_tokens_per_image(processor, pixels)
    out_ids, out_offsets = [], []
    for tok_id, span in zip(ids, offsets):
        reps = per_image if tok_id == image_id else 1
        out_ids += [tok_id] * reps
        out_offsets += [span] * reps
    return EncodedPrompt(out_ids, out_offsets, pixels)


def image_processor_class(name: str):
    """transformers' image processor `name` (CLIPImageProcessor, LlavaImageProcessor) in the
    backend this environment has: torchvision's where it is installed, else the PIL one. Asked
    for by the plain name without torchvision, transformers falls back to the PIL class itself,
    warning each process that does ("CLIPImageProcessor requires torchvision"). medray's CPU
    environment has no torchvision on purpose (PyPI's is built against CUDA torch); what it
    saves names the plain class either way, which vLLM and transformers read."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        name += "Pil"
    return getattr(transformers, name)
