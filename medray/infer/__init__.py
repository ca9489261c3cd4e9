"""Generation: the engine shared by batch inference, serving and the demo."""

from .engine import Answer, Encoded, GenerationEngine, GenerationSettings, Request, encode_request

__all__ = ["Answer", "Encoded", "GenerationEngine", "GenerationSettings", "Request", "encode_request"]
