"""One question to one model, optionally about one image: what `medray ask` does."""

from __future__ import annotations

from medray import storage
from medray.data import load_image
from medray.models import load_model

from .engine import Answer, GenerationEngine, GenerationSettings, Request


def ask(model: str, question: str, *, image: str | None = None, adapter: str | None = None,
        settings: GenerationSettings = GenerationSettings(), trust_remote_code: bool = False) -> Answer:
    """Load `model` (a URI), read `image` (a path or s3:// URI; DICOM too) and answer `question`.

    >>> ask("tiny://llava-mistral", "Is there an opacity?", image="scan.dcm").text  # doctest: +SKIP
    """
    lm = load_model(model, adapter=adapter, trust_remote_code=trust_remote_code)
    content: list[dict] = [{"type": "image"}] if image else []
    content.append({"type": "text", "text": question})
    images = [load_image(storage.read_bytes(image), image)] if image else []
    return GenerationEngine(lm).generate([Request([{"role": "user", "content": content}], images)], settings)[0]
