"""The CPU half of generation, the same for every engine: a request's messages rendered by the
model's chat template and tokenized, its images prepared by the model's image rule
(medray.models.processing). The batch pipeline runs it in CPU tasks and ships only ids and
pixels to the engine's actors; a Serve replica runs it before its engine.
"""

from __future__ import annotations

from medray.models import render_chat
from medray.models.processing import encode_prompt

from .types import Encoded, Request, RequestRejected


def encode_request(processor, request: Request, *, expand: bool = True) -> Encoded:
    """Render the chat template and run the processor: the CPU half of generation.

    Separate from generation so a pipeline can run it on CPU workers and ship only ids
    and pixels to the GPU actors. The model's image rule and prompt tokenization apply
    (medray.models.processing), for both engines: `expand=False` is vLLM's form (see
    `encode_prompt`).
    """
    try:
        prompt = render_chat(processor, request.messages, add_generation_prompt=True)
        enc = encode_prompt(processor, prompt, request.images, expand=expand)
    except RequestRejected:
        raise
    except Exception as e:  # a template's raise_exception, an image the processor refuses, ...
        raise RequestRejected(str(e) or type(e).__name__) from e
    return Encoded(enc.input_ids, enc.pixel_values, enc.images, enc.image_kwargs)
