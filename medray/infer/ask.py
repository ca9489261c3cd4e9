"""One question to one model, optionally about one image: what `medray ask` does."""

from __future__ import annotations

from medray import storage
from medray.data import load_image, user_message
from medray.models import load_model

from medray.engines.hf import GenerationEngine
from medray.engines.types import Answer, GenerationSettings, Request


def ask(model: str, question: str, *, image: str | None = None, adapter: str | None = None,
        settings: GenerationSettings = GenerationSettings(), trust_remote_code: bool = False) -> Answer:
    """Load `model` (a URI), read `image` (a path or s3:// URI; DICOM too) and answer `question`.

    >>> ask("tiny://llava-mistral", "Is there an opacity?", image="scan.dcm").text  # doctest: +SKIP
    """
    lm = load_model(model, adapter=adapter, trust_remote_code=trust_remote_code)
    images = [load_image(storage.read_bytes(image), image)] if image else []
    return GenerationEngine(lm).generate([Request([user_message(question, bool(image))], images)], settings)[0]
