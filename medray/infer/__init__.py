"""Generation: the engine shared by batch inference, serving and the demo."""

from .engine import Answer, GenerationEngine, GenerationSettings, Request

__all__ = ["Answer", "GenerationEngine", "GenerationSettings", "Request"]
