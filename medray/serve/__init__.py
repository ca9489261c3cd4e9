"""Ray Serve: an OpenAI-compatible REST endpoint over medray models.

    serve run medray.serve:build_app models='[{"name": "tiny", "uri": "tiny://llava-mistral"}]'

`build_app(args)` takes the application's `args` block (see ServeConfig).
"""

from .app import build_app
from .config import Autoscaling, JobsConfig, Limits, ModelSpec, ServeConfig

__all__ = ["build_app", "Autoscaling", "JobsConfig", "Limits", "ModelSpec", "ServeConfig"]
