"""Model URIs, loading, tiny models, chat templates and checkpoint conversion.

    >>> from medray.models import load_model
    >>> lm = load_model("s3://models/llava-med-v1.5")   # or a directory, or tiny://llava-mistral
    ...                                                   # doctest: +SKIP
    >>> lm.model, lm.processor, lm.family.name           # doctest: +SKIP

Owns: model URIs, families, loading rules, chat templates, input preparation (processing),
tiny models, LLaVA-format conversion. Must not import: medray.data, medray.infer, medray.train,
medray.serve.

Names are imported on first use (medray._lazy): families and templates load no torch.
"""

from medray._lazy import lazy_exports

__all__ = [
    "FAMILIES", "Family", "family_of", "get_family", "LoadedModel", "ModelLoadError",
    "default_device", "default_dtype", "load_model", "load_processor", "quantization_config",
    "render_chat", "resolve_model_uri", "TEMPLATES", "get_template", "build_tokenizer",
    "tiny_model_dir", "write_tiny_model",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".families": ["FAMILIES", "Family", "family_of", "get_family"],
    ".loading": ["LoadedModel", "ModelLoadError", "default_device", "default_dtype", "load_model", "load_processor",
                 "quantization_config", "render_chat", "resolve_model_uri"],
    ".templates": ["TEMPLATES", "get_template"],
    ".tiny": ["build_tokenizer", "tiny_model_dir", "write_tiny_model"],
})
